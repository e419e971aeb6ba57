"""Training's MLflow logging on a thread of its own, so that MLflow being down costs no steps.

Rank 0 hands every row, checkpoint tag and the run's end to a queue; one thread opens the
MLflow run and logs the queue in order. The run is opened once training says where it starts
(`on_start`): from a checkpoint it continues the run of that name, from scratch it gets a new
one (see `neoray.tracking`); a run that ends before it starts (a failure while resuming)
continues the run of that name, as a resume would. While MLflow does not answer
(connection refused, timeouts, 5xx), the thread keeps the queue and tries again with a growing
pause; training goes on, and a run that starts while MLflow is down starts anyway, saying so.
The queue is bounded: past `tracking.buffer_rows` metric rows, the oldest rows are dropped
(every row is also in the run's `metrics.jsonl`), counted, printed and recorded on the run as tag
`neoray.tracking.dropped_rows` once MLflow answers. Checkpoint tags and the run's end are
never dropped. A request MLflow refuses for good (a 4xx: a bad value, a password no longer
accepted) is skipped instead of retried, and printed at once; a refusal to open the run ends
MLflow logging for the run (training goes on). The job checks before training that MLflow
accepts it at all (`neoray.tracking.check_access`). At the end of the run, `close` waits up to
`tracking.flush_timeout_s` for the queue to drain and reports what could not be logged.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from neoray.config import redact_text

# MLflow error codes that mean "the server (or something before it) is unwell", not "the
# request is wrong": connection failures are reported as INTERNAL_ERROR too.
TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 10.0


def is_transient(error: BaseException) -> bool:
    """Whether `error` from an MLflow call may go away by trying again later."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_CODES
    return isinstance(error, OSError | TimeoutError | ConnectionError)


