"""Perplexity on a run's own held-out documents, as a folder of lm-eval tasks.

A small model sits at chance on benchmarks such as MMLU for a long while; on the documents of
its own data that it never trains on, it shows every checkpoint's progress. `write_heldout_tasks`
takes the first documents of the validation split of each mixture component (the documents
in-loop validation, `val/loss`, cuts its samples from: the data's `split`), decodes them with
the run's tokenizer (end-of-document token dropped, each cut to its first `max_tokens` tokens)
into `<folder>/data/<component>.jsonl`, and writes one task per component,
`<name>_<component>`, tagged `<name>`: lm-eval's `loglikelihood_rolling` over the whole
document, scored as word and byte perplexity and bits per byte, as lm-eval's wikitext is.

The folder is a task folder like any other (`eval.task_dirs`, `neoray.evaluation.task_folders`):
evaluated by the same fan-out, mirrored and scheduled like the built-in tasks. Its digest
covers the documents, so the folders of two runs never share a mirror entry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from neoray.config import ConfigError
from neoray.data.config import DataConfig
from neoray.data.gpt_dataset import split_documents
from neoray.data.indexed import IndexedDataset
from neoray.data.mixture import SPLITS
from neoray.tokenizer.load import load_tokenizer

# lm-eval's metrics of loglikelihood_rolling tasks and their aggregations (as for wikitext)
METRICS = (
    ("word_perplexity", "weighted_perplexity"),
    ("byte_perplexity", "weighted_perplexity"),
    ("bits_per_byte", "bits_per_byte"),
)


@dataclass
class HeldoutConfig:
    """Which held-out documents make the tasks (see conf/heldout_task.yaml)."""

    output: str  # the task folder to write (replaced if it exists)
    name: str = "heldout"  # the tag; the tasks are <name>_<component>
    documents: int = 16  # the first documents of each component's validation split
    max_tokens: int = 1024  # each document cut to its first this many tokens
    components: list[str] = field(default_factory=list)  # empty: every component

    def __post_init__(self) -> None:
        for name in ("documents", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"heldout.{name} must be at least 1, got {getattr(self, name)}")
        if not self.name.isidentifier():
            raise ConfigError(f"heldout.name={self.name!r}: give a name like 'heldout'")


def task_config(name: str, component: str) -> str:
    """The lm-eval YAML of the task over `component`'s documents (data/<component>.jsonl)."""
    import yaml

    config = {
        "task": f"{name}_{component}",
        "tag": [name],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"data/{component}.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in METRICS
        ],
        "metadata": {"version": 1.0},
    }
    header = (
        f"# Perplexity on held-out documents of component {component}: neoray.evaluation.heldout\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def heldout_documents(
    data: DataConfig, component: str, count: int, max_tokens: int, eod: int
) -> list[list[int]]:
    """The first `count` documents of `component`'s validation split, as token lists (each
    without its end-of-document token `eod`, cut to `max_tokens`)."""
    dataset = IndexedDataset(data.components[component].prefix)
    validation = split_documents(len(dataset), data.split)[SPLITS.index("validation")]
    documents = []
    for index in validation[:count]:
        tokens = dataset.get(index)[: max_tokens + 1].tolist()
        if tokens and tokens[-1] == eod:
            tokens = tokens[:-1]
        if tokens:
            documents.append(tokens[:max_tokens])
    return documents


def write_heldout_tasks(data: DataConfig, cfg: HeldoutConfig) -> list[str]:
    """Write the task folder `cfg.output` (built beside it, then renamed into place: a folder
    that is there is complete); the names of its tasks."""
    components = cfg.components or list(data.components)
    unknown = [c for c in components if c not in data.components]
    if unknown:
        raise ConfigError(
            f"heldout.components: no component {', '.join(unknown)} in data.components "
            f"({', '.join(data.components)})"
        )
    tokenizer = load_tokenizer(data.tokenizer)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        (staging / "data").mkdir()
        names = []
        for component in components:
            docs = heldout_documents(
                data, component, cfg.documents, cfg.max_tokens, tokenizer.eod_id
            )
            if not docs:
                raise ConfigError(
                    f"data.components.{component}: no documents in the validation split "
                    f"(data.split={data.split!r}); give it a validation share"
                )
            rows = [{"text": tokenizer.decode(tokens)} for tokens in docs]
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (staging / "data" / f"{component}.jsonl").write_text(lines, encoding="utf-8")
            (staging / f"{cfg.name}_{component}.yaml").write_text(task_config(cfg.name, component))
            names.append(f"{cfg.name}_{component}")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
