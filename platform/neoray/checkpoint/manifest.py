"""Committed checkpoints: their manifests, where they live, and reading them back verified.

A checkpoint of run R at step N is the folder `<storage root>/R/checkpoints/step_<N:08d>/`.
Its `manifest.json` is written last, once every file is uploaded, so a folder without one is
an unfinished (or failed) upload that no reader considers. The manifest lists every file with
its size and sha256, which downloads verify. A manifest that cannot be read (cut short, not
JSON, fields missing, another step's) makes its checkpoint corrupt: listings skip it with a
warning naming it, and reading it by its step raises MalformedManifestError naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neoray.storage import LocalStorage, S3Storage, Storage, StorageConfig, join_key

FORMAT = 1
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# A run name, or a file of a checkpoint or export: one path component of safe characters (no
# "/", no "..", nothing hidden), since names read from the bucket become local paths.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, or its size or sha256 differs from the manifest, or the
    manifest names a file that could not be one."""


class MalformedManifestError(CorruptCheckpointError):
    """A `manifest.json` that cannot be read as the manifest of its step."""


def safe_name(name: str, where: str) -> str:
    """`name` if it is a plain file name (see SAFE_NAME); else CorruptCheckpointError naming
    `where` it was read."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise CorruptCheckpointError(
            f"{where}: {name!r} is not a plain file name; refusing to write it anywhere"
        )
    return name


@dataclass
class FileEntry:
    path: str  # relative to the step folder
    size: int
    sha256: str


@dataclass
class Manifest:
    run_name: str
    step: int  # optimizer steps completed; training resumes at this step
    tokens_seen: int
    topology: dict[str, int]  # {"tp", "pp", "dp"}
    model: dict[str, Any]  # NeoXConfig fields
    config: dict[str, Any]  # the run's config, flattened, secrets redacted
    code_version: str
    created: str  # ISO 8601, UTC
    files: list[FileEntry] = field(default_factory=list)
    format: int = FORMAT
    # component -> fingerprint of its token files at training time (see
    # neoray.data.mixture.data_fingerprint); empty for synthetic data and older checkpoints
    data_fingerprint: dict[str, str] = field(default_factory=dict)
    # the mixture's phases as declared when saved, [{"from_step", "components": {name: weight}}]
    # (see neoray.data.phases.mixture_record); empty for synthetic data and older checkpoints
    mixture_phases: list[dict[str, Any]] = field(default_factory=list)
    # [first, last] ranges of steps before `step` whose batches were not trained (skipped by
    # train.skip_steps or after a loss spike's rollback); empty for older checkpoints
    skipped_steps: list[list[int]] = field(default_factory=list)

    def trained_on(self, step: int) -> bool:
        """Whether the checkpoint's weights were trained on the batch of `step`."""
        skipped = any(first <= step <= last for first, last in self.skipped_steps)
        return 0 <= step < self.step and not skipped

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        values = json.loads(text)
        if values.get("format") != FORMAT:
            raise ValueError(f"manifest format {values.get('format')!r}; this code reads {FORMAT}")
        values["files"] = [FileEntry(**entry) for entry in values["files"]]
        manifest = cls(**values)
        if not SAFE_NAME.fullmatch(manifest.run_name):
            raise ValueError(f"manifest run_name {manifest.run_name!r} is not a plain name")
        return manifest


def step_tag(step: int) -> str:
    """The step folder's name, also the DeepSpeed checkpoint tag."""
    return f"step_{step:08d}"


def checkpoints_key(run_name: str) -> str:
    return join_key(run_name, "checkpoints")


def checkpoint_key(run_name: str, step: int) -> str:
    """The key of a checkpoint's folder, relative to the storage root."""
    return join_key(checkpoints_key(run_name), step_tag(step))


def manifest_key(run_name: str, step: int) -> str:
    return join_key(checkpoint_key(run_name, step), MANIFEST)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The manifest in `data`; MalformedManifestError naming `where` it was read otherwise."""
    try:
        return Manifest.from_json(data.decode())
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # UnicodeError is a ValueError
        raise MalformedManifestError(
            f"{where}: not a readable manifest ({type(err).__name__}: {err}); the checkpoint "
            "is treated as corrupt"
        ) from err


def read_manifest(storage: Storage, run_name: str, step: int) -> Manifest:
    """The manifest of `run_name`'s checkpoint at `step`; MalformedManifestError, naming its
    URI, when it cannot be read or is not that checkpoint's."""
    key = manifest_key(run_name, step)
    manifest = parse_manifest(storage.get_bytes(key), storage.uri(key))
    if (manifest.run_name, manifest.step) != (run_name, step):
        raise MalformedManifestError(
            f"{storage.uri(key)}: the manifest of run {manifest.run_name!r} at step "
            f"{manifest.step}, not of this checkpoint; it is treated as corrupt"
        )
    return manifest


def files_by_step(storage: Storage, run_name: str) -> dict[int, list[str]]:
    """Every key under each step folder of `run_name`'s checkpoints, its published exports
    (`hf_<dtype>/`) included (one listing)."""
    prefix = checkpoints_key(run_name) + "/"
    files: dict[int, list[str]] = {}
    for key in storage.list(prefix):
        if match := STEP_DIR.match(key[len(prefix) :].split("/", 1)[0]):
            files.setdefault(int(match.group(1)), []).append(key)
    return files


def _committed(run_name: str, files: dict[int, list[str]]) -> list[int]:
    return sorted(step for step, keys in files.items() if manifest_key(run_name, step) in keys)


