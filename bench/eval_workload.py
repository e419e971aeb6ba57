"""The workload both evaluation benchmarks time: zero-shot MMLU (57 subjects, 281 questions) on
the local test data with a randomly initialised 4 x 384 GPT-NeoX, lm-eval's `hf` backend."""

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
    model = testdata.write_random_model(root / "hf", mirror, num_layers=4, hidden_size=384)
    return mirror, model


def suite(mirror: Path, workers: int) -> EvalConfig:
    return EvalConfig(
        suite="bench",
        tasks=TASKS,
        num_fewshot=0,
        workers=workers,
        cpus_per_worker=1,
        threads_per_worker=1,
        batch_size=8,
        data_dir=str(mirror),
        bootstrap_iters=0,
    )
