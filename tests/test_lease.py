"""One live job per run: the run lease in local storage and a real S3 bucket, and a second
training job refused while the first holds it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neoray.checkpoint.lease import (
    Holder,
    LeaseCheck,
    LeaseLostError,
    RunLease,
    RunLeaseHeld,
    lease_key,
)

ROOT = Path(__file__).resolve().parents[1]


def holder(storage, run_name: str) -> Holder:
    data, _ = storage.read_versioned(lease_key(run_name))
    return Holder.from_bytes(data)


def skewed(seconds: float):
    """The wall clock of a machine `seconds` ahead of this one (behind, when negative)."""
    return lambda: time.time() + seconds


def test_a_live_lease_is_refused_whatever_the_clocks_and_a_silent_one_taken_over(storage):
    # A live holder whose clock lags 200 s, seen by a job whose clock is 200 s ahead: its
    # heartbeat looks 400 s old, yet the lease changes while the second job watches it.
    with RunLease(storage, "run", "ray job first", stale_after_s=1, clock=skewed(-200)):
        second = RunLease(storage, "run", "ray job second", stale_after_s=1, clock=skewed(200))
        with pytest.raises(RunLeaseHeld, match=r"run_name=run is being trained by ray job first"):
            second.acquire()
    assert holder(storage, "run").released
    second.acquire()  # a released lease is free at once
    assert holder(storage, "run").owner == "ray job second"

    # A holder that stopped heartbeating (no thread beats for it) is taken over, by a job
    # whose clock is 200 s behind, after watching it unchanged for stale_after_s.
    third = RunLease(storage, "run", "ray job third", stale_after_s=1, clock=skewed(-200))
    began = time.monotonic()
    third.acquire()
    assert time.monotonic() - began >= 1
    assert holder(storage, "run").owner == "ray job third"
    assert not second.heartbeat() and second.lost  # the second learns it lost the run
    second.release()  # and releasing leaves the new holder alone
    assert holder(storage, "run").owner == "ray job third"
    assert not holder(storage, "run").released


@pytest.mark.parametrize("content", [b"", b'{"owner": "ray job fi'])
def test_an_unreadable_lease_is_named_and_taken_over_once_it_stays_unchanged(storage, content):
    storage.put_bytes(lease_key("run"), content)
    with pytest.raises(LeaseLostError, match=r"lease.json is not a lease"):
        LeaseCheck(storage, "run", "ray job first", stale_after_s=1).verify()
    began = time.monotonic()
    RunLease(storage, "run", "ray job first", stale_after_s=1).acquire()
    assert time.monotonic() - began >= 1
    assert holder(storage, "run").owner == "ray job first"


def test_a_job_whose_lease_was_taken_over_is_told_the_new_holder(storage):
    first = RunLease(storage, "run", "ray job first", stale_after_s=1)
    first.acquire()
    check = LeaseCheck(storage, "run", "ray job first", stale_after_s=1)
    check.verify()
    # The first job stalls (no heartbeat); a second job, its clock 200 s ahead, takes over.
    RunLease(storage, "run", "ray job second", stale_after_s=1, clock=skewed(200)).acquire()
    with pytest.raises(LeaseLostError, match=r"another job took the run over: .* ray job second"):
        check.verify()


def test_the_same_owner_takes_its_lease_back_after_a_restart(storage):
    RunLease(storage, "run", "tune trial sweep/abc", stale_after_s=60).acquire()
    again = RunLease(storage, "run", "tune trial sweep/abc", stale_after_s=60, clock=lambda: 5.0)
    again.acquire()  # at once, not after watching it for 60 s
    assert holder(storage, "run").heartbeat == 5.0


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


def test_a_heartbeat_reported_failed_that_was_written_keeps_the_lease(s3_bucket):
    """The server stores a heartbeat, but the job is told the write failed (the connection
    closed as the response came back): its next heartbeat, refused against the version it
    knew, finds its own lease and goes on holding it."""
    from botocore.exceptions import ConnectionClosedError

    from neoray.storage import StorageConfig, StorageError, open_storage

    storage = open_storage(StorageConfig(kind="s3", bucket=s3_bucket))
    lease = RunLease(storage, "run", "ray job first", stale_after_s=60)
    lease.acquire()

    def close_connection(http_response, **_):
        if http_response.status_code == 200:
            raise ConnectionClosedError(endpoint_url=storage.uri("run/lease.json"))

    events = storage.client.meta.events
    events.register_first("after-call.s3.PutObject", close_connection, unique_id="close")
    try:
        with pytest.raises(StorageError, match=r"ConnectionClosedError"):
            lease.heartbeat()
    finally:
        events.unregister("after-call.s3.PutObject", unique_id="close")
    assert holder(storage, "run").beats == 1  # written, though reported failed
    assert lease.heartbeat() and not lease.lost
    assert holder(storage, "run").beats == 2


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
        "checkpoint.lease_timeout_s=2",
        f"storage.root={store}",
        f"run_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with RunLease(storage, "shared", "ray job raysubmit_first", stale_after_s=2):
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


def test_a_training_job_that_lost_its_lease_stops_before_its_next_write(s3_bucket, tmp_path):
    """A dp=2 job checkpointing to S3 stalls (SIGSTOP to every process, as in a frozen VM) for
    longer than its lease timeout, and a job on a machine whose clock is 200 s ahead takes the
    run over. Resumed, the first job writes no manifest, deletes nothing, logs no metrics row,
    and fails naming the new holder."""
    import signal

    import psutil
    from distributed import torchrun_launcher

    from neoray.storage import StorageConfig, open_storage

    storage = open_storage(StorageConfig(kind="s3", bucket=s3_bucket))
    run_dir = tmp_path / "run"
    command = [
        *torchrun_launcher(2),
        "jobs/pretrain.py",
        "launcher=torchrun",
        "model=tiny",
        "parallel.dp=2",
        "data.seq_len=32",
        "train.steps=100000",
        "train.peak_tflops=1.0",
        "tracking.enabled=false",
        "run_name=stalled",
        "checkpoint.interval=3",
        "checkpoint.keep_last=1",
        "checkpoint.lease_timeout_s=3",
        "storage=s3",
        f"storage.bucket={s3_bucket}",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    launcher = psutil.Process(job.pid)
    workers: list[psutil.Process] = []  # torchrun starts each in a session of its own

    def written() -> dict[str, bytes]:
        return {key: storage.get_bytes(key) for key in storage.list("stalled/")}

    def committed_after_step_6() -> bool:
        keys = storage.list("stalled/checkpoints/")
        return any(
            k.endswith("manifest.json") and k > "stalled/checkpoints/step_00000006" for k in keys
        )

    try:
        deadline = time.monotonic() + 180
        while not committed_after_step_6():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint of step 6"
            time.sleep(0.2)
        workers = launcher.children(recursive=True)
        for process in [launcher, *workers]:
            process.send_signal(signal.SIGSTOP)
        RunLease(storage, "stalled", "ray job raysubmit_second", 3, skewed(200)).acquire()
        before = written()
        rows = (run_dir / "metrics.jsonl").read_text().count("\n")
        for process in [launcher, *workers]:
            process.send_signal(signal.SIGCONT)
        output, _ = job.communicate(timeout=120)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers = workers or launcher.children(recursive=True)
        for process in [launcher, *workers]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        print(job.communicate()[0][-5000:])

    assert job.returncode != 0
    assert "LeaseLostError" in output
    assert "another job took the run over" in output and "ray job raysubmit_second" in output
    # No checkpoint committed or touched. (A job frozen in the middle of a prune still deletes
    # the rest of a checkpoint whose manifest it had deleted before, and one frozen during an
    # upload still sends the rest of an uncommitted one: neither is a checkpoint of the run.)
    after = written()
    manifests = [key for key in before if key.endswith("manifest.json")]
    assert [key for key in after if key.endswith("manifest.json")] == manifests
    folders = {key.rsplit("/", 1)[0] for key in manifests}
    committed = {key: data for key, data in before.items() if key.rsplit("/", 1)[0] in folders}
    assert {key: after.get(key) for key in committed} == committed
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == rows
    assert holder(storage, "stalled").owner == "ray job raysubmit_second"


def _commit_after_takeover(rank: int, root: str) -> None:
    """One rank of a dp=2 job that finds a checkpoint staged by its earlier start, its lease
    meanwhile taken over: recovering it must upload but not commit, on every rank."""
    import json
    from dataclasses import asdict

    from neoray.checkpoint.config import CheckpointConfig
    from neoray.checkpoint.snapshot import Snapshots, Staged
    from neoray.storage import StorageConfig, open_storage

    storage = open_storage(StorageConfig(root=root))
    topology = {"tp": 1, "pp": 1, "dp": 2}
    lease = LeaseCheck(storage, "run", "ray job first", stale_after_s=60) if rank == 0 else None

    def no_manifest(step: int, files: list) -> None:
        raise AssertionError(f"step {step} committed after the lease was lost")

    snapshots = Snapshots(
        storage,
        "run",
        CheckpointConfig(),
        Path(root).parent / "staging",
        topology,
        no_manifest,
        on_commit=lambda *_: None,
        on_failure=lambda *_: None,
        lease=lease,
    )
    folder = snapshots.staging / "step_00000003"
    folder.mkdir(parents=True)
    (folder / f"rank_{rank}.pt").write_bytes(b"weights")
    staged = Staged("run", 3, rank, topology, {f"rank_{rank}.pt": 7})
    (snapshots.staging / "step_00000003.staged.json").write_text(json.dumps(asdict(staged)))
    with pytest.raises(LeaseLostError, match=r"another job took the run over: .* ray job second"):
        snapshots.recover(None)


def test_every_rank_stops_at_a_commit_once_the_lease_is_lost(tmp_path):
    from distributed import run_workers

    from neoray.storage import StorageConfig, open_storage

    root = tmp_path / "store"
    storage = open_storage(StorageConfig(root=str(root)))
    RunLease(storage, "run", "ray job first", stale_after_s=1).acquire()
    RunLease(storage, "run", "ray job second", stale_after_s=1, clock=skewed(200)).acquire()
    run_workers(_commit_after_takeover, 2, str(root), timeout=120)
    assert [key for key in storage.list("run/") if key.endswith("manifest.json")] == []
