"""Which committed checkpoints of a run the scheduled evaluation takes, and how it paces itself.

A policy selects steps from the run's committed checkpoints: every k-th step, the milestones
(steps 0, 1, 2, 4, ..., 512, as Pythia kept them), the latest checkpoint committed at each
time of a cron schedule, or any union of these; with none of them, every checkpoint. With
`every` or `milestones` the run's final step is taken as well, so a run is always evaluated
where it ended.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from neoray.checkpoint.config import MILESTONES
from neoray.config import ConfigError


@dataclass
class ScheduleConfig:
    """conf/eval_watch.yaml `schedule:`."""

    every: int | None = None  # evaluate steps that are multiples of this
    milestones: bool = False  # evaluate steps 0, 1, 2, 4, ..., 512
    cron: str | None = (
        None  # evaluate the latest checkpoint at these times (UTC), e.g. "0 */6 * * *"
    )
    poll_seconds: float = 30.0  # how often the run's checkpoints are listed
    max_concurrent: int = 1  # evaluations (checkpoint x suite) in flight at once
    max_attempts: int = 3  # a pair that failed this often stays failed
    until_finished: bool = False  # stop once the final step is committed and all is evaluated
    heartbeat_seconds: float = 15.0  # how often a running evaluation says it is alive
    stale_seconds: float = 120.0  # a claim this long without a heartbeat is taken over

    def __post_init__(self) -> None:
        from croniter import croniter

        if self.every is not None and self.every < 1:
            raise ConfigError(f"schedule.every={self.every}: use a step count >= 1, or null")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ConfigError(
                f"schedule.cron={self.cron!r} is not a cron expression: five fields, "
                "minute hour day-of-month month day-of-week, e.g. '0 */6 * * *'"
            )
        for name in ("poll_seconds", "heartbeat_seconds", "stale_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"schedule.{name} must be > 0, got {getattr(self, name)}")
        if self.stale_seconds <= 2 * self.heartbeat_seconds:
            raise ConfigError(
                f"schedule.stale_seconds={self.stale_seconds} must exceed twice "
                f"schedule.heartbeat_seconds={self.heartbeat_seconds}: a live owner would "
                "look dead between two heartbeats"
            )
        for name in ("max_concurrent", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name} must be at least 1, got {getattr(self, name)}")

    def describe(self) -> str:
        parts = [f"every {self.every} steps"] if self.every else []
        parts += ["milestones"] if self.milestones else []
        parts += [f"latest at cron '{self.cron}'"] if self.cron else []
        return " + ".join(parts) + (" + the final step" if self.every or self.milestones else "")


def created_time(iso: str) -> float:
    """Unix time of a manifest's `created` (ISO 8601; UTC if it names no zone)."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class Policy:
    """The steps a `ScheduleConfig` selects. Cron times are walked incrementally, so a poll
    costs only the times that passed since the previous one."""

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.cron_steps: set[int] = set()
        self.cron_walked_to: float | None = None  # the last cron time already considered

    def select(self, committed: dict[int, float], final_step: int | None, now: float) -> set[int]:
        """Selected steps among `committed` (step -> unix time it was committed) at `now`."""
        c = self.config
        if not (c.every or c.milestones or c.cron):
            return set(committed)
        chosen = {
            step
            for step in committed
            if (c.every and step % c.every == 0)
            or (c.milestones and step in MILESTONES)
            or ((c.every or c.milestones) and step == final_step)
        }
        if c.cron:
            chosen |= self._cron(committed, now)
        return chosen

    def _cron(self, committed: dict[int, float], now: float) -> set[int]:
        """For each cron time up to `now` since the first commit: the latest step committed
        by then. Times already walked are not walked again."""
        from croniter import croniter

        if not committed:
            return self.cron_steps
        by_time = sorted((at, step) for step, at in committed.items())
        latest = list(itertools.accumulate((step for _, step in by_time), max))
        start = self.cron_walked_to
        if start is None:
            start = by_time[0][0]
        times = croniter(self.config.cron, datetime.fromtimestamp(start, timezone.utc))
        while (fire := times.get_next(float)) <= now:
            done_by_then = bisect.bisect_right(by_time, (fire, math.inf))
            if done_by_then:
                self.cron_steps.add(latest[done_by_then - 1])
            start = fire
        self.cron_walked_to = start
        return self.cron_steps