def committed_steps(storage: Storage, run_name: str) -> list[int]:
    """Steps of `run_name` whose manifest exists, ascending."""
    return _committed(run_name, files_by_step(storage, run_name))


def readable_manifest(storage: Storage, run_name: str, step: int) -> Manifest | None:
    """The manifest of a committed step, or None (with a warning naming it) when it is
    malformed: one corrupt checkpoint, even an old one, must not stop every reader."""
    try:
        return read_manifest(storage, run_name, step)
    except MalformedManifestError as err:
        log.warning("skipping a corrupt checkpoint: %s", err)
        return None


def scan_checkpoints(storage: Storage, run_name: str) -> tuple[list[Manifest], list[int]]:
    """The readable manifests of `run_name`'s committed checkpoints, ascending by step, and the
    steps whose manifest is malformed (each warned about)."""
    manifests, malformed = [], []
    for step in committed_steps(storage, run_name):
        if (manifest := readable_manifest(storage, run_name, step)) is None:
            malformed.append(step)
        else:
            manifests.append(manifest)
    return manifests, malformed


def committed_checkpoints(storage: Storage, run_name: str) -> list[Manifest]:
    """Manifests of the committed checkpoints of `run_name`, ascending by step; malformed ones
    are skipped with a warning naming them."""
    return scan_checkpoints(storage, run_name)[0]


def latest_checkpoint(storage: Storage, run_name: str) -> Manifest | None:
    """The newest committed checkpoint of `run_name` whose manifest is readable."""
    for step in reversed(committed_steps(storage, run_name)):
        if (manifest := readable_manifest(storage, run_name, step)) is not None:
            return manifest
    return None


def checkpoint_from_uri(uri: str) -> tuple[Storage, Manifest]:
    """The storage (rooted where the run's folder is) and manifest of the checkpoint at `uri`,
    `<root>/<run_name>/checkpoints/step_<step:08d>` (local path or s3://), as trackers record it.
    Then `download(storage, manifest, dest)` fetches and verifies its files."""
    root, run_name, checkpoints, folder = uri.rstrip("/").rsplit("/", 3)
    match = STEP_DIR.match(folder)
    if checkpoints != "checkpoints" or not match:
        raise ValueError(f"{uri}: not a checkpoint (<root>/<run_name>/checkpoints/step_<8 digits>)")
    if root.startswith("s3://"):
        bucket, _, prefix = root[len("s3://") :].partition("/")
        storage: Storage = S3Storage(StorageConfig(kind="s3", bucket=bucket, prefix=prefix))
    else:
        storage = LocalStorage(root)
    return storage, read_manifest(storage, run_name, int(match.group(1)))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path, name: str) -> FileEntry:
    return FileEntry(name, path.stat().st_size, sha256_file(path))


def download(
    storage: Storage, manifest: Manifest, dest_dir: str | Path, files: Iterable[str] | None = None
) -> Path:
    """Download the checkpoint's files (all, or those named) into `dest_dir` and verify each
    against the manifest; raises CorruptCheckpointError naming the first bad or missing file."""
    dest = Path(dest_dir)
    listed = {entry.path: entry for entry in manifest.files}
    wanted = list(listed) if files is None else list(files)
    folder = checkpoint_key(manifest.run_name, manifest.step)
    for name in wanted:
        key = join_key(folder, name)
        entry = listed.get(name)
        if entry is None:
            raise CorruptCheckpointError(f"{storage.uri(key)}: not listed in the manifest")
        target = dest / safe_name(name, storage.uri(join_key(folder, MANIFEST)))
        try:
            storage.download_file(key, target)
        except FileNotFoundError as err:
            raise CorruptCheckpointError(f"{storage.uri(key)}: missing") from err
        size = target.stat().st_size
        if size != entry.size:
            raise CorruptCheckpointError(
                f"{storage.uri(key)}: {size} bytes, the manifest says {entry.size}"
            )
        if sha256_file(target) != entry.sha256:
            raise CorruptCheckpointError(f"{storage.uri(key)}: sha256 differs from the manifest")
    return dest


def prune(
    storage: Storage,
    run_name: str,
    keep_last: int,
    is_milestone: Callable[[int], bool],
    hold: Callable[[list[int]], set[int]] | None = None,
) -> list[int]:
    """Delete committed checkpoints older than the last `keep_last`, except milestones and those
    `hold` keeps (given the steps about to go, ascending: the ones to keep, e.g. for an
    evaluation still to come); each one's manifest first, then its files, so no reader sees a
    manifest whose files are gone. Also delete orphans older than the newest committed
    checkpoint: files of a step with no manifest (an upload that never committed, or a deletion
    cut short), which no reader uses and nothing uploads again. Newer ones may be an upload in
    flight, and stay. Returns the deleted committed steps."""
    files = files_by_step(storage, run_name)
    committed = _committed(run_name, files)
    doomed = [step for step in committed[:-keep_last] if not is_milestone(step)]
    if hold is not None and doomed:
        held = hold(doomed)
        doomed = [step for step in doomed if step not in held]
    for step in doomed:
        storage.delete(manifest_key(run_name, step))
        for key in files[step]:
            if key != manifest_key(run_name, step):
                storage.delete(key)
        log.info(
            "deleted checkpoint %s (retention: last %d plus milestones)",
            checkpoint_key(run_name, step),
            keep_last,
        )
    newest = committed[-1] if committed else -1
    for step in sorted(set(files) - set(committed)):
        if step < newest:
            for key in files[step]:
                storage.delete(key)
            log.info(
                "deleted %s: files of a checkpoint never committed", checkpoint_key(run_name, step)
            )
    return doomed
