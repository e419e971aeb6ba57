"""Sweep overhead: a 4-trial FIFO sweep against the same 4 runs of jobs/pretrain.py in a row.

Both sides train the same four configurations (learning rates) of the tiny model on synthetic
data, one run at a time (the sweep with `max_concurrent_trials=1`), each run on one Ray Train
worker with in-loop validation. The sweep pays for Ray Tune (trial actors, result plumbing,
its state on disk) and its MLflow parent run; the plain runs pay for starting Ray each time.
The ratio is total wall time, sweep over plain runs.

    DS_ACCELERATOR=cpu .venv/bin/python bench/sweep_overhead.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.10
LEARNING_RATES = [3e-3, 1e-3, 3e-4, 1e-4]


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        work = Path(tmp)
        base = [
            "model=tiny",
            "data.seq_len=128",
            "parallel.micro_batch_size=8",
            f"train.steps={args.steps}",
            f"train.eval_interval={max(args.steps // 4, 1)}",
            "train.eval_iters=2",
            "train.peak_tflops=1.0",
            "train.log_interval=0",
            "optim.min_lr=0",
            "tracking.system_metrics=false",
            f"storage.root={work / 'checkpoints'}",
        ]
        (work / "conf" / "sweep").mkdir(parents=True)
        sweep = {
            "name": "bench",
            "space": {"optim.lr": {"grid": LEARNING_RATES}},
            "num_samples": 1,
            "max_concurrent_trials": 1,
            "scheduler": {"name": "fifo"},
        }
        (work / "conf" / "sweep" / "bench.yaml").write_text(yaml.safe_dump(sweep))
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}",
        }
        plain = sum(
            timed(
                [
                    sys.executable,
                    "jobs/pretrain.py",
                    *base,
                    f"optim.lr={lr!r}",
                    f"run_name=plain-{i}",
                    f"run_dir={work / 'plain' / str(i)}",
                ],
                env,
            )
            for i, lr in enumerate(LEARNING_RATES)
        )
        swept = timed(
            [
                sys.executable,
                "jobs/sweep.py",
                f"hydra.searchpath=[file://{work / 'conf'}]",
                "sweep=bench",
                f"sweep_dir={work / 'sweep'}",
                *base,
            ],
            env,
        )
    print(f"4 runs of jobs/pretrain.py in a row: {plain:8.1f} s")
    print(f"4-trial FIFO sweep:                  {swept:8.1f} s")
    print(f"ratio sweep/plain time: {swept / plain:.2f}x (goal <= {GOAL:.2f}x)")


if __name__ == "__main__":
    main()
