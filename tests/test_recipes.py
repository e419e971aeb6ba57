"""Recipes (conf/recipe/): each composes the released run it names, field by field.

RELEASED is the reference, written from the configs of the runs themselves, not from the
recipes: EleutherAI/pythia's models/<size>/pythia-<size>.yml (the v1 suite, standard Pile)
and EleutherAI/gpt-neox's configs/20B.yml, in their own terms (micro batch per GPU, gradient
accumulation, GPUs, pipe and model parallel sizes). Pythia-1B's precision is the exception
the pythia README records: bf16, though its config says fp16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from neoray.cli import main
from neoray.config import ConfigError
from neoray.model.presets import available_presets, load_preset
from neoray.training.config import pretrain_config

CONF = Path(__file__).resolve().parents[1] / "conf"
PYTHIA_SAVES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # extra-save-iters


def pythia(
    layers, hidden, heads, lr, min_lr, gpus, micro, gas, mp, eval_interval, precision="fp16"
):
    return {
        "num-layers": layers,
        "hidden-size": hidden,
        "num-attention-heads": heads,
        "lr": lr,
        "min_lr": min_lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight-decay": 0.1,
        "gradient_clipping": 1.0,
        "warmup": 0.01,
        "lr-decay-iters": 143000,
        "train-iters": 143000,
        "seq-length": 2048,
        "gpus": gpus,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "model-parallel-size": mp,
        "pipe-parallel-size": 1,
        "precision": precision,
        "initial_scale_power": 12,
        "checkpoint-factor": 1000,
        "extra-save-iters": PYTHIA_SAVES,
        "eval-interval": eval_interval,
        "eval-iters": 10,
        "checkpoint-num-layers": 1,
    }


RELEASED = {
    "pythia_70m": pythia(6, 512, 8, 0.001, 0.0001, 32, 32, 1, 1, 100000),
    "pythia_160m": pythia(12, 768, 12, 0.0006, 0.00006, 32, 32, 1, 1, 40000),
    "pythia_410m": pythia(24, 1024, 16, 0.0003, 0.00003, 32, 32, 1, 1, 40000),
    "pythia_1b": pythia(16, 2048, 8, 0.00025, 0.000025, 64, 16, 1, 1, 40000, "bf16"),
    "pythia_1_4b": pythia(24, 2048, 16, 0.0002, 0.00002, 64, 16, 1, 1, 40000),
    "pythia_2_8b": pythia(32, 2560, 32, 0.00016, 0.000016, 64, 16, 1, 1, 40000),
    "pythia_6_9b": pythia(32, 4096, 32, 0.00012, 0.000012, 128, 8, 2, 2, 1000),
    "pythia_12b": pythia(36, 5120, 40, 0.00012, 0.000012, 256, 8, 2, 4, 1000),
    "neox_20b": {
        "num-layers": 44,
        "hidden-size": 6144,
        "num-attention-heads": 64,
        "lr": 0.97e-4,
        "min_lr": 0.97e-5,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight-decay": 0.01,
        "gradient_clipping": 1.0,
        "warmup": 0.01,
        "lr-decay-iters": 150000,
        "train-iters": 150000,
        "seq-length": 2048,
        "gpus": 96,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 32,
        "model-parallel-size": 2,
        "pipe-parallel-size": 4,
        "precision": "fp16",
        "initial_scale_power": 12,
        "checkpoint-factor": 500,
        "extra-save-iters": [],
        "eval-interval": 1000,
        "eval-iters": 10,
        "checkpoint-num-layers": 1,
    },
}


def compose_pretrain(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="pretrain", overrides=list(overrides))


def released_layout(run: dict) -> list[str]:
    """The released run's layout as overrides; accumulation is left for the recipe to derive."""
    tp, pp = run["model-parallel-size"], run["pipe-parallel-size"]
    return [
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.dp={run['gpus'] // (tp * pp)}",
        f"parallel.micro_batch_size={run['train_micro_batch_size_per_gpu']}",
    ]


def test_every_preset_with_a_released_run_has_a_recipe():
    recipes = {path.stem for path in (CONF / "recipe").glob("*.yaml")}
    assert recipes == set(RELEASED) == set(available_presets()) - {"tiny"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recipe_is_the_released_run_field_by_field(name):
    run = RELEASED[name]
    config = pretrain_config(compose_pretrain(f"recipe={name}", *released_layout(run)))
    model, optim, parallel, train, checkpoint = (
        config.model,
        config.optim,
        config.parallel,
        config.train,
        config.checkpoint,
    )
    assert model == dataclasses.replace(
        load_preset(name), checkpoint_activations=run["checkpoint-num-layers"]
    )
    assert (model.num_layers, model.hidden_size, model.num_heads) == (
        run["num-layers"],
        run["hidden-size"],
        run["num-attention-heads"],
    )
    assert optim.lr == pytest.approx(run["lr"], rel=1e-12)
    assert optim.min_lr == pytest.approx(run["min_lr"], rel=1e-12)
    assert optim.betas == run["betas"]
    assert optim.eps == run["eps"]
    assert optim.weight_decay == run["weight-decay"]
    assert optim.grad_clip == run["gradient_clipping"]
    assert optim.warmup == run["warmup"]
    assert optim.decay_steps == run["lr-decay-iters"]
    assert train.steps == run["train-iters"]
    assert config.seq_len == run["seq-length"]
    # the released layout reaches the released batch with the released accumulation
    assert parallel.world_size == run["gpus"]
    assert parallel.grad_accum_steps == run["gradient_accumulation_steps"]
    assert parallel.global_batch_size == parallel.sequences_per_step
    assert parallel.sequences_per_step == (
        run["gpus"]
        // (run["model-parallel-size"] * run["pipe-parallel-size"])
        * run["train_micro_batch_size_per_gpu"]
        * run["gradient_accumulation_steps"]
    )
    assert train.precision == run["precision"]
    assert train.initial_loss_scale_power == run["initial_scale_power"]
    assert (train.eval_interval, train.eval_iters) == (run["eval-interval"], run["eval-iters"])
    saved = [
        step
        for step in range(2 * run["checkpoint-factor"] + 1)
        if checkpoint.should_save(step, 10**9)
    ]
    expected = sorted(
        {*run["extra-save-iters"], run["checkpoint-factor"], 2 * run["checkpoint-factor"]}
    )
    assert saved == expected


def test_the_batch_sizes_match_the_papers():
    """Pythia: 2,097,152 tokens a step (299,892,736,000 in all); GPT-NeoX-20B: ~3.15 M."""
    for name, tokens in (("pythia_70m", 2_097_152), ("pythia_12b", 2_097_152)):
        config = pretrain_config(
            compose_pretrain(f"recipe={name}", *released_layout(RELEASED[name]))
        )
        assert config.tokens_per_step == tokens
        assert config.tokens_per_step * config.train.steps == 299_892_736_000
    config = pretrain_config(compose_pretrain("recipe=neox_20b", "parallel=a100_96"))
    assert config.tokens_per_step == 3_145_728


def test_any_field_can_be_overridden_after_the_recipe():
    config = pretrain_config(
        compose_pretrain(
            "recipe=pythia_1_4b", "optim.lr=1e-4", "train.steps=2000", "parallel.micro_batch_size=2"
        )
    )
    assert config.optim.lr == 1e-4
    assert config.optim.min_lr == pytest.approx(2e-5)  # the rest of the recipe stays
    assert config.optim.decay_steps == 143000  # the first 2,000 steps of the released schedule
    assert config.train.steps == 2000
    assert config.parallel.grad_accum_steps == 512  # 2 x 512 x 1 = 1,024
    assert config.model.num_layers == 24


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # the 20B layout cannot reach Pythia's 1,024 sequences: 4 x 12 divides no 1,024
        (
            ["recipe=pythia_1_4b", "parallel=a100_96"],
            r"parallel\.global_batch_size=1024 .* parallel\.micro_batch_size x parallel\.dp = "
            r"4 x 12 = 48, .* choose a parallel\.dp that divides 1024",
        ),
        (
            ["recipe=pythia_1_4b", "parallel.dp=64", "parallel.micro_batch_size=24"],
            r"parallel\.micro_batch_size x parallel\.dp = 24 x 64 = 1536, .* "
            r"set parallel\.micro_batch_size=16",
        ),
        # accumulation given by hand must still reach the recipe's batch
        (
            ["recipe=neox_20b", "parallel=a100_96", "parallel.grad_accum_steps=16"],
            r"parallel\.global_batch_size=1536 must equal .* set parallel\.grad_accum_steps=32",
        ),
        (
            ["parallel.grad_accum_steps=null"],
            r"parallel\.grad_accum_steps=null .* parallel\.global_batch_size, which is null too",
        ),
    ],
)
def test_a_layout_that_misses_the_recipes_batch_is_refused_by_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        pretrain_config(compose_pretrain(*overrides))


