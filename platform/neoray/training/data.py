"""Micro-batches for the pipeline engine, in the data pipeline's deterministic order.

Step N's samples are those `neoray.data.loader.sample_indices` assigns to this data-parallel
rank, whichever dataset backs them: the configured mixture, or synthetic tokens. Validation
reads its own split the same way, batch k of a validation pass standing in for step k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from neoray.data.loader import BatchSchedule, iter_micro_batches
from neoray.data.mixture import SPLITS, BlendedDataset, build_mixture
from neoray.training.config import PretrainConfig, SyntheticDataConfig

T = TypeVar("T")


class SyntheticTokens:
    """Sample i of a split is `seq_len + 1` uniform random tokens seeded by (seed, i) (and the
    split, past the train split): any rank can produce any sample, and every layout of the same
    run sees the same data. It is one mixture component, named "synthetic"."""

    def __init__(self, data: SyntheticDataConfig, vocab_size: int, split: str = "train") -> None:
        self.names = ["synthetic"]
        self.seq_len, self.seed, self.vocab_size = data.seq_len, data.seed, vocab_size
        self.split = SPLITS.index(split)

    def __getitem__(self, i: int) -> np.ndarray:
        key = [self.seed, i] if self.split == 0 else [self.seed, i, self.split]
        rng = np.random.default_rng(key)
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def components(self, indices: np.ndarray) -> np.ndarray:
        return np.zeros(len(indices), dtype=np.int64)


Dataset = BlendedDataset | SyntheticTokens


def batch_schedule(cfg: PretrainConfig, steps: int | None = None) -> BatchSchedule:
    """The run's batch layout over `steps` batches (default: the training steps)."""
    return BatchSchedule(
        micro_batch_size=cfg.parallel.micro_batch_size,
        grad_accum_steps=cfg.parallel.grad_accum_steps,
        data_parallel_size=cfg.parallel.dp,
        train_steps=steps or cfg.train.steps,
    )


def _on_rank0_first(build: Callable[[], T]) -> T:
    """Build on global rank 0, then on the others: a mixture writes its sample-order index
    files the first time, and processes must never write the same cache file at once."""
    if dist.get_rank() == 0:
        built = build()
    dist.barrier()
    if dist.get_rank() != 0:
        built = build()
    return built


def dataset(cfg: PretrainConfig, split: str, samples: int) -> Dataset:
    """`samples` samples of `split`: the configured mixture (the train split in its
    `data.phases`), or synthetic tokens."""
    if isinstance(cfg.data, SyntheticDataConfig):
        return SyntheticTokens(cfg.data, cfg.model.vocab_size, split)
    batch = batch_schedule(cfg).global_batch_size
    return _on_rank0_first(
        lambda: build_mixture(cfg.data, split, samples, cfg.model.vocab_size, batch)
    )


def micro_batches(
    data: Dataset, schedule: BatchSchedule, dp_rank: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) micro-batches of this data-parallel rank from `start_step` on."""
    for _, _, tokens in iter_micro_batches(data, schedule, dp_rank, start_step):
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def training_batches(
    cfg: PretrainConfig, dp_rank: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) training micro-batches of this data-parallel rank from `start_step`."""
    schedule = batch_schedule(cfg)
    return micro_batches(
        dataset(cfg, "train", schedule.train_samples), schedule, dp_rank, start_step
    )
