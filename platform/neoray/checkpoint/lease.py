"""One live job per run: a lease in the checkpoint storage, `<run_name>/lease.json`.

Two jobs training one `run_name` at once (a resubmit while the first still runs) would
overwrite each other's checkpoint files and prune each other's checkpoints. So the process that
owns a run (the Ray driver, or rank 0 under torchrun) takes the run's lease before anything
is written, refreshes its heartbeat while the run trains and releases it at the end. Every
write is conditional on the version read (S3's If-None-Match / If-Match; a folder lock
locally), so of two jobs starting together exactly one gets the lease.

Whether a holder is alive is judged on the reader's own monotonic clock, never by comparing
the holder's timestamps with the reader's (two machines' clocks need not agree): a holder is
alive when its lease changes while another job watches it, and taken for dead (a killed job)
once the lease has stayed unchanged for `stale_after_s` of watching. A lease held by the same
owner (a job that restarts under the same identity: a Ray Tune trial, a Ray job) is taken back
at once.

A job whose lease was taken over anyway (it stalled for longer than that) must not write
again: the training process that writes for the run asks `LeaseCheck` before each write.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from neoray.storage import Storage, StorageError, join_key


class RunLeaseHeld(StorageError):
    """Another live job holds the run's lease."""


class LeaseLostError(StorageError):
    """Another job took the run's lease over while this one trained."""


@dataclass
class Holder:
    """What `lease.json` says about the job that holds (or released) the lease."""

    owner: str  # stable across restarts of one job (see `default_owner`)
    host: str
    pid: int
    started: float  # unix time the lease was taken, by the holder's clock
    heartbeat: float  # unix time of the holder's last sign of life, by the holder's clock
    beats: int = 0  # heartbeats so far: every one changes the file, whatever the clock says
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        return cls(**json.loads(data))

    def taking(self) -> tuple[str, str, int, float]:
        """What tells one taking of the lease from any other, whatever its heartbeats."""
        return self.owner, self.host, self.pid, self.started

    def describe(self) -> str:
        beat = datetime.fromtimestamp(self.heartbeat, timezone.utc).isoformat(timespec="seconds")
        return (
            f"{self.owner} (host {self.host}, pid {self.pid}, last heartbeat {beat} by its clock)"
        )


def lease_key(run_name: str) -> str:
    return join_key(run_name, "lease.json")


def default_owner() -> str:
    """The Ray job this process belongs to when it was submitted (a job's driver keeps its
    submission id across retries), else this process."""
    from neoray.cluster.submit import submitted_job_id

    submission = submitted_job_id()
    if submission:
        return f"ray job {submission}"
    return f"process {socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def read_holder(storage: Storage, key: str) -> tuple[Holder | None, str | None, str]:
    """(holder, version, problem) of the lease at `key`: (None, None, "") when there is none;
    (None, version, what is wrong) when it cannot be read (empty, cut short, edited)."""
    found = storage.read_versioned(key)
    if found is None:
        return None, None, ""
    data, version = found
    try:
        return Holder.from_bytes(data), version, ""
    except (ValueError, TypeError) as err:
        return None, version, f"{storage.uri(key)} is not a lease ({type(err).__name__}: {err})"


