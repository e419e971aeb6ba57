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
from neoray.evaluation.lm_eval_private import Entry, Kind, TaskFactory, set_task_factory

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
    """A local copy of the S3 object `uri` in `cache_dir()`, named by its ETag and size
    (downloaded when not there yet: that exact version, to a temporary name, checked for its
    size, then renamed into place); None when there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    from neoray.storage import s3_client, s3_error

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as err:
        error = s3_error(uri, "read", err)
        if isinstance(error, FileNotFoundError):
            return None
        raise error from err
    etag, size = head["ETag"].strip('"'), head["ContentLength"]
    path = cache_dir() / f"{etag}-{size}{Path(key).suffix}"
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            try:  # the version the name was made from, or an error if it changed meanwhile
                body = client.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]
                shutil.copyfileobj(body, out, 1 << 20)
            except (BotoCoreError, ClientError) as err:
                raise s3_error(uri, "read", err) from err
        if os.path.getsize(partial) != size:
            raise OSError(f"{uri}: downloaded {os.path.getsize(partial)} of {size} bytes")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("%s -> %s", uri, path)
    return path


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


class MirroredTaskFactory(TaskFactory):
    """lm-eval's task factory, with each task's dataset redirected to the mirror."""

    def __init__(self, data_dir: str, *, meta: dict[str, Any] | None = None) -> None:
        super().__init__(meta=meta)
        self.data_dir = data_dir

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None):
        config = super()._load_full_config(entry, overrides)
        if entry.kind in (Kind.TASK, Kind.PY_TASK) and "task" in config:
            config.update(mirrored_dataset(config, self.data_dir))
        return config


def mirrored_dataset(config: dict[str, Any], data_dir: str) -> dict[str, Any]:
    """The dataset fields of task `config` that read its splits from the mirror."""
    task = config["task"]
    files = {split: local_split(data_dir, task, split) for split in needed_splits(config)}
    missing = [
        f"{split} ({split_uri(data_dir, task, split)})"
        for split, path in files.items()
        if path is None
    ]
    if not files or missing:
        raise MissingDatasetError(
            f"task {task}: the evaluation mirror {data_dir} has no "
            f"{', '.join(missing) or 'splits'}; fill it with `python jobs/mirror_eval_data.py "
            f"tasks=[{task}] output={data_dir}` where the hub is reachable"
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


def task_manager(data_dir: str | Path | None = None) -> TaskManager:
    """lm-eval's TaskManager; with `data_dir`, every task reads its data from that mirror."""
    manager = copy.copy(_indexed_task_manager())
    if data_dir is not None:
        set_task_factory(manager, MirroredTaskFactory(str(data_dir), meta=manager.metadata))
    return manager


def fill_mirror(tasks: list[str], data_dir: str | Path) -> list[str]:
    """Download `tasks` (names, groups or tags) from the hub and write their splits into the
    mirror at `data_dir` (a folder, or an s3:// prefix the files are uploaded to); returns
    where each file went. Each file is written under a temporary name and renamed (an S3 object
    appears once its upload is complete)."""
    loaded = TaskManager().load(tasks)["tasks"]
    written = []
    with tempfile.TemporaryDirectory(prefix="eval-mirror-") as staging:
        for name, task in sorted(loaded.items()):
            for split in needed_splits(task.dump_config()):
                path = split_path(staging if is_s3(str(data_dir)) else data_dir, name, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".jsonl.partial")
                task.dataset[split].to_json(partial, lines=True, force_ascii=False)
                partial.rename(path)
                written.append(publish_split(path, str(data_dir), name, split))
                log.info("%s: %s -> %s", name, split, written[-1])
    return written


def publish_split(path: Path, data_dir: str, task: str, split: str) -> str:
    """Put the local file `path` into the mirror `data_dir` as `split` of `task` (uploaded to
    an S3 mirror; already in place in a local one); returns its location."""
    uri = split_uri(data_dir, task, split)
    if is_s3(uri):
        from neoray.storage import s3_client, s3_error

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            s3_client().upload_file(str(path), bucket, key)
        except Exception as err:
            raise s3_error(uri, "write", err) from err
    return uri
