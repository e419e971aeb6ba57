"""`make demo`'s job, run for real through its Hydra entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "demo.py"), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def test_demo_trains_exports_and_generates(tmp_path):
    out = tmp_path / "demo"
    result = run_job(
        "demo.steps=40",
        "demo.batch_size=4",
        "demo.new_tokens=8",
        f"demo.out_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 1.0  # it learned something
    assert summary["max_abs_logit_gap_vs_transformers"] <= 1e-4
    assert (out / "hf" / "model.safetensors").exists()
    assert (out / "loss.png").stat().st_size > 1000
    assert "greedy continuation" in result.stdout


def test_demo_rejects_bad_config_before_work(tmp_path):
    result = run_job(
        "demo.steps=0", f"demo.out_dir={tmp_path / 'never'}", f"hydra.run.dir={tmp_path / 'h'}"
    )
    assert result.returncode != 0
    assert "demo.steps must be positive" in result.stderr
    assert not (tmp_path / "never").exists()
    result = run_job("+demo.stpes=5", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode != 0
    assert "unknown field(s) stpes" in result.stderr
