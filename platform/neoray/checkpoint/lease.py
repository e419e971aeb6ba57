"""One live job per run: a lease in the checkpoint storage, `<run_name>/lease.json`.

Two jobs training one `run_name` at once (a resubmit while the first still runs) would
overwrite each other's checkpoint files and prune each other's checkpoints. So the process that
owns a run (the Ray driver, or rank 0 under torchrun) takes the run's lease before anything
is written, refreshes its heartbeat while the run trains and releases it at the end. Every
write is conditional on the version read (S3's If-None-Match / If-Match; a folder lock
locally), so of two jobs starting together exactly one gets the lease. A lease whose holder
stopped heartbeating for `stale_after_s` (a killed job) is taken over, and so is one held by
the same owner (a job that restarts under the same identity: a Ray Tune trial, a Ray job).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from neoray.storage import Storage, StorageError, join_key


class RunLeaseHeld(StorageError):
    """Another live job holds the run's lease."""


@dataclass
class Holder:
    """What `lease.json` says about the job that holds (or released) the lease."""

    owner: str  # stable across restarts of one job (see `default_owner`)
    host: str
    pid: int
    started: float  # unix time the lease was taken
    heartbeat: float  # unix time of the holder's last sign of life
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        return cls(**json.loads(data))

    def describe(self, now: float) -> str:
        return (
            f"{self.owner} (host {self.host}, pid {self.pid}, last heartbeat "
            f"{now - self.heartbeat:.0f} s ago)"
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


class RunLease:
    """The lease of `run_name`, held from `acquire()` to `release()`; a context manager that
    heartbeats from a thread every `stale_after_s / 4` while held."""

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
        """Take the lease, or raise RunLeaseHeld naming the live job that has it."""
        current = self.storage.read_versioned(self.key)
        now = self.clock()
        version = None
        if current is not None:
            data, version = current
            holder = Holder.from_bytes(data)
            live = not holder.released and now - holder.heartbeat < self.stale_after_s
            if live and holder.owner != self.owner:
                raise self._held(holder, now)
            if live:
                print(
                    f"run {self.run_name}: taking the lease back from an earlier attempt of {self.owner}",
                    flush=True,
                )
            elif not holder.released:
                print(
                    f"run {self.run_name}: taking over the lease of {holder.describe(now)}, "
                    f"silent for more than checkpoint.lease_timeout_s={self.stale_after_s:g}",
                    flush=True,
                )
        mine = Holder(self.owner, socket.gethostname(), os.getpid(), now, now)
        written = self.storage.put_if(self.key, mine.to_bytes(), version)
        if written is None:  # another job wrote the lease since it was read
            winner = self.storage.read_versioned(self.key)
            raise self._held(Holder.from_bytes(winner[0]) if winner else mine, self.clock())
        self._holder, self._version = mine, written

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False (and `lost`) when another job has taken the lease."""
        if self._holder is None or self.lost:
            return False
        self._holder.heartbeat = self.clock()
        written = self.storage.put_if(self.key, self._holder.to_bytes(), self._version)
        if written is None:
            self.lost = True
            print(
                f"run {self.run_name}: another job took over the lease (this one was silent "
                f"for more than {self.stale_after_s:g} s); its checkpoints may now conflict",
                flush=True,
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
                print(f"run {self.run_name}: lease heartbeat failed: {err}", flush=True)

    def _held(self, holder: Holder, now: float) -> RunLeaseHeld:
        return RunLeaseHeld(
            f"run_name={self.run_name} is being trained by {holder.describe(now)}: its lease is "
            f"{self.storage.uri(self.key)}. Stop that job first, or choose another run_name; a "
            f"job that died without releasing it is taken over once its heartbeat is "
            f"checkpoint.lease_timeout_s={self.stale_after_s:g} s old."
        )
