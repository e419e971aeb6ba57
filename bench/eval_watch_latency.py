"""Scheduled evaluation's own cost, on SeaweedFS started here on 127.0.0.1.

1. Latency: a checkpoint is committed (its manifest written) while the watcher idles; the time
   until its evaluation starts. Goal: <= poll interval + 5 s.
2. Idle CPU: a run with 200 committed checkpoints (12 files each) whose 600 (checkpoint,
   suite) pairs the ledger already shows done; the watcher's CPU time per second of watching,
   as a share of one core. Goal: < 2%. The peer is a watcher that rescans everything each poll
   (every key of the run, every ledger entry), measured for the same number of polls.

    .venv/bin/python bench/eval_watch_latency.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from snapshot_setup import s3_endpoint

from neoray.evaluation.config import EvalConfig
from neoray.evaluation.ledger import Ledger
from neoray.evaluation.schedule import ScheduleConfig
from neoray.evaluation.testdata import commit_stand_in_checkpoint
from neoray.evaluation.watch import Watcher
from neoray.storage import StorageConfig, open_storage

SUITES = [EvalConfig(suite=name, tasks=["t"]) for name in ("mmlu_0shot", "mmlu_5shot", "math")]


def commit(storage, run: str, step: int, files: int = 0) -> None:
    """A checkpoint as training commits it (its files, then the manifest), now, by a run that
    goes on for longer than the benchmark."""
    commit_stand_in_checkpoint(storage, run, step, time.time(), final_step=10**9, files=files)


def start_watcher(storage, run: str, poll: float, on_start) -> Watcher:
    def evaluate(_, manifest, cfg):
        on_start(manifest.step, cfg.suite)
        return {"results": {"t": {"acc,none": 0.5}}}

    watcher = Watcher(
        storage, run, SUITES, ScheduleConfig(poll_seconds=poll), evaluate, say=lambda _: None
    )
    threading.Thread(target=watcher.run, daemon=True).start()
    return watcher


def latency(storage, poll: float, commits: int) -> list[float]:
    started: dict[int, float] = {}
    watcher = start_watcher(
        storage, "latency", poll, lambda step, _: started.setdefault(step, time.monotonic())
    )
    seconds = []
    for step in range(1, commits + 1):
        time.sleep(random.uniform(0, poll))  # commit at any phase of the poll
        commit(storage, "latency", step)
        committed = time.monotonic()
        while step not in started:
            time.sleep(0.01)
        seconds.append(started[step] - committed)
    watcher.stop()
    return seconds


def idle_cpu(storage, poll: float, window: float) -> tuple[float, float, float]:
    """(startup CPU seconds, watcher's CPU share, full-rescan peer's CPU share) while idle."""
    run = "idle"
    for step in range(1, 201):
        commit(storage, run, step, files=12)
    ledger = Ledger(storage, run)
    for step in range(1, 201):
        for cfg in SUITES:
            claim = ledger.claim(step, cfg.suite, "bench", None, 1)
            ledger.finish(claim, "done", metrics={"t/acc": 0.5})
    began = time.process_time()
    evaluated = []
    watcher = start_watcher(storage, run, poll, lambda *pair: evaluated.append(pair))
    deadline = time.monotonic() + 300
    while len(watcher.settled) < 600:
        assert time.monotonic() < deadline, "the watcher did not read the ledger in 5 minutes"
        time.sleep(0.05)
    startup = time.process_time() - began
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(window)
    ours = (time.process_time() - cpu) / (time.monotonic() - wall)
    watcher.stop()
    assert not evaluated, "the ledger shows every pair done: nothing may be evaluated"

    cpu, wall = time.process_time(), time.monotonic()
    for _ in range(round(window / poll)):  # the peer: everything listed and read each poll
        storage.list(f"{run}/")
        Ledger(storage, run).entries()
        time.sleep(poll)
    peer = (time.process_time() - cpu) / (time.monotonic() - wall)
    return startup, ours, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--poll", type=float, default=5.0, help="schedule.poll_seconds")
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--window", type=float, default=60.0, help="idle seconds measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp) / "weed") as (_, bucket):
        storage = open_storage(StorageConfig(kind="s3", bucket=bucket, prefix="runs"))
        seconds = latency(storage, args.poll, args.commits)
        goal = args.poll + 5.0
        print(f"commit -> evaluation start, poll {args.poll:g} s, {args.commits} commits:")
        print(f"  median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
        print(f"ratio max latency/(poll + 5 s): {max(seconds) / goal:.2f}x (goal <= 1.00x)")
        startup, ours, peer = idle_cpu(storage, args.poll, args.window)
        print(f"200 checkpoints x 3 suites done; first poll read the ledger in {startup:.2f} CPU s")
        print(f"idle CPU, share of one core: watcher {ours:.3%}, full rescan {peer:.3%}")
        print(f"ratio watcher idle CPU/2%: {ours / 0.02:.2f}x (goal < 1.00x)")
        print(f"ratio full rescan/watcher idle CPU: {peer / max(ours, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
