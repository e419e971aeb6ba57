"""The run report in a real headless Chromium: no console errors, every figure drawn, and a
run with missing pieces still renders with each empty section saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, ink, inspect_page

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = 7  # loss, epochs, learning rate, throughput, checkpoints, evaluations, energy

pytestmark = pytest.mark.slow


def job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory, mlflow_tracking_uri):
    """A short run on the demo mixture: validation per component, energy, two checkpoints,
    tracked in MLflow; then evaluation results across its checkpoints, as evaluation logs
    them on the training run."""
    from mlflow import MlflowClient

    from neoray.tracking import TrackingConfig, experiment_id, find_run

    folder = tmp_path_factory.mktemp("report")
    job(
        "jobs/pretrain.py",
        "launcher=torchrun",
        "data=demo",
        f"data.root={demo_data.root}",
        "data.seq_len=32",
        "train.steps=8",
        "train.eval_interval=4",
        "train.eval_iters=2",
        "train.peak_tflops=1.0",
        "energy.interval=2",
        "checkpoint.interval=4",
        f"storage.root={folder / 'storage'}",
        "run_name=reported",
        f"run_dir={folder / 'reported'}",
    )
    client = MlflowClient(mlflow_tracking_uri)
    run = find_run(client, experiment_id(client, TrackingConfig().experiment), "reported")
    for step, (zero, five) in {4: (0.24, 0.26), 8: (0.27, 0.31)}.items():
        client.log_metric(run.info.run_id, "eval/mmlu_0shot/mmlu/acc", zero, step=step)
        client.log_metric(run.info.run_id, "eval/mmlu_5shot/mmlu/acc", five, step=step)
        client.log_metric(run.info.run_id, "eval/math/gsm8k/exact_match", zero / 10, step=step)
    return folder


def check_renders(page: dict, figures: int) -> None:
    assert page["errors"] == []
    assert len(page["images"]) == figures
    for image, shot in zip(page["images"], page["shots"], strict=True):
        assert image["natural"] > 0 and image["width"] > 100 and image["height"] > 100, image
        assert ink(shot) > 0.02, f"{image['alt']}: the figure is blank"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (make install sets it up)")
def test_the_report_renders_every_figure_in_chromium(trained, mlflow_tracking_uri):
    printed = job("jobs/report.py", "run_name=reported", f"run_dir={trained / 'reported'}")
    report = trained / "reported" / "report.html"
    assert f"report: {report}" in printed.stdout
    screenshot = trained / "report.png"
    page = inspect_page(report, screenshot)
    check_renders(page, SECTIONS)
    assert page["missing"] == []
    text = report.read_text()
    for needle in ("last validation loss", "optim.lr", "step 8", "Energy and CO2", " kg"):
        assert needle in text, needle
    from neoray.energy.meter import RaplCounters

    assert ("ESTIMATE" in text) == (not RaplCounters.readable())  # said where it is one

    from mlflow import MlflowClient

    from neoray.tracking import experiment_id, find_run

    client = MlflowClient(mlflow_tracking_uri)
    run = find_run(client, experiment_id(client, "neoray"), "reported")
    assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (make install sets it up)")
def test_a_run_with_missing_pieces_still_renders(trained, tmp_path):
    """Metrics only (no MLflow run, so no checkpoints, evaluations or config)."""
    run_dir = tmp_path / "untracked"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text((trained / "reported" / "metrics.jsonl").read_text())
    job("jobs/report.py", "run_name=untracked", f"run_dir={run_dir}", "tracking.enabled=false")
    page = inspect_page(run_dir / "report.html")
    check_renders(page, SECTIONS - 2)
    assert any(note.startswith("No evaluations yet") for note in page["missing"])
    assert any(note.startswith("No committed checkpoint") for note in page["missing"])
    assert any("config is not recorded" in note for note in page["missing"])
