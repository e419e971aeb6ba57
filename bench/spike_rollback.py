"""Spike rollback: the time one in-process rollback takes, against a training step.

One process trains a GPT-NeoX model whose checkpoint is a few hundred MB, its checkpoints going
to a SeaweedFS started here on 127.0.0.1. It trains `--steps` steps (timed), commits a
checkpoint, trains on, then reports a NaN loss to `neoray.training.spike.SpikeGuard` as the
loop does: the guard settles the uploads, lists the committed checkpoints, downloads and
verifies the one before the spike and loads it into the engine (`neoray.checkpoint.resume`).
Printed: the rollback's seconds, the median step's, and their ratio (a rollback costs that many
steps of time, besides the trained steps it undoes, which are skipped, not trained again).

    DS_ACCELERATOR=cpu .venv/bin/python bench/spike_rollback.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from snapshot_setup import bench_config, one_process_engine, s3_endpoint

from neoray.checkpoint.resume import Layout
from neoray.checkpoint.snapshot import Snapshots
from neoray.storage import open_storage
from neoray.training.data import training_batches
from neoray.training.loop import manifest_factory
from neoray.training.spike import SkippedSteps, SpikeConfig, SpikeGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps before the spike")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp) / "weed") as (_, bucket):
        cfg = bench_config(Path(tmp) / "run", bucket, args.hidden, args.layers)
        engine = one_process_engine(cfg)
        batches = training_batches(cfg, 0)
        topology = {"tp": 1, "pp": 1, "dp": 1}
        skipped = SkippedSteps([])
        snapshots = Snapshots(
            open_storage(cfg.storage),
            cfg.run_name,
            cfg.checkpoint,
            Path(tmp) / "staging",
            topology,
            manifest_factory(cfg, skipped),
            on_commit=lambda step, uri, size: None,
            on_failure=lambda step, error: print(f"step {step}: {error}"),
        )
        layout = Layout(topology, 0, cfg.parallel.sequences_per_step, cfg.model)
        guard = SpikeGuard(
            SpikeConfig(enabled=True, skip_batches=1),
            skipped,
            engine,
            snapshots,
            layout,
            Path(tmp) / "staging",
            torch.device("cpu"),
        )
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            engine.train_batch(data_iter=batches)
            times.append(time.perf_counter() - start)
            if step == 1:
                snapshots.save(engine, step + 1)  # committed by the guard's settle
        rollback = guard.after_step(args.steps - 1, float("nan"), None)
        snapshots.finish()

        step_s = statistics.median(times)
        print(f"checkpoint: {sum(p.numel() for p in engine.module.parameters()):,} parameters")
        print(rollback.describe())
        print(f"rollback {rollback.seconds:.3f} s, median step {step_s:.3f} s")
        print(f"ratio rollback/step: {rollback.seconds / step_s:.1f}x")


if __name__ == "__main__":
    main()
