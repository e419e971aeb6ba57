"""GPT-NeoX in one file: config, layers and the language model.

The architecture of GPT-NeoX-20B and Pythia: each layer computes attention and the MLP from
two separate layernorms of the same input and adds both to the residual ("parallel
residual"); rotary position embeddings on the first `rotary_pct` of each head's dims; one
fused QKV projection laid out per head as [q_h, k_h, v_h]; untied input and output
embeddings. Module and parameter names follow Hugging Face's GPTNeoX, so checkpoints map
one to one (see `neoray.model.hf`).

This is also the model that trains: a layer built with a tensor-parallel group holds its
rank's share of the heads and of the MLP (Megatron's column/row split, `neoray.model.tensor_parallel`)
and is a stage of the DeepSpeed pipeline as it is (`neoray.parallel.pipeline`). Without a group
(the default) the same code is the plain single-process model. Attention and the MLP return
their un-reduced output projections without the bias; the layer adds the two, reduces once
(one all-reduce per layer with the parallel residual) and then adds both biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neoray.config import ConfigError
from neoray.model.loss import linear_cross_entropy
from neoray.model.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_parallel,
)

PARAMETRIZATIONS = ("standard", "mup")


@dataclass
class NeoXConfig:
    """Shape of a GPT-NeoX model. Defaults are the 20B preset."""

    vocab_size: int = 50277  # real tokens; the embedding is padded (see padded_vocab_size)
    num_layers: int = 44
    hidden_size: int = 6144
    num_heads: int = 64
    intermediate_size: int | None = None  # MLP width; None means 4 * hidden_size
    max_seq_len: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    vocab_multiple: int = 128  # pad the vocab to a multiple of this (tensor parallelism, speed)
    checkpoint_activations: int = (
        0  # in training, recompute activations in chunks of k layers; 0 = off
    )
    parametrization: str = "standard"  # standard | mup (see neoray.model.mup)
    mup_base_width: int | None = None  # muP: the hidden_size its hyperparameters were tuned at

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads}): change one of them"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"model.rotary_pct must be within [0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ConfigError(
                f"model.rotary_pct={self.rotary_pct} gives {self.rotary_dims} rotary dims per head "
                f"(head dim {self.head_dim}); it must be even: pick a rotary_pct that gives an even count"
            )
        if self.vocab_multiple <= 0:
            raise ConfigError(f"model.vocab_multiple must be positive, got {self.vocab_multiple}")
        if self.checkpoint_activations < 0:
            raise ConfigError("model.checkpoint_activations must be >= 0 (0 turns it off)")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ConfigError(
                f"model.parametrization={self.parametrization!r}: choose one of "
                f"{', '.join(PARAMETRIZATIONS)}"
            )
        if self.parametrization == "mup" and not (self.mup_base_width or 0) > 0:
            raise ConfigError(
                "model.parametrization=mup needs model.mup_base_width, the hidden_size the "
                f"hyperparameters were tuned at (got {self.mup_base_width}): set it, e.g. "
                f"model.mup_base_width={self.hidden_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def width_mult(self) -> float:
        """hidden_size / mup_base_width under muP; 1 under the standard parametrization."""
        return self.hidden_size / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def attention_scale(self) -> float:
        """The softmax temperature of q.k: 1/sqrt(head_dim), or 1/head_dim under muP (queries
        and keys become correlated in training, so q.k grows like head_dim, not its root)."""
        d = self.head_dim
        return 1.0 / d if self.parametrization == "mup" else 1.0 / math.sqrt(d)

    @property
    def output_mult(self) -> float:
        """The factor on the logits: mup_base_width / hidden_size under muP, else 1."""
        return 1.0 / self.width_mult

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def num_parameters(self, embeddings: bool = True) -> int:
        """Exact parameter count, computed without allocating the model."""
        h, f = self.hidden_size, self.ffn_size
        per_layer = (
            2 * 2 * h  # two layernorms
            + 3 * h * h
            + 3 * h  # fused QKV
            + h * h
            + h  # attention output
            + h * f
            + f  # h -> 4h
            + f * h
            + h  # 4h -> h
        )
        total = self.num_layers * per_layer + 2 * h  # + final layernorm
        if embeddings:
            total += 2 * self.padded_vocab_size * h  # untied input and output embeddings
        return total


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer.

    Static buffers avoid a concatenation per generated token; `length` is how many
    positions are filled (the same for every row: prompts are left-padded).
    """

    def __init__(self, config: NeoXConfig, batch_size: int, max_len: int, dtype, device) -> None:
        shape = (config.num_layers, batch_size, config.num_heads, max_len, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary embeddings over the first `rotary_dims` of each head."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        dims = config.rotary_dims
        inv_freq = 1.0 / (
            config.rotary_base ** (torch.arange(0, dims, 2, dtype=torch.float) / dims)
        )
        angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for `positions` (T,) or (B, T), shaped to broadcast over (B, heads, T, dims)."""
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        if positions.dim() == 2:  # per-row positions (left-padded batches): add the head axis
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (GPT-NeoX "rotate half" convention)."""
    dims = cos.shape[-1]
    x_rot, x_pass = x[..., :dims], x[..., dims:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """Causal self-attention over this rank's heads (all of them without tensor parallelism).
    Returns this rank's share of the output projection, un-reduced and without its bias."""

    def __init__(self, config: NeoXConfig, layer_index: int, group=None) -> None:
        super().__init__()
        h = config.hidden_size
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.layer_index = layer_index
        self.query_key_value = ColumnParallelLinear(h, 3 * h, group)
        self.dense = RowParallelLinear(h, h, group)
        # The fused QKV is laid out per head, so a contiguous slice of it is whole heads.
        self.num_heads = self.query_key_value.weight.shape[0] // (3 * self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Per-head fused layout: the projection's output is [q_h, k_h, v_h] for each head h.
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        S = k.shape[2]
        if mask is None and 1 < T < S:  # a chunk after cached keys: causal, aligned to the end
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale
        )
        return self.dense.partial(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """h -> 4h, GELU, 4h -> h: returns this rank's share of the last projection, un-reduced and
    without its bias."""

    def __init__(self, config: NeoXConfig, group=None) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.ffn_size, group)
        self.dense_4h_to_h = RowParallelLinear(config.ffn_size, config.hidden_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h.partial(F.gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    """One transformer layer. As a pipeline stage it gets only the hidden states and takes its
    rotary tables for positions 0..T-1 from its own copy."""

    def __init__(self, config: NeoXConfig, layer_index: int = 0, group=None) -> None:
        super().__init__()
        self.group = group
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_index, group)
        self.mlp = MLP(config, group)
        self.rotary = RotaryEmbedding(config)  # tables only (not saved)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if rotary is None:
            rotary = self.rotary(torch.arange(x.shape[1], device=x.device), x.dtype)
        attn_bias, mlp_bias = self.attention.dense.bias, self.mlp.dense_4h_to_h.bias
        attn = self.attention(self.input_layernorm(x), rotary, mask, cache)
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)), reduced once
            partial = attn + self.mlp(self.post_attention_layernorm(x))
            return x + reduce_from_tensor_parallel(partial, self.group) + (attn_bias + mlp_bias)
        x = x + reduce_from_tensor_parallel(attn, self.group) + attn_bias
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + reduce_from_tensor_parallel(mlp, self.group) + mlp_bias


