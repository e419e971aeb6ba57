"""The `data` config section: which token files make the training mixture, and how to cut it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neoray.config import ConfigError, dataclass_from_config, to_dict


@dataclass
class ComponentConfig:
    """One component of the mixture: an indexed dataset and its sampling weight.

    `input` optionally names the raw files that `jobs/preprocess.py data=...` turns into `prefix`.
    """

    prefix: str
    weight: float = 1.0
    input: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]


@dataclass
class DataConfig:
    """Mixture components, tokenizer and the split/sequence settings that fix the sample order.

    `root` is the folder the other paths are usually interpolated from (`${data.root}/code`).
    `cache_dir` is where the sample-order index files go (default: next to each component's
    data, as GPT-NeoX does; set it when the data folder is read-only).
    `demo_corpus` (optional) is a folder where the demo corpus from this Python installation is
    written before preprocessing; `tokenizer_training` (optional) holds train_tokenizer fields
    used to train `tokenizer` from the components' inputs when the file does not exist yet.
    `accept_changed_data` names the components whose token files may differ from those the
    checkpoint being resumed was trained on (a deliberate re-tokenization); any other change is
    refused, since training would silently continue on other data.
    """

    components: dict[str, ComponentConfig]
    tokenizer: str
    root: str | None = None
    split: str = "995,4,1"
    seq_len: int = 2048
    seed: int = 1234
    text_field: str = "text"
    cache_dir: str | None = None
    demo_corpus: str | None = None
    tokenizer_training: dict[str, Any] | None = field(default=None)
    accept_changed_data: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.components:
            raise ConfigError("data.components: give at least one component (prefix and weight)")
        if any(c.weight < 0 for c in self.components.values()):
            raise ConfigError("data.components.*.weight: weights must be non-negative")
        if sum(c.weight for c in self.components.values()) <= 0:
            raise ConfigError("data.components.*.weight: at least one weight must be positive")
        if self.seq_len < 1:
            raise ConfigError("data.seq_len must be at least 1")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed={self.seed}: give a whole number in [0, 2**32)")
        unknown = [name for name in self.accept_changed_data if name not in self.components]
        if isinstance(self.accept_changed_data, str) or unknown:
            raise ConfigError(
                f"data.accept_changed_data={self.accept_changed_data!r}: give a list of "
                f"component names ({', '.join(self.components)})"
            )


def data_config(section: Any, where: str = "data") -> DataConfig:
    """A DataConfig from a Hydra `data` section, components included."""
    values = to_dict(section)
    components = values.get("components") or {}
    values["components"] = {
        name: dataclass_from_config(ComponentConfig, comp, f"{where}.components.{name}")
        for name, comp in to_dict(components).items()
    }
    return dataclass_from_config(DataConfig, values, where)
