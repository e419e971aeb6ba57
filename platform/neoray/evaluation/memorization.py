"""Memorization: which training sequences a checkpoint reproduces, against how often and when
it saw them (Carlini et al. 2022; Pythia's per-checkpoint study).

For `samples` sequences drawn (seeded) among those the run trained on up to the checkpoint's
step, rebuilt through the loader's own sample index (`neoray.data.exposure`): the step at which
their tokens were first seen and how many times, and whether the checkpoint's greedy
continuation of the first `prefix_tokens` reproduces the next `continuation_tokens` exactly
(k-extractable), with the fraction of continuation positions it reproduces. Sequences of a
held-out split (never trained on) are the control. Generation is batched greedy decoding with
the KV cache (`neoray.model.generate`) on Ray workers; every prompt has the same length, so no
batch carries padding. Results: rates by times seen and by steps since first seen, per mixture
component, logged to MLflow under the training run at the checkpoint's step, with the
per-sequence records (JSONL) and plots.

Everything that can be wrong with the input (synthetic data, token files gone or changed since
training, more samples than sequences trained on) is refused from the checkpoint's manifest
and the data alone, before any weights are read or Ray starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neoray.config import ConfigError, dataclass_from_config, to_dict, unflatten
from neoray.data.config import DataConfig, data_config
from neoray.data.exposure import Window, count_exposures, draw_positions, read_windows
from neoray.data.indexed import fingerprint
from neoray.data.mixture import SPLITS, build_mixture
from neoray.storage import StorageConfig
from neoray.tracking import TrackingConfig

if TYPE_CHECKING:  # torch is imported where the study runs, not where suites are listed
    from neoray.checkpoint.export import Checkpoint
    from neoray.data.loader import BatchSchedule

SUITE = "memorization"


@dataclass
class MemorizationConfig:
    """conf/memorization.yaml: which checkpoint, how many sequences, how they are cut, and how
    generation is fanned out."""

    checkpoint: str | None = None  # a checkpoint URI, a local step dir, or a run name (with step);
    # None in the scheduled evaluation, which gives each checkpoint
    step: str | int | None = None  # with a run name: a step or "latest"
    samples: int = 1000  # training sequences checked
    prefix_tokens: int = 32
    continuation_tokens: int = 32
    heldout_samples: int = 0  # sequences of `heldout_split`, never trained on: the control
    heldout_split: str = "test"
    seed: int = 1234  # which sequences are drawn
    batch_size: int = 64  # sequences per generate call
    workers: int = 1  # Ray tasks the sequences are split into
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "cpu"
    dtype: str = "fp32"  # the dtype the checkpoint is exported and decoded in
    cache_dir: str = "runs/exports"  # local cache of exported checkpoints
    output_dir: str = "runs/memorization"  # <output_dir>/<run>/step_<n>/: records, tables, plots

    def __post_init__(self) -> None:
        for name in ("samples", "prefix_tokens", "continuation_tokens", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.heldout_samples < 0:
            raise ConfigError(f"heldout_samples must be >= 0, got {self.heldout_samples}")
        if self.heldout_split not in SPLITS[1:]:
            raise ConfigError(
                f"heldout_split={self.heldout_split!r}: choose validation or test (never trained on)"
            )
        from neoray.checkpoint.export import DTYPES

        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")

    @property
    def width(self) -> int:
        return self.prefix_tokens + self.continuation_tokens

    @property
    def suite(self) -> str:
        """Its name as a suite of the scheduled evaluation (`suites=[memorization]`)."""
        return SUITE

    @property
    def tasks(self) -> list[str]:
        """The one "task" whose metrics are the study's in the scheduled evaluation's ledger."""
        return [SUITE]


@dataclass
class Study:
    """What the checkpoint's manifest says the run trained on, checked against the data."""

    run_name: str
    step: int  # the checkpoint's weights saw steps 0 .. step - 1, less the skipped ones
    data: DataConfig
    schedule: BatchSchedule
    skipped: list[list[int]]  # [first, last] ranges of steps whose batches were not trained

    @property
    def served(self) -> int:
        """Training sequences served by the checkpoint's step, skipped steps' included."""
        return self.step * self.schedule.global_batch_size

    @property
    def trained(self) -> int:
        """Training sequences the checkpoint's weights were trained on."""
        skipped = sum(last - first + 1 for first, last in self.skipped)
        return (self.step - skipped) * self.schedule.global_batch_size


