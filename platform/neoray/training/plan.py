"""What a pretrain run will need, computed from its config alone (`jobs/pretrain.py dry_run=true`).

Memory per device is an estimate of the large items: weights and gradients in the training
precision, ZeRO-1's optimizer states (fp32 master weights when training in 16 bits, plus
Adam's two moments) divided over the data-parallel ranks, and activations. Activations follow
Korthikanti et al. 2022 (16-bit, tensor parallel, no sequence parallelism): a layer keeps
s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes for its backward pass; with checkpointing every k
layers only each chunk's input (s*b*h values) is kept and one chunk is recomputed at a time.
Under the 1F1B schedule stage i holds up to (pp - i) micro-batches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepspeed.runtime.utils import partition_balanced

from neoray.model.flops import plan_training
from neoray.training.config import PretrainConfig

GIB = 2**30


@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: int
    parameters_per_rank: int  # on each tensor-parallel rank of the stage
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Transformer layers per stage, as the pipeline partitions them."""
    bounds = partition_balanced(weights=[0] + [1] * num_layers + [0, 0], num_parts=pp)
    return [
        sum(1 for i in range(bounds[s], bounds[s + 1]) if 1 <= i <= num_layers) for s in range(pp)
    ]


def layer_parameters_per_rank(cfg: PretrainConfig) -> int:
    m, tp = cfg.model, cfg.parallel.tp
    h, f = m.hidden_size, m.ffn_size
    split = 3 * h * h + 3 * h + h * h + h * f + f + f * h
    replicated = 4 * h + 2 * h  # two layernorms, the two row-parallel biases
    return split // tp + replicated


def plan_stages(cfg: PretrainConfig) -> list[StagePlan]:
    m, par = cfg.model, cfg.parallel
    width = 4 if cfg.train.precision == "fp32" else 2
    optimizer_bytes = 8 if cfg.train.precision == "fp32" else 12  # (master +) two moments
    b, s, h = par.micro_batch_size, cfg.seq_len, m.hidden_size
    layer_activations = s * b * h * (10 + 24 / par.tp + 5 * m.num_heads * s / (h * par.tp))
    layer_activations *= width / 2
    plans = []
    for stage, layers in enumerate(stage_layers(m.num_layers, par.pp)):
        params = layers * layer_parameters_per_rank(cfg)
        logits = 0
        if stage == 0:
            params += m.padded_vocab_size * h // par.tp
        if stage == par.pp - 1:
            params += m.padded_vocab_size * h // par.tp + 2 * h
            logits = 2 * b * s * m.padded_vocab_size // par.tp * 4  # fp32 logits and softmax
        k = m.checkpoint_activations
        if k:
            per_micro = (layers / k) * s * b * h * width + min(k, layers) * layer_activations
        else:
            per_micro = layers * layer_activations
        in_flight = min(par.pp - stage, par.grad_accum_steps)
        plans.append(
            StagePlan(
                stage=stage,
                layers=layers,
                parameters_per_rank=params,
                weights_gib=params * width / GIB,
                grads_gib=params * width / GIB,
                optimizer_gib=params * optimizer_bytes / par.dp / GIB,
                activations_gib=(per_micro * in_flight + logits) / GIB,
            )
        )
    return plans


def schedule_line(cfg: PretrainConfig) -> str:
    """The optimizer schedule and checkpoint steps: what a recipe (conf/recipe/) sets."""
    o, ckpt = cfg.optim, cfg.checkpoint
    decay = o.decay_steps or cfg.train.steps
    saves = f"every {ckpt.interval:,} steps" if ckpt.enabled else "none"
    if ckpt.enabled and ckpt.milestones:
        saves += " and at 0, 1, 2, 4, ..., 512"
    return (
        f"schedule: lr {o.lr:g} -> {o.min_lr:g} ({int(o.warmup * decay):,} warmup steps, cosine "
        f"over {decay:,}), weight decay {o.weight_decay:g}; checkpoints {saves}"
    )


def format_plan(cfg: PretrainConfig, tflops: float, peak_tflops: float) -> str:
    """The dry-run report: layout, per-stage parameters and memory, FLOPs and time."""
    m, par = cfg.model, cfg.parallel
    devices = par.world_size
    run = plan_training(
        m,
        tokens_per_step=cfg.tokens_per_step,
        steps=cfg.train.steps,
        num_devices=devices,
        hardware_tflops_per_device=tflops,
        peak_tflops_per_device=peak_tflops,
        seq_len=cfg.seq_len,
    )
    lines = [
        f"model: {m.num_parameters() / 1e9:.3f} B parameters, {m.num_layers} layers, "
        f"hidden {m.hidden_size}, padded vocab {m.padded_vocab_size}",
        f"layout: tp {par.tp} x pp {par.pp} x dp {par.dp} = {devices} devices, ZeRO stage "
        f"{par.zero_stage}, {cfg.train.precision}, activation checkpointing every "
        f"{m.checkpoint_activations or 'no'} layer(s)",
        f"batch: micro {par.micro_batch_size} x accumulation {par.grad_accum_steps} x dp "
        f"{par.dp} = {par.sequences_per_step} sequences of {cfg.seq_len} = "
        f"{cfg.tokens_per_step:,} tokens per step",
        schedule_line(cfg),
        "",
        f"{'stage':>5} {'layers':>6} {'params/rank':>12} {'weights':>8} {'grads':>8} "
        f"{'optim':>8} {'activ.':>8} {'total GiB':>10}",
    ]
    for st in plan_stages(cfg):
        lines.append(
            f"{st.stage:>5} {st.layers:>6} {st.parameters_per_rank / 1e6:>11.1f}M "
            f"{st.weights_gib:>8.2f} {st.grads_gib:>8.2f} {st.optimizer_gib:>8.2f} "
            f"{st.activations_gib:>8.2f} {st.total_gib:>10.2f}"
        )
    step_flops = run.model_flops / cfg.train.steps
    step_seconds = run.hours * 3600 / cfg.train.steps
    lines += [
        "",
        f"FLOPs per step: {step_flops:.3e} model, "
        f"{run.hardware_flops / cfg.train.steps:.3e} hardware (with recomputation)",
        f"at {tflops:g} hardware TFLOPS per device ({run.hfu:.0%} HFU, {run.mfu:.0%} MFU of "
        f"{peak_tflops:g}): {run.tokens_per_second:,.0f} tokens/s, {step_seconds:.2f} s per "
        f"step, {run.hours:,.1f} h for {cfg.train.steps:,} steps ({run.tokens / 1e9:,.1f} B tokens)",
    ]
    return "\n".join(lines)
