"""In-loop validation (GPT-NeoX's `eval_interval` / `eval_iters`).

Every `train.eval_interval` steps, and after the last one, the engine evaluates the same
`train.eval_iters` global batches of the data's validation split, with the pipeline engine's
evaluation path: no gradients, no optimizer state, dropout off, its own data iterator and no
random numbers drawn, so training goes on exactly as without it. A fixed set keeps the curve
free of sampling noise from one evaluation to the next.

The loss is reported for the whole set and per mixture component: the last pipeline stage
returns each sample's loss, and the sums and counts per component are added up over the
data-parallel ranks, so every (tp, pp, dp) layout reports the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine

from neoray.data.loader import sample_indices
from neoray.parallel.topology import Placement
from neoray.training.config import PretrainConfig
from neoray.training.data import batch_schedule, dataset, micro_batches


class Validation:
    """The validation set of a run and the engine that evaluates it."""

    def __init__(self, cfg: PretrainConfig, engine: PipelineEngine, placement: Placement) -> None:
        self.engine = engine
        self.schedule = batch_schedule(cfg, cfg.train.eval_iters)
        self.data = dataset(cfg, "validation", self.schedule.train_samples)
        self.dp_rank = placement.dp_rank
        # The last stage computes the losses; its tensor-parallel ranks all hold the same ones.
        self.counts_losses = engine.is_last_stage() and placement.tp_rank == 0

    def run(self) -> dict[str, float]:
        """`val/loss`, `val/ppl` and `val/<component>/loss`, the same on every rank."""
        names = self.data.names
        device = self.engine.device
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        batches = micro_batches(self.data, self.schedule, self.dp_rank)
        loss_fn = self.engine.module.loss_fn
        loss_fn.per_sample = True
        try:
            for batch in range(self.schedule.train_steps):
                # The engine adds each evaluated loss to the total the last train_batch left
                # (train_batch starts a new one): per-sample losses need a fresh total.
                self.engine.total_loss = None
                losses = self.engine.eval_batch(batches, reduce_output=None, bcast_loss=False)
                if not self.counts_losses:
                    continue
                for micro_step, sample_losses in enumerate(losses):
                    indices = sample_indices(self.schedule, batch, micro_step, self.dp_rank)
                    component = torch.from_numpy(self.data.components(indices)).to(device)
                    sums.index_add_(0, component, sample_losses.to(sums.dtype))
                    counts.index_add_(0, component, torch.ones_like(sums[component]))
        finally:
            loss_fn.per_sample = False
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        loss = (sums.sum() / counts.sum()).item()
        row = {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}
        for name, total, count in zip(names, sums.tolist(), counts.tolist(), strict=True):
            if count:
                row[f"val/{name}/loss"] = total / count
        return row
