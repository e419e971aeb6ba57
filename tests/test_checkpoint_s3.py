"""Checkpoints in S3 (a real SeaweedFS) while it fails: the server stops mid-run and comes back,
stays down at the end of a run or while it resumes, and a shard is truncated in the bucket.

Training runs in a child process (this file run as a script) whose observer, at chosen steps,
asks the test to stop or start the server and waits until that is done, so the outage falls on
the same save points every time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = "faulty"
OVERRIDES = [
    "model=tiny",
    "data.seq_len=32",
    "parallel.micro_batch_size=2",
    "train.peak_tflops=1.0",
    "storage=s3",
    "storage.max_attempts=2",
    "storage.connect_timeout=1",
    "storage.read_timeout=5",
    "checkpoint.interval=1",
    "checkpoint.keep_last=2",
]


class ServerSwitch:
    """The child's observer: records what it is told, and at `stop_after` / `start_after`
    (metrics rows of those steps) has the test stop / start the S3 server."""

    def __init__(
        self, control: Path, storage, run: str, staging: Path, stop_after: int, start_after: int
    ) -> None:
        self.control, self.storage, self.run, self.staging = control, storage, run, staging
        self.stop_after, self.start_after = stop_after, start_after
        self.failed: set[int] = set()
        self.first_row = True

    def _event(self, **event) -> None:
        with open(self.control / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def _ask(self, action: str) -> None:
        (self.control / f"{action}.request").touch()
        deadline = time.monotonic() + 120
        while not (self.control / f"{action}.done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test did not {action} the server")
            time.sleep(0.05)

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        """Nothing to do: the switch acts on rows and checkpoints."""

    def on_metrics(self, row: dict) -> None:
        from neoray.checkpoint.manifest import committed_steps, manifest_key

        if self.first_row:
            self.first_row = False
            self._event(kind="first_row", committed=committed_steps(self.storage, self.run))
        if row["step"] == self.stop_after:
            self._ask("stop")
        if row["step"] == self.start_after:
            staged = sorted(p.name for p in self.staging.glob("step_*"))
            self._ask("start")
            exists = {
                s: self.storage.exists(manifest_key(self.run, s)) for s in sorted(self.failed)
            }
            self._event(kind="restarted", manifests_of_failed=exists, staged=staged)

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        self._event(kind="committed", step=step, uri=uri)

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        self.failed.add(step)
        self._event(kind="failed", step=step, error=error)


def child(control: Path, stop_after: int, start_after: int, overrides: list[str]) -> None:
    """One training process (no launcher) with a `ServerSwitch` observer; `stop_after` -2:
    the server is stopped when resume starts reading the checkpoint's files."""
    from hydra import compose, initialize_config_dir

    import neoray.checkpoint.resume
    from neoray.storage import open_storage
    from neoray.training.config import pretrain_config
    from neoray.training.loop import pretrain

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = pretrain_config(compose(config_name="pretrain", overrides=overrides))
    staging = Path(cfg.run_dir) / "staging" / cfg.run_name / "rank_00000"
    switch = ServerSwitch(
        control, open_storage(cfg.storage), cfg.run_name, staging, stop_after, start_after
    )
    if stop_after == -2:
        download = neoray.checkpoint.resume.download

        def download_after_an_outage(*args, **kwargs):
            switch._ask("stop")
            return download(*args, **kwargs)

        neoray.checkpoint.resume.download = download_after_an_outage
    pretrain(cfg, switch)


def train(
    service,
    tmp_path: Path,
    name: str,
    steps: int,
    stop_after=-1,
    start_after=-1,
    run: str = RUN,
    overrides: tuple[str, ...] = (),
    fails: bool = False,
) -> str:
    """Run the child; meanwhile serve its stop/start requests. Returns its output; it must
    have succeeded, or failed when `fails`."""
    control = tmp_path / name
    control.mkdir()
    overrides = [
        *OVERRIDES,
        *overrides,
        f"run_name={run}",
        f"train.steps={steps}",
        f"run_dir={tmp_path / run}",
        f"storage.bucket={service.bucket}",
        f"storage.endpoint_url={service.server.endpoint_url}",
    ]
    env = {
        **os.environ,
        **service.server.env(),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")]),
    }
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(variable, None)
    args = [str(control), str(stop_after), str(start_after), *overrides]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, __file__, *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        # Served from this thread: a server started from another thread would be killed when
        # that thread ends (its parent-death signal follows the starting thread).
        deadline = time.monotonic() + 240
        while process.poll() is None:
            for action in ("stop", "start"):
                request, done = control / f"{action}.request", control / f"{action}.done"
                if request.exists() and not done.exists():
                    if action == "stop":
                        service.stop()
                    else:
                        service.start()
                    done.touch()
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.05)
    output = log.read_text()
    assert (process.returncode != 0) == fails, output[-5000:]
    return output


