"""Micro-batches for the pipeline engine, in the data pipeline's deterministic order.

Step N's samples are those `neoray.data.loader.sample_indices` assigns to this data-parallel
rank, whichever dataset backs them: the configured mixture, or synthetic tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from neoray.data.loader import BatchSchedule, iter_micro_batches, train_mixture
from neoray.train.config import PretrainConfig, SyntheticDataConfig


class SyntheticTokens:
    """Sample i is `seq_len + 1` uniform random tokens seeded by (seed, i): any rank can
    produce any sample, and every layout of the same run sees the same data."""

    def __init__(self, data: SyntheticDataConfig, vocab_size: int) -> None:
        self.seq_len, self.seed, self.vocab_size = data.seq_len, data.seed, vocab_size

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)


def batch_schedule(cfg: PretrainConfig) -> BatchSchedule:
    return BatchSchedule(
        micro_batch_size=cfg.parallel.micro_batch_size,
        grad_accum_steps=cfg.parallel.grad_accum_steps,
        data_parallel_size=cfg.parallel.dp,
        train_steps=cfg.train.steps,
    )


def training_batches(
    cfg: PretrainConfig, dp_rank: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) micro-batches of this data-parallel rank from `start_step` on.

    The mixture's sample-order index is built by global rank 0 first (the others wait), so
    processes never write the same cache file at once.
    """
    schedule = batch_schedule(cfg)
    if isinstance(cfg.data, SyntheticDataConfig):
        dataset = SyntheticTokens(cfg.data, cfg.model.vocab_size)
    else:
        if dist.get_rank() == 0:
            dataset = train_mixture(cfg.data, schedule)
        dist.barrier()
        if dist.get_rank() != 0:
            dataset = train_mixture(cfg.data, schedule)
    for _, _, tokens in iter_micro_batches(dataset, schedule, dp_rank, start_step):
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
