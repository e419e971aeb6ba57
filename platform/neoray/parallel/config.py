"""The `parallel` config section and the checks that a model fits a 3D layout.

Everything here is plain arithmetic on config values, so a bad layout is reported before any
process group, tensor or device exists (and `jobs/pretrain.py dry_run=true` can use it on a
laptop for a 96-GPU plan).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from neoray.config import ConfigError
from neoray.model.gpt_neox import NeoXConfig

# Megatron pads the vocab so each tensor-parallel shard of the embedding is a multiple of 128.
VOCAB_ALIGNMENT = 128


@dataclass
class ParallelConfig:
    """How the work is split: tensor (tp) x pipeline (pp) x data (dp) parallel ranks.

    One optimizer step consumes `micro_batch_size * grad_accum_steps * dp` sequences. When
    `global_batch_size` is set it must equal that product (it documents the intent of a preset,
    e.g. the 1,536 sequences of GPT-NeoX-20B). `grad_accum_steps: null` derives accumulation
    from it instead: a recipe (conf/recipe/) fixes the global batch of the run it reproduces
    and leaves micro batch and dp to the layout. ZeRO stage 1 shards optimizer states across
    the data-parallel ranks; DeepSpeed's pipeline engine allows no higher stage.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 4
    grad_accum_steps: int | None = 1  # None: global_batch_size / (micro_batch_size x dp)
    global_batch_size: int | None = None
    zero_stage: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "micro_batch_size", "grad_accum_steps", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"parallel.{name} must be at least 1, got {value}")
        if self.grad_accum_steps is None:
            self.grad_accum_steps = self._derived_grad_accum_steps()
        if self.zero_stage not in (0, 1):
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage}: DeepSpeed's pipeline engine supports ZeRO "
                "stage 0 or 1 only (stages 2 and 3 shard gradients and parameters, which its "
                "pipeline schedule cannot accumulate across micro-batches); set parallel.zero_stage=1"
            )
        product = self.micro_batch_size * self.grad_accum_steps * self.dp
        if self.global_batch_size is not None and self.global_batch_size != product:
            per_step = self.micro_batch_size * self.dp
            hint = (
                f"set parallel.grad_accum_steps={self.global_batch_size // per_step}"
                if self.global_batch_size % per_step == 0
                else "change parallel.micro_batch_size or parallel.dp so that they divide it"
            )
            raise ConfigError(
                f"parallel.global_batch_size={self.global_batch_size} must equal micro_batch_size "
                f"x grad_accum_steps x dp = {self.micro_batch_size} x {self.grad_accum_steps} x "
                f"{self.dp} = {product}: {hint}, or remove parallel.global_batch_size"
            )

    def _derived_grad_accum_steps(self) -> int:
        """The accumulation that makes micro_batch_size x dp sequences the global batch, or a
        `ConfigError` naming the layout field to change when none does."""
        batch, micro, dp = self.global_batch_size, self.micro_batch_size, self.dp
        if batch is None:
            raise ConfigError(
                "parallel.grad_accum_steps=null derives accumulation from "
                "parallel.global_batch_size, which is null too: set one of them"
            )
        if batch % (micro * dp) == 0:
            return batch // (micro * dp)
        if batch % dp:
            fix = f"choose a parallel.dp that divides {batch}"
        else:
            fitting = max(m for m in range(1, micro + 1) if (batch // dp) % m == 0)
            fix = f"set parallel.micro_batch_size={fitting} (or another divisor of {batch // dp})"
        raise ConfigError(
            f"parallel.global_batch_size={batch} (a recipe's batch) is not a multiple of "
            f"parallel.micro_batch_size x parallel.dp = {micro} x {dp} = {micro * dp}, so no "
            f"whole parallel.grad_accum_steps reaches it: {fix}"
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp

    def shrunk_to(self, workers: int) -> ParallelConfig | None:
        """The layout with the most data-parallel ranks, fewer than now, that fits on `workers`
        workers and keeps the global batch (each rank accumulating more micro-batches), so a
        run resharded to it trains on the same data; None when there is none. tp and pp stay:
        a model-parallel group is the smallest unit that holds the model as configured."""
        per_step = self.sequences_per_step
        for dp in range(min(self.dp - 1, workers // (self.tp * self.pp)), 0, -1):
            if per_step % (self.micro_batch_size * dp) == 0:
                accum = per_step // (self.micro_batch_size * dp)
                return replace(self, dp=dp, grad_accum_steps=accum)
        return None


def validate_layout(
    model: NeoXConfig, parallel: ParallelConfig, world_size: int | None = None
) -> None:
    """Raise a `ConfigError` naming the field and the fix if `model` cannot run on `parallel`.

    `world_size` is the number of launched processes, when known (not in a dry run); it is
    checked last, so a layout that cannot hold the model says so whatever was launched.
    """
    tp = parallel.tp
    if model.num_heads % tp:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}: each "
            "tensor-parallel rank holds whole attention heads; pick a tp that divides num_heads"
        )
    if model.ffn_size % tp:
        raise ConfigError(
            f"the MLP width ({model.ffn_size}, model.intermediate_size or 4 x hidden_size) is not "
            f"divisible by parallel.tp={tp}: pick a tp that divides it"
        )
    if model.num_layers < parallel.pp:
        raise ConfigError(
            f"model.num_layers={model.num_layers} is less than parallel.pp={parallel.pp}: every "
            f"pipeline stage needs at least one layer; set parallel.pp <= {model.num_layers}"
        )
    alignment = VOCAB_ALIGNMENT * tp
    if model.padded_vocab_size % alignment:
        raise ConfigError(
            f"the padded vocab ({model.padded_vocab_size} = model.vocab_size {model.vocab_size} "
            f"rounded up to model.vocab_multiple={model.vocab_multiple}) is not a multiple of "
            f"128 x parallel.tp = {alignment}: set model.vocab_multiple={alignment}"
        )
    if world_size is not None and world_size != parallel.world_size:
        raise ConfigError(
            f"{world_size} processes were launched but parallel.tp x parallel.pp x parallel.dp = "
            f"{parallel.tp} x {parallel.pp} x {parallel.dp} = {parallel.world_size}: launch "
            f"{parallel.world_size} processes (torchrun --nproc_per_node {parallel.world_size}) "
            "or change parallel.tp/pp/dp so that their product is the number of processes"
        )
