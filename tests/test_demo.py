"""`make demo`'s job, run for real through its Hydra entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import transformers

from neoray.tokenizer.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_job(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "demo.py"),
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "data"
    result = run_job(
        tmp_path,
        "batch.train_steps=60",
        "batch.micro_batch_size=8",
        "demo.new_tokens=8",
        f"demo.out_dir={out}",
        f"data.root={data}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation_loss_after"] < summary["validation_loss_before"] - 1.0
    assert summary["max_abs_logit_gap_vs_transformers"] <= 1e-4
    assert (data / "code.idx").exists() and (data / "prose.idx").exists()
    assert (out / "loss.png").stat().st_size > 1000
    # The export carries the tokenizer: transformers' own loader tokenizes as ours does.
    theirs = transformers.AutoTokenizer.from_pretrained(out / "hf")
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert theirs(text)["input_ids"] == load_tokenizer(str(data / "tokenizer.json")).encode(text)
    assert "greedy continuation" in result.stdout
    assert "| mmlu | " in result.stdout and "| mmlu |" in summary["mmlu"]


def test_demo_rejects_bad_config_before_any_work(tmp_path):
    never = tmp_path / "never"
    result = run_job(tmp_path, "batch.train_steps=0", f"demo.out_dir={never}", f"data.root={never}")
    assert result.returncode != 0 and "batch.train_steps must be at least 1" in result.stderr
    result = run_job(tmp_path, "data.seq_len=512", f"demo.out_dir={never}", f"data.root={never}")
    assert (
        result.returncode != 0
        and "data.seq_len (512) exceeds model.max_seq_len (256)" in result.stderr
    )
    result = run_job(tmp_path, "+demo.stpes=5")
    assert result.returncode != 0 and "unknown field(s) stpes" in result.stderr
    assert not never.exists()
