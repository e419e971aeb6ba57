"""What the checkpoint benchmarks share: a SeaweedFS S3 endpoint and a one-process engine.

The S3 endpoint is the tests' (tests/services.py): `weed server` on 127.0.0.1, data in a
temporary folder, stopped at the end. The engine trains a GPT-NeoX model whose checkpoint is a
few hundred MB (weights, fp32 master weights and both Adam moments under ZeRO-1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from common import one_process_group  # noqa: E402
from services import S3Server, seaweedfs  # noqa: E402

from neoray.model.gpt_neox import NeoXConfig  # noqa: E402
from neoray.parallel.config import ParallelConfig  # noqa: E402
from neoray.parallel.pipeline import build_pipeline  # noqa: E402
from neoray.parallel.topology import place_rank  # noqa: E402
from neoray.storage import StorageConfig  # noqa: E402
from neoray.training.config import (  # noqa: E402
    OptimConfig,
    PretrainConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from neoray.training.engine import build_engine  # noqa: E402


@contextmanager
def s3_endpoint(directory: Path) -> Iterator[tuple[S3Server, str]]:
    """A running SeaweedFS, the environment pointing boto3 at it, and a new bucket."""
    directory.mkdir(parents=True, exist_ok=True)
    with seaweedfs(directory) as server:
        renice_server(server)
        os.environ.update(server.env())
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(name, None)
        yield server, server.new_bucket()


def renice_server(server: S3Server) -> None:
    """The S3 server stands in for a remote store: on this machine it runs, at low priority,
    on the cores training uses. Every thread of the `weed` process listening on its port."""
    port = server.endpoint_url.rsplit(":", 1)[1]
    for pid in os.listdir("/proc"):
        cmdline = Path("/proc", pid, "cmdline")
        if (
            pid.isdigit()
            and cmdline.exists()
            and f"-s3.port={port}".encode() in cmdline.read_bytes()
        ):
            for task in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(task), 10)


def bench_config(run_dir: Path, bucket: str, hidden: int, layers: int) -> PretrainConfig:
    model = NeoXConfig(
        vocab_size=1024, num_layers=layers, hidden_size=hidden, num_heads=8, max_seq_len=128
    )
    return PretrainConfig(
        model=model,
        parallel=ParallelConfig(micro_batch_size=4),
        optim=OptimConfig(),
        train=TrainConfig(steps=100_000),
        data=SyntheticDataConfig(seq_len=128),
        run_dir=str(run_dir),
        run_name="bench",
        storage=StorageConfig(kind="s3", bucket=bucket),
    )


def one_process_engine(cfg: PretrainConfig):
    """A DeepSpeed engine for `cfg` in this process (a process group of one)."""
    one_process_group(29541)
    placement = place_rank(cfg.parallel)
    module = build_pipeline(cfg.model, placement, cfg.train.seed)
    return build_engine(module, cfg.parallel, cfg.optim, cfg.train)
