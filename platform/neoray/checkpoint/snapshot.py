"""Asynchronous checkpoints: write shards locally, upload them while training goes on, commit.

At a save point every rank writes its DeepSpeed shards to its own staging folder (fast, local),
records them in a marker written last (`step_<N>.staged.json`: the files and their sizes), then
a child process uploads them (`neoray.checkpoint.upload_process`) and training continues. Commits happen at the next save point
(or at the end): the ranks agree, with one all-reduce, on which uploads succeeded on every rank;
rank 0 then writes those checkpoints' manifests, last. Training waits on storage only when a
save point arrives while the previous upload is still running.

While storage fails, nothing staged is lost and the staging folder stays bounded: an upload
that failed is reported and tried again at the next save point, where a newer checkpoint
supersedes it once it is staged itself (only the newest uncommitted checkpoint and milestones
are kept; a save that fails, on a full disk, stops the run and loses nothing), and a run whose
staged checkpoints outgrow `checkpoint.max_staging_gb` stops. A run that ends with checkpoints
still uncommitted ends with an error, and its next start uploads and commits the staged
checkpoints newer than the latest committed one (`recover`) before it resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.config import CheckpointConfig
from neoray.checkpoint.lease import LeaseCheck, LeaseLostError
from neoray.checkpoint.manifest import (
    FileEntry,
    Manifest,
    checkpoint_key,
    manifest_key,
    prune,
    step_tag,
)
from neoray.checkpoint.upload_process import UploadProcess
from neoray.config import ConfigError
from neoray.storage import Storage, StorageError, publish_file

log = logging.getLogger(__name__)
GB = 10**9


class UncommittedCheckpointError(StorageError):
    """Checkpoints are staged locally but not committed to storage (it is failing)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written to the local staging folder (a full disk)."""


@dataclass
class Staged:
    """The marker of one rank's complete local checkpoint: written after DeepSpeed's save
    returned, so a checkpoint without one (a crash while saving) is never uploaded."""

    run_name: str
    step: int
    rank: int
    topology: dict[str, int]
    files: dict[str, int]  # name (relative to the step folder) -> size in bytes

    def intact(self, folder: Path) -> bool:
        """Every listed file is there with its size, and nothing else."""
        return file_sizes(folder) == self.files


def file_sizes(folder: Path) -> dict[str, int]:
    """Size of every file under `folder`, by its path relative to it."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
    }


# (step, files) -> the manifest to commit for that checkpoint
ManifestFactory = Callable[[int, list[FileEntry]], Manifest]


