"""`neoray submit` to a Ray head started with `ray start --head` on 127.0.0.1 (token auth), with
an MLflow server: the job runs from the uploaded project and its MLflow run appears."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import services
from mlflow import MlflowClient

NEORAY = str(Path(sys.executable).parent / "neoray")
TINY = ["model=tiny", "data.seq_len=32", "train.peak_tflops=1.0", "tracking=server"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An MLflow server and a Ray head whose jobs log to it (what `neoray up` runs)."""
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow")) as mlflow:
        node_env = {
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": mlflow.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        with services.ray_head(node_env, num_cpus=2) as head:
            yield head, mlflow


def neoray(head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NEORAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **head.env()},
    )


@pytest.mark.slow
def test_submitted_pretrain_job_succeeds_and_is_tracked(stack, tmp_path):
    head, mlflow = stack
    run_dir = tmp_path / "submitted"
    result = neoray(
        head, "submit", "pretrain", *TINY, "parallel.dp=2", "train.steps=3", f"run_dir={run_dir}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submission = re.search(r"submitted (raysubmit_\w+)", result.stdout).group(1)
    assert f"job {submission} SUCCEEDED" in result.stdout
    assert "RayTrainWorker" in result.stdout  # the job's logs were followed
    assert neoray(head, "status", submission).stdout.strip() == "SUCCEEDED"
    assert "RayTrainWorker" in neoray(head, "logs", submission).stdout

    client = MlflowClient(mlflow.url)
    experiment = client.get_experiment_by_name("neoray").experiment_id
    [run] = client.search_runs([experiment], "tags.`neoray.run_name` = 'submitted'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.submission_id"] == submission
    assert run.data.tags["neoray.topology"] == "tp=1 pp=1 dp=2"
    assert run.data.params["train.steps"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert (run_dir / "metrics.jsonl").exists()  # an absolute run_dir is shared with the node


@pytest.mark.slow
def test_a_job_submitted_without_waiting_can_be_stopped(stack, tmp_path):
    head, _ = stack
    result = neoray(head, "submit", "--no-wait", "pretrain", *TINY, "train.steps=100000")
    assert result.returncode == 0, result.stderr[-3000:]
    submission = re.search(r"submitted (raysubmit_\w+)", result.stdout).group(1)
    assert "stopping" in neoray(head, "stop", submission).stdout
    deadline = time.monotonic() + 60
    while (status := neoray(head, "status", submission).stdout.strip()) != "STOPPED":
        assert time.monotonic() < deadline, status
        time.sleep(1)


def test_unknown_job_and_missing_cluster_are_explained(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    unknown = subprocess.run(
        [NEORAY, "submit", "pretrian"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert unknown.returncode != 0
    assert "no job 'pretrian': choose one of" in unknown.stderr and "pretrain" in unknown.stderr
    nowhere = subprocess.run(
        [NEORAY, "status", "raysubmit_x"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert nowhere.returncode != 0
    assert "no Ray cluster: start the local one with `neoray up`" in nowhere.stderr
