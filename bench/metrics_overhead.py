"""Live metrics and energy metering: training steps with them on against off, same engine.

One process, fp32 on CPU, connected to a local Ray (as a Ray Train worker is). The "on" side
does what rank 0 of a run does besides training: the metrics row of every step handed to the
Prometheus exporter (`ray.util.metrics` gauges) and an energy reading (meter + all-reduce)
every `energy.interval` steps; the "off" side only trains. Both sides alternate on the same
engine, a call being `--interval` steps.

    DS_ACCELERATOR=cpu .venv/bin/python bench/metrics_overhead.py
"""

from __future__ import annotations

import argparse
import itertools
import time

import ray
import torch
from common import compare, one_process_group

from neoray.energy.grid import EnergyConfig
from neoray.energy.run import RunEnergy
from neoray.live_metrics import TrainingExporter
from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank
from neoray.training.config import OptimConfig, TrainConfig
from neoray.training.engine import build_engine
from neoray.training.metrics import StepMetrics

GOAL = 1.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_70m", help="model preset in conf/model/")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--interval", type=int, default=10, help="steps per energy reading")
    parser.add_argument("--rounds", type=int, default=6, help="timed calls per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    args = parser.parse_args()

    one_process_group(29537)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    model = load_preset(args.preset)
    parallel = ParallelConfig(micro_batch_size=args.batch)
    engine = build_engine(
        build_pipeline(model, place_rank(parallel)), parallel, OptimConfig(), TrainConfig(10**6)
    )
    tokens = torch.randint(0, model.vocab_size, (args.batch, args.seq + 1))
    batches = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))
    metrics = StepMetrics(model, args.seq, args.batch * args.seq, devices=1, peak=1.0)
    exporter = TrainingExporter("bench")
    energy = RunEnergy(EnergyConfig(interval=args.interval), torch.device("cpu"))
    step = itertools.count()

    def steps(observed: bool) -> None:
        for _ in range(args.interval):
            start = time.perf_counter()
            loss = engine.train_batch(data_iter=batches).item()
            if observed:
                row = metrics.row(next(step), time.perf_counter() - start, loss=loss, lr=1e-4)
                exporter.on_metrics(row)
        if observed:
            energy.read()

    print(
        f"{args.preset}, batch {args.batch} x {args.seq}, fp32, {torch.get_num_threads()} "
        f"threads; a call is {args.interval} steps, {args.rounds} rounds after {args.warmup}"
    )
    compare(
        "on",
        lambda: steps(True),
        "off",
        lambda: steps(False),
        rounds=args.rounds,
        warmup=args.warmup,
        units_per_call=args.interval * args.batch * args.seq,
        goal=1 / GOAL,  # throughput on/off >= 0.99: time on/off <= 1.01x
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
