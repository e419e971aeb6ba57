"""The `data` config section: which token files make the training mixture, and how to cut it."""

from __future__ import annotations

from collections.abc import Mapping
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
class PhaseConfig:
    """From training step `from_step` on, the mixture samples the named components with these
    weights (`components`: name -> weight; a component of `data.components` not named here
    gets weight 0 in this phase), as OLMo 2's mid-training anneal switches to another mix.

    Every step before `from_step` keeps the batches the earlier phases gave, and each component
    continues its own sample order where the earlier phases left it (its epochs keep counting).
    """

    from_step: int
    components: dict[str, float]


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
    `phases` changes the mixture at named steps (see PhaseConfig); `components`' own weights
    make the first phase, from step 0. Components first sampled in a later phase are declared
    in `components` with weight 0.
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
    phases: list[PhaseConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phases = [_phase(p, f"data.phases[{i}]") for i, p in enumerate(self.phases)]
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
        self._check_phases()

    def _check_phases(self) -> None:
        names = ", ".join(self.components)
        previous = 0
        for i, phase in enumerate(self.phases):
            where = f"data.phases[{i}]"
            if not isinstance(phase.from_step, int) or phase.from_step <= previous:
                raise ConfigError(
                    f"{where}.from_step={phase.from_step!r}: give a step after {previous} "
                    "(phases are listed in the order they start, after the first one: the "
                    "weights of data.components, from step 0)"
                )
            previous = phase.from_step
            unknown = sorted(set(phase.components) - set(self.components))
            if unknown:
                raise ConfigError(
                    f"{where}.components: {', '.join(unknown)} not in data.components ({names}); "
                    "declare a new component there (prefix, weight 0) and weight it here"
                )
            weights = phase.components.values()
            if any(not isinstance(w, int | float) or w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"{where}.components={phase.components!r}: give non-negative weights, "
                    "at least one positive"
                )

    def mixture_phases(self) -> list[tuple[int, dict[str, float]]]:
        """(first step, component -> weight) of each phase, the first from step 0 with the
        weights of `components`; every component is named in each (0: not sampled)."""
        first = {name: c.weight for name, c in self.components.items()}
        later = [
            (p.from_step, {name: float(p.components.get(name, 0.0)) for name in self.components})
            for p in self.phases
        ]
        return [(0, first), *later]


def _phase(value: Any, where: str) -> PhaseConfig:
    if isinstance(value, PhaseConfig):
        return value
    example = "{from_step: 800, components: {name: weight, ...}}"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}={value!r}: give a phase as {example}")
    phase = dataclass_from_config(PhaseConfig, value, where)
    if not isinstance(phase.components, Mapping):
        raise ConfigError(f"{where}.components={phase.components!r}: give a phase as {example}")
    return phase


def data_config(section: Any, where: str = "data") -> DataConfig:
    """A DataConfig from a Hydra `data` section, components included."""
    values = to_dict(section)
    components = values.get("components") or {}
    values["components"] = {
        name: dataclass_from_config(ComponentConfig, comp, f"{where}.components.{name}")
        for name, comp in to_dict(components).items()
    }
    return dataclass_from_config(DataConfig, values, where)
