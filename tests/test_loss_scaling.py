"""fp16 dynamic loss scaling on every machine, fp16 kernels or not.

The end-to-end fp16 run (tests/test_pretrain_job.py) needs a device DeepSpeed accepts fp16 on.
These tests run everywhere: DeepSpeed's own loss scaler, configured from the DeepSpeed config
the pretrain job writes, driven through an overflow streak and a recovery; and the same scaler
inside a real ZeRO-1 pipeline engine in fp32, where a loss scale past fp32's range injects the
overflow, so the skip path (no update, no LR step, scale lowered) runs for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from distributed import run_workers
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


def job_config(*overrides: str):
    from neoray.training.config import pretrain_config

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="pretrain", overrides=["data.seq_len=32", *overrides])
    return pretrain_config(cfg)


def fp16_scaler(cfg, initial_power: int):
    """DeepSpeed's loss scaler, built by DeepSpeed from the fp16 section the job would write."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.precision_config import get_float16_config

    from neoray.training.engine import deepspeed_config

    train = dataclasses.replace(cfg.train, precision="fp16", initial_loss_scale_power=initial_power)
    fp16 = get_float16_config(deepspeed_config(cfg.parallel, cfg.optim, train))
    return CreateLossScaler(
        dtype=torch.float16,
        static_loss_scale=fp16.loss_scale,
        dynamic_scaling=fp16.loss_scale == 0,
        dynamic_loss_args=fp16.dynamic_loss_scale_args(),
    )


def _scaler_schedule(rank: int, out: Path) -> None:
    from neoray.training.engine import init_distributed

    init_distributed("gloo")  # the scaler logs from rank 0
    cfg = job_config()
    scaler = fp16_scaler(cfg, initial_power=12)
    scales, error = [], None
    try:
        for overflow in [True] * 3 + [False] * 2000 + [True] * 40:
            scaler.update_scale(overflow)
            scales.append(scaler.cur_scale)
    except Exception as err:  # DeepSpeed stops a run that overflows at the minimum scale
        error = str(err)
    out.write_text(json.dumps({"scales": scales, "error": error}))


def test_the_jobs_fp16_config_scales_like_gpt_neox(tmp_path):
    """Hysteresis 2 (the first overflow keeps the scale), halving after that, doubling after
    1000 clean steps, a floor of 1: GPT-NeoX-20B's fp16 settings."""
    run_workers(_scaler_schedule, 1, tmp_path / "scales.json")
    result = json.loads((tmp_path / "scales.json").read_text())
    scales = result["scales"]
    assert scales[:3] == [2.0**12, 2.0**11, 2.0**10]
    assert scales[1002] == 2.0**10 and scales[1003] == 2.0**11  # after 1000 clean steps
    assert scales[2002] == 2.0**11
    # overflowing again: hysteresis was refilled when the scale grew, then halving to the floor
    assert scales[2003:] == [2.0**11] + [2.0**p for p in range(10, -1, -1)]
    assert "cannot decrease scale anymore" in result["error"]


def _overflow_on_a_real_engine(rank: int, out: Path) -> None:
    import torch

    from neoray.parallel.pipeline import build_pipeline
    from neoray.parallel.topology import place_rank
    from neoray.training.data import training_batches
    from neoray.training.engine import build_engine, init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cfg = job_config("train.steps=6", "optim.warmup=0.5")
    init_distributed("gloo")
    placement = place_rank(cfg.parallel)
    engine = build_engine(
        build_pipeline(cfg.model, placement, cfg.train.seed), cfg.parallel, cfg.optim, cfg.train
    )
    # 2**130 is past fp32's range: the scaled loss and every gradient overflow, as an fp16
    # run's do at too high a scale. Hysteresis keeps 2**130 once, then it halves each step.
    engine.optimizer.loss_scaler = fp16_scaler(cfg, initial_power=12)
    engine.optimizer.loss_scaler.cur_scale = 2.0**130
    batches = training_batches(cfg, placement.dp_rank, 0)
    rows = []
    for step in range(5):
        if step == 4:  # a scale fp32 can hold: the step goes through
            engine.optimizer.loss_scaler.cur_scale = 2.0**8
        before = [p.detach().clone() for p in engine.module.parameters()]
        lr = engine.get_lr()[0]
        loss = engine.train_batch(data_iter=batches).item()
        rows.append(
            {
                "loss": loss,
                "applied": engine.was_step_applied(),
                "scale": engine.optimizer.cur_scale,
                "lr": lr,
                "moved": any(
                    not torch.equal(a, b)
                    for a, b in zip(before, engine.module.parameters(), strict=True)
                ),
            }
        )
    out.write_text(json.dumps(rows))


def test_an_overflowing_step_is_skipped_and_lowers_the_scale_on_a_real_engine(tmp_path):
    run_workers(_overflow_on_a_real_engine, 1, tmp_path / "rows.json", timeout=240)
    rows = json.loads((tmp_path / "rows.json").read_text())
    skipped, applied = rows[:4], rows[4]
    assert [row["scale"] for row in skipped] == [2.0**130, 2.0**129, 2.0**128, 2.0**127]
    assert not any(row["applied"] or row["moved"] for row in skipped)
    # the learning-rate schedule waits for an applied step: warmup has not advanced
    assert len({row["lr"] for row in rows}) == 1
    assert applied["applied"] and applied["moved"] and applied["scale"] == 2.0**8
    assert all(math.isfinite(row["loss"]) for row in rows)  # reported unscaled
