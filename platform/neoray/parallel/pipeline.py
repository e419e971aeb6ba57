"""The model as a DeepSpeed `PipelineModule`: a list of `LayerSpec`s cut into stages.

The list is embedding, N transformer layers, final norm, output layer; stages are balanced by
transformer layers (the embedding joins the first stage, norm and output the last). A
`LayerSpec` builds its module only on the stage that owns it, so no rank ever holds the
whole model. The transformer layers are the model's own (`neoray.model.gpt_neox.Layer`, built
with the tensor-parallel group); the other three entries hold the model's embedding, final
layernorm and output layer under the names `GPTNeoX` gives them (`neoray.parallel.convert`
maps one to the other by a prefix).

The output layer is applied by the loss: without tensor parallelism the projection is fused
with the cross-entropy (`neoray.model.loss`: no logits tensor is kept), with it each rank
projects to its slice of the vocab and the cross-entropy is computed across the slices.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from neoray.model.gpt_neox import Layer, NeoXConfig, init_weights
from neoray.model.loss import linear_cross_entropy
from neoray.model.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
    vocab_parallel_sample_losses,
)
from neoray.parallel.topology import Placement


class EmbeddingStage(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, hidden): the model's `embed_in`."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_in(tokens)


class FinalNormStage(nn.Module):
    """The model's `final_layer_norm`, and muP's readout multiplier after it (as `GPTNeoX`)."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_mult = config.output_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_layer_norm(x)
        return x * self.output_mult if self.output_mult != 1.0 else x


class OutputStage(nn.Module):
    """Holds the model's `embed_out` (this rank's slice of the vocab) for the loss, which
    applies it; the hidden states pass through."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.embed_out = ColumnParallelLinear(
            config.hidden_size, config.padded_vocab_size, group, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def layer_specs(config: NeoXConfig, tp_group) -> list[LayerSpec]:
    """Embedding, `num_layers` transformer layers, final norm, output: in pipeline order."""
    return [
        LayerSpec(EmbeddingStage, config, tp_group),
        *(LayerSpec(Layer, config, i, tp_group) for i in range(config.num_layers)),
        LayerSpec(FinalNormStage, config),
        LayerSpec(OutputStage, config, tp_group),
    ]


class NextTokenLoss:
    """The pipeline's loss function, on the last stage: the output layer and the micro-batch's
    mean next-token loss, or with `per_sample` set each sample's (B,), which validation asks for
    to report the loss of each mixture component (DeepSpeed hands the loss back per
    micro-batch, as computed)."""

    def __init__(self, group) -> None:
        self.group = group
        self.per_sample = False
        self.output: ColumnParallelLinear | None = None  # the last stage's, set once built

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("the loss runs on the last pipeline stage, which holds embed_out")
        if self.per_sample:
            logits = F.linear(hidden, self.output.weight)
            return vocab_parallel_sample_losses(logits, targets, self.group)
        if self.group is None or torch.distributed.get_world_size(self.group) == 1:
            return linear_cross_entropy(hidden.flatten(0, 1), self.output.weight, targets.flatten())
        return vocab_parallel_cross_entropy(self.output(hidden), targets, self.group)


def build_pipeline(
    config: NeoXConfig, placement: Placement, seed: int = 0, compile_layers: bool = False
) -> PipelineModule:
    """This rank's stage of the model, initialised like `GPTNeoX` (NeoX init).

    Random init differs per stage and tensor-parallel rank (the seed is offset by both) and is
    the same on every data-parallel replica. To start from given weights, load them afterwards
    with `neoray.parallel.convert.load_full_state_dict`.

    `compile_layers` compiles each transformer layer with `torch.compile` in place (parameter
    names unchanged): layernorms, rotary, GELU and the residual sums become a few fused kernels
    around the matmuls instead of one memory pass each. All layers share one compiled graph.
    """
    group = placement.tp_group
    loss = NextTokenLoss(group)
    module = PipelineModule(
        layers=layer_specs(config, group),
        loss_fn=loss,
        topology=placement.topology,
        partition_method="type:^Layer$",
        activation_checkpoint_interval=config.checkpoint_activations,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        checkpointable_layers=["Layer"],
    )
    device = next(module.parameters()).device  # PipelineModule moves its stage to the device
    generator = torch.Generator(device).manual_seed(
        seed + 1000 * placement.pp_rank + placement.tp_rank
    )
    init_weights(module, config, generator)
    for stage in module.forward_funcs:
        if isinstance(stage, OutputStage):
            loss.output = stage.embed_out
        if compile_layers and isinstance(stage, Layer):
            stage.compile()
    return module
