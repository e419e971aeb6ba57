"""The private parts of lm-evaluation-harness the evaluation relies on, and nowhere else.

Written against lm-eval 0.4.13 (pinned in pyproject.toml). lm-eval has no public way to point a
task's dataset elsewhere (the offline mirror) or to merge per-document results computed in
several processes (the Ray fan-out), so both go through its internals:

- `TaskFactory`, `Entry`, `Kind` (`lm_eval.tasks._factory`, `lm_eval.tasks._index`) and the
  `TaskManager._factory` attribute: the mirror's task factory rewrites each task's dataset;
- `TaskIndex.build` and the `TaskManager._index` / `_all_*` attributes: a suite's own task
  folders join the index of lm-eval's built-in tasks, which is built once per process (seconds)
  instead of once per folder list as `TaskManager(include_path=...)` would;
- `lm_eval.evaluator_utils._process_results` and the `_to_eval_results` method of what it
  returns: the fan-out's merge computes the metrics as one lm-eval run would.

`check_upstream()` says, naming the missing piece and the version written against, when an
upgrade changed any of them (a test runs it).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.tasks._index import Entry, Kind, TaskIndex

WRITTEN_AGAINST = "0.4.13"
SUBTASK_KINDS = (Kind.TASK, Kind.PY_TASK)

__all__ = [
    "Entry",
    "Kind",
    "TaskFactory",
    "add_task_folders",
    "check_upstream",
    "process_results",
    "set_task_factory",
]


def set_task_factory(manager: TaskManager, factory: TaskFactory) -> None:
    """Make `manager` build its tasks with `factory`."""
    manager._factory = factory


def add_task_folders(manager: TaskManager, folders: list[Path]) -> None:
    """Index the task configs under `folders` into `manager` as `include_path` would (a name
    defined there overrides a built-in one)."""
    index = {**manager._index, **TaskIndex.build(folders)}
    manager._index = index
    manager.include_path = [*(manager.include_path or []), *map(str, folders)]
    manager._all_tasks = sorted(index)
    manager._all_subtasks = sorted(n for n, e in index.items() if e.kind in SUBTASK_KINDS)
    manager._all_groups = sorted(n for n, e in index.items() if e.kind is Kind.GROUP)
    manager._all_tags = sorted(n for n, e in index.items() if e.kind is Kind.TAG)


def process_results(accumulated: dict[str, Any], groups: dict[str, Any], bootstrap_iters: int):
    """lm-eval's results dict from per-task raw metrics and logged samples, as `evaluate` makes
    it at its end."""
    from lm_eval.evaluator_utils import _process_results

    merged = _process_results(accumulated, groups, bootstrap_iters)
    return merged._to_eval_results(samples=merged.samples)


def check_upstream() -> None:
    """Raise RuntimeError naming what changed if the installed lm-eval lacks a private piece
    used here, or has it with another signature."""
    import lm_eval

    version = getattr(lm_eval, "__version__", "unknown")
    problems = []
    manager = TaskManager(include_defaults=False)
    attributes = ("_factory", "_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags")
    problems += [
        f"TaskManager has no `{a}` attribute" for a in attributes if not hasattr(manager, a)
    ]
    if "build" not in vars(TaskIndex):
        problems.append("TaskIndex has no `build` method")
    if "_load_full_config" not in vars(TaskFactory):
        problems.append("TaskFactory has no `_load_full_config` method")
    else:
        parameters = list(inspect.signature(TaskFactory._load_full_config).parameters)
        if parameters[:3] != ["self", "entry", "overrides"]:
            problems.append(f"TaskFactory._load_full_config takes {parameters}")
    if not {"TASK", "PY_TASK"} <= set(Kind.__members__):
        problems.append(f"Kind has members {sorted(Kind.__members__)}")
    utils = importlib.import_module("lm_eval.evaluator_utils")
    process = getattr(utils, "_process_results", None)
    if process is None:
        problems.append("lm_eval.evaluator_utils has no `_process_results`")
    elif len(inspect.signature(process).parameters) < 3:
        problems.append(f"_process_results takes {list(inspect.signature(process).parameters)}")
    to_results = getattr(getattr(utils, "EvalAcc", None), "_to_eval_results", None)
    if to_results is None:
        problems.append("lm_eval.evaluator_utils.EvalAcc has no `_to_eval_results`")
    elif "samples" not in inspect.signature(to_results).parameters:
        problems.append("EvalAcc._to_eval_results takes no `samples`")
    if problems:
        raise RuntimeError(
            f"lm-eval {version} differs from {WRITTEN_AGAINST}, which "
            f"neoray.evaluation.lm_eval_private was written against: {'; '.join(problems)}. "
            "Install the pinned version, or adapt that module"
        )
