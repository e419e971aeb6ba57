"""The per-worker training function: one process of a tp x pp x dp run.

It needs only the `torch.distributed` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so any launcher can start it: torchrun, or Ray Train (which may have created the
process group already; DeepSpeed then reuses it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from neoray.parallel.config import validate_layout
from neoray.parallel.convert import load_full_state_dict, shard_path
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank
from neoray.train.config import PretrainConfig
from neoray.train.data import training_batches
from neoray.train.engine import build_engine
from neoray.train.metrics import (
    MetricsFile,
    StepMetrics,
    device_peak_tflops,
    matmul_probe_tflops,
    peak_memory_gib,
)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss stayed NaN/inf for too many consecutive steps."""


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _peak_tflops(cfg: PretrainConfig, device: torch.device) -> float:
    """Peak TFLOPS of one device: configured, from the data sheet, or a CPU probe.

    On a CPU the probe runs once, on rank 0, and is shared by the processes of a node in
    equal parts (they share its cores).
    """
    peak = cfg.train.peak_tflops or device_peak_tflops(device)
    if peak:
        return peak
    measured = torch.tensor([matmul_probe_tflops() if dist.get_rank() == 0 else 0.0])
    dist.broadcast(measured, src=0)
    return measured.item() / int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


def pretrain(cfg: PretrainConfig, on_metrics: Callable[[dict], None] | None = None) -> None:
    """Train `cfg.train.steps` steps; rank 0 writes `<run_dir>/metrics.jsonl` and calls
    `on_metrics(row)` (the experiment tracker) after every step."""
    validate_layout(cfg.model, cfg.parallel, int(os.environ["WORLD_SIZE"]))
    device = _device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    placement = place_rank(cfg.parallel)
    module = build_pipeline(cfg.model, placement, cfg.train.seed, cfg.train.compile)
    if cfg.train.init_from:
        full = torch.load(cfg.train.init_from, map_location="cpu", weights_only=True)
        load_full_state_dict(module, full, cfg.model, placement.tp_rank, cfg.parallel.tp)
    engine = build_engine(module, cfg.parallel, cfg.optim, cfg.train)

    metrics = StepMetrics(
        cfg.model,
        cfg.seq_len,
        cfg.tokens_per_step,
        devices=cfg.parallel.world_size,
        peak=_peak_tflops(cfg, device),
    )
    out = MetricsFile(cfg.run_dir) if dist.get_rank() == 0 else None
    batches = training_batches(cfg, placement.dp_rank)
    fp16 = cfg.train.precision == "fp16"
    nonfinite = 0
    for step in range(cfg.train.steps):
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        loss = engine.train_batch(data_iter=batches).item()
        seconds = time.perf_counter() - start
        grad_norm = engine.get_global_grad_norm()
        row = metrics.row(
            step,
            seconds,
            loss=loss,
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            loss_scale=engine.optimizer.cur_scale if fp16 else 1.0,
            step_skipped=not engine.was_step_applied(),
            peak_memory_gib=peak_memory_gib(device),
        )
        if out is not None:
            out.write(row)
            if on_metrics is not None:
                on_metrics(row)
        nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
        if nonfinite >= cfg.train.max_nonfinite_steps and not fp16:
            raise NonFiniteLossError(
                f"the loss was not finite for {nonfinite} consecutive steps (last: step {step}); "
                "stopping without saving the diverged weights. Lower optim.lr, raise "
                "optim.warmup, or train in bf16"
            )
    if out is not None:
        out.close()
    if cfg.train.save_final and placement.dp_rank == 0:
        path = shard_path(Path(cfg.run_dir) / "final", placement.tp_rank, placement.pp_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(engine.module.state_dict(), path)
    dist.barrier()
