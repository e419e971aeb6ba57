"""The workload both evaluation benchmarks time: five-shot MMLU on the local test data with a
randomly initialised 8 x 512 GPT-NeoX, through lm-eval's `hf` backend on one thread."""

from __future__ import annotations

import tempfile
from pathlib import Path

from neoray.evaluation import testdata
from neoray.evaluation.config import EvalConfig

TASKS = ["mmlu"]


def prepare() -> tuple[Path, Path]:
    """A local mirror and a model directory, in a temporary directory."""
    root = Path(tempfile.mkdtemp(prefix="neoray-eval-bench-"))
    mirror = testdata.write_all(root / "mirror")
    model = testdata.write_random_model(root / "hf", mirror, num_layers=8, hidden_size=512)
    return mirror, model


def suite(mirror: Path, workers: int) -> EvalConfig:
    return EvalConfig(
        suite="bench",
        tasks=TASKS,
        num_fewshot=5,
        workers=workers,
        cpus_per_worker=1,
        threads_per_worker=1,
        batch_size=8,
        data_dir=str(mirror),
        bootstrap_iters=0,
    )
