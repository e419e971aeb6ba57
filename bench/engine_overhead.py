"""Engine overhead: our DeepSpeed setup (pipeline engine, ZeRO-1, AdamW) against a plain loop.

One process, fp32 on CPU. Both sides train the same pipeline module (two copies built from the
same seed) on the same batch with the same optimizer settings, schedule and gradient clipping:
the plain side calls forward, the vocab-parallel loss, backward, clipping and `AdamW.step()`
itself; the engine side calls `engine.train_batch`. The ratio is what DeepSpeed costs.
Both sides build their optimizer with `neoray.training.engine.adamw` (fused AdamW, same
hyperparameters). What differs is DeepSpeed's own work, which this benchmark measures: ZeRO-1
keeps a flat fp32 master copy of the weights and copies it back after each step, gathers the
gradients into buckets and flattens them into its partition, and accumulates the gradient norm
in fp64 (the plain side clips with `clip_grad_norm_` in fp32).

ZeRO-1's work is per optimizer step, so it shrinks with gradient accumulation; real runs
accumulate (GPT-NeoX-20B: 32 micro-batches), and so does the default here (8). `--accum 1`
shows the per-step cost alone.

    DS_ACCELERATOR=cpu .venv/bin/python bench/engine_overhead.py --preset pythia_70m
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import compare, one_process_group

from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank
from neoray.training.config import OptimConfig, TrainConfig
from neoray.training.engine import adamw, build_engine
from neoray.training.schedule import learning_rate

GOAL = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_70m", help="model preset in conf/model/")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--accum", type=int, default=8, help="micro-batches per optimizer step (20B run: 32)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    args = parser.parse_args()

    one_process_group(29533)
    model_config = load_preset(args.preset)
    parallel = ParallelConfig(micro_batch_size=args.batch, grad_accum_steps=args.accum)
    optim = OptimConfig()
    train = TrainConfig(steps=10_000)

    placement = place_rank(parallel)
    module = build_pipeline(model_config, placement)
    plain = build_pipeline(model_config, placement)  # same seed: the same weights
    engine = build_engine(module, parallel, optim, train)
    optimizer = adamw(plain, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, optim, train.steps) / optim.lr
    )

    tokens = torch.randint(0, model_config.vocab_size, (args.batch, args.seq + 1))
    batch = (tokens[:, :-1], tokens[:, 1:])

    def engine_step() -> None:
        engine.train_batch(data_iter=itertools.repeat(batch))

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.accum):
            (plain.loss_fn(plain(batch[0]), batch[1]) / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()

    print(
        f"train step, {args.preset} ({model_config.num_parameters() / 1e6:.1f} M parameters), "
        f"batch {args.batch} x {args.seq} x {args.accum} accumulation, fp32, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds after {args.warmup} warmup"
    )
    compare(
        "engine",
        engine_step,
        "plain",
        plain_step,
        rounds=args.rounds,
        warmup=args.warmup,
        units_per_call=args.batch * args.seq * args.accum,
        goal=GOAL,
    )


if __name__ == "__main__":
    main()
