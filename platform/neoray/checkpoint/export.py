"""Slim export: a committed training checkpoint of any (tp, pp) layout -> one Hugging Face dir.

A checkpoint step directory holds what DeepSpeed's `PipelineEngine.save_checkpoint` wrote:
one `layer_<LL>-model_<TT>-model_states.pt` per pipeline layer LL and tensor-parallel rank TT
(that layer's state dict, names without the layer prefix), optimizer states (not needed
here) and `manifest.json` with the model config. The layer files are read without pickle
(`weights_only`), joined into the full `GPTNeoX` state dict by `neoray.parallel.convert`
and written by `neoray.model.hf.save_hf` (`config.json`, `model.safetensors` in the chosen
dtype, the tokenizer) under a temporary name, then renamed: the "slim checkpoint" of the
GPT-NeoX-20B paper, which `transformers` and lm-eval load directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from neoray.config import ConfigError
from neoray.model.gpt_neox import GPTNeoX, NeoXConfig
from neoray.model.hf import save_hf
from neoray.parallel.convert import consolidate

if TYPE_CHECKING:
    from neoray.checkpoint.manifest import Manifest
    from neoray.storage import Storage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportConfig:
    """conf/export.yaml: which checkpoint, in which dtype, with which tokenizer, to where."""

    checkpoint: str  # a step directory (local or s3://...), or <run_name> with step=
    step: str | None = None  # with a run name: a step number or "latest"
    output: str | None = None  # a local directory; None: the local cache (cache_dir)
    dtype: str = "fp16"
    tokenizer: str | None = None  # tokenizer.json or a name; None: the run's data.tokenizer
    cache_dir: str = "runs/exports"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"export.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")


def layer_files(step_dir: Path) -> dict[tuple[int, int], Path]:
    """(pipeline layer, tensor-parallel rank) -> its model-states file in `step_dir`."""
    found = {}
    for path in step_dir.iterdir():
        if match := LAYER_FILE.fullmatch(path.name):
            found[int(match[1]), int(match[2])] = path
    if not found:
        raise FileNotFoundError(
            f"{step_dir}: no DeepSpeed layer files (layer_<LL>-model_<TT>-model_states.pt)"
        )
    return found


def local_manifest(step_dir: Path) -> Manifest:
    """The manifest of a local checkpoint directory; MalformedManifestError naming the file
    when it cannot be read."""
    from neoray.checkpoint.manifest import parse_manifest

    path = step_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{step_dir}: no {MANIFEST}; it is not a committed checkpoint")
    return parse_manifest(path.read_bytes(), str(path))


def consolidate_checkpoint(step_dir: str | Path, config: NeoXConfig) -> dict[str, torch.Tensor]:
    """The full `GPTNeoX` state dict of a DeepSpeed pipeline checkpoint directory."""
    by_rank: dict[tuple[int, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for (layer, tp_rank), path in sorted(layer_files(Path(step_dir)).items()):
        state = torch.load(path, map_location="cpu", weights_only=True)
        by_rank[tp_rank, 0].update({f"{layer}.{name}": value for name, value in state.items()})
    full = consolidate(by_rank, config)
    with torch.device("meta"):
        expected = GPTNeoX(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{step_dir}: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")
    return full


def tokenizer_file(spec: str) -> Path:
    """A `tokenizer.json` path for a path or the name of a tokenizer neoray ships."""
    from neoray.tokenizer.load import RELEASED_20B, released_20b_path

    path = Path(released_20b_path() if spec == RELEASED_20B else spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: {path} is not a tokenizer.json file")
    return path


def export_directory(
    step_dir: str | Path, out_dir: str | Path, dtype: str = "fp16", tokenizer: str | None = None
) -> Path:
    """Write the Hugging Face directory of the local checkpoint `step_dir` to `out_dir`.

    Without `tokenizer`, the run's `data.tokenizer` (from the manifest's config) is shipped.
    """
    step_dir = Path(step_dir)
    manifest = local_manifest(step_dir)
    config = NeoXConfig(**manifest.model)
    if tokenizer is None:
        tokenizer = manifest.config.get("data.tokenizer")
    full = consolidate_checkpoint(step_dir, config)
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.load_state_dict(full, assign=True)
    return save_hf(
        model,
        out_dir,
        tokenizer=tokenizer_file(tokenizer) if tokenizer else None,
        dtype=DTYPES[dtype],
    )


@dataclass
class Export:
    """A slim export on local disk and the run and step it was taken from."""

    hf_dir: Path
    run_name: str
    step: int


EXPORT_MARKER = "export.json"  # written last into an export directory: it is complete


def checkpoint_id(manifest) -> str:
    """What an export is of: the sha256 of the model config and of every layer file's sha256
    as the manifest lists them. A run retrained under the same name and step has new weights
    and so a new id; the run name and step alone would serve the old export."""
    layers = sorted((e.path, e.sha256) for e in manifest.files if LAYER_FILE.fullmatch(e.path))
    blob = json.dumps({"model": manifest.model, "layers": layers}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def export_key(run_name: str, step: int, dtype: str) -> str:
    """Where the export of a checkpoint lives in the object store: next to its shards."""
    from neoray.checkpoint import checkpoint_key

    return f"{checkpoint_key(run_name, step)}/hf_{dtype}"


def cache_path(cache_dir: str | Path, manifest, dtype: str) -> Path:
    """The local cache entry of `manifest`'s export: its run, step, dtype and checkpoint id."""
    step = f"step_{manifest.step:08d}"
    return Path(cache_dir) / manifest.run_name / step / f"hf_{dtype}-{checkpoint_id(manifest)[:16]}"


