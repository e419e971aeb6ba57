"""Async snapshots: training step time while a checkpoint uploads in the background vs idle,
and the time each save holds the training loop.

One process trains a GPT-NeoX model whose checkpoint is a few hundred MB, with checkpoints going
to a SeaweedFS started here on 127.0.0.1. Rounds alternate (swapping which side goes first):
"idle" times `--steps` training steps with nothing else going on; "uploading" saves a checkpoint
through `neoray.checkpoint.snapshot.Snapshots` and times the same number of steps while its
upload (in the upload process) runs. The save itself, the local write that training waits for
by design, is timed apart: the blocked time per save. The upload is committed after the timed
steps. The ratio is the median step time uploading / idle.

    DS_ACCELERATOR=cpu .venv/bin/python bench/async_snapshot.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from snapshot_setup import bench_config, one_process_engine, s3_endpoint

from neoray.checkpoint.snapshot import Snapshots
from neoray.storage import open_storage
from neoray.training.data import training_batches
from neoray.training.loop import manifest_factory

GOAL = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp) / "weed") as (_, bucket):
        cfg = bench_config(Path(tmp) / "run", bucket, args.hidden, args.layers)
        engine = one_process_engine(cfg)
        batches = training_batches(cfg, 0)
        snapshots = Snapshots(
            open_storage(cfg.storage),
            cfg.run_name,
            cfg.checkpoint,
            Path(tmp) / "staging",
            {"tp": 1, "pp": 1, "dp": 1},
            manifest_factory(cfg),
            on_commit=lambda step, uri, size: None,
            on_failure=lambda step, error: print(f"step {step}: {error}"),
        )

        def steps() -> list[float]:
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.train_batch(data_iter=batches)
                times.append(time.perf_counter() - start)
            return times

        step = 0
        idle: list[float] = []
        uploading: list[float] = []
        blocked: list[float] = []
        covered = 0
        steps()  # warmup
        for round_index in range(args.rounds):
            for side in ("idle", "uploading") if round_index % 2 == 0 else ("uploading", "idle"):
                if side == "idle":
                    idle += steps()
                    continue
                step += 1
                start = time.perf_counter()
                snapshots.save(engine, step)
                blocked.append(time.perf_counter() - start)
                uploading += steps()
                covered += snapshots.thread is not None and snapshots.thread.is_alive()
                snapshots.settle()
        snapshots.finish()

        print(f"{'':10} {'median s':>10} {'min s':>10} {'max s':>10}")
        for name, times in (("idle", idle), ("uploading", uploading)):
            print(
                f"{name:10} {statistics.median(times):10.4f} {min(times):10.4f} {max(times):10.4f}"
            )
        print(f"uploads still running after the timed steps: {covered} of {args.rounds}")
        print(
            f"training blocked per save (local write): median {statistics.median(blocked):.3f} s, "
            f"max {max(blocked):.3f} s"
        )
        ratio = statistics.median(uploading) / statistics.median(idle)
        print(f"ratio step time uploading/idle: {ratio:.2f}x (goal <= {GOAL:.2f}x)")


if __name__ == "__main__":
    main()
