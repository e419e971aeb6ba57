"""Resuming a checkpoint at another layout: weights and AdamW state re-split for (tp', pp', dp').

DeepSpeed's checkpoint of a tp x pp x dp run holds, for each model-parallel rank (pipeline
stage s, tensor rank t: `mp_rank_<s * tp + t>`), the shapes of its stage's parameters, and for
each (data-parallel rank, model-parallel rank) its ZeRO-1 partition: the flat fp32 master
weights and Adam moments of each parameter group, with the slice of each parameter that the
partition holds (`param_slice_mappings`). A parameter's slices in data-parallel order are its
tensor-rank shard, flattened; the tensor ranks' shards joined along the parameter's split
dimension (`neoray.parallel.convert`, the mapping that export and `init_from` use) are the full
tensor. Pipeline parameter names are global (`4.mlp...` is layer 3 at any pp), so a rank of the
new layout reads the model-parallel ranks that held its stage's parameters, rebuilds those
parameters in full, and writes its own shard of each into its engine: module weights, fp32
master weights, exp_avg, exp_avg_sq, Adam's step, the learning-rate schedule and step counters.

DeepSpeed's universal checkpoint (`ds_to_universal`) does the same as a separate offline pass
that writes a second, per-parameter copy of the whole checkpoint, and needs Megatron-style
tensor-layout patterns recorded in the checkpoint; this reads the checkpoint as saved, at
resume, each rank only the files of its stage, with the project's own split rules.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from neoray.checkpoint.manifest import Manifest
from neoray.config import ConfigError
from neoray.deepspeed_private import (
    checkpoint_globals,
    optimizer_partitions,
    restore_optimizer_settings,
    write_partition_fragment,
)
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.convert import consolidate, shard_tensor, to_plain_name

MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIMIZER_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")
FP32 = "fp32"  # the master weights, alongside the moments


def check_layout_change(manifest: Manifest, topology: dict[str, int], global_batch: int) -> None:
    """Refuse, before any weight is read, a layout change that cannot continue the run: the
    data order continues at the saved step only with the same global batch."""
    saved = manifest.config
    saved_batch = (
        saved["parallel.micro_batch_size"]
        * saved["parallel.grad_accum_steps"]
        * manifest.topology["dp"]
    )
    if saved_batch != global_batch:
        raise ConfigError(
            f"run_name={manifest.run_name!r}: its checkpoint at step {manifest.step} trained with "
            f"a global batch of {saved_batch} sequences (micro_batch_size "
            f"{saved['parallel.micro_batch_size']} x grad_accum_steps "
            f"{saved['parallel.grad_accum_steps']} x dp {manifest.topology['dp']}); this run's is "
            f"{global_batch} (dp={topology['dp']}). Resuming at another layout keeps the data "
            "order only with the same global batch: set parallel.micro_batch_size and "
            "parallel.grad_accum_steps so that their product times dp is "
            f"{saved_batch}, or start a new run_name"
        )


@dataclass
class SavedRank:
    """One model-parallel rank of the saved layout: its tensor rank and its parameters'
    shapes, in optimizer-group order."""

    mp_rank: int
    tp_rank: int
    shapes: list[dict[str, torch.Size]]
    states: dict  # the rest of DeepSpeed's model-states file (schedule, step counters)


def model_state_files(manifest: Manifest) -> list[str]:
    """The small per-model-parallel-rank files: parameter shapes, schedule, counters."""
    return sorted(e.path for e in manifest.files if MODEL_STATES.match(e.path))


def read_saved_ranks(folder: Path, manifest: Manifest) -> list[SavedRank]:
    ranks = []
    for name in model_state_files(manifest):
        mp_rank = int(MODEL_STATES.match(name)[1])
        with checkpoint_globals():
            states = torch.load(folder / name, map_location="cpu", weights_only=True)
        shapes = [dict(group) for group in states.pop("param_shapes")]
        ranks.append(SavedRank(mp_rank, mp_rank % manifest.topology["tp"], shapes, states))
    return ranks


def optimizer_files(manifest: Manifest, mp_ranks: Iterable[int]) -> dict[int, list[str]]:
    """ZeRO partition files of the given model-parallel ranks, in data-parallel order."""
    wanted = set(mp_ranks)
    found: dict[int, dict[int, str]] = defaultdict(dict)
    for entry in manifest.files:
        if (match := OPTIMIZER_STATES.match(entry.path)) and int(match[2]) in wanted:
            found[int(match[2])][int(match[1])] = entry.path
    dp = manifest.topology["dp"]
    return {
        mp: [
            found[mp].get(d, f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")
            for d in range(dp)
        ]
        for mp in sorted(wanted)  # an unlisted partition: the download reports it missing
    }


def tensor_rank_shards(
    saved: SavedRank, partition_files: list[Path], names: set[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{fp32 | exp_avg | exp_avg_sq: {pipeline name: this tensor rank's shard}} of the `names`
    that `saved` holds, from its data-parallel partitions; and partition 0's optimizer state
    (Adam's step and hyperparameters, the loss scaler)."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    first = None
    for path in partition_files:
        with checkpoint_globals():
            state = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        first = first or state
        flat = {
            FP32: state["single_partition_of_fp32_groups"],
            **{
                key: [
                    group[key]
                    for _, group in sorted(state["base_optimizer_state"]["state"].items())
                ]
                for key in MOMENTS
            },
        }
        for group, slices in enumerate(state["param_slice_mappings"]):
            for name, where in slices.items():
                if name in names:
                    for key, groups in flat.items():
                        pieces[key][name].append(groups[group].narrow(0, where.start, where.numel))
    shapes = {name: shape for group in saved.shapes for name, shape in group.items()}
    shards = {
        key: {name: torch.cat(parts).view(shapes[name]) for name, parts in by_name.items()}
        for key, by_name in pieces.items()
    }
    return shards, first


def full_states(
    folder: Path, manifest: Manifest, names: set[str], config: NeoXConfig
) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """{fp32 | exp_avg | exp_avg_sq: {plain name: full tensor}} of the pipeline parameters
    `names`, read from the saved checkpoint's files in `folder`; with the optimizer state of
    one partition and the model-states file of one rank (same schedule and counters on all)."""
    holding = holding_ranks(folder, manifest, names)
    by_key: dict[str, dict[tuple[int, int], dict[str, torch.Tensor]]] = defaultdict(dict)
    optimizer = None
    for rank, files in holding:
        shards, optimizer = tensor_rank_shards(rank, [folder / f for f in files], names)
        for key, tensors in shards.items():
            by_key[key][rank.tp_rank, rank.mp_rank] = tensors
    full = {key: consolidate(shards, config) for key, shards in by_key.items()}
    missing = {to_plain_name(n, config) for n in names} - set(full.get(FP32, {}))
    if missing:
        raise ConfigError(
            f"run_name={manifest.run_name!r}: its checkpoint at step {manifest.step} has no "
            f"{sorted(missing)[0]} (and {len(missing) - 1} more): the model differs from the one "
            "it was saved with (model.* must be as saved)"
        )
    return full, optimizer, holding[0][0].states


def _holds(rank: SavedRank, names: set[str]) -> bool:
    return any(name in group for group in rank.shapes for name in names)


def holding_ranks(
    folder: Path, manifest: Manifest, names: set[str]
) -> list[tuple[SavedRank, list[str]]]:
    """The saved model-parallel ranks that held any of the pipeline parameters `names`, each
    with its partition files in data-parallel order (the model-states files are in `folder`)."""
    saved = [r for r in read_saved_ranks(folder, manifest) if _holds(r, names)]
    files = optimizer_files(manifest, [r.mp_rank for r in saved])
    return [(rank, files[rank.mp_rank]) for rank in saved]


def files_for(manifest: Manifest, folder: Path, names: set[str]) -> list[str]:
    """The partition files a rank holding pipeline parameters `names` reads."""
    return [f for _, files in holding_ranks(folder, manifest, names) for f in files]


def load_resharded(
    engine,
    folder: Path,
    manifest: Manifest,
    config: NeoXConfig,
    tp_rank: int,
    tp: int,
) -> None:
    """Write this rank's part of the saved run's state (files in `folder`) into `engine`,
    built at the new layout: each parameter's tensor-parallel shard into the module and its
    ZeRO partition's slice into the optimizer, then the schedule and the step counters."""
    params = dict(engine.module.named_parameters())
    full, optimizer, model_states = full_states(folder, manifest, set(params), config)
    base = optimizer["base_optimizer_state"]
    step = next(iter(base["state"].values()))["step"]
    partitions = optimizer_partitions(engine, step)
    for name, param in params.items():
        plain = to_plain_name(name, config)
        own = {key: shard_tensor(plain, full[key][plain], tp_rank, tp) for key in full}
        if own[FP32].shape != param.shape:
            raise ConfigError(
                f"{plain}: saved {tuple(full[FP32][plain].shape)}, which splits for tp={tp} into "
                f"{tuple(own[FP32].shape)}, but this rank's shard is {tuple(param.shape)}: "
                "model.* must be as saved"
            )
        with torch.no_grad():
            param.copy_(own[FP32])
        for key, value in own.items():
            write_partition_fragment(param, partitions, None if key == FP32 else key, value)
    restore_optimizer_settings(engine, optimizer)
    engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states["global_samples"]
    engine.skipped_steps = model_states["skipped_steps"]