def events(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / name / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(tmp_path: Path, run: str = RUN) -> dict[int, float]:
    rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, rows)}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS the tests stop and restart, a bucket in it, and a client to look inside."""
    from services import stoppable_seaweedfs

    with stoppable_seaweedfs(tmp_path_factory.mktemp("weed")) as service:
        service.bucket = service.server.new_bucket()
        yield service


@pytest.fixture(scope="module")
def outage(s3, tmp_path_factory):
    """8 steps, a checkpoint after each; the server is down from step 1's end to step 3's."""
    tmp_path = tmp_path_factory.mktemp("outage")
    output = train(s3, tmp_path, "outage", steps=8, stop_after=1, start_after=3)
    return tmp_path, output


def committed_steps(s3, run: str = RUN) -> list[int]:
    """Steps with a manifest in the bucket, listed by a plain boto3 client."""
    pages = s3.server.client().get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in pages.paginate(Bucket=s3.bucket, Prefix=f"{run}/checkpoints/")
        for obj in page.get("Contents", [])
    ]
    return sorted(
        int(k.split("/")[-2][len("step_") :]) for k in keys if k.endswith("/manifest.json")
    )


def test_training_goes_on_while_storage_is_down(s3, outage, monkeypatch):
    tmp_path, output = outage
    assert sorted(losses(tmp_path)) == list(range(8))  # every step trained
    log = events(tmp_path, "outage")
    failed = [e for e in log if e["kind"] == "failed"]
    assert {2, 3} <= {e["step"] for e in failed}  # saved while the server was down
    assert all(f"s3://{s3.bucket}/{RUN}/checkpoints/step_0000000" in e["error"] for e in failed)
    assert "not committed (tried again at the next save)" in output
    restarted = next(e for e in log if e["kind"] == "restarted")
    assert restarted["manifests_of_failed"] and not any(restarted["manifests_of_failed"].values())
    # the staging folder kept only the newest uncommitted checkpoint: 3 superseded 2
    assert "checkpoint step 2 was never committed and is superseded by step 3" in output
    assert restarted["staged"] == ["step_00000003", "step_00000003.staged.json"]
    committed = [e["step"] for e in log if e["kind"] == "committed"]
    assert committed[-1] == 8 and max(committed[:-1]) == 7  # later checkpoints commit again
    assert committed_steps(s3) == [7, 8]  # retention: the last two

    from neoray.checkpoint import checkpoint_from_uri, download

    for name, value in s3.server.env().items():
        monkeypatch.setenv(name, value)
    storage, manifest = checkpoint_from_uri(f"s3://{s3.bucket}/{RUN}/checkpoints/step_00000008")
    assert manifest.step == 8 and manifest.tokens_seen == 8 * 2 * 32
    fetched = download(storage, manifest, tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(e.path for e in manifest.files)


def test_resume_rejects_a_truncated_shard_and_uses_the_previous_checkpoint(s3, outage):
    tmp_path, _ = outage
    before = losses(tmp_path)
    client = s3.server.client()
    shard = f"{RUN}/checkpoints/step_00000008/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = client.get_object(Bucket=s3.bucket, Key=shard)["Body"].read()
    client.put_object(Bucket=s3.bucket, Key=shard, Body=data[: len(data) // 2])

    output = train(s3, tmp_path, "truncated", steps=10)
    assert f"{shard}: {len(data) // 2} bytes, the manifest says {len(data)}" in output
    assert "rejecting checkpoint step 8" in output
    assert f"resumed run '{RUN}' at step 7" in output
    # step 8's old manifest is gone before step 8 is saved again
    first_row = next(e for e in events(tmp_path, "truncated") if e["kind"] == "first_row")
    assert first_row["committed"] == [7]
    after = losses(tmp_path)
    assert sorted(after) == list(range(10))
    assert after[7] == before[7]  # step 7 trained again from step 7's checkpoint, identically
    assert committed_steps(s3) == [9, 10]


def staged_files(tmp_path: Path, run: str) -> dict[str, str]:
    """sha256 of every staged file of a run's rank 0, by path under its staging folder."""
    from neoray.checkpoint.manifest import sha256_file

    folder = tmp_path / run / "staging" / run / "rank_00000"
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0].startswith("step_")
    }