def plan_study(manifest, cfg: MemorizationConfig) -> Study:
    """The run's data and batch layout from `manifest`, refused with the reason and the fix when
    its sequences cannot be rebuilt or checked as asked."""
    from neoray.data.loader import BatchSchedule

    where = f"checkpoint {manifest.run_name} step {manifest.step}"
    config = manifest.config
    if config.get("data.synthetic"):
        raise ConfigError(
            f"checkpoint={cfg.checkpoint}: {where} was trained on synthetic data (random tokens "
            "drawn afresh for every sample), so no sequence recurs and none can be memorized; "
            "evaluate a run trained on a token-file mixture (data=...)"
        )
    data = data_config(unflatten(config, "data"), "data (from the manifest)")
    _check_fingerprint(manifest, data, where)
    schedule = BatchSchedule(
        micro_batch_size=int(config["parallel.micro_batch_size"]),
        grad_accum_steps=int(config["parallel.grad_accum_steps"]),
        data_parallel_size=int(config["parallel.dp"]),
        train_steps=max(int(config["train.steps"]), manifest.step, 1),
    )
    study = Study(manifest.run_name, manifest.step, data, schedule, manifest.skipped_steps)
    if cfg.samples > study.trained:
        raise ConfigError(
            f"samples={cfg.samples}: {where} has trained on {study.trained} sequences "
            f"({manifest.step} steps of {schedule.global_batch_size}, less skipped ones); set "
            f"samples<={study.trained} "
            "or evaluate a later checkpoint"
        )
    if cfg.width > data.seq_len + 1:
        raise ConfigError(
            f"prefix_tokens + continuation_tokens = {cfg.width} exceeds the run's samples of "
            f"data.seq_len + 1 = {data.seq_len + 1} tokens: lower them"
        )
    max_seq_len = int(manifest.model["max_seq_len"])
    if cfg.width > max_seq_len:
        raise ConfigError(
            f"prefix_tokens + continuation_tokens = {cfg.width} exceeds the model's "
            f"max_seq_len={max_seq_len}: lower them"
        )
    return study


def _check_fingerprint(manifest, data: DataConfig, where: str) -> None:
    """The token files must be those the run trained on: their fingerprints as recorded."""
    recorded = manifest.data_fingerprint
    if not recorded:
        raise ConfigError(
            f"{where}: its manifest records no data fingerprint (it was written before neoray "
            "recorded one), so the training order cannot be verified against the token files; "
            "evaluate a checkpoint saved by this version"
        )
    for name, component in data.components.items():
        field = f"data.components.{name}"
        try:
            now = fingerprint(component.prefix)
        except FileNotFoundError as err:
            raise ConfigError(
                f"{field}: the token files the run trained on are gone ({err.filename}); "
                f"restore {component.prefix}.bin/.idx (paths relative to where training ran)"
            ) from err
        if now != recorded.get(name):
            raise ConfigError(
                f"{field}: {component.prefix}.bin/.idx changed since {where} was trained "
                f"(fingerprint {now[:12]}, recorded {str(recorded.get(name))[:12]}): the "
                "sequences it saw cannot be rebuilt from them; restore the files it trained on"
            )


