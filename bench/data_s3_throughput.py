"""The data loader's tokens/s from token files in S3 against the same files on disk.

Two components of random tokens (`--mb` MB of .bin each, documents of 100 to 4,000 tokens,
uint16) are written locally and uploaded to a SeaweedFS started here on 127.0.0.1. The same
mixture (seq_len 2048, micro batches of 8) is then read as training reads it
(`neoray.data.loader.micro_batch`), step after step, from the local files and from the bucket
through the node's token cache (`neoray.data.remote`), rounds alternating.

The first pass over the S3 files fetches every block it touches (the cache starts empty): its
tokens/s is printed first, against the local files' first pass. The rounds after it are what a
run reads once its blocks are cached (the ratio of the last line; goal >= 0.95x).

    .venv/bin/python bench/data_s3_throughput.py [--mb 64] [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from common import compare, time_call
from snapshot_setup import s3_endpoint

from neoray.data.config import ComponentConfig, DataConfig
from neoray.data.indexed import IndexedDatasetWriter, publish
from neoray.data.loader import BatchSchedule, micro_batch, train_mixture
from neoray.data.remote import upload_token_files

GOAL = 0.95
SEQ_LEN = 2048


def write_component(prefix: str, megabytes: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    tokens_left = int(megabytes * 2**20) // 2
    while tokens_left > 0:
        sizes = rng.integers(100, 4000, 1000)
        sizes = sizes[np.cumsum(sizes) <= tokens_left] if sizes.sum() > tokens_left else sizes
        if not len(sizes):
            break
        writer.add_documents(rng.integers(0, 50000, int(sizes.sum()), dtype=np.uint16), sizes)
        tokens_left -= int(sizes.sum())
    writer.finish()
    publish(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=64, help="MB of tokens per component")
    parser.add_argument("--steps", type=int, default=200, help="steps read per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp) / "weed") as (_, bucket):
        os.environ["NEORAY_TOKEN_CACHE"] = str(Path(tmp) / "token-cache")
        components = {}
        for seed, name in enumerate(("code", "prose")):
            prefix = str(Path(tmp) / "data" / name)
            write_component(prefix, args.mb, seed)
            upload_token_files(prefix, f"s3://{bucket}/data/{name}")
            components[name] = ComponentConfig(prefix=prefix, weight=0.7 - 0.4 * seed)
        local_cfg = DataConfig(components=components, tokenizer="-", seq_len=SEQ_LEN)
        remote_cfg = dataclasses.replace(
            local_cfg,
            components={
                name: dataclasses.replace(c, prefix=f"s3://{bucket}/data/{name}")
                for name, c in components.items()
            },
        )
        schedule = BatchSchedule(micro_batch_size=8, train_steps=args.steps)
        local, remote = train_mixture(local_cfg, schedule), train_mixture(remote_cfg, schedule)

        def reader(dataset):
            return lambda: [micro_batch(dataset, schedule, s, 0, 0) for s in range(args.steps)]

        tokens = args.steps * schedule.global_batch_size * SEQ_LEN
        print(f"{args.steps} steps of {schedule.global_batch_size} x {SEQ_LEN} tokens a round")
        cold = {name: time_call(reader(d)) for name, d in [("s3", remote), ("local", local)]}
        print(
            f"first pass: s3 {tokens / cold['s3']:,.0f} tokens/s, local "
            f"{tokens / cold['local']:,.0f} tokens/s: ratio s3/local {cold['local'] / cold['s3']:.2f}x"
        )
        compare(
            "s3",
            reader(remote),
            "local",
            reader(local),
            rounds=args.rounds,
            warmup=0,
            units_per_call=tokens,
            goal=GOAL,
        )


if __name__ == "__main__":
    main()
