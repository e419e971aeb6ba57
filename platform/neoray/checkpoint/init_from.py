"""`train.init_from`: start a run from released weights or from another run's checkpoint.

Weights only: the optimizer, the learning-rate schedule and the data order start afresh. The
source is named by one string (see `open_source`); what it is, and whether its shape is the
configured model's, is checked from its metadata alone (`check_source`) before any process
group or tensor exists. Each rank then fills only its own pipeline stage's tensors, each with
only its tensor-parallel slice (`load_stage`), one tensor at a time, and reports how many bytes
it read: its share of the model, plus at most one tensor in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from neoray.checkpoint.manifest import latest_checkpoint, read_manifest
from neoray.checkpoint.weight_sources import (
    RunCheckpoint,
    Source,
    StateDictFile,
    hf_directory,
)
from neoray.config import ConfigError
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.convert import split_dim, to_plain_name
from neoray.storage import StorageConfig, open_storage, storage_from_uri

log = logging.getLogger(__name__)
RUN_PREFIX = "run:"
FIELD = "train.init_from"


def open_source(spec: str, storage: StorageConfig) -> Source:
    """The weights `spec` names, with only their metadata read:

    - `run:<name>` or `run:<name>@<step>`: the latest (or that step's) committed checkpoint of
      run <name> in this run's storage;
    - a checkpoint's own location, `<root>/<run>/checkpoints/step_<n>` (local or s3://), as
      trackers record it and `export` takes it;
    - a Hugging Face GPTNeoX directory, local or s3://;
    - a local `torch.save` file of a full GPTNeoX state dict.
    """
    what = f"{FIELD}={spec!r}"
    if spec.startswith(RUN_PREFIX):
        return _run_checkpoint(spec[len(RUN_PREFIX) :], storage, what)
    if "/checkpoints/step_" in spec:
        from neoray.checkpoint.export import resolve_checkpoint

        try:
            found = resolve_checkpoint(spec)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{what}: {err}") from err
        return RunCheckpoint(what, found.storage, found.manifest)
    if not spec.startswith("s3://") and Path(spec).is_file():
        return StateDictFile(what, Path(spec))
    if not spec.startswith("s3://") and not Path(spec).is_dir():
        raise ConfigError(
            f"{what}: no such file or directory. Name a Hugging Face GPTNeoX directory (local "
            "or s3://), run:<name>[@<step>] (a checkpoint of another run in this storage), a "
            "checkpoint's <root>/<run>/checkpoints/step_<n>, or a torch.save state dict file"
        )
    return hf_directory(*storage_from_uri(spec), what)


def _run_checkpoint(name: str, config: StorageConfig, what: str) -> RunCheckpoint:
    run, _, step = name.partition("@")
    storage = open_storage(config)
    if step in ("", "latest"):
        manifest = latest_checkpoint(storage, run)
        if manifest is None:
            raise ConfigError(f"{what}: run {run!r} has no committed checkpoint in {storage}")
    elif step.isdigit():
        try:
            manifest = read_manifest(storage, run, int(step))
        except FileNotFoundError as err:
            raise ConfigError(
                f"{what}: run {run!r} has no committed checkpoint at step {step} in {storage}"
            ) from err
    else:
        raise ConfigError(f"{what}: write run:<name>@<step> with a step number, or run:<name>")
    return RunCheckpoint(what, storage, manifest)


# Model fields that do not change what the weights compute, or that are compared through a
# derived one (the padded vocabulary: the rows the embeddings have; the MLP width). Every other
# field of NeoXConfig is compared.
_NOT_COMPARED = {
    "vocab_size",
    "vocab_multiple",
    "intermediate_size",
    "max_seq_len",
    "checkpoint_activations",
}
# The names a Hugging Face config.json gives them.
_HF_NAMES = {
    "padded_vocab_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "rotary_base": "rotary_emb_base",
    "parallel_residual": "use_parallel_residual",
}


def _compared(config: NeoXConfig) -> dict:
    fields = {f.name for f in dataclasses.fields(config)} - _NOT_COMPARED
    values = {name: getattr(config, name) for name in sorted(fields)}
    return {**values, "padded_vocab_size": config.padded_vocab_size, "ffn_size": config.ffn_size}


def _fix(field: str, theirs, model: NeoXConfig) -> str:
    if field == "padded_vocab_size":  # the rows the weights have, whatever the padding rule
        multiple = "" if theirs % model.vocab_multiple else " model.vocab_multiple=1"
        return f"set model.vocab_size={theirs}{multiple}"
    if field == "ffn_size":
        return f"set model.intermediate_size={theirs}"
    return f"set model.{field}={theirs}"


def check_source(source: Source, model: NeoXConfig) -> None:
    """Refuse a source whose model is not `model`: every field that differs, named, with the
    override that makes them agree (a plain state dict is checked tensor by tensor instead)."""
    if source.config is None:
        return
    hf = not isinstance(source, RunCheckpoint)
    theirs, ours = _compared(source.config), _compared(model)
    differ = [
        f"{_HF_NAMES.get(field, field) if hf else 'model.' + field}={theirs[field]!r} where "
        f"model.{field}={ours[field]!r}: {_fix(field, theirs[field], model)}"
        for field in theirs
        if theirs[field] != ours[field]
    ]
    if differ:
        where = "its config.json has" if hf else "its checkpoint's model has"
        raise ConfigError(f"{source.what}: {where} " + "; ".join(differ))


@dataclass
class LoadReport:
    """What one rank read: the bytes of the tensors it materialised from the source (its share
    of the model), the most it held at once besides its own parameters, and the full model's
    size at the source's precision, for comparison."""

    materialised_bytes: int
    peak_bytes: int
    model_bytes: int
    files: list[str]

    def summary(self) -> str:
        share = self.materialised_bytes / self.model_bytes if self.model_bytes else 0.0
        return (
            f"read {self.materialised_bytes / 2**20:,.1f} MiB of the model's "
            f"{self.model_bytes / 2**20:,.1f} MiB ({share:.1%}), at most "
            f"{self.peak_bytes / 2**20:,.1f} MiB at once, from {_files(self.files)}"
        )


def _files(files: list[str]) -> str:
    return ", ".join(files) if len(files) <= 2 else f"{len(files)} files ({files[0]}, ...)"


def load_stage(
    source: Source,
    targets: dict[str, torch.Tensor],
    model: NeoXConfig,
    tp_rank: int,
    tp: int,
    scratch: Path,
) -> LoadReport:
    """Copy into `targets` (this rank's parameters, by pipeline name) their slices of the
    source's tensors, once every shape is checked. Files fetched from an object store go to
    `scratch` (left to the caller)."""
    names = {to_plain_name(name, model): name for name in targets}
    opened = source.open(set(names), scratch)
    for plain, name in sorted(names.items()):
        expected = list(targets[name].shape)
        if (dim := split_dim(plain)) is not None:
            expected[dim] *= tp
        if list(opened.tensors[plain].shape) != expected:
            raise ConfigError(
                f"{source.what}: {plain} has shape {tuple(opened.tensors[plain].shape)}, the "
                f"model's is {tuple(expected)}: model.* must describe the model the weights are of"
            )
    read = peak = itemsize = 0
    for plain, name in sorted(names.items()):
        target, dim = targets[name], split_dim(plain)
        size = 0 if dim is None else target.shape[dim]
        pieces = opened.tensors[plain].copy_into(target, dim, tp_rank * size, (tp_rank + 1) * size)
        read += sum(pieces)
        peak = max(peak, *pieces)
        itemsize = sum(pieces) // target.numel()
    return LoadReport(read, peak, model.num_parameters() * itemsize, opened.files)


def init_stage(
    spec: str,
    module: torch.nn.Module,
    model: NeoXConfig,
    tp_rank: int,
    tp: int,
    storage: StorageConfig,
    scratch_dir: str | Path,
) -> LoadReport:
    """Load this rank's part of the weights `spec` names into its pipeline stage `module`;
    files downloaded for it live in a temporary folder under `scratch_dir` until loaded."""
    source = open_source(spec, storage)
    check_source(source, model)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".init_from-", dir=scratch_dir) as scratch:
        report = load_stage(source, module.state_dict(), model, tp_rank, tp, Path(scratch))
    log.info("%s: %s", source.what, report.summary())
    return report
