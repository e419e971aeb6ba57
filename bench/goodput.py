"""Goodput under failures: a pretraining run on Ray with one training worker killed every
`--every` seconds, against the same run never interrupted.

Both runs train the tiny model at tp=2 on Ray Train workers (a local Ray), saving every
`--interval` steps. The uninterrupted run gives the time per step; the interrupted run kills one
Ray Train worker (SIGKILL) every `--every` seconds of its training, and Ray Train restarts the
worker group, which resumes from the last committed checkpoint. Reported:

- recovery per kill: from the kill to the first step trained after it, split into Ray's restart
  (the kill to the first process of the new worker group), start-up (imports, process group,
  engine, checkpoint download and load: to the job's "resumed run ... at step" line) and the
  first step;
- goodput: the uninterrupted run's time for the steps trained (steps x its time per step)
  over the interrupted run's wall time from its first step to its last (the recoveries and the
  steps trained again after each restart are the loss).

Ray forwards the job's output in batches, so the "resumed" marker can lag by up to a second:
the split between start-up and first step is approximate, the recovery itself is not.

    DS_ACCELERATOR=cpu .venv/bin/python bench/goodput.py            # a kill every 10 minutes
    DS_ACCELERATOR=cpu .venv/bin/python bench/goodput.py --quick    # every 60 s, about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"recovery_s": 60.0, "goodput": 0.90}
CONFIG = [
    "model=tiny",
    "parallel.tp=2",
    "data.seq_len=32",
    "train.peak_tflops=1.0",
    "tracking.system_metrics=false",
    "cluster.max_failures=-1",
]


class Job:
    """A `jobs/pretrain.py` process whose output lines and `metrics.jsonl` rows are timestamped
    as they arrive (wall-clock seconds). Rank 0 flushes a row per step, so a row's arrival is
    when its step was trained (again, after a restart, which truncates the file to the resumed
    step); Ray forwards output lines in batches, so lines are only used as markers."""

    def __init__(self, run_dir: Path, overrides: list[str], env: dict[str, str]) -> None:
        self.metrics = run_dir / "metrics.jsonl"
        self.rows_seen = 0
        self.lines: list[tuple[float, str]] = []
        self.steps: list[tuple[float, int]] = []  # (arrival, step number) of each row
        self.process = subprocess.Popen(
            [sys.executable, "jobs/pretrain.py", *CONFIG, f"run_dir={run_dir}", *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read_output, daemon=True).start()

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip()))

    def poll_steps(self) -> None:
        """Timestamp the rows written since the last call."""
        if not self.metrics.exists():
            return
        now = time.time()
        rows = [line for line in self.metrics.read_text().splitlines() if line.endswith("}")]
        self.rows_seen = min(self.rows_seen, len(rows))  # truncated at a restart
        for line in rows[self.rows_seen :]:
            self.steps.append((now, json.loads(line)["step"]))
        self.rows_seen = len(rows)

    def workers(self) -> list[psutil.Process]:
        found = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines[-40:])


def run(
    tmp: Path, name: str, steps: int, interval: int, every: float | None
) -> tuple[Job, list[dict]]:
    """Train `steps` steps; with `every`, kill a worker every `every` seconds of training.
    Returns the job and one record per kill."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}",
    }
    overrides = [
        f"run_name={name}",
        f"train.steps={steps}",
        f"checkpoint.interval={interval}",
        f"storage.root={tmp / 'store'}",
    ]
    job = Job(tmp / name, overrides, env)
    kills: list[dict] = []
    try:
        while job.process.poll() is None:
            time.sleep(0.05)
            job.poll_steps()
            waiting = kills and "restarted" not in kills[-1]
            if waiting and {w.pid for w in job.workers()} - kills[-1]["old_workers"]:
                kills[-1]["restarted"] = time.time()  # a process of the new worker group
            if every is None or not job.steps:
                continue
            since = kills[-1]["at"] if kills else job.steps[0][0]
            if time.time() - since >= every and job.steps[-1][1] < steps - interval:
                kills.append(kill_one_worker(job))
        job.poll_steps()
        if job.process.returncode != 0:
            sys.exit(f"{name} failed:\n{job.output()}")
    finally:
        job.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for kill in kills:
        kill.update(recovery(job, kill))
    return job, kills


def kill_one_worker(job: Job) -> dict:
    workers = job.workers()
    victim = workers[-1]
    at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    return {"at": at, "old_workers": {w.pid for w in workers}}


def recovery(job: Job, kill: dict) -> dict:
    """Where the time from a kill to the next trained step went, from the timestamps. A row
    can still arrive just after the kill from a rank that finished its step first: the first
    step after the kill is the first one of the new worker group."""
    after = kill["at"]
    restarted = kill.get("restarted")
    resumed = next((t for t, line in job.lines if t > after and "resumed run" in line), None)
    first_step = None
    if restarted is not None:
        first_step = next((t for t, _ in job.steps if t > restarted), None)
    return {
        "recovery_s": None if first_step is None else first_step - after,
        "ray_restart_s": None if restarted is None else restarted - after,
        "startup_s": None if resumed is None or restarted is None else resumed - restarted,
        "first_step_s": None if resumed is None or first_step is None else first_step - resumed,
    }


def step_time(job: Job) -> float:
    """Seconds per step of an uninterrupted run, its rows' arrivals end to end (polled every
    50 ms: the mean over the run, not one step's)."""
    first, last = job.steps[0][0], job.steps[-1][0]
    return (last - first) / (len(job.steps) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=float, default=600.0, help="seconds between kills")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--interval", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--quick", action="store_true", help="a kill every 60 s, 5 minutes")
    args = parser.parse_args()
    if args.quick:
        args.every, args.minutes = 60.0, 5.0

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        probe, _ = run(tmp, "probe", 60, 1000, None)
        per_step = step_time(probe)
        steps = max(int(args.minutes * 60 / per_step), 3 * args.interval)
        print(f"uninterrupted: {per_step:.3f} s/step; training {steps} steps", flush=True)
        baseline, _ = run(tmp, "uninterrupted", steps, args.interval, None)
        per_step = step_time(baseline)
        job, kills = run(tmp, "interrupted", steps, args.interval, args.every)

    wall = job.steps[-1][0] - job.steps[0][0]
    goodput = steps * per_step / wall
    print(
        f"{'kill':>4} {'recovery s':>11} {'Ray restart s':>14} {'start-up s':>11} {'1st step s':>11}"
    )
    for index, kill in enumerate(kills, 1):
        cells = [kill[k] for k in ("recovery_s", "ray_restart_s", "startup_s", "first_step_s")]
        print(f"{index:>4} " + " ".join(f"{'-' if c is None else f'{c:.1f}':>11}" for c in cells))
    recoveries = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
    worst = max(recoveries, default=float("nan"))
    print(
        f"{len(kills)} kills in {wall:.0f} s of training; steps trained again: "
        f"{len(job.steps) - steps}"
    )
    print(f"recovery, worst: {worst:.1f} s (goal <= {GOALS['recovery_s']:.0f} s)")
    print(f"goodput: {goodput:.1%} (goal >= {GOALS['goodput']:.0%})")


if __name__ == "__main__":
    main()
