"""Checkpoint upload throughput: neoray's S3 path against a bare boto3 `upload_file`.

One DeepSpeed checkpoint (every file an engine writes) goes to the same SeaweedFS, started here
on 127.0.0.1, alternately through `neoray.storage` as checkpoints take it (sha256 of each file
for the manifest, then a managed multipart upload) and through a plain boto3 client's
`upload_file` with boto3's default transfer settings, which checksums nothing.

    DS_ACCELERATOR=cpu .venv/bin/python bench/upload_throughput.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import compare
from snapshot_setup import bench_config, one_process_engine, s3_endpoint

from neoray.checkpoint.manifest import file_entry
from neoray.storage import open_storage

GOAL = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp) / "weed") as (server, bucket):
        cfg = bench_config(Path(tmp) / "run", bucket, args.hidden, args.layers)
        engine = one_process_engine(cfg)
        engine.save_checkpoint(str(Path(tmp) / "ckpt"), tag="step")
        files = sorted(p for p in (Path(tmp) / "ckpt" / "step").iterdir() if p.is_file())
        total_mb = sum(p.stat().st_size for p in files) / 2**20
        print(f"checkpoint: {len(files)} files, {total_mb:.1f} MB")

        storage = open_storage(cfg.storage)
        client = server.client()

        def neoray() -> None:
            for path in files:
                file_entry(path, path.name)
                storage.upload_file(path, f"neoray/{path.name}")

        def boto3() -> None:
            for path in files:
                client.upload_file(str(path), bucket, f"boto3/{path.name}")

        compare(
            "neoray",
            neoray,
            "boto3",
            boto3,
            rounds=args.rounds,
            warmup=1,
            units_per_call=total_mb,
            unit="MB/s",
            goal=GOAL,
        )


if __name__ == "__main__":
    main()
