"""One live job per run: the run lease in local storage and a real S3 bucket, and a second
training job refused while the first holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neoray.checkpoint.lease import Holder, RunLease, RunLeaseHeld, lease_key

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def holder(storage, run_name: str) -> Holder:
    data, _ = storage.read_versioned(lease_key(run_name))
    return Holder.from_bytes(data)


def test_a_live_lease_is_refused_naming_its_holder_and_a_stale_one_taken_over(storage):
    clock = Clock()
    first = RunLease(storage, "run", "ray job first", stale_after_s=60, clock=clock)
    first.acquire()
    second = RunLease(storage, "run", "ray job second", stale_after_s=60, clock=clock)
    clock.now += 30
    assert first.heartbeat()
    clock.now += 59  # 59 s after the first's last heartbeat: still live
    with pytest.raises(RunLeaseHeld, match=r"run_name=run is being trained by ray job first"):
        second.acquire()
    assert holder(storage, "run").owner == "ray job first"

    clock.now += 2  # 61 s of silence: the first job is taken for dead
    second.acquire()
    assert holder(storage, "run").owner == "ray job second"
    assert not first.heartbeat() and first.lost  # the first learns it lost the run
    first.release()  # and releasing leaves the new holder alone
    assert holder(storage, "run").owner == "ray job second"
    assert not holder(storage, "run").released

    second.release()
    assert holder(storage, "run").released
    third = RunLease(storage, "run", "ray job third", stale_after_s=60, clock=clock)
    third.acquire()  # a released lease is free at once
    assert holder(storage, "run").owner == "ray job third"


def test_the_same_owner_takes_its_lease_back_after_a_restart(storage):
    clock = Clock()
    RunLease(storage, "run", "tune trial sweep/abc", stale_after_s=60, clock=clock).acquire()
    clock.now += 5
    again = RunLease(storage, "run", "tune trial sweep/abc", stale_after_s=60, clock=clock)
    again.acquire()
    assert holder(storage, "run").heartbeat == clock.now


def test_of_jobs_starting_together_exactly_one_gets_the_lease(storage):
    leases = [RunLease(storage, "run", f"process {i}", stale_after_s=60) for i in range(6)]
    start, outcomes = threading.Barrier(len(leases)), []

    def take(lease: RunLease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes.append(lease.owner)
        except RunLeaseHeld:
            outcomes.append(None)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [owner for owner in outcomes if owner is not None]
    assert holder(storage, "run").owner == winner


def test_heartbeats_keep_a_held_lease_fresh(storage):
    with RunLease(storage, "run", "process a", stale_after_s=4) as lease:  # a beat every 1 s
        first = holder(storage, "run").heartbeat
        deadline = time.monotonic() + 20
        while holder(storage, "run").heartbeat == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert not lease.lost
        with pytest.raises(RunLeaseHeld):
            RunLease(storage, "run", "process b", stale_after_s=4).acquire()
    assert holder(storage, "run").released


def test_a_second_training_job_on_a_held_run_is_refused_before_it_writes(tmp_path):
    store = tmp_path / "store"
    from neoray.storage import StorageConfig, open_storage

    storage = open_storage(StorageConfig(root=str(store)))
    command = [
        sys.executable,
        "jobs/pretrain.py",
        "launcher=torchrun",
        "model=tiny",
        "train.steps=3",
        "data.seq_len=32",
        "tracking.enabled=false",
        "run_name=shared",
        f"storage.root={store}",
        f"run_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with RunLease(storage, "shared", "ray job raysubmit_first", stale_after_s=60):
        refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "run_name=shared is being trained by ray job raysubmit_first" in refused.stderr
    assert not (store / "shared" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # Released: the next job trains, and releases the lease when it ends.
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (store / "shared" / "checkpoints" / "step_00000003" / "manifest.json").exists()
    assert holder(storage, "shared").released