class RunLease:
    """The lease of `run_name`, held from `acquire()` to `release()`; a context manager that
    heartbeats from a thread every `stale_after_s / 4` while held. `clock` gives the times
    written into the lease (for people to read); staleness is measured with time.monotonic."""

    def __init__(
        self,
        storage: Storage,
        run_name: str,
        owner: str,
        stale_after_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage, self.run_name, self.owner = storage, run_name, owner
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.key = lease_key(run_name)
        self.lost = False  # another job took the lease over while this one held it
        self._version: str | None = None
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or raise RunLeaseHeld naming the live job that has it. Another
        job's lease is watched (up to `stale_after_s`) until it changes, which means that job
        is alive, or until it has stayed unchanged for `stale_after_s`, and is taken over."""
        watched: tuple[str | None, float] | None = None  # another's version, first seen when
        while True:
            holder, version, problem = read_holder(self.storage, self.key)
            seen = time.monotonic()
            if version is None or (holder is not None and holder.released):
                break
            if holder is not None and holder.owner == self.owner:
                self._say(f"taking the lease back from an earlier attempt of {self.owner}")
                break
            if watched is not None and watched[0] != version:
                raise self._held(holder, problem)
            if watched is None:
                watched = (version, seen)
                self._say(
                    f"{self._who(holder, problem)} holds the lease {self.storage.uri(self.key)}; "
                    f"watching it for checkpoint.lease_timeout_s={self.stale_after_s:g} s "
                    "(a live job refreshes it, a dead one's is taken over)"
                )
            elif seen - watched[1] >= self.stale_after_s:
                self._say(
                    f"taking over the lease of {self._who(holder, problem)}, unchanged for "
                    f"checkpoint.lease_timeout_s={self.stale_after_s:g} s"
                )
                break
            time.sleep(self.stale_after_s / 8)
        now = self.clock()
        mine = Holder(self.owner, socket.gethostname(), os.getpid(), now, now)
        written = self.storage.put_if(self.key, mine.to_bytes(), version)
        if written is None:  # another job wrote the lease since it was read
            holder, _, problem = read_holder(self.storage, self.key)
            raise self._held(holder, problem)
        self._holder, self._version = mine, written

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False (and `lost`) when another job has taken the lease."""
        if self._holder is None or self.lost:
            return False
        self._holder.heartbeat = self.clock()
        self._holder.beats += 1
        written = self.storage.put_if(self.key, self._holder.to_bytes(), self._version)
        if written is None:
            holder, version, _ = read_holder(self.storage, self.key)
            if holder is not None and holder.taking() == self._holder.taking():
                # a heartbeat that was reported failed had been written after all
                written = self.storage.put_if(self.key, self._holder.to_bytes(), version)
        if written is None:
            self.lost = True
            holder, _, problem = read_holder(self.storage, self.key)
            self._say(
                f"{self._who(holder, problem)} took over the lease (this job was silent for "
                f"more than {self.stale_after_s:g} s); training stops before its next write"
            )
            return False
        self._version = written
        return True

    def release(self) -> None:
        """Mark the lease released (only if this job still holds it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._holder is None or self.lost:
            return
        self._holder.released = True
        self._holder.heartbeat = self.clock()
        self.storage.put_if(self.key, self._holder.to_bytes(), self._version)
        self._holder = None

    def __enter__(self) -> RunLease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                if not self.heartbeat():
                    return
            except StorageError as err:  # storage down: try again at the next beat
                self._say(f"lease heartbeat failed: {err}")

    def _say(self, message: str) -> None:
        print(f"run {self.run_name}: {message}", flush=True)

    @staticmethod
    def _who(holder: Holder | None, problem: str) -> str:
        return holder.describe() if holder is not None else f"nobody known ({problem})"

    def _held(self, holder: Holder | None, problem: str) -> RunLeaseHeld:
        if holder is None:
            return RunLeaseHeld(
                f"run_name={self.run_name}: {problem or 'its lease is gone'}, and it changed "
                "while this job watched or took it: another job is writing it"
            )
        return RunLeaseHeld(
            f"run_name={self.run_name} is being trained by {holder.describe()}: its lease is "
            f"{self.storage.uri(self.key)}. Stop that job first, or choose another run_name; a "
            f"job that died without releasing it is taken over once its lease has stayed "
            f"unchanged for checkpoint.lease_timeout_s={self.stale_after_s:g} s."
        )


class LeaseCheck:
    """Whether the run's lease is still `owner`'s, asked by the training process that writes
    for the run (global rank 0) before each write: `verify()` raises LeaseLostError, naming
    the new holder, once another job has taken the lease over.

    Reading the lease before every step's metrics would cost a request a step, so `verify`
    skips reads while the lease is certainly held: a holder's heartbeat seen between two reads
    was written after the first began, and a takeover needs the lease unchanged for
    `stale_after_s` after the holder's last write, so none happens before half of that has
    passed since the first read (the other half is margin). Reads go on every
    `stale_after_s / 8` meanwhile, and at every call once the holder has been silent too long.
    """

    def __init__(self, storage: Storage, run_name: str, owner: str, stale_after_s: float) -> None:
        self.storage, self.run_name, self.owner = storage, run_name, owner
        self.stale_after_s = stale_after_s
        self.key = lease_key(run_name)
        self._version: str | None = None  # the version read last
        self._read_at = -math.inf  # when that read began (time.monotonic)
        self._safe_until = -math.inf

    def verify(self, fresh: bool = False) -> None:
        """Raise LeaseLostError unless the lease is still this job's; `fresh` reads it in any
        case (before the writes that would harm another job: a commit, a deletion)."""
        began = time.monotonic()
        recent = began - self._read_at < self.stale_after_s / 8
        if not fresh and began < self._safe_until and recent:
            return
        holder, version, problem = read_holder(self.storage, self.key)
        if holder is None or holder.owner != self.owner or holder.released or version is None:
            raise LeaseLostError(self._lost(holder, problem))
        if self._version is not None and self._version != version:
            self._safe_until = self._read_at + self.stale_after_s / 2
        self._version, self._read_at = version, began

    def _lost(self, holder: Holder | None, problem: str) -> str:
        uri = self.storage.uri(self.key)
        if holder is not None and holder.owner != self.owner:
            what = f"another job took the run over: {uri} names {holder.describe()}"
        elif holder is not None:
            what = f"{uri} says the lease was released"
        else:
            what = problem or f"{uri} was deleted"
        return (
            f"run {self.run_name}: this job ({self.owner}) no longer holds its lease: {what}. It "
            "stopped before writing more, so as not to overwrite or prune the other job's "
            "checkpoints; the run continues in the job that holds the lease"
        )
