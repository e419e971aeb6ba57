"""Checkpoints of training runs in object storage: layout, manifests, async saving, resume.

Layout: `<storage root>/<run_name>/checkpoints/step_<step:08d>/` holds the files DeepSpeed
writes for every rank, plus `manifest.json`, written last; see `neoray.checkpoint.manifest`.
"""

from neoray.checkpoint.config import MILESTONES, CheckpointConfig
from neoray.checkpoint.manifest import (
    CorruptCheckpointError,
    FileEntry,
    Manifest,
    checkpoint_from_uri,
    checkpoint_key,
    committed_checkpoints,
    download,
    latest_checkpoint,
    read_manifest,
)

__all__ = [
    "MILESTONES",
    "CheckpointConfig",
    "CorruptCheckpointError",
    "FileEntry",
    "Manifest",
    "checkpoint_from_uri",
    "checkpoint_key",
    "committed_checkpoints",
    "download",
    "latest_checkpoint",
    "read_manifest",
]