def rebuild(study: Study, cfg: MemorizationConfig) -> list[Window]:
    """The drawn training sequences and the held-out ones, with their exposure counted."""
    from neoray.data.loader import train_mixture

    mixture = train_mixture(study.data, study.schedule)
    per_step = study.schedule.global_batch_size
    positions = draw_positions(study.trained, cfg.samples, cfg.seed, per_step, study.skipped)
    windows = read_windows(mixture, positions, cfg.width)
    if cfg.heldout_samples:
        try:
            heldout = build_mixture(study.data, cfg.heldout_split, cfg.heldout_samples)
        except ValueError as err:
            raise ConfigError(f"heldout_split={cfg.heldout_split!r}: {err}") from err
        windows += read_windows(
            heldout, np.arange(cfg.heldout_samples), cfg.width, cfg.heldout_split
        )
    skipped = {s for first, last in study.skipped for s in range(first, last + 1)}
    count_exposures(mixture, study.served, per_step, windows, skipped)
    return windows


def greedy_continuations(
    model, prompts: list[list[int]], new_tokens: int, batch_size: int
) -> list[list[int]]:
    """The greedy continuation of every prompt, `new_tokens` long (no stop token), decoded
    `batch_size` prompts at a time with the KV cache."""
    from neoray.model.generate import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=new_tokens)
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        out += generate(model, prompts[first : first + batch_size], sampling)
    return out


def continue_greedily(
    hf_dir: str,
    prompts: list[list[int]],
    new_tokens: int,
    batch_size: int,
    device: str = "cpu",
    threads: int | None = None,
) -> list[list[int]]:
    """`greedy_continuations` of the exported model in `hf_dir` (one Ray worker's share)."""
    import torch

    from neoray.model.hf import load_hf

    if threads:
        torch.set_num_threads(threads)
    model = load_hf(hf_dir).to(device).eval()
    return greedy_continuations(model, prompts, new_tokens, batch_size)


def extract(hf_dir: str, windows: list[Window], cfg: MemorizationConfig) -> list[list[int]]:
    """Greedy continuations of the windows' prefixes, fanned out over `cfg.workers` Ray tasks
    (in the connected cluster), in the windows' order."""
    import ray

    remote = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_retries=2)(
        continue_greedily
    )
    prompts = [w.tokens[: cfg.prefix_tokens].tolist() for w in windows]
    shards = np.array_split(np.arange(len(prompts)), min(cfg.workers, len(prompts)))
    threads = max(1, int(cfg.cpus_per_worker))
    pending = [
        remote.remote(
            str(Path(hf_dir).absolute()),
            [prompts[i] for i in shard],
            cfg.continuation_tokens,
            cfg.batch_size,
            cfg.device,
            threads,
        )
        for shard in shards
    ]
    return [tokens for part in ray.get(pending) for tokens in part]


def records(
    windows: list[Window], generated: list[list[int]], study: Study, cfg: MemorizationConfig
) -> list[dict[str, Any]]:
    """One row per sequence: where it is in the data, its exposure, and what the checkpoint
    made of its prefix."""
    rows = []
    global_batch = study.schedule.global_batch_size
    for window, tokens in zip(windows, generated, strict=True):
        truth = window.tokens[cfg.prefix_tokens :].tolist()
        matches = [a == b for a, b in zip(tokens, truth, strict=True)]
        first = window.first_seen_step
        rows.append({
            "split": window.split,
            "position": window.position,
            "step": window.position // global_batch if window.split == "train" else None,
            "component": window.component,
            "documents": window.documents,
            "times_seen": window.times_seen,
            "first_seen_step": first,
            "steps_since_first_seen": None if first is None else study.step - first,
            "extracted": all(matches),
            "match_fraction": sum(matches) / len(matches),
            "prefix": window.tokens[: cfg.prefix_tokens].tolist(),
            "continuation": truth,
            "generated": tokens,
        })  # fmt: skip
    return rows


