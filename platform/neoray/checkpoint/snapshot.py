"""Asynchronous checkpoints: write shards locally, upload them while training goes on, commit.

At a save point every rank writes its DeepSpeed shards to its own staging folder (fast, local),
then a background thread uploads them and training continues. Commits happen at the next save
point (or at the end): the ranks agree, with one all-reduce, on which uploads succeeded on every
rank; rank 0 then writes those checkpoints' manifests, last. An upload that failed on any rank
gets no manifest, is reported, and is uploaded again at the next save point. Training waits on
storage only when a save point arrives while the previous upload is still running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.config import CheckpointConfig
from neoray.checkpoint.manifest import (
    FileEntry,
    Manifest,
    checkpoint_key,
    file_entry,
    manifest_key,
    prune,
    step_tag,
)
from neoray.storage import Storage, join_key

log = logging.getLogger(__name__)
UPLOAD_NICENESS = 10

# (step, files) -> the manifest to commit for that checkpoint
ManifestFactory = Callable[[int, list[FileEntry]], Manifest]


class Snapshots:
    """The save points of one training process (every rank has one; all calls are collective).

    `on_commit(step, uri, size_bytes)` and `on_failure(step, error)` are called on global rank 0.
    """

    def __init__(
        self,
        engine,
        storage: Storage,
        run_name: str,
        config: CheckpointConfig,
        staging: Path,
        make_manifest: ManifestFactory,
        on_commit: Callable[[int, str, int], None],
        on_failure: Callable[[int, str], None],
    ) -> None:
        self.engine, self.storage, self.run_name, self.config = engine, storage, run_name, config
        self.staging = staging / f"rank_{dist.get_rank():05d}"
        self.make_manifest = make_manifest
        self.on_commit, self.on_failure = on_commit, on_failure
        self.pending: list[int] = []  # written locally, not committed yet (ascending)
        self.results: dict[int, list[FileEntry] | str] = {}  # this rank's upload outcome
        self.thread: threading.Thread | None = None
        shutil.rmtree(self.staging, ignore_errors=True)  # leftovers of a run that crashed

    def save(self, step: int) -> None:
        """Commit what finished uploading, write checkpoint `step`, upload it in the background
        (with any earlier checkpoint whose upload failed)."""
        self.settle()
        tag = step_tag(step)
        shutil.rmtree(self.staging / tag, ignore_errors=True)
        self.engine.save_checkpoint(str(self.staging), tag=tag)
        (self.staging / "latest").unlink(missing_ok=True)  # DeepSpeed's pointer; ours is manifests
        self.pending.append(step)
        self._start_upload()

    def _start_upload(self) -> None:
        """Upload every pending checkpoint in a background thread."""
        self.results = {}
        self.thread = threading.Thread(
            target=self._upload, args=(list(self.pending),), name="checkpoint-upload", daemon=True
        )
        self.thread.start()

    def _upload(self, steps: list[int]) -> None:
        """Upload the staged checkpoints `steps`, oldest first; after a failure (retries
        included) the rest wait for the next save rather than hammer a store that is down."""
        _yield_cpu_to_training()
        failure = ""
        for step in steps:
            if failure:
                self.results[step] = f"not attempted after an earlier failure: {failure}"
                continue
            folder = self.staging / step_tag(step)
            try:
                entries = []
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    name = path.relative_to(folder).as_posix()
                    entries.append(file_entry(path, name))
                    key = join_key(checkpoint_key(self.run_name, step), name)
                    self.storage.upload_file(path, key)
                self.results[step] = entries
            except Exception as err:  # any failure is reported, training goes on
                failure = self.results[step] = f"{type(err).__name__}: {err}"
                log.warning(
                    "rank %d: upload of checkpoint step %d failed: %s", dist.get_rank(), step, err
                )

    def settle(self) -> None:
        """Wait for the upload in flight, then commit each pending checkpoint that every rank
        uploaded; report the others, which stay pending (collective)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if not self.pending:
            return
        uploaded = torch.tensor(
            [isinstance(self.results.get(step), list) for step in self.pending], dtype=torch.int32
        )
        dist.all_reduce(uploaded, op=dist.ReduceOp.MIN)
        outcomes: list[dict[int, list[FileEntry] | str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(
            outcomes, {s: self.results.get(s, "not uploaded") for s in self.pending}
        )
        committed = [None]
        if dist.get_rank() == 0:
            committed[0] = self._commit_or_report(uploaded.tolist(), outcomes)
        dist.broadcast_object_list(committed, src=0)
        for step in committed[0]:
            shutil.rmtree(self.staging / step_tag(step), ignore_errors=True)
            self.pending.remove(step)

    def finish(self) -> None:
        """At the end of training: commit what is uploaded; upload what failed once more."""
        self.settle()
        if self.pending:
            self._start_upload()
            self.settle()
        if not self.pending:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _commit_or_report(self, uploaded: list[int], outcomes: list[dict]) -> list[int]:
        """Rank 0: write the manifests of fully uploaded checkpoints, oldest first; report the
        rest. Returns the committed steps."""
        committed = []
        for step, ok in zip(self.pending, uploaded, strict=True):
            folder = self.storage.uri(checkpoint_key(self.run_name, step))
            if not ok:
                errors = [o[step] for o in outcomes if not isinstance(o[step], list)]
                self._report(step, f"upload of {folder} failed: {errors[0]}")
                continue
            files = sorted((e for o in outcomes for e in o[step]), key=lambda e: e.path)
            try:
                manifest = self.make_manifest(step, files)
                self.storage.put_bytes(
                    manifest_key(self.run_name, step), manifest.to_json().encode()
                )
            except Exception as err:  # reported; retried at the next save
                self._report(step, f"writing the manifest of {folder} failed: {err}")
                continue
            committed.append(step)
            log.info("committed checkpoint %s (%d files)", folder, len(files))
            _notify(self.on_commit, step, folder, sum(e.size for e in files))
        if committed:
            try:
                prune(self.storage, self.run_name, self.config.keep_last, self.config.is_milestone)
            except Exception as err:  # old checkpoints stay until the next try
                log.warning("retention: deleting old checkpoints failed: %s", err)
        return committed

    def _report(self, step: int, error: str) -> None:
        log.error(
            "checkpoint step %d not committed (uploaded again at the next save): %s", step, error
        )
        _notify(self.on_failure, step, error)


def _yield_cpu_to_training() -> None:
    """Lower this thread's CPU priority (Linux: per thread, inherited by the transfer threads
    it starts), so hashing and sending shards never delay a training step that needs the CPU."""
    with contextlib.suppress(AttributeError, OSError):  # elsewhere: upload at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)


def _notify(callback: Callable[..., None], step: int, *details: object) -> None:
    """Tell the observer; its failure (a tracker that is down) must not stop the commit,
    which the other ranks are waiting for."""
    try:
        callback(step, *details)
    except Exception as err:
        log.warning("checkpoint step %d: the observer failed: %s", step, err)


def manifest_created() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
