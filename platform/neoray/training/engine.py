"""The DeepSpeed pipeline engine: ZeRO stage 1 over the data axis, AdamW, precision, clipping.

The optimizer is PyTorch's AdamW handed to DeepSpeed, which wraps it in its ZeRO-1 optimizer
(each data-parallel rank keeps the fp32 master weights and Adam moments of a 1/dp slice). The
learning rate follows `neoray.training.schedule` through a `LambdaLR` that DeepSpeed steps after
every applied optimizer step (not after fp16 steps skipped for overflow); under muP the hidden
matrices' parameter group follows it at a fixed fraction of the lr (`neoray.model.mup`).
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.engine import PipelineEngine

from neoray.deepspeed_private import disable_op
from neoray.model.mup import lr_multiplier
from neoray.parallel.config import ParallelConfig
from neoray.training.config import OptimConfig, TrainConfig
from neoray.training.schedule import learning_rate

# DeepSpeed's CPU shared-memory all-reduce, used only by its inference kernels, never by training.
SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed(backend: str) -> None:
    """DeepSpeed's process group (joining torch.distributed's when one exists), without the CPU
    shared-memory op. DeepSpeed JIT-loads that op in every process that starts a group, under a
    lock file torch keeps in its extensions folder; a process killed while holding it (a stopped
    sweep trial, a killed worker) leaves the file, and every later process group waits on it
    forever. Training never calls the op, so it is marked unavailable (DeepSpeed keeps its
    probe of compatible ops in one dict for that purpose) and nothing is loaded."""
    if get_accelerator().device_name() == "cpu":
        disable_op(SHM_COMM_OP)
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> dict:
    """The DeepSpeed config dict for a layout, optimizer and precision."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": parallel.micro_batch_size,
        "gradient_accumulation_steps": parallel.grad_accum_steps,
        "train_batch_size": parallel.sequences_per_step,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW works under ZeRO-1
        "steps_per_print": 2**31 - 1,  # metrics are ours (see neoray.training.metrics)
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": train.initial_loss_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return config


def parameter_groups(module: torch.nn.Module, optim: OptimConfig, width_mult: float = 1.0):
    """Weight decay on matrices (weights and embeddings), none on biases and layernorms; under
    muP (`width_mult` > 1) the hidden matrices in a group of their own at lr / width_mult.

    The scheduler multiplies each group's own starting lr, so every group follows the schedule
    in proportion. The groups at the full lr come first: the lr reported is group 0's.
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, param in module.named_parameters():
        if param.requires_grad:
            key = (lr_multiplier(name, width_mult), param.dim() >= 2)
            groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr": optim.lr * lr_mult,
            "weight_decay": optim.weight_decay if decay else 0.0,
        }
        for (lr_mult, decay), params in groups.items()
        if params or lr_mult == 1.0
    ]


def adamw(
    module: torch.nn.Module, optim: OptimConfig, width_mult: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over `module`'s parameters with the fused kernel (CPU and CUDA alike).

    The fused kernel updates each tensor in one pass, without the temporaries of the
    per-tensor implementation; that matters most under ZeRO, whose optimizer sees each
    parameter group as one flat tensor of the whole partition. Same math, same state.
    `width_mult` is muP's (`NeoXConfig.width_mult`; 1 under the standard parametrization).
    """
    return torch.optim.AdamW(
        parameter_groups(module, optim, width_mult),
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        fused=True,
    )


def build_engine(
    module: PipelineModule,
    parallel: ParallelConfig,
    optim: OptimConfig,
    train: TrainConfig,
    width_mult: float = 1.0,
) -> PipelineEngine:
    """The engine that trains `module` with `engine.train_batch` (1F1B pipeline schedule);
    `width_mult` is muP's (see `adamw`)."""
    optimizer = adamw(module, optim, width_mult)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, optim, train.steps) / optim.lr
    )
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(parallel, optim, train),
    )
    return engine
