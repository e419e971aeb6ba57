"""FLOPs accounting, checked against the GPT-NeoX-20B run and against a direct count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.flops import (
    PEAK_TFLOPS,
    attention_flops_per_token,
    hardware_flops_per_token,
    hfu,
    mfu,
    model_flops_per_token,
    plan_training,
)
from neoray.model.presets import load_preset


def neox_20b_run():
    """The 20B run: 96 A100 at 117 TFLOPS of hardware FLOPs, every layer checkpointed."""
    config = dataclasses.replace(load_preset("neox_20b"), checkpoint_activations=1)
    return plan_training(
        config,
        tokens_per_step=1536 * 2048,
        steps=150_000,
        num_devices=96,
        hardware_tflops_per_device=117.0,
        peak_tflops_per_device=PEAK_TFLOPS["a100"],
    )


def test_neox_20b_training_time():
    assert neox_20b_run().hours == pytest.approx(1830, rel=0.10)


def test_neox_20b_mfu():
    plan = neox_20b_run()
    assert plan.mfu == pytest.approx(0.28, abs=0.02)  # the paper's figure


def test_recompute_costs_about_one_extra_forward():
    config = load_preset("pythia_1b")
    assert hardware_flops_per_token(config) == model_flops_per_token(config)
    recomputed = dataclasses.replace(config, checkpoint_activations=1)
    assert hardware_flops_per_token(recomputed) / model_flops_per_token(config) == pytest.approx(
        8 / 6, rel=0.05
    )


def test_model_flops_match_a_direct_count():
    """Count the matmuls of a real forward and backward with torch's FLOP counter.

    The math SDPA kernel (whose matmuls the counter sees) computes the full T x T scores and
    masks them, so it executes the causal half twice: add the masked half to the formula. The
    loss is taken from the logits because the counter has no formula for the in-place `addmm_`
    of the fused loss (the matmuls are the same).
    """
    torch.manual_seed(0)
    config = load_preset("tiny")
    batch, seq = 2, config.max_seq_len
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))

    def counted_per_token(config: NeoXConfig) -> float:
        model = GPTNeoX(config).train()
        # Recompute whole chunks (torch stops early once the saved tensors it needs are back).
        with (
            set_checkpoint_early_stop(False),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return counter.get_total_flops() / (batch * seq)

    masked_half = attention_flops_per_token(config, seq)
    measured = counted_per_token(config)
    assert measured == pytest.approx(model_flops_per_token(config, seq) + masked_half, rel=0.03)
    # With every layer's activations recomputed in the backward pass, the counter sees the
    # layers' forward twice: that is what hardware FLOPs (and so HFU) count.
    recomputed = dataclasses.replace(config, checkpoint_activations=1)
    hardware = counted_per_token(recomputed) - masked_half * 4 / 3  # masked half, forward again
    assert hardware == pytest.approx(hardware_flops_per_token(recomputed, seq), rel=0.03)
    plan = hfu(recomputed, 1e6, 1, 100.0, seq) / mfu(recomputed, 1e6, 1, 100.0, seq)
    assert plan == pytest.approx(hardware / (measured - masked_half), rel=0.03)
