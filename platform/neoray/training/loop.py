"""The per-worker training function: one process of a tp x pp x dp run.

It needs only the `torch.distributed` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so any launcher can start it: torchrun, or Ray Train (which may have created the
process group already; DeepSpeed then reuses it).

A run is named (`run_name`): it starts from its latest committed checkpoint if it has one, with
the data order continuing at that step, and saves checkpoints as `checkpoint` says, uploading
them in the background (see `neoray.checkpoint.snapshot`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from neoray.checkpoint.init_from import init_stage
from neoray.checkpoint.lease import LeaseCheck
from neoray.checkpoint.manifest import CorruptCheckpointError, FileEntry, Manifest
from neoray.checkpoint.resume import Layout, committed_on_rank0, resume
from neoray.checkpoint.snapshot import Snapshots, manifest_created
from neoray.code_version import code_version
from neoray.config import ConfigError, flatten, redact
from neoray.data.config import DataConfig
from neoray.data.mixture import BlendedDataset, changed_components, data_fingerprint
from neoray.data.phases import mixture_metrics, mixture_record, rewritten_phases
from neoray.energy.run import RunEnergy
from neoray.evaluation.hold import EvaluationHold
from neoray.evaluation.ledger import Ledger
from neoray.parallel.config import validate_layout
from neoray.parallel.convert import shard_path
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank
from neoray.storage import Storage, open_storage, publish_file
from neoray.training.config import PretrainConfig
from neoray.training.data import batch_schedule, dataset, micro_batches
from neoray.training.engine import build_engine, init_distributed
from neoray.training.metrics import (
    MetricsFile,
    StepMetrics,
    device_peak_tflops,
    matmul_probe_tflops,
    peak_memory_gib,
)
from neoray.training.observer import TrainingObserver
from neoray.training.precision import check_precision
from neoray.training.spike import Rollback, SkippedSteps, SpikeGuard, checked_ranges
from neoray.training.validation import Validation

log = logging.getLogger(__name__)


def progress_line(row: dict, steps: int) -> str:
    """One line of progress for the console (metrics.jsonl and MLflow get every field)."""
    line = (
        f"step {row['step'] + 1}/{steps}  loss {_number(row['loss'])}  lr {row['lr']:.2e}  "
        f"{row['tokens_per_s']:,.0f} tokens/s  MFU {row['mfu']:.1%}"
    )
    if "val/loss" in row:
        line += f"  val loss {_number(row['val/loss'])}"
    return line


def _number(value: float | None) -> str:
    return f"{float('nan') if value is None else value:.4f}"  # None: not finite (JSON)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss stayed NaN/inf for too many consecutive steps."""


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _peak_tflops(cfg: PretrainConfig, device: torch.device) -> float:
    """Peak TFLOPS of one device: configured, from the data sheet, or a CPU probe.

    On a CPU the probe runs once, on rank 0, and is shared by the processes of a node in
    equal parts (they share its cores).
    """
    peak = cfg.train.peak_tflops or device_peak_tflops(device)
    if peak:
        return peak
    measured = torch.tensor([matmul_probe_tflops() if dist.get_rank() == 0 else 0.0])
    dist.broadcast(measured, src=0)
    return measured.item() / int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


