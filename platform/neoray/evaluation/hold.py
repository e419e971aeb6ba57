"""Retention's hold for scheduled evaluation: a training run keeps the checkpoints that the
evaluation ledger has not settled yet, so that a watcher started after the run, or fallen
behind it, still finds them.

A run configured with `checkpoint.hold_for_eval: [suite, ...]` (the watcher's suites) keeps a
checkpoint that retention would delete while any of those suites has no final ledger entry for
it (`done`, `skipped`, or `failed` as often as the schedule's default `max_attempts`); with
`checkpoint.hold_for_eval_every` only the steps that are its multiples are held, as the
watcher's `schedule.every` selects them. The held checkpoints are bounded by
`checkpoint.hold_for_eval_max_gb`: past it the oldest are deleted anyway, and their pairs
recorded in the ledger as `skipped` with that reason (a pair a watcher is evaluating is left to
its owner, who records the deletion itself).
"""

from __future__ import annotations

import logging

from neoray.checkpoint.config import CheckpointConfig
from neoray.checkpoint.manifest import checkpoint_key, read_manifest
from neoray.evaluation.ledger import Ledger, is_final
from neoray.evaluation.schedule import ScheduleConfig
from neoray.storage import Storage

GB = 10**9
log = logging.getLogger(__name__)


class EvaluationHold:
    """`prune`'s hold (see `neoray.checkpoint.manifest.prune`) for one run's checkpoints."""

    def __init__(self, storage: Storage, run_name: str, config: CheckpointConfig) -> None:
        self.storage, self.run_name = storage, run_name
        self.suites = list(config.hold_for_eval)
        self.every = config.hold_for_eval_every
        self.max_gb = config.hold_for_eval_max_gb
        self.ledger = Ledger(storage, run_name)

    def __call__(self, steps: list[int]) -> set[int]:
        """Of `steps` (ascending, about to be deleted), those to keep for evaluation."""
        held = [step for step in steps if self._wanted(step) and not self._settled(step)]
        if held:
            log.info(
                "retention: holding checkpoint(s) %s of run %r until evaluated on %s",
                held,
                self.run_name,
                ", ".join(self.suites),
            )
        if self.max_gb is None:
            return set(held)
        sizes = {step: self._size(step) for step in held}
        total = sum(sizes.values())
        for step in list(held):  # oldest first
            if total <= self.max_gb * GB:
                break
            self._record_deletion(step, total)
            held.remove(step)
            total -= sizes[step]
        return set(held)

    def _wanted(self, step: int) -> bool:
        return self.every is None or step % self.every == 0

    def _settled(self, step: int) -> bool:
        return all(
            is_final(self.ledger.read(step, suite)[0], ScheduleConfig.max_attempts)
            for suite in self.suites
        )

    def _size(self, step: int) -> int:
        return sum(entry.size for entry in read_manifest(self.storage, self.run_name, step).files)

    def _record_deletion(self, step: int, total: int) -> None:
        """Say in the ledger why the pairs of `step` will not be evaluated, before it goes."""
        reason = (
            f"deleted by retention: the checkpoints held for evaluation took {total / GB:.3g} GB, "
            f"over the cap of checkpoint.hold_for_eval_max_gb={self.max_gb:g}"
        )
        for suite in self.suites:
            entry, version, _ = self.ledger.read(step, suite)
            if is_final(entry, ScheduleConfig.max_attempts) or (
                entry is not None and entry.state == "running"
            ):
                continue
            attempts = entry.attempts if entry is not None else 0
            self.ledger.record(step, suite, version, "skipped", attempts=attempts, reason=reason)
        log.warning("%s: %s", self.storage.uri(checkpoint_key(self.run_name, step)), reason)
