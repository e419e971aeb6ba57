"""Retention holds the checkpoints a scheduled evaluation still needs (`checkpoint.hold_for_eval`),
on real storage with a ledger written by the ledger's own code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from distributed import run_command, torchrun_launcher
from layouts import TINY

from neoray.checkpoint.config import CheckpointConfig
from neoray.checkpoint.manifest import committed_steps, prune
from neoray.config import ConfigError
from neoray.evaluation import testdata
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.hold import EvaluationHold
from neoray.evaluation.ledger import Ledger
from neoray.evaluation.schedule import ScheduleConfig
from neoray.evaluation.watch import Watcher
from neoray.storage import StorageConfig, open_storage

ROOT = Path(__file__).resolve().parents[1]
RUN = "held"
BYTES = 10  # each stand-in checkpoint's size
SUITES = ["a", "b"]


def commit(storage, *steps: int) -> None:
    for step in steps:
        testdata.commit_stand_in_checkpoint(storage, RUN, step, 0.0, 100, files=BYTES)


def retention(storage, **hold) -> list[int]:
    """What retention deletes after a commit, keep_last=2, holding for suites a and b."""
    config = CheckpointConfig(keep_last=2, hold_for_eval=SUITES, **hold)
    return prune(
        storage, RUN, config.keep_last, config.is_milestone, EvaluationHold(storage, RUN, config)
    )


def settle(storage, step: int, suite: str, state: str, attempts: int = 1) -> None:
    """A watcher's claim of the pair, then its outcome."""
    ledger = Ledger(storage, RUN)
    claim = ledger.claim(step, suite, "watcher", ledger.read(step, suite)[1], attempts)
    if state != "running":
        assert ledger.finish(claim, state, reason=f"{state} in the test")


def test_unevaluated_checkpoints_are_held_until_the_ledger_settles_them(storage):
    commit(storage, 1, 2, 3, 4)
    assert retention(storage, hold_for_eval_max_gb=None) == []  # nothing evaluated yet
    settle(storage, 1, "a", "done")
    settle(storage, 1, "b", "skipped")
    settle(storage, 2, "a", "done")
    settle(storage, 2, "b", "failed")  # retried by the watcher: still held
    assert retention(storage, hold_for_eval_max_gb=None) == [1]
    settle(storage, 2, "b", "failed", attempts=ScheduleConfig.max_attempts)  # failed for good
    settle(storage, 3, "a", "done")  # b still to come
    assert retention(storage, hold_for_eval_max_gb=None) == [2]
    assert committed_steps(storage, RUN) == [3, 4]

    # Over the cap (one and a half checkpoints), the oldest held one goes and the ledger says
    # why; a pair a watcher is evaluating is left to it.
    cap = 1.5 * BYTES / 1e9
    settle(storage, 4, "b", "running")
    commit(storage, 5, 6)
    assert retention(storage, hold_for_eval_max_gb=cap) == [3]
    commit(storage, 7)
    assert retention(storage, hold_for_eval_max_gb=cap) == [4]
    assert committed_steps(storage, RUN) == [5, 6, 7]
    entries = {(e.step, e.suite): e for e in Ledger(storage, RUN).entries()}
    assert entries[3, "a"].state == "done" and entries[4, "b"].state == "running"
    for pair in ((3, "b"), (4, "a")):
        assert entries[pair].state == "skipped"
        assert entries[pair].reason.startswith("deleted by retention: the checkpoints held")
        assert f"over the cap of checkpoint.hold_for_eval_max_gb={cap:g}" in entries[pair].reason


def test_only_the_schedules_multiples_are_held(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    commit(storage, 1, 2, 3, 4, 5)
    assert retention(storage, hold_for_eval_every=2) == [1, 3]
    assert committed_steps(storage, RUN) == [2, 4, 5]


@pytest.mark.parametrize("field, value", [("hold_for_eval_every", 0), ("hold_for_eval_max_gb", 0)])
def test_bad_hold_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"checkpoint.{field}"):
        CheckpointConfig(**{field: value})


def evaluate(storage, manifest, cfg):
    return {"results": {"t": {"acc,none": manifest.step / 10}}}


def test_a_watcher_started_after_the_run_finds_every_checkpoint(tmp_path):
    """checkpoint.interval=2 and keep_last=2: a watcher started once the run ended evaluates
    steps 2 to 8; the run's next commit then deletes the evaluated ones."""
    store = tmp_path / "store"

    def pretrain(steps: int) -> None:
        args = [
            "jobs/pretrain.py",
            "launcher=torchrun",
            *TINY,
            f"train.steps={steps}",
            "checkpoint.interval=2",
            "checkpoint.hold_for_eval=[a,b]",
            f"run_name={RUN}",
            f"run_dir={tmp_path / 'run'}",
            f"storage.root={store}",
            "tracking.enabled=false",
        ]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        run_command(torchrun_launcher(1) + args, timeout=240, cwd=ROOT, env=env)

    pretrain(8)
    storage = open_storage(StorageConfig(root=str(store)))
    assert committed_steps(storage, RUN) == [2, 4, 6, 8]
    schedule = ScheduleConfig(poll_seconds=0.05, until_finished=True)
    suites = [EvalConfig(suite=suite, tasks=["t"]) for suite in SUITES]
    lines: list[str] = []
    settled = Watcher(storage, RUN, suites, schedule, evaluate, say=lines.append).run()
    assert not any("does not hold" in line for line in lines)
    assert {pair: entry.state for pair, entry in settled.items()} == {
        (step, suite): "done" for step in (2, 4, 6, 8) for suite in SUITES
    }
    pretrain(10)
    assert committed_steps(storage, RUN) == [8, 10]