def marker(folder: Path, manifest) -> bytes:
    """The export.json of the export in `folder` of `manifest`: its files with their sha256,
    and the checkpoint it is of."""
    from neoray.checkpoint.manifest import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    of = {"run_name": manifest.run_name, "step": manifest.step, "id": checkpoint_id(manifest)}
    return json.dumps({"files": files, "checkpoint": of}, indent=2).encode()


def is_export_of(marker_bytes: bytes | None, manifest) -> bool:
    """True when an export.json says its directory is an export of `manifest`'s checkpoint."""
    if marker_bytes is None:
        return False
    try:
        values = json.loads(marker_bytes)
        return values["checkpoint"]["id"] == checkpoint_id(manifest) and isinstance(
            values["files"], dict
        )
    except (ValueError, KeyError, TypeError):
        return False  # an export of older code, or a damaged marker: build it again


def _download_published(storage, folder: str, published: bytes, staging: Path) -> bool:
    """Fetch an export published in the object store into `staging`, each file checked
    against the sha256 its export.json lists; False (logged) when one differs or a listed
    name is not a plain file name (nothing is written outside `staging`)."""
    from neoray.checkpoint.manifest import CorruptCheckpointError, safe_name, sha256_file
    from neoray.storage import join_key

    where = storage.uri(join_key(folder, EXPORT_MARKER))
    try:
        for name, digest in json.loads(published)["files"].items():
            target = staging / safe_name(name, where)
            storage.download_file(join_key(folder, name), target)
            if sha256_file(target) != digest:
                raise CorruptCheckpointError(f"{where}: the sha256 of {name} differs")
    except (CorruptCheckpointError, FileNotFoundError) as err:
        log.warning("not using the published export: %s; exporting again", err)
        return False
    return True


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _publish_locally(staging: Path, out: Path, manifest) -> None:
    """Move a complete export (in a temporary folder) into the cache, replacing an entry that
    is incomplete or of other weights. An export of the same checkpoint that another process
    published first is kept as it is (a reader may be using it) and `staging` is dropped."""
    if is_export_of(_read(out / EXPORT_MARKER), manifest):
        return
    with contextlib.suppress(FileNotFoundError):  # another process may move it first
        out.rename(staging.parent / "replaced")  # removed with the temporary folder
    try:
        staging.rename(out)
    except OSError:  # a non-empty `out` appeared meanwhile: another process published
        if not is_export_of(_read(out / EXPORT_MARKER), manifest):
            raise


