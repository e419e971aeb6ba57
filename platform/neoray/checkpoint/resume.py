"""Resuming a run from its latest committed checkpoint that every rank can read intact.

At the layout it was saved with, each rank downloads only what its engine loads: its own ZeRO
optimizer partition, the layer files of its pipeline stage (for every tensor rank: DeepSpeed's
layer loader counts them to choose its own) and every model-parallel rank's small model-states
file (DeepSpeed's loader counts them against the saved model-parallel size, and reads the
first besides its own). At another layout, each rank downloads the saved optimizer partitions of the parameters
its stage holds and re-splits them (`neoray.checkpoint.reshard`). Every file is checked against the
manifest's size and sha256. If any rank finds a file missing or corrupt, all ranks reject that
checkpoint together and try the one before; the rejected checkpoints' manifests are deleted,
so that when training saves those steps again no reader takes the old manifest for the new
files. So are malformed manifests (unreadable: corrupt checkpoints) of steps after the one
resumed from, which training saves again and which retention would otherwise count as kept
checkpoints; older ones stay, named in a warning at every listing, until retention deletes
them. Storage that fails (after the storage's own retries: timeouts, 5xx, refused
connections) is not corruption: resume stops with an error rather than fall back.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.manifest import (
    CorruptCheckpointError,
    Manifest,
    checkpoint_key,
    download,
    manifest_key,
    scan_checkpoints,
    step_tag,
)
from neoray.checkpoint.reshard import (
    check_layout_change,
    files_for,
    load_resharded,
    model_state_files,
)
from neoray.config import ConfigError
from neoray.deepspeed_private import loads_without_pickle, local_layers, rank_checkpoint_files
from neoray.model.gpt_neox import NeoXConfig
from neoray.storage import Storage, StorageError

log = logging.getLogger(__name__)
AXES = ("tp", "pp", "dp")
# Model settings that do not change what the checkpoint holds (a run may resume with another).
SHAPELESS = {"checkpoint_activations"}
INTACT, CORRUPT, UNREACHABLE = 0, 1, 2  # a rank's finding; the ranks act on the worst


def files_of_rank(engine, manifest: Manifest) -> list[str]:
    """The files of `manifest` that this rank's engine reads in `load_checkpoint` (see the
    module's docstring)."""
    own = rank_checkpoint_files(engine, step_tag(manifest.step)) | set(model_state_files(manifest))
    layers = tuple(f"layer_{i:02d}-" for i in local_layers(engine.module))
    listed = [entry.path for entry in manifest.files]
    return [path for path in listed if path in own or path.startswith(layers)] + sorted(
        own - set(listed)  # absent from the manifest: download() reports it as missing
    )


@dataclass
class Layout:
    """The layout a run resumes at: where this rank sits, and the global batch (which a
    checkpoint saved at another layout must share)."""

    topology: dict[str, int]  # {"tp", "pp", "dp"}
    tp_rank: int
    global_batch: int
    model: NeoXConfig

    def check(self, manifest: Manifest) -> None:
        """Refuse, before any weight is read, a checkpoint this layout cannot continue."""
        now = dataclasses.asdict(self.model)
        changed = [
            f"model.{field}={now[field]!r} (saved: {manifest.model.get(field)!r})"
            for field in sorted(now)
            if field in manifest.model
            and field not in SHAPELESS
            and manifest.model[field] != now[field]
        ]
        if changed:
            raise ConfigError(
                f"run_name={manifest.run_name!r}: its checkpoint at step {manifest.step} is of "
                f"another model: {', '.join(changed)}; set model.* as saved, or start a new "
                "run_name"
            )
        if manifest.topology != self.topology:
            check_layout_change(manifest, self.topology, self.global_batch)


def _fetch(engine, storage: Storage, manifest: Manifest, folder: Path, layout: Layout) -> None:
    """Download (verified) the files of `manifest` this rank reads into `folder`."""
    if manifest.topology == layout.topology:
        download(storage, manifest, folder, files_of_rank(engine, manifest))
        return
    download(storage, manifest, folder, model_state_files(manifest))
    names = {name for name, _ in engine.module.named_parameters()}
    download(storage, manifest, folder, files_for(manifest, folder, names))


