"""The GPT-NeoX model as tensor-parallel pipeline stages: embedding, layers, final norm, output.

Each class is one entry of the pipeline (see `neoray.parallel.pipeline`) and takes one tensor
in and gives one tensor out, as DeepSpeed's `PipelineModule` requires. Parameter names inside
each stage are those of `neoray.model.GPTNeoX`, so a stage's state dict maps to the plain
model's by a prefix (see `neoray.parallel.convert`); with a tensor-parallel group of one
process every stage computes exactly what `GPTNeoX` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neoray.model.gpt_neox import NeoXConfig, RotaryEmbedding, apply_rotary
from neoray.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_parallel,
)


class EmbeddingStage(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, hidden)."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_in(tokens)


class ParallelAttention(nn.Module):
    """Causal self-attention over this rank's heads; returns the un-reduced output projection."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        h = config.hidden_size
        self.head_dim = config.head_dim
        self.query_key_value = ColumnParallelLinear(h, 3 * h, group)
        self.dense = RowParallelLinear(h, h, group)
        # The fused QKV is laid out per head, so a contiguous slice of it is whole heads.
        self.local_heads = self.query_key_value.weight.shape[0] // (3 * self.head_dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.local_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense.partial(y.transpose(1, 2).reshape(B, T, -1))


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel), GELU, 4h -> h (row-parallel, returned un-reduced)."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.ffn_size, group)
        self.dense_4h_to_h = RowParallelLinear(config.ffn_size, config.hidden_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h.partial(F.gelu(self.dense_h_to_4h(x)))


class ParallelLayer(nn.Module):
    """One transformer layer. With the parallel residual the attention and MLP partial outputs
    are summed before a single all-reduce: one collective per layer in the forward pass."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.group = group
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ParallelAttention(config, group)
        self.mlp = ParallelMLP(config, group)
        self.rotary = RotaryEmbedding(config)  # tables only (not saved): each stage has its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotary = self.rotary(torch.arange(x.shape[1], device=x.device), x.dtype)
        attn_bias, mlp_bias = self.attention.dense.bias, self.mlp.dense_4h_to_h.bias
        attn = self.attention(self.input_layernorm(x), rotary)
        if self.parallel_residual:
            partial = attn + self.mlp(self.post_attention_layernorm(x))
            return x + reduce_from_tensor_parallel(partial, self.group) + (attn_bias + mlp_bias)
        x = x + reduce_from_tensor_parallel(attn, self.group) + attn_bias
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + reduce_from_tensor_parallel(mlp, self.group) + mlp_bias


class FinalNormStage(nn.Module):
    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x)


class OutputStage(nn.Module):
    """Hidden states -> this rank's slice of the logits (B, T, padded vocab / tp)."""

    def __init__(self, config: NeoXConfig, group) -> None:
        super().__init__()
        self.embed_out = ColumnParallelLinear(
            config.hidden_size, config.padded_vocab_size, group, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_out(x)