class QueuedTracker:
    """A TrainingObserver that logs to the tracker `open_tracker(fresh=...)` returns (an
    MLflowTracker), from a thread, in order, surviving MLflow outages. Use it as a context
    manager."""

    def __init__(
        self,
        open_tracker: Callable[..., Any],
        uri: str,
        buffer_rows: int,
        flush_timeout_s: float,
        pause_s: float = FIRST_PAUSE_S,
    ) -> None:
        self.uri = redact_text(uri)  # as messages show it: no password
        self.buffer_rows = buffer_rows
        self.flush_timeout_s = flush_timeout_s
        self.dropped_rows = 0
        self.refused: list[str] = []  # requests MLflow refused for good, with its reason
        self._open_tracker = open_tracker
        self._first_pause_s = pause_s
        self._queue: collections.deque[tuple[str, tuple]] = collections.deque()
        self._rows = 0  # metric rows in the queue
        self._sending: str | None = None  # the kind of record the thread is logging
        self._dropped_recorded = 0
        self._gave_up = False  # MLflow refused to open the run: nothing more is queued
        self._done = threading.Event()
        self._changed = threading.Condition()
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-logging", daemon=True)
        self._thread.start()

    # The observer side: called by the training loop, never blocks on MLflow.

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        self._put("start", (resumed_from, [dict(row) for row in earlier_rows]))

    def on_metrics(self, row: dict) -> None:
        with self._changed:
            if self._gave_up:
                return
            self._queue.append(("metrics", (dict(row),)))
            self._rows += 1
            if self._rows > self.buffer_rows:
                self._drop_oldest_row()
            self._changed.notify()

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        self._put("checkpoint", (step, uri, size_bytes))

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        self._put("checkpoint_failed", (step, error))

    def on_rollback(self, step: int, count: int, seconds: float, description: str) -> None:
        self._put("rollback", (step, count, seconds, description))

    def close(self, failed: bool = False) -> None:
        """End the MLflow run (FINISHED or FAILED) once everything before it is logged; wait at
        most `flush_timeout_s`, then report what was not logged and return."""
        self._put("close", (failed,))
        if not self._done.wait(self.flush_timeout_s):
            with self._changed:
                rows = self._rows + (self._sending == "metrics")
                others = len(self._queue) + (self._sending is not None) - rows
            print(
                f"MLflow at {self.uri} did not answer within tracking.flush_timeout_s="
                f"{self.flush_timeout_s:g}: {rows} metric rows and {others} other records "
                "were not logged (the rows are in metrics.jsonl)",
                flush=True,
            )
        if self.dropped_rows:
            print(
                f"{self.dropped_rows} metric rows were dropped from the MLflow queue during an "
                f"outage (tracking.buffer_rows={self.buffer_rows}); they are in metrics.jsonl",
                flush=True,
            )
        if self.refused:
            print(
                f"MLflow at {self.uri} refused requests of this run {len(self.refused)} times "
                "(each printed when it happened); the metrics are in metrics.jsonl",
                flush=True,
            )

    def __enter__(self) -> QueuedTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)

    def _put(self, kind: str, args: tuple) -> None:
        with self._changed:
            if self._gave_up:
                return
            self._queue.append((kind, args))
            self._changed.notify()

    def _drop_oldest_row(self) -> None:
        for index, (kind, _) in enumerate(self._queue):
            if kind == "metrics":
                del self._queue[index]
                self._rows -= 1
                self.dropped_rows += 1
                return

    # The logging thread.

    def _run(self) -> None:
        with self._changed:
            while not self._queue:
                self._changed.wait()
            kind, args = self._queue[0]  # logged (`_send`) once the run is open
        fresh = kind == "start" and args[0] is None
        tracker = self._retry(functools.partial(self._open_tracker, fresh=fresh), "open")
        if tracker is None:
            with self._changed:
                self._gave_up = True
                self._queue.clear()
                self._rows = 0
            self._done.set()
            return
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                kind, args = self._queue.popleft()
                if kind == "metrics":
                    self._rows -= 1
                self._sending = kind
            self._retry(functools.partial(self._send, tracker, kind, args), kind)
            with self._changed:
                self._sending = None
            if kind == "close":
                self._done.set()
                return

    def _send(self, tracker: Any, kind: str, args: tuple) -> None:
        dropped = self.dropped_rows
        if dropped > self._dropped_recorded:
            tracker.set_tags({"neoray.tracking.dropped_rows": str(dropped)})
            self._dropped_recorded = dropped
        if kind == "metrics":
            tracker.on_metrics(*args)
        elif kind == "checkpoint":
            tracker.on_checkpoint(*args)
        elif kind == "checkpoint_failed":
            tracker.on_checkpoint_failed(*args)
        elif kind == "rollback":
            tracker.on_rollback(*args)
        elif kind == "start":
            tracker.on_start(*args)
        else:
            tracker.close(*args)

    def _retry(self, call: Callable[[], Any], kind: str) -> Any:
        """`call()`, tried again after a growing pause while MLflow is down; None if MLflow
        refused it for good, which is printed at once (`kind`: "open" for the run, else the
        record's)."""
        pause = self._first_pause_s
        while True:
            try:
                result = call()
            except Exception as error:  # sorted by is_transient below
                if not is_transient(error):
                    self._refused(kind, redact_text(str(error).splitlines()[0][:500]))
                    return None
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(
                        f"MLflow at {self.uri} does not answer ({redact_text(str(error).splitlines()[0][:200])}); "
                        f"training goes on, metrics wait (up to tracking.buffer_rows="
                        f"{self.buffer_rows} rows) and are logged when it is back",
                        flush=True,
                    )
                time.sleep(pause)
                pause = min(2 * pause, MAX_PAUSE_S)
                continue
            if self._down_since is not None:
                print(
                    f"MLflow at {self.uri} answers again after "
                    f"{time.monotonic() - self._down_since:.0f} s; logging the queued records",
                    flush=True,
                )
                self._down_since = None
            return result

    def _refused(self, kind: str, reason: str) -> None:
        self.refused.append(reason)
        if kind == "open":
            consequence = (
                "nothing more of this run is logged to MLflow (check tracking.uri and the "
                "credentials); training goes on and metrics.jsonl has every row"
            )
        else:
            consequence = f"this {kind} record is skipped; training goes on"
        print(f"MLflow at {self.uri} refused a request: {reason}; {consequence}", flush=True)
