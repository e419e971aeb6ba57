"""Pretraining on Ray Train: workers on a local Ray train exactly as torchrun's processes do."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from distributed import run_command, torchrun_launcher
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
# Two ranks (a 2-stage pipeline), fp32, the tiny model: small enough for two CPU cores.
CONFIG = [
    "model=tiny",
    "parallel.pp=2",
    "train.steps=4",
    "data.seq_len=32",
    "train.peak_tflops=1.0",
    "tracking.system_metrics=false",
    "checkpoint.enabled=false",
]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def env(tmp_path):
    """A job's environment: a local Ray with its state under a short temporary directory
    (socket paths must fit in 107 bytes) and no authentication state from ~/.ray."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_train_workers_match_torchrun(tmp_path, env):
    ray_dir, torchrun_dir = tmp_path / "ray", tmp_path / "torchrun"
    env.pop("RAY_ADDRESS", None)
    output = run_command(
        [sys.executable, "jobs/pretrain.py", *CONFIG, f"run_dir={ray_dir}", "run_name=on-ray"],
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert "RayTrainWorker" in output  # the ranks ran as Ray Train workers
    launcher = torchrun_launcher(2)
    run_command(
        [*launcher, "jobs/pretrain.py", "launcher=torchrun", *CONFIG, f"run_dir={torchrun_dir}"],
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    on_ray, on_torchrun = metrics(ray_dir), metrics(torchrun_dir)
    assert [row["step"] for row in on_ray] == [0, 1, 2, 3]
    assert [row["loss"] for row in on_ray] == pytest.approx(
        [row["loss"] for row in on_torchrun], rel=1e-6
    )

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("neoray").experiment_id
    [run] = client.search_runs([experiment], "tags.`neoray.run_name` = 'on-ray'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["neoray.launcher"] == "ray"
    assert run.data.tags["neoray.topology"] == "tp=1 pp=2 dp=1"
    assert len(run.data.tags["ray.job_id"]) == 8  # Ray's job ids are 4 bytes in hex
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx([row["loss"] for row in on_ray])
