"""jobs/pretrain.py: bad configs fail before any process group exists; the dry run plans."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from neoray.config import ConfigError
from neoray.training.config import pretrain_config
from neoray.training.precision import check_precision, device_name
from neoray.training.schedule import learning_rate

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_pretrain(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="pretrain", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["parallel=cpu_3d", "parallel.tp=8"],
            r"model\.num_heads=4 is not divisible by parallel\.tp=8",
        ),
        (["parallel.pp=3"], r"parallel\.pp <= 2"),
        (["model=pythia_70m", "parallel.tp=2"], r"set model\.vocab_multiple=256"),
        (
            ["parallel=a100_96", "parallel.grad_accum_steps=16"],
            r"set parallel\.grad_accum_steps=32",
        ),
        (["parallel.zero_stage=3"], r"set parallel\.zero_stage=1"),
        (["data.seq_len=4096"], r"data\.seq_len=4096 exceeds model\.max_seq_len=128"),
        (["train.precision=fp8"], r"train\.precision='fp8'"),
        (["+parallel.sp=2"], r"parallel: unknown field\(s\) sp"),
        (
            ["data=demo", "data.root=/nonexistent/demo", "data.seq_len=64"],
            r"has 8,000 token ids but model\.vocab_size=1,024: set model\.vocab_size=8000",
        ),
        (
            ["data=demo", "data.accept_changed_data=[code,poetry]"],
            r"data\.accept_changed_data=\['code', 'poetry'\]: give a list of component names "
            r"\(code, prose\)",
        ),
        # NaN passes every `< 0` / `<= 0` check: it is refused as such, by name
        (["optim.grad_clip=nan"], r"optim\.grad_clip=nan: give a finite number"),
        (["optim.betas=[0.9,inf]"], r"optim\.betas\[1\]=inf: give a finite number"),
        (
            ["data=demo", "data.components.code.weight=nan"],
            r"data\.components\.code\.weight=nan: give a finite number",
        ),
    ],
)
def test_bad_configs_name_the_field_and_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        pretrain_config(compose_pretrain(*overrides))


def test_presets_are_valid():
    for parallel in ("single", "cpu_3d"):
        pretrain_config(compose_pretrain(f"parallel={parallel}"))
    config = pretrain_config(compose_pretrain("model=neox_20b", "parallel=a100_96"))
    assert config.parallel.world_size == 96
    assert config.parallel.sequences_per_step == 1536


def test_schedule_warms_up_then_decays_to_the_floor():
    optim = pretrain_config(compose_pretrain("optim.warmup=0.1")).optim
    lrs = [learning_rate(step, optim, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(optim.lr / 10)
    assert lrs[9] == pytest.approx(optim.lr)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(optim.min_lr, rel=1e-2)


def run_job(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "jobs/pretrain.py",
            "launcher=torchrun",
            "checkpoint.enabled=false",
            *overrides,
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


def test_dry_run_prints_the_20b_plan():
    result = run_job("dry_run=true", "model=neox_20b", "parallel=a100_96", "data.seq_len=2048")
    assert result.returncode == 0, result.stderr
    assert "tp 2 x pp 4 x dp 12 = 96 devices" in result.stdout
    assert "1536 sequences of 2048 = 3,145,728 tokens per step" in result.stdout
    assert "FLOPs per step" in result.stdout


def test_wrong_process_count_is_rejected_before_training():
    result = run_job("parallel=cpu_3d", "train.steps=1", "run_dir=/nonexistent/never")
    assert result.returncode != 0
    assert "1 processes were launched but" in result.stderr
    assert "torchrun --nproc_per_node 8" in result.stderr


def test_a_ray_run_without_its_token_files_fails_before_any_worker(tmp_path):
    """Missing token files would fail every Ray Train worker, and every restart of them: the
    driver names the file once, before Ray starts."""
    result = run_job(
        "launcher=ray",
        "data=demo",
        "data.seq_len=32",
        "model.vocab_size=8000",
        f"data.root={tmp_path}/none",
        f"run_dir={tmp_path}/run",
    )
    assert result.returncode != 0
    assert f"data.components.code: no token files at {tmp_path}/none/code.idx" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def unsupported(precision: str) -> str | None:
    """Why this machine cannot train in `precision` (as the job says it), or None."""
    try:
        check_precision(precision)
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("precision, loss_scale", [("bf16", 1.0), ("fp16", 2.0**12)])
def test_mixed_precision_with_activation_checkpointing(tmp_path, precision, loss_scale):
    """Where the device runs the precision, two steps train; where it cannot, the job refuses
    before any process group or file exists, naming the device and a precision that works."""
    result = run_job(
        "train.steps=2",
        f"train.precision={precision}",
        "model.checkpoint_activations=1",
        "data.seq_len=32",
        "train.peak_tflops=1.0",
        f"run_dir={tmp_path / 'run'}",
    )
    if reason := unsupported(precision):
        assert result.returncode != 0
        assert reason in result.stderr and device_name("cpu") in reason
        assert "set train.precision=" in reason
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["hydra"]  # Hydra's log only
        return
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [0, 1]
    # At NeoX init the logits are ~N(0, hidden * small_init**2 = 0.4), so the first losses are
    # about ln(vocab) + 0.4 / 2: reduced precision must not move them.
    expected = math.log(1024) + 0.2
    assert all(math.isfinite(row["loss"]) and abs(row["loss"] - expected) < 0.1 for row in rows)
    assert rows[0]["loss_scale"] == loss_scale
    assert rows[0]["hfu"] > rows[0]["mfu"]  # recomputation counts as hardware FLOPs


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_diverging_fp32_run_stops_after_max_nonfinite_steps(tmp_path):
    """A learning rate of 1e30 overflows the weights in the first step; the loss is NaN from
    then on, and the run stops once `train.max_nonfinite_steps` losses in a row were."""
    result = run_job(
        "train.steps=10",
        "train.max_nonfinite_steps=2",
        "optim.lr=1e30",
        "optim.min_lr=1e30",
        "optim.warmup=0",
        "data.seq_len=32",
        "train.peak_tflops=1.0",
        f"run_dir={tmp_path}",
    )
    assert result.returncode != 0
    assert "the loss was not finite for 2 consecutive steps (last: step 2)" in result.stderr
    assert "without saving the diverged weights. Lower optim.lr" in result.stderr
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert math.isfinite(rows[0]["loss"])
    assert all(row["loss"] is None for row in rows[1:])


@pytest.mark.slow
@pytest.mark.skipif(bool(unsupported("fp16")), reason=unsupported("fp16") or "")
def test_fp16_overflow_skips_steps_and_lowers_the_loss_scale(tmp_path):
    """A loss scale of 2**40 overflows fp16 gradients: the steps are skipped and training goes
    on, halving the scale at each overflow after the first (hysteresis 2). Machines without
    fp16 kernels run the same scaler and skip path in tests/test_loss_scaling.py."""
    result = run_job(
        "train.steps=4",
        "train.precision=fp16",
        "train.initial_loss_scale_power=40",
        "train.max_nonfinite_steps=1",
        "data.seq_len=32",
        "train.peak_tflops=1.0",
        f"run_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert all(row["step_skipped"] for row in rows)
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert [row["loss_scale"] for row in rows] == [2.0**40, 2.0**39, 2.0**38, 2.0**37]


@pytest.mark.slow
def test_pretrains_on_the_demo_data(tmp_path):
    """The demo corpus, preprocessed into `data.root`, trains a model sized to its tokenizer."""
    data = ["data=demo", f"data.root={tmp_path / 'data'}", "data.seq_len=64"]
    prepared = subprocess.run(
        [sys.executable, "jobs/preprocess.py", *data],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    run_dir = tmp_path / "run"
    result = run_job(
        *data,
        "model.vocab_size=8000",
        "train.steps=2",
        "train.peak_tflops=1.0",
        f"run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert [row["step"] for row in rows] == [0, 1]
    assert all(abs(row["loss"] - math.log(8000)) < 0.5 for row in rows)
