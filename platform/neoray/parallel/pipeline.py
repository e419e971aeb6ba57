"""The model as a DeepSpeed `PipelineModule`: a list of `LayerSpec`s cut into stages.

The list is embedding, N transformer layers, final norm, output layer; stages are balanced by
transformer layers (the embedding joins the first stage, norm and output the last). A
`LayerSpec` builds its module only on the stage that owns it, so no rank ever holds the
whole model. The loss is the vocab-parallel cross-entropy of the output stage's logit slice.
"""

from __future__ import annotations

import functools

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch.utils.checkpoint import checkpoint

from neoray.model.gpt_neox import NeoXConfig, init_weights
from neoray.parallel.layers import EmbeddingStage, FinalNormStage, OutputStage, ParallelLayer
from neoray.parallel.tensor import vocab_parallel_cross_entropy, vocab_parallel_sample_losses
from neoray.parallel.topology import Placement


def layer_specs(config: NeoXConfig, tp_group) -> list[LayerSpec]:
    """Embedding, `num_layers` transformer layers, final norm, output: in pipeline order."""
    return [
        LayerSpec(EmbeddingStage, config, tp_group),
        *(LayerSpec(ParallelLayer, config, tp_group) for _ in range(config.num_layers)),
        LayerSpec(FinalNormStage, config),
        LayerSpec(OutputStage, config, tp_group),
    ]


class NextTokenLoss:
    """The pipeline's loss function: the micro-batch's mean next-token loss, or with
    `per_sample` set each sample's (B,), which validation asks for to report the loss of each
    mixture component (DeepSpeed hands the loss back per micro-batch, as computed)."""

    def __init__(self, group) -> None:
        self.group = group
        self.per_sample = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.per_sample:
            return vocab_parallel_sample_losses(logits, targets, self.group)
        return vocab_parallel_cross_entropy(logits, targets, self.group)


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
    torch.manual_seed(seed + 1000 * placement.pp_rank + placement.tp_rank)
    group = placement.tp_group
    module = PipelineModule(
        layers=layer_specs(config, group),
        loss_fn=NextTokenLoss(group),
        topology=placement.topology,
        partition_method="type:ParallelLayer",
        activation_checkpoint_interval=config.checkpoint_activations,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        checkpointable_layers=["ParallelLayer"],
    )
    init_weights(module, config)
    if compile_layers:
        for layer in module.forward_funcs:
            if isinstance(layer, ParallelLayer):
                layer.compile()
    return module
