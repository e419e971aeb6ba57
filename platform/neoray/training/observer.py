"""What a training run reports as it goes: the hook an experiment tracker implements."""

from __future__ import annotations

from typing import Protocol


class TrainingObserver(Protocol):
    """Called on global rank 0 only."""

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        """Training starts: resumed from the checkpoint of step `resumed_from`, or from scratch
        (None), which an experiment tracker records as a new run. `earlier_rows` are
        metrics.jsonl's rows of the steps before it, so that a tracker can log those that a
        crash kept from reaching it."""

    def on_metrics(self, row: dict) -> None:
        """After every step: the row also written to metrics.jsonl."""

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        """A checkpoint was committed (its manifest written) at `uri`; its files' total size."""

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        """The checkpoint of `step` could not be uploaded; it is retried at the next save."""

    def on_rollback(self, step: int, count: int, seconds: float, description: str) -> None:
        """The loss of `step` spiked and the run rolled back (its `count`-th rollback, taking
        `seconds`), as `description` says; the rows of the steps undone come again (see
        training.spike)."""


class Observers:
    """Several observers as one (an experiment tracker and the live metrics, say)."""

    def __init__(self, *observers: TrainingObserver) -> None:
        self.observers = observers

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        for observer in self.observers:
            observer.on_start(resumed_from, earlier_rows)

    def on_metrics(self, row: dict) -> None:
        for observer in self.observers:
            observer.on_metrics(row)

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        for observer in self.observers:
            observer.on_checkpoint(step, uri, size_bytes)

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        for observer in self.observers:
            observer.on_checkpoint_failed(step, error)

    def on_rollback(self, step: int, count: int, seconds: float, description: str) -> None:
        for observer in self.observers:
            observer.on_rollback(step, count, seconds, description)