def _load(engine, manifest: Manifest, folder: Path, layout: Layout) -> None:
    if manifest.topology == layout.topology:
        with loads_without_pickle(engine):
            engine.load_checkpoint(str(folder.parent), tag=folder.name)
        return
    load_resharded(engine, folder, manifest, layout.model, layout.tp_rank, layout.topology["tp"])
    log.info(
        "rank %d: resharded step %d from %s to %s",
        dist.get_rank(),
        manifest.step,
        _describe(manifest.topology),
        _describe(layout.topology),
    )


def _describe(topology: dict[str, int]) -> str:
    return ", ".join(f"{axis}={topology.get(axis)}" for axis in AXES)


def committed_on_rank0(storage: Storage, run_name: str) -> tuple[list[Manifest], list[int]]:
    """The committed checkpoints with a readable manifest, and the steps whose manifest is
    malformed, as rank 0 sees them (all ranks act on the same lists)."""
    found: list = [None]
    if dist.get_rank() == 0:
        try:
            found[0] = scan_checkpoints(storage, run_name)
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
    layout: Layout,
    staging: Path,
    malformed: list[int],
) -> Manifest:
    """Load the newest checkpoint of `manifests` that all ranks read intact into `engine`
    (collective), re-split when it was saved at another layout. A checkpoint the layout cannot
    continue is refused (ConfigError); when no checkpoint is intact, CorruptCheckpointError.
    The `malformed` manifests of later steps are deleted with those of rejected checkpoints."""
    local = staging / f"rank_{dist.get_rank():05d}" / "resume"
    rejected: list[Manifest] = []
    for manifest in reversed(manifests):
        layout.check(manifest)
        tag = step_tag(manifest.step)
        shutil.rmtree(local, ignore_errors=True)
        problem, state = "", INTACT
        try:
            _fetch(engine, storage, manifest, local / tag, layout)
        except CorruptCheckpointError as err:
            problem, state = str(err), CORRUPT
        except (StorageError, OSError) as err:
            problem, state = f"{type(err).__name__}: {err}", UNREACHABLE
        if problem:
            log.error("rank %d: checkpoint step %d: %s", dist.get_rank(), manifest.step, problem)
        worst = torch.tensor([state], dtype=torch.int32)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if worst.item() == UNREACHABLE:
            shutil.rmtree(local, ignore_errors=True)
            raise StorageError(
                f"resuming run {manifest.run_name!r}: reading checkpoint step {manifest.step} "
                f"from {storage.uri(checkpoint_key(manifest.run_name, manifest.step))} failed "
                "on a rank (see the messages above) after the storage's retries; not falling "
                "back to an older checkpoint. Start the job again once storage is reachable"
            )
        if worst.item() == INTACT:
            _load(engine, manifest, local / tag, layout)
            shutil.rmtree(local, ignore_errors=True)
            if dist.get_rank() == 0:
                later = [s for s in malformed if s > manifest.step]
                steps = [m.step for m in rejected] + later
                _forget(storage, [manifest_key(manifest.run_name, s) for s in steps])
                log.info(
                    "resumed run %r at step %d from %s",
                    manifest.run_name,
                    manifest.step,
                    storage.uri(checkpoint_key(manifest.run_name, manifest.step)),
                )
            dist.barrier()  # the rejected manifests are gone before any step is saved again
            return manifest
        rejected.append(manifest)
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


def _forget(storage: Storage, keys: list[str]) -> None:
    """Delete the manifests `keys` of corrupt checkpoints (their files are overwritten when
    training saves those steps again)."""
    for key in keys:
        try:
            storage.delete(key)
        except Exception as err:  # the next resume rejects it again; saving it replaces it
            log.warning("could not delete %s: %s", storage.uri(key), err)
            continue
        log.warning("deleted %s: its checkpoint is corrupt", storage.uri(key))
