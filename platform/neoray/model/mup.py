"""The Maximal Update Parametrization (muP, Yang et al. 2022, "Tensor Programs V").

Under the standard parametrization the best learning rate shrinks as the model widens, so a
sweep tunes only the model it runs. Under muP the hyperparameters tuned on a narrow proxy hold
on a wider model of the same family. Relative to a base width (`model.mup_base_width`,
usually the proxy's hidden_size) and m = hidden_size / base width, muP with Adam is:

- hidden matrices (QKV, attention output, both MLP matrices): init variance 1/fan_in (NeoX's
  init already is) and the learning rate divided by m;
- input embedding: init at the base width's scale at every width, learning rate unchanged;
- output embedding: the logits multiplied by 1/m (`NeoXConfig.output_mult`), learning rate
  unchanged (with the multiplier, TP V's lr / m), initialised at zero (the limit of TP V's
  1/fan_in^2 variance; logits start at 0 at every width);
- biases and layernorms: unchanged;
- attention: q.k / head_dim instead of q.k / sqrt(head_dim).

The multipliers are exact linear factors, so a muP model is an ordinary GPTNeoX once they are
folded into its weights (`standard_weights`): exports load in `transformers` unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from neoray.model.gpt_neox import NeoXConfig

# Parameters whose two dimensions both grow with the width: Adam's lr is divided by width_mult.
HIDDEN_MATRICES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def lr_multiplier(name: str, width_mult: float) -> float:
    """The factor on the learning rate of parameter `name` (1 under the standard
    parametrization, where width_mult is 1)."""
    return 1.0 / width_mult if name.endswith(HIDDEN_MATRICES) else 1.0


def standard_weights(
    state: dict[str, torch.Tensor], config: NeoXConfig
) -> tuple[dict[str, torch.Tensor], NeoXConfig]:
    """A full `GPTNeoX` state dict and config as the standard model that computes the same
    logits: the attention's 1/head_dim becomes 1/sqrt(head_dim) with the queries (weights and
    bias) scaled by 1/sqrt(head_dim) (rotary embeddings are linear in q, so the factor passes
    through them), and the logits' multiplier goes into the output embedding."""
    if config.parametrization == "standard":
        return state, config
    folded = dict(state)
    q_factor = config.attention_scale * math.sqrt(config.head_dim)
    d = config.head_dim
    for name, value in state.items():
        if name.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
            per_head = value.reshape(config.num_heads, 3, d, *value.shape[1:]).clone()
            per_head[:, 0] *= q_factor  # the fused layout is [q_h, k_h, v_h] for each head h
            folded[name] = per_head.reshape(value.shape)
        elif name == "embed_out.weight":
            folded[name] = value * config.output_mult
    return folded, dataclasses.replace(config, parametrization="standard", mup_base_width=None)
