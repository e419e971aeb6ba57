"""The evaluation ledger: what happened to each (checkpoint, suite) of a run, next to its checkpoints.

One small JSON file per pair, `<run>/evals/step_<8 digits>/<suite>.json`, in the storage that
holds `<run>/checkpoints/`. Its state is one of

- `running`: claimed by `owner`, who refreshes `heartbeat` while it works;
- `done`: with the `metrics` (and which one is the suite's `headline`) and the MLflow run id;
- `failed`: with the `reason`; retried until `attempts` reaches the watcher's maximum;
- `skipped`: with the reason (the checkpoint was deleted before its turn; by retention past
  the cap of its evaluation hold, see `neoray.evaluation.hold`).

The ledger is the one truth that watchers share. Every write is conditional on the version
the writer read (S3's If-Match / If-None-Match, a folder lock locally), so of two watchers
that read the same entry exactly one can claim it, and a watcher whose claim was taken over
(its heartbeat went stale) cannot overwrite the new owner's result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from neoray.checkpoint.manifest import STEP_DIR, step_tag
from neoray.storage import Storage, join_key

STATES = ("running", "done", "failed", "skipped")
SUFFIX = ".json"

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """The ledger file of one (step, suite)."""

    run_name: str
    step: int
    suite: str
    state: str
    attempts: int = 0  # claims so far, the current one included
    owner: str | None = None
    heartbeat: float | None = None  # unix time of the owner's last sign of life
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # every metric, by MLflow name
    headline: str | None = None  # the metric that sums the suite up (e.g. mmlu/acc)
    mlflow_run_id: str | None = None
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state {self.state!r} is not one of {', '.join(STATES)}")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        return cls(**json.loads(data))


def is_final(entry: Entry | None, max_attempts: int) -> bool:
    """Whether the pair of this ledger entry will not be evaluated (again): done, skipped, or
    failed `max_attempts` times."""
    return entry is not None and (
        entry.state in ("done", "skipped")
        or (entry.state == "failed" and entry.attempts >= max_attempts)
    )


def evals_key(run_name: str) -> str:
    return join_key(run_name, "evals")


def entry_key(run_name: str, step: int, suite: str) -> str:
    return join_key(evals_key(run_name), step_tag(step), suite + SUFFIX)


@dataclass
class Claim:
    """A pair this watcher owns, and the version of its ledger file it last wrote."""

    entry: Entry
    version: str
    lost: bool = False  # another watcher took the pair over
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Ledger:
    """Reads and conditional writes of one run's ledger; `clock` is injectable for tests."""

    def __init__(
        self, storage: Storage, run_name: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.storage = storage
        self.run_name = run_name
        self.clock = clock

    def uri(self, step: int, suite: str) -> str:
        return self.storage.uri(entry_key(self.run_name, step, suite))

    def read(self, step: int, suite: str) -> tuple[Entry | None, str | None, str | None]:
        """(entry, version, problem): a missing file is (None, None, None); a malformed one
        is (None, its version, what is wrong), so that a claim can replace it."""
        found = self.storage.read_versioned(entry_key(self.run_name, step, suite))
        if found is None:
            return None, None, None
        data, version = found
        try:
            entry = Entry.from_bytes(data)
            if (entry.run_name, entry.step, entry.suite) != (self.run_name, step, suite):
                raise ValueError(f"it describes {entry.run_name} step {entry.step} {entry.suite}")
        except (ValueError, TypeError) as err:
            return None, version, f"{self.uri(step, suite)} is malformed ({err})"
        return entry, version, None

    def entries(self) -> list[Entry]:
        """Every readable entry of the run, by step and suite (malformed ones are logged)."""
        found = []
        for key in self.storage.list(evals_key(self.run_name) + "/"):
            *_, folder, name = key.split("/")
            match = STEP_DIR.match(folder)
            if not match or not name.endswith(SUFFIX):
                continue
            entry, _, problem = self.read(int(match.group(1)), name[: -len(SUFFIX)])
            if problem:
                log.warning("%s", problem)
            elif entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: (e.step, e.suite))

    def clear(self) -> int:
        """Delete every entry: at a fresh start of the run (its checkpoints deleted) they
        describe checkpoints that are gone, and would pass the new ones of the same steps off
        as evaluated. Returns how many there were."""
        keys = self.storage.list(evals_key(self.run_name) + "/")
        for key in keys:
            self.storage.delete(key)
        return len(keys)

    def _write(self, entry: Entry, version: str | None) -> str | None:
        """Write `entry` if its file is still at `version`; the new version, or None if lost."""
        entry.updated = self.clock()
        key = entry_key(entry.run_name, entry.step, entry.suite)
        return self.storage.put_if(key, entry.to_bytes(), version)

    def claim(self, step: int, suite: str, owner: str, version: str | None, attempts: int):
        """Take the pair for `owner` if its file is still at `version`; the Claim, or None."""
        entry = Entry(self.run_name, step, suite, "running", attempts, owner, self.clock())
        written = self._write(entry, version)
        return None if written is None else Claim(entry, written)

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the claim's heartbeat; False (and `claim.lost`) if it was taken over."""
        with claim.lock:
            if claim.lost:
                return False
            claim.entry.heartbeat = self.clock()
            written = self._write(claim.entry, claim.version)
            if written is None:
                claim.lost = True
                return False
            claim.version = written
            return True

    def finish(self, claim: Claim, state: str, **fields) -> bool:
        """Record the claim's outcome (`done`, `failed` or `skipped` with their fields); False
        if the pair was taken over meanwhile, and then nothing is written."""
        with claim.lock:
            if claim.lost:
                return False
            entry = Entry(**{**asdict(claim.entry), "state": state, **fields})
            written = self._write(entry, claim.version)
            if written is None:
                claim.lost = True
                return False
            claim.entry, claim.version = entry, written
            return True

    def record(self, step: int, suite: str, version: str | None, state: str, **fields) -> bool:
        """Write a final state for a pair nobody owns (a skip, a stale claim out of attempts)."""
        entry = Entry(self.run_name, step, suite, state, **fields)
        return self._write(entry, version) is not None
