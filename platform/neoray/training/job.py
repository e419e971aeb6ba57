"""`jobs/pretrain.py`: validate the config, then print the plan or train under a launcher.

`launcher=ray` (the default) runs one Ray Train worker per rank on a local Ray or the cluster
named by `cluster.address` / RAY_ADDRESS; `launcher=torchrun` expects torchrun (or a single
process started by hand) to have started the ranks. Either way every rank calls `train`, and
global rank 0 logs the run to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoray.cluster.ray_train import ClusterConfig, PlacementError
from neoray.cluster.submit import check_durable_locations, check_outputs
from neoray.config import ConfigError, dataclass_from_config, to_dict
from neoray.data.config import DataConfig
from neoray.data.prepare import check_token_files
from neoray.tracking import TrackingConfig, check_access
from neoray.training.config import PretrainConfig, pretrain_config
from neoray.training.precision import check_precision

if TYPE_CHECKING:
    from neoray.checkpoint.lease import RunLease

LAUNCHERS = ("ray", "torchrun")
log = logging.getLogger(__name__)


@dataclass
class WorkerJob:
    """What every training process receives (pickled to Ray workers)."""

    config: PretrainConfig
    run_name: str
    tracking: TrackingConfig
    params: dict[str, Any] = field(default_factory=dict)  # the job config, for MLflow
    tags: dict[str, str] = field(default_factory=dict)
    report_validation: bool = False  # pass validation rows to Ray Train (a sweep's trial)
    lease_owner: str | None = None  # who holds the run's lease, checked before rank 0 writes


def run_tags(config: PretrainConfig, launcher: str) -> dict[str, str]:
    """Tags of the MLflow run: topology, launcher, code version, Ray job ids."""
    from neoray.code_version import code_version
    from neoray.tracking import ray_job_tags

    p = config.parallel
    return {
        "neoray.launcher": launcher,
        "neoray.topology": f"tp={p.tp} pp={p.pp} dp={p.dp}",
        "neoray.world_size": str(p.world_size),
        "neoray.code_version": code_version(),
        **ray_job_tags(),
    }


def train(job: WorkerJob) -> None:
    """The per-worker function: one rank of the run. Global rank 0 tracks it in MLflow (from a
    thread, so an MLflow outage costs no steps) and, on Ray, exports its live metrics to
    Prometheus."""
    from neoray.live_metrics import TrainingExporter, ray_connected
    from neoray.training.loop import pretrain
    from neoray.training.observer import Observers

    on_validation = None
    if job.report_validation:
        on_validation = functools.partial(report_to_ray_train, steps=job.config.train.steps)
    if int(os.environ["RANK"]) != 0:
        pretrain(job.config, on_validation=on_validation)
        return
    with contextlib.ExitStack() as stack:
        observers = [TrainingExporter(job.run_name)] if ray_connected() else []
        if job.tracking.enabled:
            from neoray.tracking import MLflowTracker, ray_job_tags
            from neoray.tracking_queue import QueuedTracker

            tags = {**job.tags, **ray_job_tags()}  # a Ray worker knows its job's id
            tracker = QueuedTracker(
                functools.partial(MLflowTracker, job.tracking, job.run_name, job.params, tags),
                uri=job.tracking.uri,
                buffer_rows=job.tracking.buffer_rows,
                flush_timeout_s=job.tracking.flush_timeout_s,
            )
            observers.append(stack.enter_context(tracker))
        observer = Observers(*observers) if observers else None
        pretrain(job.config, observer, on_validation, job.lease_owner)


def report_to_ray_train(row: dict, steps: int) -> None:
    """Hand a validation row to Ray Train (every worker must), which passes rank 0's on to
    Ray Tune: its numbers, `trained_steps` (the time axis of a scheduler such as ASHA) and
    `train_steps`, the run's length (a trial that stopped short of it was stopped early)."""
    import ray.train

    numbers = {key: value for key, value in row.items() if isinstance(value, int | float)}
    ray.train.report({**numbers, "trained_steps": row["step"] + 1, "train_steps": steps})