def export_cached(
    step_dir: str | Path, cache_dir: str | Path, dtype: str = "fp16", tokenizer: str | None = None
) -> Export:
    """The export of a local checkpoint directory `step_dir`, written once into the cache (see
    `cache_path`) and reused while the checkpoint is the same."""
    step_dir = Path(step_dir)
    manifest = local_manifest(step_dir)
    out = cache_path(cache_dir, manifest, dtype)
    if not is_export_of(_read(out / EXPORT_MARKER), manifest):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
            staging = export_directory(step_dir, Path(tmp) / "hf", dtype, tokenizer)
            (staging / EXPORT_MARKER).write_bytes(marker(staging, manifest))
            _publish_locally(staging, out, manifest)
    return Export(out, manifest.run_name, manifest.step)


def export_committed(
    storage, manifest, cache_dir: str | Path, dtype: str = "fp16", tokenizer: str | None = None
) -> Export:
    """The export of a committed checkpoint in `storage`, cached locally.

    Taken from the object store when an export of this very checkpoint was published there;
    otherwise (or when a published file's sha256 differs from its export.json) only the layer
    files are downloaded (sha256-verified), consolidated and exported, and the result is
    published to `<checkpoint>/hf_<dtype>/`: an outdated `export.json` deleted first, the files
    uploaded, the new `export.json` written last.
    """
    from neoray.checkpoint import download
    from neoray.storage import join_key

    out = cache_path(cache_dir, manifest, dtype)
    result = Export(out, manifest.run_name, manifest.step)
    if is_export_of(_read(out / EXPORT_MARKER), manifest):
        return result
    folder = export_key(manifest.run_name, manifest.step, dtype)
    marker_key = join_key(folder, EXPORT_MARKER)
    published = storage.get_bytes(marker_key) if storage.exists(marker_key) else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        staging = Path(tmp) / "hf"
        fetched = is_export_of(published, manifest) and _download_published(
            storage, folder, published, staging
        )
        if not fetched:
            shutil.rmtree(staging, ignore_errors=True)
            shards = Path(tmp) / "checkpoint"
            names = [e.path for e in manifest.files if LAYER_FILE.fullmatch(e.path)]
            download(storage, manifest, shards, names)
            (shards / MANIFEST).write_text(manifest.to_json())
            export_directory(shards, staging, dtype, tokenizer)
            if published is not None:  # of other weights, or damaged: no longer complete
                storage.delete(marker_key)
            for path in sorted(staging.iterdir()):
                storage.upload_file(path, join_key(folder, path.name))
            published = marker(staging, manifest)  # hashes the weights once, for both copies
            storage.put_bytes(marker_key, published)
        (staging / EXPORT_MARKER).write_bytes(published)
        _publish_locally(staging, out, manifest)
    return result


def committed_manifest(checkpoint: str, step: str | int | None, storage_config=None):
    """(storage, manifest) of a checkpoint URI (`s3://.../<run>/checkpoints/step_<n>` or its
    local path) or of run `checkpoint` at `step` (a number or "latest") in `storage_config`."""
    from neoray.checkpoint import checkpoint_from_uri, latest_checkpoint, read_manifest
    from neoray.storage import StorageConfig, open_storage

    if checkpoint.startswith("s3://") or "/checkpoints/step_" in checkpoint:
        return checkpoint_from_uri(checkpoint)
    if step is None:
        raise ConfigError(f"checkpoint={checkpoint!r} is a run name: add step=<n> or step=latest")
    storage = open_storage(storage_config or StorageConfig())
    if str(step) == "latest":
        manifest = latest_checkpoint(storage, checkpoint)
        if manifest is None:
            raise FileNotFoundError(f"run {checkpoint!r} has no committed checkpoint in {storage}")
        return storage, manifest
    return storage, read_manifest(storage, checkpoint, int(step))


