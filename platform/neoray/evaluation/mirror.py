"""Evaluation datasets from a mirror (a local folder or an S3 prefix) instead of the Hugging
Face hub.

A mirror holds one jsonl file per (task, split): `<data_dir>/<task>/<split>.jsonl`, with the
rows of the dataset the task's lm-eval config names (before its `process_docs`). With a
mirror, every task lm-eval builds reads `json` files from there (its prompt, metrics and
filters stay those of its own config), so an air-gapped cluster evaluates without the hub.
A split the task needs that the mirror lacks fails at once, naming the task and the path.

A mirror in S3 (`s3://bucket/prefix`) serves nodes that share no disk: each process that
builds a task downloads the split files it needs into a local cache (NEORAY_EVAL_CACHE, by
default ~/.cache/neoray/eval-mirror) under a name made of the object's ETag and size, so a
file is fetched once per node and content, and a changed object is fetched again.

A suite's own task folders (`neoray.evaluation.task_folders`) are mirrored under
`<data_dir>/task_dirs/<content digest>/`: `files/` holds a copy of the folder,
`data/<task>/<split>.jsonl` the splits of its tasks, whether they came from the hub or from
files in the folder. A folder changed since it was mirrored finds no data there (another
digest) and fails at once, as a missing split does.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from neoray.corpus import is_s3
from neoray.evaluation.lm_eval_private import (
    Entry,
    Kind,
    TaskFactory,
    add_task_folders,
    set_task_factory,
)
from neoray.evaluation.task_folders import TaskFolder, folder_of, local_dataset, task_folder

log = logging.getLogger(__name__)

SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")
CACHE_VARIABLE = "NEORAY_EVAL_CACHE"


class MissingDatasetError(FileNotFoundError):
    """A task's dataset split is not in the evaluation mirror."""


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    """Where a local mirror keeps `split` of `task`'s dataset."""
    return Path(data_dir) / task / f"{split}.jsonl"


def split_uri(data_dir: str, task: str, split: str) -> str:
    """Where the mirror `data_dir` (a folder or an s3:// prefix) keeps `split` of `task`."""
    if is_s3(data_dir):
        return f"{data_dir.rstrip('/')}/{task}/{split}.jsonl"
    return str(split_path(data_dir, task, split))


def cache_dir() -> Path:
    """Where split files downloaded from S3 mirrors are kept on this node."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache/neoray/eval-mirror")


def cached_copy(uri: str) -> Path | None:
    """A local copy of the S3 object `uri` in `cache_dir()`, one per version
    (`neoray.storage.cached_object`); None when there is no such object."""
    from neoray.storage import cached_object

    try:
        return cached_object(uri, cache_dir())
    except FileNotFoundError:
        return None


def local_split(data_dir: str, task: str, split: str) -> Path | None:
    """The local file holding `split` of `task` from the mirror (downloaded from an S3 mirror
    into the cache); None when the mirror lacks it."""
    uri = split_uri(data_dir, task, split)
    if is_s3(uri):
        return cached_copy(uri)
    return Path(uri) if Path(uri).is_file() else None


def needed_splits(config: dict[str, Any]) -> list[str]:
    """The dataset splits a task config reads (training, validation, test, few-shot)."""
    splits = [config.get(field) for field in SPLIT_FIELDS]
    fewshot = config.get("fewshot_config") or {}
    splits.append(fewshot.get("split") if isinstance(fewshot, dict) else None)
    return sorted({split for split in splits if split})


def folder_mirror(data_dir: str, folder: TaskFolder) -> str:
    """Where the mirror `data_dir` keeps a task folder (its files and its tasks' splits)."""
    return f"{str(data_dir).rstrip('/')}/task_dirs/{folder.key}"


class SuiteTaskFactory(TaskFactory):
    """lm-eval's task factory, with the datasets of a suite's own task folders read relative
    to their YAML files and, with a mirror, every task's dataset read from the mirror."""

    def __init__(
        self,
        data_dir: str | None,
        folders: list[TaskFolder],
        *,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(meta=meta)
        self.data_dir = data_dir
        self.folders = folders

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None):
        config = super()._load_full_config(entry, overrides)
        if entry.kind not in (Kind.TASK, Kind.PY_TASK) or "task" not in config:
            return config
        folder = folder_of(entry.yaml_path, self.folders)
        if self.data_dir is not None:
            config.update(mirrored_dataset(config, self.data_dir, folder))
        elif folder is not None:
            config.update(local_dataset(config, entry.yaml_path))
        return config


def mirrored_dataset(
    config: dict[str, Any], data_dir: str, folder: TaskFolder | None = None
) -> dict[str, Any]:
    """The dataset fields of task `config` that read its splits from the mirror `data_dir`
    (from the entry of `folder`, for a task of a suite's own task folder)."""
    task = config["task"]
    splits_dir = data_dir if folder is None else f"{folder_mirror(data_dir, folder)}/data"
    files = {split: local_split(splits_dir, task, split) for split in needed_splits(config)}
    missing = [
        f"{split} ({split_uri(splits_dir, task, split)})"
        for split, path in files.items()
        if path is None
    ]
    if not files or missing:
        what, fill = data_dir, f"tasks=[{task}]"
        if folder is not None:
            what = f"{data_dir} (for {folder.path} as it is now, digest {folder.key})"
            fill = f"task_dirs=[{folder.path}]"
        raise MissingDatasetError(
            f"task {task}: the evaluation mirror {what} has no {', '.join(missing) or 'splits'}"
            f"; fill it with `python jobs/mirror_eval_data.py {fill} output={data_dir}` where "
            "the hub is reachable"
        )
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(path) for split, path in files.items()},
            # A task built here travels to Ray workers on other nodes: its rows in memory
            # pickle with it, where memory-mapped ones would be re-opened by this node's path.
            "keep_in_memory": True,
        },
    }