def checkpoint_uri(found: Checkpoint) -> str:
    """Where the evaluated checkpoint is, as the evaluation runs record their source."""
    from neoray.checkpoint.manifest import checkpoint_key

    if found.step_dir is not None:
        return str(found.step_dir.absolute())
    return found.storage.uri(checkpoint_key(found.manifest.run_name, found.manifest.step))


def study_checkpoint(
    found: Checkpoint, cfg: MemorizationConfig, export_dir: Path | None = None
) -> dict[str, Any]:
    """The study of one checkpoint: check, rebuild, export (unless `export_dir`, an export of
    it, is given), extract over the connected Ray cluster (started here if none), summarise and
    write the outputs under `cfg.output_dir`. Returns the summary, with `output` (the folder)
    and `source` (the checkpoint's URI)."""
    from neoray.checkpoint.export import export_checkpoint
    from neoray.cluster.ray_start import start_or_join
    from neoray.evaluation.memorization_report import summarise, write_outputs

    study = plan_study(found.manifest, cfg)
    windows = rebuild(study, cfg)
    if export_dir is None:
        export_dir = export_checkpoint(found, cfg.cache_dir, cfg.dtype).hf_dir
    start_or_join(log_to_driver=False)
    rows = records(windows, extract(str(export_dir), windows, cfg), study, cfg)
    summary = summarise(rows, study.run_name, study.step, cfg)
    out = Path(cfg.output_dir) / study.run_name / f"step_{study.step:08d}"
    write_outputs(rows, summary, out)
    return summary | {"output": str(out), "source": checkpoint_uri(found)}


def as_suite_results(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary in the shape of a suite's merged results (`results.<task>.<metric>,none`),
    as the scheduled evaluation's ledger records suites: the rate (its headline, first by
    name) and the rate by times seen; the whole summary rides along for MLflow."""
    metrics = {"rate,none": summary["rate"]}
    for row in summary["by_times_seen"]:
        if row["component"] == "all":
            metrics[f"times_seen/{row['bin']}/rate,none"] = row["rate"]
    return {"results": {SUITE: metrics}, "failed": {}, "summary": summary}


SHARED_SETTINGS = ("workers", "cpus_per_worker", "gpus_per_worker", "device")


def memorization_suite(settings: dict[str, Any], suite: dict[str, Any], where: str):
    """The study as a suite of the scheduled evaluation: the suite file's fields (those of
    conf/memorization.yaml), with the fan-out settings every suite shares (`eval.workers`,
    `eval.cpus_per_worker`, `eval.gpus_per_worker`, `eval.device`)."""
    values = {k: settings[k] for k in SHARED_SETTINGS if k in settings}
    values |= {k: v for k, v in suite.items() if k != "suite"}
    return dataclass_from_config(MemorizationConfig, values, where)


def run_memorization(cfg: Any) -> dict[str, Any]:
    """The job (conf/memorization.yaml): the checkpoint's manifest is read and everything
    checked before any weights are; then `study_checkpoint`, MLflow, and the tables printed."""
    from neoray.checkpoint.export import resolve_checkpoint
    from neoray.cluster.submit import check_durable_locations
    from neoray.evaluation.memorization_report import format_summary, log_to_mlflow

    values = to_dict(cfg)
    tracking = dataclass_from_config(TrackingConfig, values.pop("tracking", None), "tracking")
    storage = dataclass_from_config(StorageConfig, values.pop("storage", None), "storage")
    mem = dataclass_from_config(MemorizationConfig, values, "memorization")
    if not mem.checkpoint:
        raise ConfigError("checkpoint: give a checkpoint URI, a step directory or a run name")
    check_durable_locations(tracking=tracking)
    summary = study_checkpoint(resolve_checkpoint(mem.checkpoint, mem.step, storage), mem)
    out = Path(summary["output"])
    if tracking.enabled:
        summary["mlflow_run_id"] = log_to_mlflow(tracking, summary, out, summary["source"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"records, tables and plots: {out}")
    return summary