@torch.no_grad()
def init_weights(
    module: nn.Module, config: NeoXConfig, generator: torch.Generator | None = None
) -> None:
    """GPT-NeoX-20B init: `small_init` everywhere, `wang_init` on output projections.

    Both give the hidden matrices a variance of 1/fan_in, as muP wants too. Under muP the input
    embedding's scale is that of the base width at every width (its fan-in, the vocab, does
    not grow), and the output embedding starts at zero (the limit of muP's 1/fan_in^2
    variance; what the `mup` package recommends): logits start at 0 at every width.

    Works by parameter name (and finds layernorms by type), so any module that names its
    parameters like `GPTNeoX` (a pipeline stage, a tensor-parallel shard) is initialised by the
    same rules. Layernorms and biases start equal on every rank, as replicated weights must.
    Random draws come from `generator` (on the parameters' device), else torch's global one.
    """
    h, n = config.hidden_size, config.num_layers
    small = math.sqrt(2 / (5 * h))
    wang = 2 / (n * math.sqrt(h))
    embedding = math.sqrt(2 / (5 * h / config.width_mult))  # small_init, at the base width
    norms = {id(p) for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, p in module.named_parameters():
        if id(p) in norms:  # every layernorm, the final one included: weight 1, bias 0
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            p.normal_(0.0, wang, generator=generator)
        elif name.endswith("embed_in.weight"):
            p.normal_(0.0, embedding, generator=generator)
        elif name.endswith("embed_out.weight") and config.parametrization == "mup":
            p.zero_()
        else:
            p.normal_(0.0, small, generator=generator)


class GPTNeoX(nn.Module):
    """The language model: embeddings, layers, final layernorm, output embedding."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_in = VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size, None)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = ColumnParallelLinear(
            config.hidden_size, config.padded_vocab_size, None, bias=False
        )
        self.rotary = RotaryEmbedding(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, padded vocab), or the mean next-token loss when `targets` is given.

        `targets` (B, T) holds the token that follows each input position; -100 is ignored.
        `positions` (B, T) and a boolean attention `mask` (B, 1, T, S) are for left-padded
        batches and decoding with a `cache`; without them attention is plainly causal.
        `last_only` computes logits for the last position only (generation).
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}"
            )
        x = self.embed_in(idx)
        rotary = self.rotary(positions, x.dtype)
        chunk = self.config.checkpoint_activations
        if chunk and self.training and torch.is_grad_enabled():
            # Keep only each chunk's input; recompute its activations in the backward pass.
            for first in range(0, len(self.layers), chunk):
                x = checkpoint(
                    self._run_layers, x, first, first + chunk, rotary, mask, use_reentrant=False
                )
        else:
            x = self._run_layers(x, 0, len(self.layers), rotary, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.final_layer_norm(x)
        if self.config.output_mult != 1.0:  # muP's readout multiplier
            x = x * self.config.output_mult
        if targets is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.embed_out.weight, targets.flatten())
        if last_only:
            x = x[:, -1:]
        return self.embed_out(x)

    def _run_layers(self, x, first, end, rotary, mask=None, cache=None) -> torch.Tensor:
        for layer in self.layers[first:end]:
            x = layer(x, rotary, mask, cache)
        return x