@functools.cache
def _indexed_task_manager() -> TaskManager:
    """Indexing the thousands of task configs lm-eval ships takes seconds: once per process."""
    return TaskManager()


def task_manager(
    data_dir: str | Path | None = None, task_dirs: list[str] | tuple[str, ...] = ()
) -> TaskManager:
    """lm-eval's TaskManager, with the tasks of the folders `task_dirs` (a suite's own,
    `neoray.evaluation.task_folders`) beside its built-in ones; with `data_dir`, every task
    reads its data from that mirror."""
    manager = copy.copy(_indexed_task_manager())
    folders = [task_folder(name) for name in task_dirs]
    if folders:
        add_task_folders(manager, [folder.path for folder in folders])
    if data_dir is not None or folders:
        data = None if data_dir is None else str(data_dir)
        set_task_factory(manager, SuiteTaskFactory(data, folders, meta=manager.metadata))
    return manager


def fill_mirror(
    tasks: list[str], data_dir: str | Path, task_dirs: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """Download `tasks` (names, groups or tags) from the hub and write their splits into the
    mirror at `data_dir` (a folder, or an s3:// prefix the files are uploaded to), and every
    task of each folder in `task_dirs` with a copy of the folder; returns where each file went.
    Each file is written under a temporary name and renamed (an S3 object appears once its
    upload is complete)."""
    data_dir = str(data_dir)
    written = write_splits(task_manager().load(tasks)["tasks"], data_dir) if tasks else []
    for name in task_dirs:
        folder = task_folder(name)
        manager = task_manager(task_dirs=[str(folder.path)])
        names = [
            task
            for task, entry in manager.task_index.items()
            if entry.kind in (Kind.TASK, Kind.PY_TASK) and folder.holds(entry.yaml_path)
        ]
        entry = folder_mirror(data_dir, folder)
        written += write_splits(manager.load(names)["tasks"], f"{entry}/data")
        for file in folder.files():
            relative = file.relative_to(folder.path).as_posix()
            written.append(publish_file(file, f"{entry}/files/{relative}"))
    return written


def write_splits(loaded: dict[str, Any], data_dir: str) -> list[str]:
    """Every split the tasks `loaded` (name -> lm-eval task) read, into the mirror
    `data_dir`; where each went."""
    written = []
    with tempfile.TemporaryDirectory(prefix="eval-mirror-") as staging:
        for name, task in sorted(loaded.items()):
            for split in needed_splits(task.dump_config()):
                path = split_path(staging, name, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                task.dataset[split].to_json(path, lines=True, force_ascii=False)
                written.append(publish_split(path, data_dir, name, split))
                log.info("%s: %s -> %s", name, split, written[-1])
    return written


def publish_split(path: Path, data_dir: str, task: str, split: str) -> str:
    """Put the local file `path` into the mirror `data_dir` as `split` of `task`."""
    return publish_file(path, split_uri(str(data_dir), task, split))


def publish_file(path: Path, uri: str) -> str:
    """Put the local file `path` at `uri` (uploaded to S3; copied under a temporary name and
    renamed into place in a folder); returns `uri`."""
    if is_s3(uri):
        from neoray.storage import s3_client, s3_error

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            s3_client().upload_file(str(path), bucket, key)
        except Exception as err:
            raise s3_error(uri, "write", err) from err
        return uri
    target = Path(uri)
    if target.resolve() != Path(path).resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, partial)
        os.replace(partial, target)
    return uri
