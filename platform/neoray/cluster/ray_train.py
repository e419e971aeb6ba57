"""Running the per-worker training function on Ray: Ray Train's TorchTrainer, one worker per
rank of the tp x pp x dp layout.

Ray Train creates the torch.distributed process group (gloo on CPU, NCCL on GPU) and sets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every worker,
so the training function runs as under torchrun and DeepSpeed reuses that group. When a worker
fails, Ray Train restarts the whole group (up to `max_failures` times); the training function
then resumes from the latest committed checkpoint by itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from neoray.config import ConfigError

T = TypeVar("T")

# Environment that workers need from the submitting process (never credentials: a runtime
# environment is visible in the dashboard).
FORWARDED_ENV = ("DS_ACCELERATOR", "NEORAY_CODE_VERSION")
# Ray Train routes a worker's print() to its logger and, where stdout is wrapped (as in every
# Ray worker), to stdout as well: each progress line would reach the driver twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass
class ClusterConfig:
    """Where and how the training workers run."""

    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, else a local Ray
    use_gpu: bool = False  # one GPU per worker and NCCL; False: CPU workers and gloo
    cpus_per_worker: float = 1
    max_failures: int = 3  # worker group restarts before the run fails; -1: no limit
    storage_path: str | None = None  # Ray Train's own run state; None: <run_dir>/ray

    def __post_init__(self) -> None:
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cluster.cpus_per_worker={self.cpus_per_worker} must be > 0")
        if self.max_failures < -1:
            raise ConfigError(
                f"cluster.max_failures={self.max_failures}: use -1 (no limit), 0 or more"
            )


def connect(cluster: ClusterConfig, num_workers: int) -> bool:
    """Join `cluster.address` or RAY_ADDRESS, or start a local Ray on 127.0.0.1 with enough
    logical CPUs for the workers. Returns True when a local Ray was started (stop it after)."""
    from neoray.cluster.ray_start import start_or_join

    return start_or_join(
        cluster.address,
        num_cpus=max(os.cpu_count() or 1, int(num_workers * cluster.cpus_per_worker + 0.999)),
        use_gpu=cluster.use_gpu,
        # Ray Train's placement-group cleaner asks the state API, which the dashboard serves.
        dashboard=True,
    )


def enter_job_directory(cwd: str) -> None:
    """Process-wide, and the only place that changes a worker's directory: Ray starts workers
    in a directory of its own, while relative paths in the config (data, run_dir, storage root)
    mean the submitting process's directory `cwd`, where the node has it. Called first by the
    worker entry points (a Ray Train worker, a Tune trial) and nowhere else."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


def _run_worker(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker's entry point."""
    enter_job_directory(loop_config["cwd"])
    loop_config["function"](loop_config["argument"])


def run_workers(
    function: Callable[[T], None],
    argument: T,
    *,
    num_workers: int,
    cluster: ClusterConfig,
    name: str,
    default_storage: str,
    callbacks: tuple = (),
) -> None:
    """Call `function(argument)` on `num_workers` Ray Train workers forming one process group;
    raise if the run fails after `cluster.max_failures` restarts. `callbacks` are Ray Train
    callbacks (a sweep's trial passes Ray Tune's, which forwards the workers' reports)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    env = WORKER_ENV | {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    started_local = connect(cluster, num_workers)
    trainer = TorchTrainer(
        _run_worker,
        train_loop_config={"function": function, "argument": argument, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(cluster.storage_path or default_storage).resolve()),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks),
        ),
    )
    try:
        trainer.fit()
    finally:
        if started_local:
            import ray

            ray.shutdown()