def plan(*args: str) -> tuple[int | str, str]:
    """`neoray plan <args>` as the console script runs it: its exit code (or message) and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["plan", *args])
    return exited.value.code, out.getvalue()


def test_neoray_plan_takes_a_recipe_and_a_layout():
    code, out = plan("recipe=pythia_1_4b", "parallel.dp=64", "parallel.micro_batch_size=16")
    assert code == 0
    assert "1.415 B parameters, 24 layers, hidden 2048" in out
    assert "tp 1 x pp 1 x dp 64 = 64 devices, ZeRO stage 1, fp16" in out
    assert "micro 16 x accumulation 1 x dp 64 = 1024 sequences of 2048 = 2,097,152 tokens" in out
    assert re.search(r"lr 0\.0002 -> 2e-05 \(1,430 warmup steps, cosine over 143,000\)", out)
    assert "weight decay 0.1; checkpoints every 1,000 steps and at 0, 1, 2, 4, ..., 512" in out
    assert "for 143,000 steps (299.9 B tokens)" in out

    code, out = plan("recipe=pythia_1_4b", "parallel=a100_96")
    assert str(code).startswith("neoray plan: parallel.global_batch_size=1024 ") and not out
    code, _ = plan("recipe=pythia_1_4b", "--devices", "64")
    assert str(code).startswith("neoray plan: --devices: these apply to a preset")


@pytest.mark.slow
def test_a_recipe_trains_through_the_pretrain_job_on_ray_at_tp_2(tmp_path):
    """`recipe=pythia_70m` through `jobs/pretrain.py` on Ray Train workers, shrunk to the tiny
    model and a batch of 8 for the CPU: the optimizer, schedule and checkpoint milestones that
    the run records are the released run's."""
    from distributed import run_command

    from neoray.checkpoint import committed_checkpoints
    from neoray.storage import LocalStorage

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,
    }
    store = tmp_path / "store"
    try:
        run_command(
            [
                sys.executable,
                "jobs/pretrain.py",
                "recipe=pythia_70m",
                "model=tiny",
                "data.seq_len=32",
                "parallel.tp=2",
                "parallel.micro_batch_size=2",
                "parallel.global_batch_size=8",
                "train.steps=3",
                "train.precision=fp32",  # the recipe's fp16 needs kernels not every CPU has
                "train.peak_tflops=1.0",
                "tracking.enabled=false",
                "run_name=recipe",
                f"run_dir={tmp_path / 'run'}",
                f"storage.root={store}",
            ],
            timeout=300,
            cwd=CONF.parent,
            env=env,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    manifests = committed_checkpoints(LocalStorage(store), "recipe")
    assert [m.step for m in manifests] == [0, 1, 2, 3]  # milestones 0, 1, 2 and the last step
    saved = manifests[-1].config
    released = RELEASED["pythia_70m"]
    assert (saved["optim.lr"], saved["optim.min_lr"]) == (released["lr"], released["min_lr"])
    assert saved["optim.weight_decay"] == released["weight-decay"]
    assert saved["optim.decay_steps"] == released["lr-decay-iters"]
    assert saved["parallel.grad_accum_steps"] == 8 // 2  # derived: 8 sequences / (2 x dp 1)
    assert manifests[-1].topology == {"tp": 2, "pp": 1, "dp": 1}
