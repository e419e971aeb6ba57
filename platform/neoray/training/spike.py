"""Loss spikes: detect one, roll back to the last committed checkpoint before it, skip batches.

A spike is a loss above `train.spike.factor` times the median of the last `window` trained
steps' losses (once `warmup` steps are trained and the window is full), or a loss or gradient
norm that is not finite. Then, in the same processes, the run reloads the newest committed
checkpoint at or before the spike's step (through `neoray.checkpoint.resume`, so at the run's
own layout), marks the batches from that checkpoint's step through the spike's own, and at
least `skip_batches` of them, as skipped, and goes on: PaLM's recipe (restart ~100 steps before
the spike, skip 200-500 batches). The steps keep their numbers, so step N still reads the
batch that `inspect_batch step=N` shows; a skipped step trains nothing but advances the
learning-rate schedule, so the run ends where it was planned. A run configured with
`train.skip_steps` skips the same steps from the start and trains the same weights.

Every rank judges the same loss (DeepSpeed averages it over the data-parallel ranks and
broadcasts it from the last pipeline stage) and, to be sure, the ranks agree on the verdict with
one all-reduce per step. Bounded: after `max_rollbacks` rollbacks whose spikes lie within
`rollback_window` steps, the next spike stops the run (SpikeError, with the history). fp16
steps that the dynamic loss scaler skipped for overflow are its business, not a spike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.manifest import Manifest
from neoray.checkpoint.resume import Layout, committed_on_rank0, resume
from neoray.checkpoint.snapshot import Snapshots
from neoray.config import ConfigError


class SpikeError(RuntimeError):
    """A loss spike that cannot be rolled back: too many rollbacks, or no checkpoint before it."""


@dataclass
class SpikeConfig:
    """`train.spike`: roll back to the last checkpoint before a loss spike and skip its batches."""

    enabled: bool = False
    factor: float = 2.0  # a spike: loss > factor x the median loss of the last `window` steps
    window: int = 50  # trained steps whose losses make the median
    warmup: int = 100  # steps trained before losses are judged (NaN/inf always are)
    skip_batches: int = (
        200  # batches skipped from the checkpoint rolled back to (at least up to the spike's)
    )
    max_rollbacks: int = (
        3  # rollbacks allowed within `rollback_window` steps; one more stops the run
    )
    rollback_window: int = 1000

    def __post_init__(self) -> None:
        for name in ("window", "skip_batches", "rollback_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.spike.{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.spike.{name}={getattr(self, name)} must be >= 0")
        if not self.factor > 1:
            raise ConfigError(
                f"train.spike.factor={self.factor}: a spike is a loss this many times the recent "
                "median, so use a number above 1 (e.g. 2.0)"
            )


def checked_ranges(ranges: list, where: str) -> list[tuple[int, int]]:
    """`[[first, last], ...]` (inclusive step ranges) as sorted tuples; ConfigError naming
    `where` and the entry otherwise."""
    checked = []
    for i, entry in enumerate(ranges):
        if (
            not isinstance(entry, Sequence)
            or isinstance(entry, str)
            or len(entry) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
            or not 0 <= entry[0] <= entry[1]
        ):
            raise ConfigError(
                f"{where}[{i}]={entry!r}: give a step range [first, last] with 0 <= first <= last"
            )
        checked.append((entry[0], entry[1]))
    return sorted(checked)


class SkippedSteps:
    """The steps whose batches are not trained: `train.skip_steps` and each rollback's."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges: list[tuple[int, int]] = []
        for first, last in ranges:
            self.add(first, last)

    def add(self, first: int, last: int) -> None:
        """Skip steps first..last as well (overlapping or adjacent ranges are merged)."""
        merged = []
        for a, b in sorted([*self.ranges, (first, last)]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged

    def __contains__(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.ranges)

    def before(self, step: int) -> list[list[int]]:
        """The ranges of the steps before `step` (what a checkpoint at `step` skipped)."""
        return [[first, min(last, step - 1)] for first, last in self.ranges if first < step]

    def count_before(self, step: int) -> int:
        return sum(last - first + 1 for first, last in self.before(step))


@dataclass
class Rollback:
    """One spike and what was done about it."""

    step: int  # the step whose loss spiked
    loss: float
    reason: str
    to_step: int  # the checkpoint reloaded (training resumes at its step)
    skipped: tuple[int, int]  # the steps skipped for it, inclusive
    seconds: float = 0.0  # from the spike's verdict to the checkpoint loaded

    def describe(self) -> str:
        first, last = self.skipped
        return (
            f"spike at step {self.step} ({self.reason}): rolled back to the checkpoint of step "
            f"{self.to_step}, skipping the batches of steps {first}..{last}"
        )

    def cost(self) -> str:
        """What the rollback cost: the trained steps thrown away, and its own time."""
        return f"{self.step - self.to_step + 1} trained steps undone, {self.seconds:.1f} s"


class SpikeDetector:
    """Judges each trained step's loss against the median of the last `window` ones. A rollback
    keeps the losses of the steps it undid: they were below the threshold, the level the
    run is at, and the window stays full, so the next spike is caught at once."""

    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.losses: deque[tuple[int, float]] = deque(maxlen=config.window)

    def judge(self, step: int, loss: float, grad_norm: float | None) -> str:
        """Why the loss of `step` is a spike, or "" (then it joins the window)."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm}"
        full = len(self.losses) == self.config.window
        if full and step >= self.config.warmup:
            median = statistics.median(value for _, value in self.losses)
            if loss > self.config.factor * median:
                return (
                    f"loss {loss:.4f} > {self.config.factor:g} x {median:.4f}, the median of the "
                    f"last {self.config.window} steps"
                )
        self.losses.append((step, loss))
        return ""


def agreed(spike: bool, device: torch.device) -> bool:
    """Whether any rank saw a spike (collective): all ranks roll back together or none."""
    flag = torch.tensor([int(spike)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class SpikeGuard:
    """The run's spike handling on one rank: the detector, the rollbacks and their bound."""

    def __init__(
        self,
        config: SpikeConfig,
        skipped: SkippedSteps,
        engine,
        snapshots: Snapshots,
        layout: Layout,
        staging: Path,
        device: torch.device,
    ) -> None:
        self.config, self.skipped = config, skipped
        self.engine, self.snapshots, self.layout, self.staging = engine, snapshots, layout, staging
        self.device = device
        self.detector = SpikeDetector(config)
        self.history: list[Rollback] = []

    def recall(self, earlier_rows: list[dict]) -> None:
        """At a restart (collective): the window starts with the last losses trained before it,
        from the rows rank 0's metrics.jsonl kept (`earlier_rows`), so that a spike right after
        a restart is caught too. The rollback history is this process's own."""
        losses: list = [None]
        if dist.get_rank() == 0:
            rows = [row for row in earlier_rows if isinstance(row.get("loss"), float)]
            losses[0] = [(row["step"], row["loss"]) for row in rows[-self.config.window :]]
        dist.broadcast_object_list(losses, src=0)
        self.detector.losses.extend(losses[0])

    def after_step(self, step: int, loss: float, grad_norm: float | None) -> Rollback | None:
        """After training `step` (collective): None, or the rollback done for its spike.
        fp16 steps skipped for overflow are the loss scaler's business, not spikes."""
        applied = self.engine.was_step_applied()
        reason = self.detector.judge(step, loss, grad_norm) if applied else ""
        if not agreed(bool(reason), self.device):
            return None
        started = time.perf_counter()
        reason = reason or "a spike seen on another rank"
        self.snapshots.settle()  # a checkpoint before the spike may still be uploading
        try:
            self.check_bound(step, reason)
            rollback = self._roll_back(step, loss, reason)
        except SpikeError:
            self.snapshots.finish_before_stopping()
            raise
        self.snapshots.discard_after(rollback.to_step)
        rollback.seconds = time.perf_counter() - started
        return rollback

    def check_bound(self, step: int, reason: str) -> None:
        """SpikeError with the history when the rollbacks within `rollback_window` steps
        before `step` reached `max_rollbacks`."""
        recent = [r for r in self.history if r.step > step - self.config.rollback_window]
        if len(recent) >= self.config.max_rollbacks:
            earlier = "".join(f"\n  {r.describe()}" for r in self.history)
            raise SpikeError(
                f"spike at step {step} ({reason}) after {len(recent)} rollbacks within "
                f"train.spike.rollback_window={self.config.rollback_window} steps "
                f"(train.spike.max_rollbacks={self.config.max_rollbacks}); stopping. "
                f"Rollbacks so far:{earlier or ' none'}\nLower optim.lr, or raise "
                "train.spike.max_rollbacks"
            )

    def _roll_back(self, step: int, loss: float, reason: str) -> Rollback:
        """Load the newest committed checkpoint at or before `step` into the engine and skip
        the batches from it through `step`, `skip_batches` at least (collective)."""
        storage, run_name = self.snapshots.storage, self.snapshots.run_name
        manifests, _ = committed_on_rank0(storage, run_name)
        before: list[Manifest] = [m for m in manifests if m.step <= step]
        if not before:
            raise SpikeError(
                f"spike at step {step} ({reason}), but no committed checkpoint of run "
                f"{run_name!r} precedes it to roll back to; save one earlier "
                "(checkpoint.interval, or checkpoint.milestones=true for step 0)"
            )
        to_step = resume(self.engine, storage, before, self.layout, self.staging, []).step
        last = max(step, to_step + self.config.skip_batches - 1)
        rollback = Rollback(step, loss, reason, to_step, (to_step, last))
        self.skipped.add(to_step, last)
        self.history.append(rollback)
        return rollback
