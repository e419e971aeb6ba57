"""What a run that crashed and resumed leaves in metrics.jsonl and MLflow: the README's promise
("Metrics of steps trained again"), checked the same way whenever the crash landed."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest


def resumed_at(output: str, run_name: str) -> int:
    """The step the last restart of `run_name` resumed at, from the job's output."""
    steps = re.findall(rf"resumed run '{re.escape(run_name)}' at step (\d+)", output)
    assert steps, f"run {run_name!r} never resumed:\n{output[-3000:]}"
    return int(steps[-1])


def check_history(history: list, rows: list[dict], resumed: int) -> None:
    """`rows` (metrics.jsonl) hold one row per step, as trained last. In MLflow's `history`
    of the loss: every step from `resumed` on is there, the newest row at each is the one
    metrics.jsonl holds; every row of an earlier step (logged before the crash, or at the
    restart from metrics.jsonl) is the one metrics.jsonl holds too."""
    assert [row["step"] for row in rows] == list(range(len(rows)))
    final = {row["step"]: row["loss"] for row in rows}
    by_step = defaultdict(list)
    for metric in history:
        by_step[metric.step].append(metric)
    assert set(by_step) == set(final), sorted(set(final) - set(by_step))
    for step, metrics in by_step.items():
        newest = max(metrics, key=lambda m: m.timestamp)
        assert newest.value == pytest.approx(final[step], rel=1e-6), step
        if step < resumed:
            assert [m.value for m in metrics] == pytest.approx([final[step]] * len(metrics)), step