def _single_process_environment() -> None:
    """Let one process started without a launcher form its own process group."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def worker_job(
    cfg: Any,
    config: PretrainConfig,
    launcher: str,
    tags: dict[str, str] | None = None,
    report_validation: bool = False,
) -> WorkerJob:
    """What every rank of the run of Hydra config `cfg` (typed as `config`) receives."""
    return WorkerJob(
        config=config,
        run_name=config.run_name,
        tracking=dataclass_from_config(TrackingConfig, cfg.get("tracking"), "tracking"),
        params=to_dict(cfg),
        tags={**run_tags(config, launcher), **(tags or {})},
        report_validation=report_validation,
    )


def cluster_config(cfg: Any) -> ClusterConfig:
    return dataclass_from_config(ClusterConfig, cfg.get("cluster"), "cluster")


def run_on_ray(
    job: WorkerJob, cluster: ClusterConfig, callbacks: tuple = (), owner: str | None = None
) -> None:
    """Run `job` on one Ray Train worker per rank, holding the run's lease as `owner` (see
    `run_lease`); `callbacks` are Ray Train's."""
    from neoray.cluster.ray_train import run_workers

    if isinstance(job.config.data, DataConfig):
        # Missing token files fail every worker, and every restart of the workers, alike.
        check_token_files(job.config.data)
    with run_lease(job.config, owner) as lease:
        job = holding(job, lease)
        while True:
            try:
                run_workers(
                    train,
                    job,
                    num_workers=job.config.parallel.world_size,
                    cluster=cluster,
                    name=job.run_name,
                    default_storage=str(Path(job.config.run_dir) / "ray"),
                    callbacks=callbacks,
                )
                return
            except PlacementError as err:
                if not cluster.elastic:
                    raise
                job = _on_fewer_workers(job, err)


def _on_fewer_workers(job: WorkerJob, err: PlacementError) -> WorkerJob:
    """The job continued with the most data-parallel ranks that `err.placeable` workers hold
    at the same global batch (it resumes resharded from its last committed checkpoint); the
    placement error again when there is no such layout."""
    parallel = job.config.parallel
    smaller = parallel.shrunk_to(err.placeable)
    if smaller is None:
        raise err
    log.warning(
        "cluster.elastic: %d workers cannot be placed (%d can); continuing with dp=%d and "
        "grad_accum_steps=%d (was dp=%d, %d): the same %d sequences a step",
        parallel.world_size,
        err.placeable,
        smaller.dp,
        smaller.grad_accum_steps,
        parallel.dp,
        parallel.grad_accum_steps,
        smaller.sequences_per_step,
    )
    config = dataclasses.replace(job.config, parallel=smaller)
    tags = job.tags | {"neoray.topology": f"tp={smaller.tp} pp={smaller.pp} dp={smaller.dp}"}
    return dataclasses.replace(job, config=config, tags=tags)


def holding(job: WorkerJob, lease: RunLease | None) -> WorkerJob:
    """`job` told which owner holds its run's lease (None: no lease is held)."""
    return job if lease is None else dataclasses.replace(job, lease_owner=lease.owner)


def run_lease(
    config: PretrainConfig, owner: str | None = None
) -> contextlib.AbstractContextManager:
    """The run's lease in its checkpoint storage, held by the process that owns the run (the
    Ray driver, or rank 0 under torchrun) so that no second job trains the same run_name;
    `owner` names the job across its restarts (default: its Ray job, else this process).
    Nothing to hold without checkpoints, and on the other ranks."""
    if not config.checkpoint.enabled or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from neoray.checkpoint.lease import RunLease, default_owner
    from neoray.storage import open_storage

    storage = open_storage(config.storage)
    return RunLease(
        storage, config.run_name, owner or default_owner(), config.checkpoint.lease_timeout_s
    )


def run_pretrain(cfg: Any) -> None:
    # Everything is validated before any process group, Ray worker or tensor exists.
    config = pretrain_config(cfg)
    if cfg.dry_run:
        from neoray.training.plan import format_plan

        print(format_plan(config, cfg.plan.tflops, cfg.plan.peak_tflops))
        return
    if cfg.launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={cfg.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    cluster = cluster_config(cfg)
    if cfg.launcher == "torchrun" or not (cluster.address or os.environ.get("RAY_ADDRESS")):
        check_precision(config.train.precision)  # the ranks run on this machine's devices
    job = worker_job(cfg, config, cfg.launcher)
    check_durable_locations(config.storage if config.checkpoint.enabled else None, job.tracking)
    check_outputs("pretrain", cfg)
    check_access(job.tracking)
    if cfg.launcher == "ray":
        run_on_ray(job, cluster)
    else:
        _single_process_environment()
        with run_lease(config) as lease:
            train(holding(job, lease))
