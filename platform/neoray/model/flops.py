"""FLOPs accounting: what a training token costs, how well the hardware is used, how long a run takes.

Two counts, following Chowdhery et al. 2022 (PaLM, appendix B) and Narayanan et al. 2021:

- *Model FLOPs* are the work the math requires: forward plus backward (twice the forward) of
  every matmul. A parameter that multiplies an activation costs 2 FLOPs per token forward, so 6
  per token in all: 6 * N. N counts every parameter except the input embedding, which is a
  table lookup, not a matmul; it includes the output embedding (the logits matmul is 2 * V * h
  per token, the largest single matmul of a small model). Biases and layernorm weights are
  counted as if they were matmul weights: they are < 0.1% of N at any real size, and it keeps
  N tied to `NeoXConfig.num_parameters`. On top, attention's own matmuls (QK^T and AV), which
  have no parameters (see `attention_flops_per_token`).
- *Hardware FLOPs* are what the devices actually execute: with activation checkpointing the
  layers run their forward a second time during the backward pass (8N-style instead of 6N).

MFU (model FLOPs utilization) divides achieved model FLOPs by the device peak; it is comparable
across implementations because recomputation does not count as useful work. HFU divides the
hardware FLOPs instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from neoray.model.gpt_neox import NeoXConfig

# Dense fp16/bf16 tensor-core peaks, TFLOPS per device (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}


def matmul_parameters(config: NeoXConfig) -> int:
    """N of "6N": every parameter except the input embedding (a lookup costs no FLOPs)."""
    return config.num_parameters(embeddings=False) + config.padded_vocab_size * config.hidden_size


def attention_flops_per_token(config: NeoXConfig, seq_len: int | None = None) -> int:
    """FLOPs per token of the QK^T and AV matmuls, forward plus backward, causal half only.

    A query attending to S keys costs 2 * S * h FLOPs in QK^T and as much in AV (h = heads x
    head dim). Under a causal mask a token sees on average about half of the T positions, so
    the forward is 2 * T * h per layer and forward plus backward 6 * T * h. Counting only the
    causal half is the work a causal kernel (flash attention) does; a kernel that computes the
    full T x T scores and masks them executes twice this amount.
    """
    seq_len = seq_len or config.max_seq_len
    return 6 * config.num_layers * seq_len * config.hidden_size


def model_flops_per_token(config: NeoXConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token the model requires: 6 * N plus attention (see module doc)."""
    return 6 * matmul_parameters(config) + attention_flops_per_token(config, seq_len)


def hardware_flops_per_token(config: NeoXConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token executed, with recomputation when the config checkpoints activations.

    Checkpointing reruns the forward of the layers (2 FLOPs per layer parameter plus a third of
    the attention count), not of the output embedding, whose logits are not checkpointed.
    """
    flops = model_flops_per_token(config, seq_len)
    if config.checkpoint_activations:
        flops += 2 * config.num_parameters(embeddings=False)
        flops += attention_flops_per_token(config, seq_len) // 3
    return flops


def mfu(
    config: NeoXConfig,
    tokens_per_second: float,
    num_devices: int,
    peak_tflops: float,
    seq_len: int | None = None,
) -> float:
    """Model FLOPs utilization: achieved model FLOPs over the peak of `num_devices` devices."""
    achieved = model_flops_per_token(config, seq_len) * tokens_per_second
    return achieved / (num_devices * peak_tflops * 1e12)


def hfu(
    config: NeoXConfig,
    tokens_per_second: float,
    num_devices: int,
    peak_tflops: float,
    seq_len: int | None = None,
) -> float:
    """Hardware FLOPs utilization: like `mfu`, counting recomputed work as well."""
    achieved = hardware_flops_per_token(config, seq_len) * tokens_per_second
    return achieved / (num_devices * peak_tflops * 1e12)


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run costs, derived from its size and the throughput its devices sustain."""

    tokens: int  # trained on, in total
    model_flops: float  # total, see `model_flops_per_token`
    hardware_flops: float  # total, see `hardware_flops_per_token`
    tokens_per_second: float  # all devices together
    hours: float  # wall clock
    mfu: float
    hfu: float


def plan_training(
    config: NeoXConfig,
    *,
    tokens_per_step: int,
    steps: int,
    num_devices: int,
    hardware_tflops_per_device: float,
    peak_tflops_per_device: float,
    seq_len: int | None = None,
) -> TrainingPlan:
    """Time and utilization of a run whose devices each sustain `hardware_tflops_per_device`.

    Throughput is quoted in hardware FLOPs, as the GPT-NeoX-20B paper reports it, so the token
    rate follows from the hardware FLOPs per token, recomputation included when
    `config.checkpoint_activations` is set.
    """
    tokens = tokens_per_step * steps
    tokens_per_second = (
        num_devices * hardware_tflops_per_device * 1e12 / hardware_flops_per_token(config, seq_len)
    )
    return TrainingPlan(
        tokens=tokens,
        model_flops=float(tokens * model_flops_per_token(config, seq_len)),
        hardware_flops=float(tokens * hardware_flops_per_token(config, seq_len)),
        tokens_per_second=tokens_per_second,
        hours=tokens / tokens_per_second / 3600,
        mfu=mfu(config, tokens_per_second, num_devices, peak_tflops_per_device, seq_len),
        hfu=hfu(config, tokens_per_second, num_devices, peak_tflops_per_device, seq_len),
    )
