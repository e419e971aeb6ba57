"""The decoded text of a training batch, as Pythia's batch viewer shows it for memorization work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoray.data.loader import BatchSchedule, sample_indices
from neoray.data.mixture import BlendedDataset
from neoray.tokenizer.load import TextTokenizer


@dataclass
class BatchSample:
    rank: int
    micro_step: int
    index: int  # position in the train mixture
    component: str
    tokens: np.ndarray
    text: str


def batch_samples(
    dataset: BlendedDataset,
    tokenizer: TextTokenizer,
    schedule: BatchSchedule,
    step: int,
    rank: int | None = None,
) -> list[BatchSample]:
    """Every sample of global step `step` (or only those of data-parallel `rank`)."""
    ranks = range(schedule.data_parallel_size) if rank is None else [rank]
    samples = []
    for micro_step in range(schedule.grad_accum_steps):
        for r in ranks:
            for i in sample_indices(schedule, step, micro_step, r):
                tokens = dataset[int(i)]
                text = tokenizer.decode(tokens.tolist())
                samples.append(
                    BatchSample(r, micro_step, int(i), dataset.source(int(i)), tokens, text)
                )
    return samples


def format_batch(step: int, samples: list[BatchSample]) -> str:
    lines = [f"step {step}: {len(samples)} samples"]
    for s in samples:
        lines.append(
            f"--- rank {s.rank} micro-step {s.micro_step} sample {s.index} ({s.component}, "
            f"{len(s.tokens)} tokens) ---"
        )
        lines.append(s.text)
    return "\n".join(lines)
