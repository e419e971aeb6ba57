"""Converting weights between the plain `GPTNeoX` and its tensor/pipeline-parallel shards.

A full state dict uses `GPTNeoX`'s names (`layers.3.mlp.dense_h_to_4h.weight`). A shard is the
part one (tp rank, pipeline stage) holds, named as in its `PipelineModule`, where entry i of
the layer list is submodule `i` (`4.mlp.dense_h_to_4h.weight` for layer 3). The split
dimension of each weight follows from its role (see `neoray.model.tensor_parallel`):

- output-feature (row) split: embeddings, the fused QKV, h -> 4h (weights and biases);
- input-feature (column) split: the attention output and 4h -> h weights;
- everything else (layernorms, the biases of the last two) is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from neoray.model.gpt_neox import NeoXConfig

_SPLIT_OUTPUTS = (
    "embed_in.weight",
    "embed_out.weight",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
)
_SPLIT_INPUTS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def split_dim(name: str) -> int | None:
    """Dimension along which tensor parallelism splits parameter `name`; None if replicated."""
    if name.endswith(_SPLIT_OUTPUTS):
        return 0
    if name.endswith(_SPLIT_INPUTS):
        return 1
    return None


def to_pipeline_name(name: str, config: NeoXConfig) -> str:
    """`GPTNeoX` parameter name -> its name in the `PipelineModule`."""
    if name.startswith("embed_in."):
        return f"0.{name}"
    if match := re.match(r"layers\.(\d+)\.(.*)", name):
        return f"{int(match[1]) + 1}.{match[2]}"
    if name.startswith("final_layer_norm."):
        return f"{config.num_layers + 1}.{name}"
    if name.startswith("embed_out."):
        return f"{config.num_layers + 2}.{name}"
    raise KeyError(f"not a GPTNeoX parameter: {name}")


def to_plain_name(name: str, config: NeoXConfig) -> str:
    """`PipelineModule` parameter name -> its `GPTNeoX` name."""
    index, rest = name.split(".", 1)
    position = int(index)
    if 1 <= position <= config.num_layers:
        return f"layers.{position - 1}.{rest}"
    return rest  # embed_in, final_layer_norm and embed_out keep their own names


def shard_tensor(name: str, tensor: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s slice of full parameter `name` (a plain name)."""
    dim = split_dim(name)
    return tensor if dim is None else tensor.chunk(tp, dim=dim)[tp_rank]


def shard(
    full: Mapping[str, torch.Tensor], config: NeoXConfig, tp_rank: int, tp: int
) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `tp_rank`'s slice of a full state dict, in pipeline names."""
    return {
        to_pipeline_name(name, config): shard_tensor(name, tensor, tp_rank, tp).clone()
        for name, tensor in full.items()
    }


def consolidate(
    shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], config: NeoXConfig
) -> dict[str, torch.Tensor]:
    """Full `GPTNeoX` state dict from shards keyed by (tp rank, pipeline stage)."""
    tp = 1 + max(tp_rank for tp_rank, _ in shards)
    by_name: dict[str, list[torch.Tensor | None]] = {}
    for (tp_rank, _), state in shards.items():
        for name, tensor in state.items():
            by_name.setdefault(to_plain_name(name, config), [None] * tp)[tp_rank] = tensor
    full = {}
    for name, pieces in by_name.items():
        if any(p is None for p in pieces):
            raise ValueError(f"{name}: missing from some tensor-parallel ranks")
        dim = split_dim(name)
        full[name] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    return full


def load_full_state_dict(
    module: torch.nn.Module,
    full: Mapping[str, torch.Tensor],
    config: NeoXConfig,
    tp_rank: int,
    tp: int,
) -> None:
    """Load this rank's part of a full `GPTNeoX` state dict into its pipeline stage."""
    local = {}
    for name in module.state_dict():
        plain = to_plain_name(name, config)
        if plain not in full:
            raise KeyError(f"the state dict has no {plain} (parameter {name} of this stage)")
        local[name] = shard_tensor(plain, full[plain], tp_rank, tp)
    module.load_state_dict(local)


def shard_path(directory: str | Path, tp_rank: int, pp_rank: int) -> Path:
    """Where the shard of (tensor-parallel rank, pipeline stage) is saved in `directory`."""
    return Path(directory) / f"tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def consolidate_directory(directory: str | Path, config: NeoXConfig) -> dict[str, torch.Tensor]:
    """Full `GPTNeoX` state dict from the shard files of `directory` (see `shard_path`)."""
    shards = {}
    for path in sorted(Path(directory).glob("tp*_pp*.pt")):
        tp_rank, pp_rank = (int(part[2:]) for part in path.stem.split("_"))
        shards[tp_rank, pp_rank] = torch.load(path, map_location="cpu", weights_only=True)
    if not shards:
        raise FileNotFoundError(f"no shard files (tpNN_ppNN.pt) in {directory}")
    return consolidate(shards, config)
