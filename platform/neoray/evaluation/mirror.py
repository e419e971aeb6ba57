"""Evaluation datasets from a local mirror instead of the Hugging Face hub.

A mirror holds one jsonl file per (task, split): `<data_dir>/<task>/<split>.jsonl`, with the
rows of the dataset the task's lm-eval config names (before its `process_docs`). With a
mirror, every task lm-eval builds reads `json` files from there (its prompt, metrics and
filters stay those of its own config), so an air-gapped cluster evaluates without the hub.
A split the task needs that the mirror lacks fails at once, naming the task and the path.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from neoray.evaluation.lm_eval_private import Entry, Kind, TaskFactory, set_task_factory

log = logging.getLogger(__name__)

SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


class MissingDatasetError(FileNotFoundError):
    """A task's dataset split is not in the evaluation mirror."""


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    """Where the mirror keeps `split` of `task`'s dataset."""
    return Path(data_dir) / task / f"{split}.jsonl"


def needed_splits(config: dict[str, Any]) -> list[str]:
    """The dataset splits a task config reads (training, validation, test, few-shot)."""
    splits = [config.get(field) for field in SPLIT_FIELDS]
    fewshot = config.get("fewshot_config") or {}
    splits.append(fewshot.get("split") if isinstance(fewshot, dict) else None)
    return sorted({split for split in splits if split})


class MirroredTaskFactory(TaskFactory):
    """lm-eval's task factory, with each task's dataset redirected to the mirror."""

    def __init__(self, data_dir: Path, *, meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta=meta)
        self.data_dir = data_dir

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None):
        config = super()._load_full_config(entry, overrides)
        if entry.kind in (Kind.TASK, Kind.PY_TASK) and "task" in config:
            config.update(mirrored_dataset(config, self.data_dir))
        return config


def mirrored_dataset(config: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """The dataset fields of task `config` that read its splits from the mirror."""
    task = config["task"]
    files = {split: split_path(data_dir, task, split) for split in needed_splits(config)}
    missing = [f"{split} ({path})" for split, path in files.items() if not path.is_file()]
    if not files or missing:
        raise MissingDatasetError(
            f"task {task}: the evaluation mirror {data_dir} has no "
            f"{', '.join(missing) or 'splits'}; fill it with `python jobs/mirror_eval_data.py "
            f"tasks=[{task}] output={data_dir}` where the hub is reachable"
        )
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
    }


@functools.cache
def _indexed_task_manager() -> TaskManager:
    """Indexing the thousands of task configs lm-eval ships takes seconds: once per process."""
    return TaskManager()


def task_manager(data_dir: str | Path | None = None) -> TaskManager:
    """lm-eval's TaskManager; with `data_dir`, every task reads its data from that mirror."""
    manager = copy.copy(_indexed_task_manager())
    if data_dir is not None:
        set_task_factory(manager, MirroredTaskFactory(Path(data_dir), meta=manager.metadata))
    return manager


def fill_mirror(tasks: list[str], data_dir: str | Path) -> list[Path]:
    """Download `tasks` (names, groups or tags) from the hub and write their splits into the
    mirror at `data_dir`. Each file is written under a temporary name and renamed."""
    loaded = TaskManager().load(tasks)["tasks"]
    written = []
    for name, task in sorted(loaded.items()):
        for split in needed_splits(task.dump_config()):
            path = split_path(data_dir, name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".jsonl.partial")
            task.dataset[split].to_json(partial, lines=True, force_ascii=False)
            partial.rename(path)
            written.append(path)
            log.info("%s: %s -> %s", name, split, path)
    return written
