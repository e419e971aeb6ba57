"""Which samples each data-parallel rank trains on at each step: a pure function of the step.

Step N's global batch is samples [N * G, (N + 1) * G) of the train mixture, G being the global
batch size. It is consumed in `grad_accum_steps` micro-steps of `micro_batch_size *
data_parallel_size` consecutive samples, dealt to the ranks in contiguous blocks (the layout of
GPT-NeoX's DistributedBatchSampler). Nothing depends on what ran before, so a run resumed at
step N, or `jobs/inspect_batch.py step=N`, sees exactly the samples of the original run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from neoray.config import ConfigError
from neoray.data.config import DataConfig
from neoray.data.mixture import BlendedDataset, build_mixture


@dataclass
class BatchSchedule:
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    data_parallel_size: int = 1
    train_steps: int = 1000

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "data_parallel_size", "train_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batch.{name} must be at least 1")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data_parallel_size

    @property
    def train_samples(self) -> int:
        return self.train_steps * self.global_batch_size


def sample_indices(schedule: BatchSchedule, step: int, micro_step: int, rank: int) -> np.ndarray:
    """Indices into the train mixture of one rank's micro-batch at (step, micro_step)."""
    if not 0 <= step < schedule.train_steps:
        raise ValueError(f"step {step} outside [0, {schedule.train_steps})")
    if not 0 <= micro_step < schedule.grad_accum_steps:
        raise ValueError(f"micro_step {micro_step} outside [0, {schedule.grad_accum_steps})")
    if not 0 <= rank < schedule.data_parallel_size:
        raise ValueError(f"rank {rank} outside [0, {schedule.data_parallel_size})")
    micro = schedule.micro_batch_size
    start = (
        step * schedule.global_batch_size
        + micro_step * micro * schedule.data_parallel_size
        + rank * micro
    )
    return np.arange(start, start + micro)


def train_mixture(cfg: DataConfig, schedule: BatchSchedule) -> BlendedDataset:
    """The train split mixture sized for the whole run, in its `data.phases`."""
    return build_mixture(cfg, "train", schedule.train_samples, None, schedule.global_batch_size)


def micro_batch(
    dataset: BlendedDataset, schedule: BatchSchedule, step: int, micro_step: int, rank: int
) -> torch.Tensor:
    """Tokens [micro_batch_size, seq_len + 1] (int64); inputs are [:, :-1], targets [:, 1:]."""
    indices = sample_indices(schedule, step, micro_step, rank)
    return torch.from_numpy(np.stack([dataset[int(i)] for i in indices]))


def iter_micro_batches(
    dataset: BlendedDataset, schedule: BatchSchedule, rank: int, start_step: int = 0
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(step, micro_step, tokens) for one rank from `start_step` to the end of training."""
    for step in range(start_step, schedule.train_steps):
        for micro_step in range(schedule.grad_accum_steps):
            yield step, micro_step, micro_batch(dataset, schedule, step, micro_step, rank)
