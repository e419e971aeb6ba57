"""Checkpoints in S3 (a real SeaweedFS) while it fails: the server stops mid-run and comes back,
and a shard is truncated in the bucket.

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
    f"run_name={RUN}",
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

    def __init__(self, control: Path, storage, stop_after: int, start_after: int) -> None:
        self.control, self.storage = control, storage
        self.stop_after, self.start_after = stop_after, start_after
        self.failed: set[int] = set()

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

    def on_metrics(self, row: dict) -> None:
        if row["step"] == self.stop_after:
            self._ask("stop")
        if row["step"] == self.start_after:
            self._ask("start")
            from neoray.checkpoint.manifest import manifest_key

            exists = {s: self.storage.exists(manifest_key(RUN, s)) for s in sorted(self.failed)}
            self._event(kind="restarted", manifests_of_failed=exists)

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        self._event(kind="committed", step=step, uri=uri)

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        self.failed.add(step)
        self._event(kind="failed", step=step, error=error)


def child(control: Path, stop_after: int, start_after: int, overrides: list[str]) -> None:
    """One training process (no launcher) with a `ServerSwitch` observer."""
    from hydra import compose, initialize_config_dir

    from neoray.storage import open_storage
    from neoray.train.config import pretrain_config
    from neoray.train.loop import pretrain

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = pretrain_config(compose(config_name="pretrain", overrides=overrides))
    pretrain(cfg, ServerSwitch(control, open_storage(cfg.storage), stop_after, start_after))


def train(service, tmp_path: Path, name: str, steps: int, stop_after=-1, start_after=-1) -> str:
    """Run the child; meanwhile serve its stop/start requests. Returns its output."""
    control = tmp_path / name
    control.mkdir()
    overrides = [
        *OVERRIDES,
        f"train.steps={steps}",
        f"run_dir={tmp_path / 'run'}",
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
    assert process.returncode == 0, output[-5000:]
    return output


def events(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / name / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(tmp_path: Path) -> dict[int, float]:
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
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


def committed_steps(s3) -> list[int]:
    """Steps with a manifest in the bucket, listed by a plain boto3 client."""
    pages = s3.server.client().get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in pages.paginate(Bucket=s3.bucket, Prefix=f"{RUN}/checkpoints/")
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
    assert "not committed (uploaded again at the next save)" in output
    restarted = next(e for e in log if e["kind"] == "restarted")
    assert restarted["manifests_of_failed"] and not any(restarted["manifests_of_failed"].values())
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
    after = losses(tmp_path)
    assert sorted(after) == list(range(10))
    assert after[7] == before[7]  # step 7 trained again from step 7's checkpoint, identically
    assert committed_steps(s3) == [9, 10]


if __name__ == "__main__":
    child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
