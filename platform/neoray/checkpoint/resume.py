"""Resuming a run from its latest committed checkpoint that every rank can read intact.

Each rank downloads only what its engine loads: its model-parallel rank's model states, its own
ZeRO optimizer partition, and the layer files of its pipeline stage (for every tensor rank:
DeepSpeed's layer loader counts them to choose its own). Every file is checked against the
manifest's size and sha256. If any rank finds a file missing or corrupt, all ranks reject that
checkpoint together and try the one before.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.manifest import (
    CorruptCheckpointError,
    Manifest,
    checkpoint_key,
    committed_checkpoints,
    download,
    step_tag,
)
from neoray.config import ConfigError
from neoray.storage import Storage, StorageError

log = logging.getLogger(__name__)
AXES = ("tp", "pp", "dp")


def files_of_rank(engine, manifest: Manifest) -> list[str]:
    """The files of `manifest` that this rank's engine reads in `load_checkpoint`."""
    tag = step_tag(manifest.step)
    own = {
        Path(engine._get_ckpt_name("", tag)).name,  # mp_rank_<TT>_model_states.pt
        Path(engine._get_zero_ckpt_name("", tag)).name,  # (bf16_)zero_pp_rank_<D>_mp_rank_<TT>_...
    }
    module = engine.module
    layers = tuple(f"layer_{i:02d}-" for i in range(module._local_start, module._local_stop))
    listed = [entry.path for entry in manifest.files]
    return [path for path in listed if path in own or path.startswith(layers)] + sorted(
        own - set(listed)  # absent from the manifest: download() reports it as missing
    )


def check_topology(manifest: Manifest, topology: dict[str, int]) -> None:
    if manifest.topology != topology:
        saved = ", ".join(f"{axis}={manifest.topology.get(axis)}" for axis in AXES)
        now = ", ".join(f"{axis}={topology[axis]}" for axis in AXES)
        raise ConfigError(
            f"run_name={manifest.run_name!r}: its checkpoint at step {manifest.step} was written "
            f"with {saved} but this run has {now}; resharding a checkpoint to another layout is "
            "not supported yet: set parallel.tp/pp/dp as before, or start a new run_name"
        )


def committed_on_rank0(storage: Storage, run_name: str) -> list[Manifest]:
    """The committed checkpoints, as rank 0 sees them (all ranks act on the same list)."""
    found: list = [None]
    if dist.get_rank() == 0:
        try:
            found[0] = committed_checkpoints(storage, run_name)
        except Exception as err:  # every rank raises it, rather than wait for rank 0 forever
            found[0] = f"listing the checkpoints of run {run_name!r} failed: {err}"
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], str):
        raise StorageError(found[0])
    return found[0]


def resume(
    engine,
    storage: Storage,
    manifests: list[Manifest],
    topology: dict[str, int],
    staging: Path,
) -> Manifest:
    """Load the newest checkpoint of `manifests` that all ranks read intact into `engine`
    (collective). A different topology is refused (ConfigError); when no checkpoint is intact,
    CorruptCheckpointError."""
    local = staging / f"rank_{dist.get_rank():05d}" / "resume"
    for manifest in reversed(manifests):
        check_topology(manifest, topology)
        tag = step_tag(manifest.step)
        shutil.rmtree(local, ignore_errors=True)
        problem = ""
        try:
            download(storage, manifest, local / tag, files_of_rank(engine, manifest))
        except (CorruptCheckpointError, StorageError, OSError) as err:
            problem = str(err)
            log.error(
                "rank %d: checkpoint step %d is unusable: %s",
                dist.get_rank(),
                manifest.step,
                problem,
            )
        intact = torch.tensor([0 if problem else 1], dtype=torch.int32)
        dist.all_reduce(intact, op=dist.ReduceOp.MIN)
        if intact.item():
            engine.load_checkpoint(str(local), tag=tag)
            shutil.rmtree(local, ignore_errors=True)
            if dist.get_rank() == 0:
                log.info(
                    "resumed run %r at step %d from %s",
                    manifest.run_name,
                    manifest.step,
                    storage.uri(checkpoint_key(manifest.run_name, manifest.step)),
                )
            return manifest
        if dist.get_rank() == 0:
            log.error(
                "rejecting checkpoint step %d of run %r (a file is missing or corrupt, see the "
                "messages above); trying the previous one",
                manifest.step,
                manifest.run_name,
            )
    shutil.rmtree(local, ignore_errors=True)
    raise CorruptCheckpointError(
        f"none of the {len(manifests)} committed checkpoints of run {manifests[0].run_name!r} "
        "could be read intact (see the messages above); starting over would overwrite them: "
        "use another run_name, or delete the run's checkpoints to start it afresh"
    )
