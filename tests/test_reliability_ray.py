"""Crash-proof training on Ray at a model-parallel layout: SIGKILL one Ray Train worker of a
tp=2 run mid-run; Ray Train restarts the worker group, training resumes from the last
committed checkpoint at its own layout and finishes, and its losses are those of a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from distributed import run_command, torchrun_launcher
from mlflow import MlflowClient
from run_history import check_history, resumed_at

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
CONFIG = [
    "model=tiny",
    "parallel.tp=2",
    f"train.steps={STEPS}",
    "data.seq_len=32",
    "train.peak_tflops=1.0",
    "tracking.system_metrics=false",
]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_workers(job: psutil.Process) -> list[psutil.Process]:
    """The Ray Train workers of the local Ray the job started (its descendants)."""
    workers = []
    for process in job.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def committed(store: Path, run_name: str) -> list[int]:
    manifests = (store / run_name / "checkpoints").glob("step_*/manifest.json")
    return sorted(int(path.parent.name.removeprefix("step_")) for path in manifests)


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    store, run_dir = tmp_path / "store", tmp_path / "crashed"
    command = [
        sys.executable,
        "jobs/pretrain.py",
        *CONFIG,
        "run_name=crashed",
        f"storage.root={store}",
        "checkpoint.interval=10",
        "cluster.max_failures=1",
        f"run_dir={run_dir}",
    ]
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # Once a checkpoint past step 0 is committed and a step past it is logged, kill one
        # worker: the steps between that checkpoint and the kill are then trained (and logged)
        # twice. Checkpoints commit in the background, so the newest one can land before the
        # next step is logged; killing then would leave nothing to train again.
        deadline = time.monotonic() + 300
        while True:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint committed in time"
            newest = max(committed(store, "crashed"), default=0)
            logged = max((row["step"] for row in rows(run_dir)), default=-1)
            if newest > 0 and logged > newest:
                break
            time.sleep(0.02)
        assert logged < STEPS - 1, "training ended before a worker could be killed"
        victim = train_workers(psutil.Process(job.pid))[-1]
        os.kill(victim.pid, signal.SIGKILL)
        assert job.wait(timeout=400) == 0, log.read_text()[-5000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    uninterrupted = tmp_path / "uninterrupted"
    launcher = torchrun_launcher(2)
    run_command(
        [
            *launcher,
            "jobs/pretrain.py",
            "launcher=torchrun",
            *CONFIG,
            "checkpoint.enabled=false",
            "tracking.enabled=false",
            f"run_dir={uninterrupted}",
        ],
        timeout=400,
        cwd=ROOT,
        env=env,
    )
    resumed, expected = rows(run_dir), rows(uninterrupted)
    assert [row["step"] for row in resumed] == list(range(STEPS))
    assert [row["loss"] for row in resumed] == pytest.approx(
        [row["loss"] for row in expected], rel=1e-6
    )

    # One MLflow run, continued after the restart, with every step as promised, and every
    # committed checkpoint recorded.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("neoray").experiment_id
    [run] = client.search_runs([experiment], "tags.`neoray.run_name` = 'crashed'")
    assert run.info.status == "FINISHED"
    resumed_step = resumed_at(log.read_text(), "crashed")
    assert newest <= resumed_step
    check_history(client.get_metric_history(run.info.run_id, "loss"), resumed, resumed_step)
    recorded = sorted(
        int(key.removeprefix("checkpoint.step_"))
        for key in run.data.tags
        if key.startswith("checkpoint.step_")
    )
    assert committed(store, "crashed")[-1] == STEPS
    assert set(committed(store, "crashed")) <= set(recorded)