def _topology(cfg: PretrainConfig) -> dict[str, int]:
    return {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": cfg.parallel.dp}


def _pin_decay_horizon(cfg: PretrainConfig, manifests: list[Manifest]) -> None:
    """A resumed run keeps the learning-rate schedule it was saved with.

    Without `optim.decay_steps` the cosine decays over `train.steps`; rerunning with a larger
    `train.steps` to train on would otherwise stretch the schedule behind the weights' back (the
    learning rate jumping up again). The saved horizon is kept instead, so the extra steps run at
    `optim.min_lr`; to decay over a longer run, set `optim.decay_steps` from the start.
    """
    if cfg.optim.decay_steps is not None or not manifests:
        return
    saved = manifests[-1].config
    cfg.optim.decay_steps = saved.get("optim.decay_steps") or saved["train.steps"]
    if cfg.optim.decay_steps != cfg.train.steps:
        log.info(
            "resuming: the learning rate keeps decaying over %d steps as saved (train.steps=%d); "
            "set optim.decay_steps to change that",
            cfg.optim.decay_steps,
            cfg.train.steps,
        )


def _check_data(cfg: PretrainConfig, manifest: Manifest) -> None:
    """Refuse (on every rank, before any weight is read) to resume on token files other than
    those `manifest` was trained on, unless `data.accept_changed_data` names the component,
    or on a mixture whose phases before the checkpoint differ from those it recorded (a change
    from the checkpoint's step on is declared as a phase): the run would otherwise go on with
    other samples than its data order says, unnoticed. Rank 0 alone reads the files, as it
    alone fingerprints them for the manifests."""
    if not isinstance(cfg.data, DataConfig):
        return  # synthetic data
    rewritten = rewritten_phases(cfg.data, manifest.mixture_phases, manifest.step)
    if rewritten:
        raise ConfigError(
            f"run_name={cfg.run_name!r}: {rewritten}. Its checkpoint at step {manifest.step} "
            "was trained on the recorded ones: restore them in data.components and "
            f"data.phases, and declare a change as a phase from step {manifest.step} or later "
            f"(data.phases=[{{from_step: {manifest.step}, components: {{...}}}}])"
        )
    if not manifest.data_fingerprint:
        return  # a checkpoint from before fingerprints were recorded
    refusal: list = [None]
    if dist.get_rank() == 0:
        changed = changed_components(cfg.data, manifest.data_fingerprint)
        refused = sorted(set(changed) - set(cfg.data.accept_changed_data))
        if refused:
            refusal[0] = (
                f"run_name={cfg.run_name!r}: the token files of "
                + "; ".join(
                    f"data.components.{name} ({cfg.data.components[name].prefix}.bin/.idx: "
                    f"fingerprint saved {changed[name][0]}, now {changed[name][1]})"
                    for name in refused
                )
                + f" changed since its checkpoint at step {manifest.step} was saved. Restore "
                "the files it trained on, or, to continue on the new ones, set "
                f"data.accept_changed_data=[{','.join(refused)}]"
            )
        for name in sorted(changed.keys() - set(refused)):
            log.warning(
                "data.components.%s: token files changed since step %d (fingerprint saved %s, "
                "now %s); continuing on them as data.accept_changed_data allows, and the next "
                "checkpoint records the new fingerprint",
                name,
                manifest.step,
                *changed[name],
            )
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ConfigError(refusal[0])


def epochs_seen(data, samples: int) -> dict[str, float]:
    """`epochs/<component>` after `samples` training samples (a mixture's components only)."""
    if not isinstance(data, BlendedDataset):
        return {}
    return {f"epochs/{name}": epochs for name, epochs in data.epochs(samples).items()}


def manifest_factory(cfg: PretrainConfig, skipped: SkippedSteps | None = None):
    """(step, files) -> the Manifest of run `cfg` at `step`, with the steps before it that
    `skipped` holds (their batches untrained, left out of `tokens_seen`). The data's fingerprint
    is taken once, at the first commit (on rank 0, the only one that writes manifests), so
    evaluations that rebuild the training order can refuse token files changed since."""
    skipped = skipped or SkippedSteps([])
    config = redact(flatten(json.loads(json.dumps(dataclasses.asdict(cfg), default=str))))
    model = json.loads(json.dumps(dataclasses.asdict(cfg.model), default=str))
    version = code_version()

    @functools.cache
    def fingerprint() -> dict[str, str]:
        return data_fingerprint(cfg.data) if isinstance(cfg.data, DataConfig) else {}

    def make(step: int, files: list[FileEntry]) -> Manifest:
        return Manifest(
            run_name=cfg.run_name,
            step=step,
            tokens_seen=(step - skipped.count_before(step)) * cfg.tokens_per_step,
            topology=_topology(cfg),
            model=model,
            config=config,
            code_version=version,
            created=manifest_created(),
            files=files,
            data_fingerprint=fingerprint(),
            mixture_phases=mixture_record(cfg.data) if isinstance(cfg.data, DataConfig) else [],
            skipped_steps=skipped.before(step),
        )

    return make


def _snapshots(
    cfg: PretrainConfig,
    storage: Storage,
    staging: Path,
    observer: TrainingObserver | None,
    lease: LeaseCheck | None,
    skipped: SkippedSteps,
) -> Snapshots:
    def on_commit(step: int, uri: str, size_bytes: int) -> None:
        if observer is not None:
            observer.on_checkpoint(step, uri, size_bytes)

    def on_failure(step: int, error: str) -> None:
        if observer is not None:
            observer.on_checkpoint_failed(step, error)

    hold = None
    if cfg.checkpoint.hold_for_eval:
        hold = EvaluationHold(storage, cfg.run_name, cfg.checkpoint)
    return Snapshots(
        storage,
        cfg.run_name,
        cfg.checkpoint,
        staging,
        _topology(cfg),
        manifest_factory(cfg, skipped),
        on_commit,
        on_failure,
        hold,
        lease,
    )


def _forget_evaluations(storage: Storage, run_name: str) -> None:
    """A run that starts from no checkpoint under a used name deletes the evaluation ledger of
    the checkpoints it had, so that a watcher evaluates the new checkpoints of the same steps
    (the results stay in MLflow, on the superseded run)."""
    if forgotten := Ledger(storage, run_name).clear():
        log.info(
            "run %r starts from no checkpoint: deleted %d evaluation ledger entries of its "
            "earlier checkpoints",
            run_name,
            forgotten,
        )


def _report_rollback(rollback: Rollback, count: int, observer: TrainingObserver | None) -> None:
    """The progress line and the observers' record of the `count`-th rollback (rank 0)."""
    print(f"{rollback.describe()} [rollback {count}: {rollback.cost()}]", flush=True)
    if observer is not None:
        observer.on_rollback(rollback.step, count, rollback.seconds, rollback.describe())


def pretrain(
    cfg: PretrainConfig,
    observer: TrainingObserver | None = None,
    on_validation: Callable[[dict], None] | None = None,
    lease_owner: str | None = None,
) -> None:
    """Train run `cfg.run_name` up to `cfg.train.steps` steps, resuming from its latest
    committed checkpoint; rank 0 writes `<run_dir>/metrics.jsonl` and reports each step's
    metrics and each checkpoint (committed or failed) to `observer`. Every rank passes the
    row of each step that ended with validation to `on_validation` (Ray Tune needs all of a
    Ray Train run's workers to report). With the `lease_owner` of the job that holds the run's
    lease, rank 0 stops with LeaseLostError before any write once another job holds it."""
    validate_layout(cfg.model, cfg.parallel, int(os.environ["WORLD_SIZE"]))
    check_precision(cfg.train.precision)  # a worker on a remote node may have another device
    device = _device()
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    placement = place_rank(cfg.parallel)
    storage = open_storage(cfg.storage) if cfg.checkpoint.enabled else None
    lease = None
    if storage is not None and lease_owner is not None and dist.get_rank() == 0:
        lease = LeaseCheck(storage, cfg.run_name, lease_owner, cfg.checkpoint.lease_timeout_s)
    staging = Path(cfg.checkpoint.staging_dir or Path(cfg.run_dir) / "staging") / cfg.run_name
    manifests, malformed = committed_on_rank0(storage, cfg.run_name) if storage else ([], [])
    skipped = SkippedSteps(checked_ranges(cfg.train.skip_steps, "train.skip_steps"))
    snapshots = _snapshots(cfg, storage, staging, observer, lease, skipped) if storage else None
    if snapshots is not None:
        snapshots.check_lease()  # a worker group restarted after its job lost the run stops here
    if snapshots is not None and snapshots.recover(manifests[-1].step if manifests else None):
        manifests, malformed = committed_on_rank0(storage, cfg.run_name)  # with the new ones
    if malformed and not manifests:
        raise CorruptCheckpointError(
            f"run_name={cfg.run_name!r}: the manifests of its checkpoints at steps {malformed} "
            "cannot be read (see the warnings above); starting over would overwrite them: use "
            "another run_name, or delete the run's checkpoints to start it afresh"
        )
    schedule = batch_schedule(cfg)
    layout = Layout(_topology(cfg), placement.tp_rank, schedule.global_batch_size, cfg.model)
    if manifests:
        layout.check(manifests[-1])  # before any weights are allocated
        _check_data(cfg, manifests[-1])
    _pin_decay_horizon(cfg, manifests)
    module = build_pipeline(cfg.model, placement, cfg.train.seed, cfg.train.compile)
    if cfg.train.init_from and manifests:
        log.info("run %r resumes its own checkpoint; train.init_from is not read", cfg.run_name)
    elif cfg.train.init_from:  # weights only: the optimizer, schedule and data order start afresh
        init_stage(
            cfg.train.init_from,
            module,
            cfg.model,
            placement.tp_rank,
            cfg.parallel.tp,
            cfg.storage,
            Path(cfg.run_dir),
        )
    engine = build_engine(module, cfg.parallel, cfg.optim, cfg.train, cfg.model.width_mult)
    resumed = resume(engine, storage, manifests, layout, staging, malformed) if manifests else None
    start = resumed.step if resumed is not None else 0
    for first, last in resumed.skipped_steps if resumed is not None else []:
        skipped.add(first, last)  # the rollbacks of earlier starts
    out = MetricsFile(cfg.run_dir, start) if dist.get_rank() == 0 else None
    if observer is not None:
        observer.on_start(None if resumed is None else start, out.kept if out else [])
    if storage is not None and resumed is None and dist.get_rank() == 0:
        _forget_evaluations(storage, cfg.run_name)
    if start >= cfg.train.steps:
        log.info(
            "run %r already trained %d steps (train.steps=%d)", cfg.run_name, start, cfg.train.steps
        )
        if on_validation is not None and cfg.train.eval_interval:
            # Started again after it finished (a sweep whose driver died before recording
            # this trial's end): whoever waits on its validation gets the final one again.
            on_validation({"step": start - 1, **Validation(cfg, engine, placement).run()})
        if out is not None:
            out.close()
        dist.barrier()
        return

    metrics = StepMetrics(
        cfg.model,
        cfg.seq_len,
        cfg.tokens_per_step,
        devices=cfg.parallel.world_size,
        peak=_peak_tflops(cfg, device),
    )
    energy = None
    if cfg.energy.enabled:
        earlier = [row["energy/kwh"] for row in out.kept if "energy/kwh" in row] if out else []
        energy = RunEnergy(cfg.energy, device, start_kwh=earlier[-1] if earlier else 0.0)
    train_data = dataset(cfg, "train", schedule.train_samples)
    batches = None  # the micro-batches from the next trained step on, made when it comes
    validation = Validation(cfg, engine, placement) if cfg.train.eval_interval else None
    if snapshots is not None and resumed is None and cfg.checkpoint.should_save(0, cfg.train.steps):
        snapshots.save(engine, 0)
    fp16 = cfg.train.precision == "fp16"
    guard = None
    if cfg.train.spike.enabled:  # checkpoints are on (checked with the config)
        guard = SpikeGuard(cfg.train.spike, skipped, engine, snapshots, layout, staging, device)
        guard.recall(out.kept if out is not None else [])
    nonfinite = 0
    step = start
    while step < cfg.train.steps:
        done = step + 1
        if step in skipped:
            engine.lr_scheduler.step()  # untrained, but the schedule stays a function of the step
            batches = None
        else:
            if batches is None:
                batches = micro_batches(train_data, schedule, placement.dp_rank, step)
            lr = engine.get_lr()[0]
            start_time = time.perf_counter()
            loss = engine.train_batch(data_iter=batches).item()
            seconds = time.perf_counter() - start_time
            grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            if guard is not None and (rollback := guard.after_step(step, loss, grad_norm)):
                step, batches, nonfinite = rollback.to_step, None, 0
                if out is not None:  # the rows of the steps undone go, as on a restart
                    out.close()
                    out = MetricsFile(cfg.run_dir, step)
                    _report_rollback(rollback, len(guard.history), observer)
                continue
            row = metrics.row(
                step,
                seconds,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                loss_scale=engine.optimizer.cur_scale if fp16 else 1.0,
                step_skipped=not engine.was_step_applied(),
                peak_memory_gib=peak_memory_gib(device),
            )
            if isinstance(cfg.data, DataConfig):
                row.update(mixture_metrics(cfg.data, step, start))
            validated = validation is not None and cfg.train.validates_after(done)
            if validated:
                start_time = time.perf_counter()
                row.update(
                    validation.run(), **epochs_seen(train_data, done * schedule.global_batch_size)
                )
                row["val/time_s"] = time.perf_counter() - start_time
                if on_validation is not None:
                    on_validation(row)
            if energy is not None and (done % cfg.energy.interval == 0 or done == cfg.train.steps):
                row.update(energy.read())
            if out is not None:
                if lease is not None:
                    lease.verify()
                out.write(row)
                if observer is not None:
                    observer.on_metrics(row)
                if validated or (cfg.train.log_interval and done % cfg.train.log_interval == 0):
                    print(progress_line(row, cfg.train.steps), flush=True)
            nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
            if nonfinite >= cfg.train.max_nonfinite_steps and not fp16:
                if snapshots is not None:
                    snapshots.finish_before_stopping()
                raise NonFiniteLossError(
                    f"the loss was not finite for {nonfinite} consecutive steps (last: step "
                    f"{step}); stopping without saving the diverged weights. Lower optim.lr, "
                    "raise optim.warmup, train in bf16, or set train.spike.enabled=true"
                )
        if snapshots is not None and cfg.checkpoint.should_save(done, cfg.train.steps):
            if nonfinite == 0:
                snapshots.save(engine, done)
            elif dist.get_rank() == 0:
                log.warning(
                    "not saving step %d: its loss is not finite (the last good checkpoint stays)",
                    done,
                )
        step += 1
    if out is not None:
        out.close()
    if cfg.train.save_final and placement.dp_rank == 0:
        path = shard_path(Path(cfg.run_dir) / "final", placement.tp_rank, placement.pp_rank)
        publish_file(path, lambda f: torch.save(engine.module.state_dict(), f))
    if snapshots is not None:
        snapshots.finish()  # raises, on every rank, when a checkpoint stays uncommitted
    dist.barrier()