def bucket(s3, monkeypatch):
    """The test bucket as the project's storage, with the server's credentials."""
    from neoray.storage import S3Storage, StorageConfig

    for name, value in s3.server.env().items():
        monkeypatch.setenv(name, value)
    return S3Storage(
        StorageConfig(kind="s3", bucket=s3.bucket, endpoint_url=s3.server.endpoint_url)
    )


def test_an_uncommitted_final_checkpoint_fails_the_run_and_is_committed_at_its_restart(
    s3, tmp_path, monkeypatch
):
    """Storage goes down before the last save and stays down: the job ends non-zero, keeping
    the checkpoint; started again with storage back, it commits exactly those files."""
    run = "unfinished"
    output = train(s3, tmp_path, "down", steps=4, stop_after=3, run=run, fails=True)
    assert "UncommittedCheckpointError: checkpoints of steps [4]" in output
    assert "run the same job again once storage works" in output
    staged = staged_files(tmp_path, run)
    assert {name.split("/")[0] for name in staged} == {
        "step_00000004", "step_00000004.staged.json"
    }  # fmt: skip
    s3.start()
    assert committed_steps(s3, run) == [1, 2]

    output = train(s3, tmp_path, "back", steps=4, run=run)
    assert "staged checkpoints of steps [4] were never committed; uploading them" in output
    assert f"resumed run '{run}' at step 4" in output
    assert committed_steps(s3, run) == [2, 4]
    from neoray.checkpoint.manifest import read_manifest

    manifest = read_manifest(bucket(s3, monkeypatch), run, 4)
    assert {f"step_00000004/{e.path}": e.sha256 for e in manifest.files} == {
        name: digest for name, digest in staged.items() if not name.endswith(".json")
    }
    assert not staged_files(tmp_path, run)  # nothing left behind


def test_staging_past_its_limit_stops_the_run_keeping_milestones(s3, tmp_path, monkeypatch):
    """Storage down from step 2's save with milestones on: failed milestones are kept (not
    superseded) until they exceed checkpoint.max_staging_gb; the next start commits them all
    and trains on from the newest, with the losses of an uninterrupted run."""
    run = "milestones"
    settings = ("checkpoint.milestones=true", "checkpoint.interval=100", "checkpoint.keep_last=5")
    reference = train(s3, tmp_path, "reference", steps=6, run="reference", overrides=settings)
    assert "committed checkpoint" in reference
    from neoray.checkpoint.manifest import read_manifest

    size = sum(e.size for e in read_manifest(bucket(s3, monkeypatch), "reference", 4).files)
    limit = f"checkpoint.max_staging_gb={2.5 * size / 1e9}"
    output = train(
        s3, tmp_path, "full", 6, stop_after=1, run=run, overrides=(*settings, limit), fails=True
    )
    assert "over checkpoint.max_staging_gb" in output and "steps [1, 2, 4]" in output
    assert [n for n in sorted(staged_files(tmp_path, run)) if n.endswith(".json")] == [
        "step_00000001.staged.json", "step_00000002.staged.json", "step_00000004.staged.json"
    ]  # fmt: skip
    s3.start()
    output = train(s3, tmp_path, "resumed", 6, run=run, overrides=(*settings, limit))
    assert "staged checkpoints of steps [1, 2, 4] were never committed" in output
    assert f"resumed run '{run}' at step 4" in output
    assert committed_steps(s3, run) == [0, 1, 2, 4, 6]
    assert losses(tmp_path, run) == losses(tmp_path, "reference")


def test_storage_down_while_resuming_stops_without_falling_back(s3, outage):
    """Transient storage errors while reading the latest checkpoint are not corruption: the
    run stops, touching no checkpoint, and resumes from that same one once storage is back."""
    tmp_path, _ = outage
    before = committed_steps(s3)
    output = train(s3, tmp_path, "unreachable", steps=12, stop_after=-2, fails=True)
    assert "not falling back to an older checkpoint" in output
    assert "rejecting checkpoint" not in output
    s3.start()
    assert committed_steps(s3) == before
    output = train(s3, tmp_path, "reachable", steps=12)
    assert f"resumed run '{RUN}' at step {before[-1]}" in output


if __name__ == "__main__":
    child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