class Snapshots:
    """The save points of one training process (every rank has one; all calls are collective).

    `on_commit(step, uri, size_bytes)` and `on_failure(step, error)` are called on global rank 0,
    which also applies retention after a commit, keeping what `hold` says. With a `lease`
    (rank 0's), rank 0 verifies that the run is still this job's before it commits or prunes,
    and every rank raises LeaseLostError when it is not.
    """

    def __init__(
        self,
        storage: Storage,
        run_name: str,
        config: CheckpointConfig,
        staging: Path,
        topology: dict[str, int],
        make_manifest: ManifestFactory,
        on_commit: Callable[[int, str, int], None],
        on_failure: Callable[[int, str], None],
        hold: Callable[[list[int]], set[int]] | None = None,
        lease: LeaseCheck | None = None,
    ) -> None:
        self.storage, self.run_name, self.config = storage, run_name, config
        self.hold = hold  # what retention keeps past keep_last (see `prune`)
        self.lease = lease
        self.rank = dist.get_rank()
        self.staging = staging / f"rank_{self.rank:05d}"
        self.topology = topology
        self.make_manifest = make_manifest
        self.on_commit, self.on_failure = on_commit, on_failure
        self.pending: list[int] = []  # written locally, not committed yet (ascending)
        self.results: dict[int, list[FileEntry] | str] = {}  # this rank's upload outcome
        self.errors: dict[int, str] = {}  # why each pending step is not committed yet
        self.thread: threading.Thread | None = None  # waits on the uploader
        self.uploader = UploadProcess(storage.config)
        self.uploader.start()

    def _marker(self, step: int) -> Path:
        return self.staging / f"{step_tag(step)}.staged.json"

    def _discard(self, step: int) -> None:
        """Delete step's local copy, marker first (a half-deleted folder is never uploaded)."""
        self._marker(step).unlink(missing_ok=True)
        shutil.rmtree(self.staging / step_tag(step), ignore_errors=True)

    def recover(self, latest_committed: int | None) -> list[int]:
        """At start, before resuming (collective): upload and commit the checkpoints staged by an
        earlier start of this run that are newer than `latest_committed` and intact on every
        rank; delete the rest of the staging folder. Returns the committed steps; raises
        UncommittedCheckpointError (keeping them) when storage still fails."""
        found = self._intact_staged(latest_committed)
        everywhere: list[list[int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everywhere, found)
        usable = sorted(set.intersection(*(set(steps) for steps in everywhere)))
        if self.staging.exists():
            keep = {step_tag(s) for s in usable} | {self._marker(s).name for s in usable}
            for path in self.staging.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not usable:
            return []
        if self.rank == 0:
            log.info(
                "run %r: staged checkpoints of steps %s were never committed; uploading them",
                self.run_name,
                usable,
            )
        self.pending = list(usable)
        self._start_upload()
        self.settle()
        if self.pending:
            raise UncommittedCheckpointError(self._uncommitted_message())
        return usable

    def _intact_staged(self, latest_committed: int | None) -> list[int]:
        """This rank's staged steps newer than `latest_committed` whose files match their
        marker; a staged checkpoint of another layout is refused, not deleted."""
        steps = []
        for marker in sorted(self.staging.glob("step_*.staged.json")):
            try:
                staged = Staged(**json.loads(marker.read_text()))
            except (ValueError, TypeError) as err:
                log.warning("rank %d: ignoring unreadable %s: %s", self.rank, marker, err)
                continue
            if staged.run_name != self.run_name or staged.rank != self.rank:
                continue
            if latest_committed is not None and staged.step <= latest_committed:
                continue
            if staged.topology != self.topology:
                raise ConfigError(
                    f"run_name={self.run_name!r}: {self.staging} holds the uncommitted "
                    f"checkpoint of step {staged.step}, written with {staged.topology}, and "
                    f"this run has {self.topology}: start it with the same parallel.tp/pp/dp "
                    "so that it is uploaded, or delete that folder to give it up"
                )
            if staged.intact(self.staging / step_tag(staged.step)):
                steps.append(staged.step)
            else:
                log.warning(
                    "rank %d: staged checkpoint %s is incomplete; deleting it",
                    self.rank,
                    self.staging / step_tag(staged.step),
                )
        return steps

    def save(self, engine, step: int) -> None:
        """Commit what finished uploading, write `engine`'s checkpoint `step` and upload it in
        the background, with any milestone whose upload failed (it supersedes the others).
        A superseded checkpoint is deleted only once the new one is staged: a disk that fills
        during the save keeps it, and the run stops with CheckpointSaveError."""
        self.settle()
        self._stage(engine, step)
        for old in [s for s in self.pending if not self.config.is_milestone(s)]:
            self._discard(old)
            self.pending.remove(old)
            if self.rank == 0:
                log.warning(
                    "checkpoint step %d was never committed and is superseded by step %d: "
                    "deleted from staging",
                    old,
                    step,
                )
        self.pending.append(step)
        self._check_staging_size()
        self._start_upload()

    def _stage(self, engine, step: int) -> None:
        """Write `engine`'s checkpoint `step` and its marker to the staging folder (collective).
        When that fails on any rank (a full disk), every rank deletes what it wrote of it and
        raises CheckpointSaveError; what was staged before is kept."""
        tag = step_tag(step)
        self._discard(step)
        error = ""
        try:
            engine.save_checkpoint(str(self.staging), tag=tag)
            (self.staging / "latest").unlink(missing_ok=True)  # DeepSpeed's; ours is manifests
            files = file_sizes(self.staging / tag)
            marker = Staged(self.run_name, step, self.rank, self.topology, files)
            publish_file(self._marker(step), lambda f: f.write(json.dumps(asdict(marker)).encode()))
        except Exception as err:  # on a full disk torch.save raises a bare RuntimeError
            error = f"rank {self.rank}: {type(err).__name__}: {err}{_free_space(self.staging)}"
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if any(errors):
            self._discard(step)
            kept = (
                f"; the uncommitted checkpoints of steps {self.pending} stay staged, and the "
                "next start of the same job commits them before resuming"
                if self.pending
                else ""
            )
            raise CheckpointSaveError(
                f"saving checkpoint step {step} of run {self.run_name!r} to "
                f"{self.staging.parent} failed ({'; '.join(e for e in errors if e)}); what it "
                f"wrote of it is deleted{kept}. Free space there, or set "
                "checkpoint.staging_dir to a larger disk"
            )

    def _check_staging_size(self) -> None:
        """Stop (collectively) when a rank's uncommitted checkpoints exceed the limit."""
        if self.config.max_staging_gb is None:
            return
        staged = sum(
            sum(json.loads(self._marker(s).read_text())["files"].values()) for s in self.pending
        )
        largest = torch.tensor([staged], dtype=torch.float64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        if largest.item() > self.config.max_staging_gb * GB:
            raise UncommittedCheckpointError(
                f"{largest.item() / GB:.2f} GB of uncommitted checkpoints are staged on a rank, "
                f"over checkpoint.max_staging_gb={self.config.max_staging_gb}. "
                + self._uncommitted_message()
            )

    def _start_upload(self) -> None:
        """Upload every pending checkpoint, from the upload process; a thread here waits on it."""
        self.results = {}
        self.thread = threading.Thread(
            target=self._upload, args=(list(self.pending),), name="checkpoint-upload", daemon=True
        )
        self.thread.start()

    def _upload(self, steps: list[int]) -> None:
        """Upload the staged checkpoints `steps`, oldest first; after a failure (retries
        included) the rest wait for the next save rather than hammer a store that is down."""
        failure = ""
        for step in steps:
            if failure:
                self.results[step] = f"not attempted after an earlier failure: {failure}"
                continue
            folder = self.staging / step_tag(step)
            try:
                key = checkpoint_key(self.run_name, step)
                self.results[step] = self.uploader.upload(folder, key)
            except Exception as err:  # any failure is reported, training goes on
                failure = self.results[step] = f"{type(err).__name__}: {err}"
                log.warning(
                    "rank %d: upload of checkpoint step %d failed: %s", self.rank, step, err
                )

    def settle(self) -> None:
        """Wait for the upload in flight, then commit each pending checkpoint that every rank
        uploaded; report the others, which stay pending (collective). Raises LeaseLostError
        on every rank, with nothing committed or pruned, once the run is another job's."""
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
        self.check_lease()
        decided: list = [None]  # (committed steps, {step: why not}) from rank 0
        if self.rank == 0:
            decided[0] = self._commit_or_report(uploaded.tolist(), outcomes)
        dist.broadcast_object_list(decided, src=0)
        committed, self.errors = decided[0]
        for step in committed:
            self._discard(step)
            self.pending.remove(step)

    def discard_after(self, step: int) -> None:
        """Forget the uncommitted checkpoints after `step`: training rolled back to `step`, and
        they hold weights (and batches) it no longer has."""
        for later in [s for s in self.pending if s > step]:
            self._discard(later)
            self.pending.remove(later)

    def check_lease(self) -> None:
        """Raise LeaseLostError on every rank when rank 0 reads that the run's lease is no
        longer this job's (collective; rank 0 reads it afresh)."""
        verdict: list[LeaseLostError | None] = [None]
        if self.lease is not None:
            try:
                self.lease.verify(fresh=True)
            except LeaseLostError as err:
                verdict[0] = err
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise verdict[0]

    def finish(self) -> None:
        """At the end of training: commit what is uploaded; upload what failed once more.
        Raises UncommittedCheckpointError when checkpoints stay uncommitted (they are kept in
        the staging folder, and the run's next start commits them)."""
        self.settle()
        if self.pending:
            self._start_upload()
            self.settle()
        self.uploader.close()
        if self.pending:
            raise UncommittedCheckpointError(self._uncommitted_message())
        shutil.rmtree(self.staging, ignore_errors=True)

    def finish_before_stopping(self) -> None:
        """`finish` before the run stops on a bad loss: the good checkpoints already uploading
        are committed; any left uncommitted are logged, not raised (the loss is the news)."""
        try:
            self.finish()
        except UncommittedCheckpointError as err:
            log.error("%s", err)

    def _uncommitted_message(self) -> str:
        errors = "; ".join(f"step {s}: {self.errors.get(s, 'not uploaded')}" for s in self.pending)
        return (
            f"checkpoints of steps {self.pending} of run {self.run_name!r} are not committed "
            f"({errors}). They are kept in {self.staging.parent}: run the same job again once "
            "storage works, and it uploads and commits them before resuming"
        )

    def _commit_or_report(
        self, uploaded: list[int], outcomes: list[dict]
    ) -> tuple[list[int], dict[int, str]]:
        """Rank 0: write the manifests of fully uploaded checkpoints, oldest first; report the
        rest. Returns the committed steps and why each other one is not."""
        committed, errors = [], {}
        for step, ok in zip(self.pending, uploaded, strict=True):
            folder = self.storage.uri(checkpoint_key(self.run_name, step))
            if not ok:
                failures = [o[step] for o in outcomes if not isinstance(o[step], list)]
                errors[step] = f"upload of {folder} failed: {failures[0]}"
                self._report(step, errors[step])
                continue
            files = sorted((e for o in outcomes for e in o[step]), key=lambda e: e.path)
            try:
                manifest = self.make_manifest(step, files)
                self.storage.put_bytes(
                    manifest_key(self.run_name, step), manifest.to_json().encode()
                )
            except Exception as err:  # reported; retried at the next save
                errors[step] = f"writing the manifest of {folder} failed: {err}"
                self._report(step, errors[step])
                continue
            committed.append(step)
            log.info("committed checkpoint %s (%d files)", folder, len(files))
            _notify(self.on_commit, step, folder, sum(e.size for e in files))
        if committed:
            try:
                prune(
                    self.storage,
                    self.run_name,
                    self.config.keep_last,
                    self.config.is_milestone,
                    self.hold,
                )
            except Exception as err:  # old checkpoints stay until the next try
                log.warning("retention: deleting old checkpoints failed: %s", err)
        return committed, errors

    def _report(self, step: int, error: str) -> None:
        log.error(
            "checkpoint step %d not committed (tried again at the next save): %s", step, error
        )
        _notify(self.on_failure, step, error)


def _free_space(folder: Path) -> str:
    """ "; <n> MB free there", which tells a full disk from other failures (torch.save reports
    it as a bare RuntimeError); empty when `folder` cannot be examined."""
    try:
        return f"; {shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    except OSError:
        return ""


def _notify(callback: Callable[..., None], step: int, *details: object) -> None:
    """Tell the observer; its failure (a tracker that is down) must not stop the commit,
    which the other ranks are waiting for."""
    try:
        callback(step, *details)
    except Exception as err:
        log.warning("checkpoint step %d: the observer failed: %s", step, err)


def manifest_created() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