@dataclass
class Checkpoint:
    """A committed checkpoint found by `resolve_checkpoint`: its manifest, and where its files
    are (a local step directory, or the storage of a URI or run name)."""

    manifest: Manifest
    step_dir: Path | None = None
    storage: Storage | None = None  # when not a local step directory


def resolve_checkpoint(
    checkpoint: str, step: str | int | None = None, storage_config=None
) -> Checkpoint:
    """The checkpoint named by a local step directory, a checkpoint URI, or a run + step, with
    only its manifest read: what it is can be checked before any weights are touched."""
    local = Path(checkpoint)
    if (local / MANIFEST).is_file() and "/checkpoints/step_" not in checkpoint:
        return Checkpoint(local_manifest(local), step_dir=local)
    storage, manifest = committed_manifest(checkpoint, step, storage_config)
    return Checkpoint(manifest, storage=storage)


def export_checkpoint(
    found: Checkpoint, cache_dir: str | Path, dtype: str = "fp16", tokenizer: str | None = None
) -> Export:
    """The (cached) export of a checkpoint from `resolve_checkpoint`."""
    if found.step_dir is not None:
        return export_cached(found.step_dir, cache_dir, dtype, tokenizer)
    return export_committed(found.storage, found.manifest, cache_dir, dtype, tokenizer)


def resolve_export(cfg: ExportConfig, storage_config=None) -> Export:
    """The export `cfg` asks for: a local step directory, a checkpoint URI, or a run + step."""
    found = resolve_checkpoint(cfg.checkpoint, cfg.step, storage_config)
    return export_checkpoint(found, cfg.cache_dir, cfg.dtype, cfg.tokenizer)


def check_output(output: str | Path) -> Path:
    """`output=` of an export: a new or empty directory, or an earlier export, which is
    replaced: its export.json reads as ours and lists every other file next to it. Anything
    else is refused before any work: replacing the folder would delete the user's files."""
    out = Path(output).absolute()
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"output={output}: {out} is a file; choose a new or empty directory")
    present = {p.name for p in out.iterdir()}
    if not present:
        return out
    listed = _exported_files(out / EXPORT_MARKER)
    if listed is None:
        raise ConfigError(
            f"output={output}: {out} exists and is not an export (no {EXPORT_MARKER} of ours); "
            "choose a new or empty directory (an earlier export there is replaced)"
        )
    foreign = sorted(present - listed - {EXPORT_MARKER})
    if foreign:
        raise ConfigError(
            f"output={output}: {out} holds an export and files it did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which replacing "
            "it would delete; move them, or choose a new or empty directory"
        )
    return out


def _exported_files(path: Path) -> set[str] | None:
    """The files an export.json (see `marker`) lists; None when `path` is not one."""
    try:
        values = json.loads(path.read_bytes())
        files, checkpoint = values["files"], values["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not isinstance(checkpoint, dict) or "id" not in checkpoint:
        return None
    return set(files)


def run_export(cfg: ExportConfig, storage_config=None) -> Path:
    """`jobs/export.py`: the exported directory (copied to `cfg.output` when given). An earlier
    export at `output` is replaced by renames: the new copy is complete before the old one
    moves aside, and nothing is deleted before the new one is in place."""
    out = None if cfg.output is None else check_output(cfg.output)
    export = resolve_export(cfg, storage_config)
    if out is None:
        return export.hf_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "new"
        shutil.copytree(export.hf_dir, staging)
        check_output(out)  # still an export (or absent) now that the copy is done
        if out.exists():
            out.rename(Path(tmp) / "old")  # removed with the temporary directory
        staging.rename(out)
    return out
