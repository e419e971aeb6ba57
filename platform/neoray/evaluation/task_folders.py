"""A suite's own lm-eval tasks: folders of task YAMLs, taken like lm-eval's built-in tasks.

A suite names folders in `task_dirs` (lm-eval's `include_path`); their tasks, groups and tags
join lm-eval's index, so `tasks:` names them as it names `mmlu`. A task's `data_files` may be
relative to its YAML file, so a folder carries its own data (`dataset_path: json`), and its rows
are held in memory, so a task built by the driver reaches Ray workers on any node.

A folder is identified by its content (`TaskFolder.digest`, over every file in it), not by its
name: an evaluation mirror keeps a folder's files and the splits of its tasks under
`task_dirs/<digest>/`, so a folder edited after it was mirrored never reads the data mirrored
for what it was, and a copy of it elsewhere, under any name, finds its data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray import CONF_DIR
from neoray.config import ConfigError

IGNORED = ("__pycache__", ".ipynb_checkpoints")


@dataclass(frozen=True)
class TaskFolder:
    """A folder of lm-eval task configs and the digest of everything in it."""

    path: Path
    digest: str

    @property
    def key(self) -> str:
        """Its name in an evaluation mirror: its content, whatever the folder is called."""
        return self.digest[:16]

    def files(self) -> list[Path]:
        """Every file in the folder (its configs, code and data), in a fixed order."""
        return sorted(
            path
            for path in self.path.rglob("*")
            if path.is_file() and not any(part in IGNORED for part in path.parts)
        )

    def holds(self, path: Path | None) -> bool:
        """True when `path` (a task's YAML file) lies in this folder."""
        return path is not None and Path(path).resolve().is_relative_to(self.path)


def resolve_folder(name: str, field: str = "eval.task_dirs") -> Path:
    """The folder `name` names: an absolute path, a path relative to the working directory,
    or one under the shipped configs (`eval_tasks/<name>` is conf/eval_tasks/<name>)."""
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(name), CONF_DIR / name]
    for path in candidates:
        if path.is_dir():
            if not any(path.rglob("*.yaml")):
                raise ConfigError(f"{field}: {path} holds no task YAML (*.yaml) files")
            return path.resolve()
    where = " or ".join(str(path) for path in candidates)
    raise ConfigError(
        f"{field}: no folder {name!r} ({where}); give a folder of lm-eval task YAML files"
    )


def task_folder(name: str | Path) -> TaskFolder:
    """The folder `name` names (see `resolve_folder`), with the digest of its content."""
    path = resolve_folder(str(name))
    digest = hashlib.sha256()
    folder = TaskFolder(path, "")
    for file in folder.files():
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return TaskFolder(path, digest.hexdigest())


def folder_of(yaml_path: Path | None, folders: list[TaskFolder]) -> TaskFolder | None:
    """The folder among `folders` that holds the task config `yaml_path`; None: a built-in."""
    return next((folder for folder in folders if folder.holds(yaml_path)), None)


def local_dataset(config: dict[str, Any], yaml_path: Path) -> dict[str, Any]:
    """The dataset fields of a task config from a task folder: `data_files` relative to the
    task's YAML file made absolute, the rows held in memory."""
    kwargs = dict(config.get("dataset_kwargs") or {})

    def absolute(files: Any) -> Any:
        if isinstance(files, str):
            return str(Path(yaml_path).parent / files)  # an absolute `files` stays as it is
        if isinstance(files, list | tuple):
            return [absolute(f) for f in files]
        if isinstance(files, dict):
            return {split: absolute(f) for split, f in files.items()}
        return files

    if "data_files" in kwargs:
        kwargs["data_files"] = absolute(kwargs["data_files"])
    # A task built here travels to Ray workers on other nodes: its rows in memory pickle with
    # it, where memory-mapped ones would be re-opened by this node's path.
    kwargs["keep_in_memory"] = True
    return {"dataset_kwargs": kwargs}
