"""Running the per-worker training function on Ray: Ray Train's TorchTrainer, one worker per
rank of the tp x pp x dp layout.

Ray Train creates the torch.distributed process group (gloo on CPU, NCCL on GPU) and sets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in every worker,
so the training function runs as under torchrun and DeepSpeed reuses that group. When a worker
fails, Ray Train restarts the whole group (up to `max_failures` times); the training function
then resumes from the latest committed checkpoint by itself.

On several nodes the workers are placed by `placement_strategy` (SPREAD / STRICT_SPREAD: one
worker per node where possible). When a node is lost, its workers die with it and the group is
restarted at the same size as soon as the cluster can place it again (a replacement node
joins); if it cannot within `placement_timeout_s`, the run stops with `PlacementError`, which
says how many workers the live nodes can hold (with `cluster.elastic`, the training job then
continues on fewer data-parallel ranks: `neoray.training.job.run_on_ray`). Credentials reach
workers on every node as an object (`neoray.cluster.job_env`), never through the runtime
environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from neoray.config import ConfigError

T = TypeVar("T")

# Environment that workers need from the submitting process (never credentials: a runtime
# environment is visible in the dashboard; those travel as an object, see job_env).
FORWARDED_ENV = ("DS_ACCELERATOR", "NEORAY_CODE_VERSION")
# Ray Train routes a worker's print() to its logger and, where stdout is wrapped (as in every
# Ray worker), to stdout as well: each progress line would reach the driver twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray Train's own wait for a worker group's placement group (read by its controller, to which
# Ray Train passes this variable from the driver's environment).
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class PlacementError(RuntimeError):
    """The cluster could not place the run's workers in time (too few nodes or resources);
    `placeable` is how many workers its live nodes could hold."""

    def __init__(self, message: str, placeable: int) -> None:
        super().__init__(message)
        self.placeable = placeable

    def __reduce__(self) -> tuple:
        # Ray pickles a trial's error to hand it to Tune; the default rebuilds it from the
        # message alone and fails on the missing `placeable`.
        return (PlacementError, (str(self), self.placeable))


@dataclass
class ClusterConfig:
    """Where and how the training workers run."""

    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, else a local Ray
    use_gpu: bool = False  # one GPU per worker and NCCL; False: CPU workers and gloo
    cpus_per_worker: float = 1
    max_failures: int = 3  # worker group restarts before the run fails; -1: no limit
    storage_path: str | None = None  # Ray Train's own run state; None: <run_dir>/ray
    placement_strategy: str = "PACK"  # Ray placement group strategy of the worker group
    placement_timeout_s: float | None = 600.0  # wait for room for every worker; None: forever
    elastic: bool = False  # when the workers cannot be placed, continue with a smaller dp

    def __post_init__(self) -> None:
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cluster.cpus_per_worker={self.cpus_per_worker} must be > 0")
        if self.max_failures < -1:
            raise ConfigError(
                f"cluster.max_failures={self.max_failures}: use -1 (no limit), 0 or more"
            )
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"cluster.placement_strategy={self.placement_strategy!r}: choose one of "
                f"{', '.join(PLACEMENT_STRATEGIES)} (SPREAD / STRICT_SPREAD: one worker per node)"
            )
        if self.placement_timeout_s is not None and self.placement_timeout_s <= 0:
            raise ConfigError(
                f"cluster.placement_timeout_s={self.placement_timeout_s}: use seconds > 0, "
                "or null to wait without limit"
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
    from neoray.cluster import job_env

    enter_job_directory(loop_config["cwd"])
    job_env.adopt(loop_config["env"])
    loop_config["function"](loop_config["argument"])


def placeable_workers(cluster: ClusterConfig) -> int:
    """How many of the run's workers the live nodes could hold, each node by itself (one per
    node under STRICT_SPREAD), whatever else runs there now."""
    import ray

    fits = []
    for node in ray.nodes():
        if node["Alive"]:
            resources = node["Resources"]
            fit = int(resources.get("CPU", 0) // cluster.cpus_per_worker)
            if cluster.use_gpu:
                fit = min(fit, int(resources.get("GPU", 0)))
            fits.append(min(fit, 1) if cluster.placement_strategy == "STRICT_SPREAD" else fit)
    return sum(fits)


def placement_error(cluster: ClusterConfig, num_workers: int) -> PlacementError:
    """Why the run stopped when Ray Train could not place its workers, and what to do."""
    placeable = placeable_workers(cluster)
    return PlacementError(
        f"Ray could not place the run's {num_workers} workers "
        f"({cluster.cpus_per_worker} CPU{' and 1 GPU' if cluster.use_gpu else ''} each, "
        f"placement {cluster.placement_strategy}) within cluster.placement_timeout_s="
        f"{cluster.placement_timeout_s}: the cluster's live nodes hold {placeable} (a node was "
        "lost, or never joined). Start a node (`ray start --address=<head>`) and run again, or "
        "let the run wait longer (cluster.placement_timeout_s); it resumes from its last "
        "committed checkpoint. With cluster.elastic=true the run continues on fewer "
        "data-parallel ranks instead, its checkpoint resharded.",
        placeable,
    )


@contextmanager
def _start_timeout(seconds: float | None) -> Iterator[None]:
    """Ray Train's controller waits `seconds` for a worker group's placement (None: its own
    default, retried without limit); it takes the setting from this process's environment
    when the run starts."""
    previous = os.environ.get(START_TIMEOUT_VARIABLE)
    if seconds is not None:
        os.environ[START_TIMEOUT_VARIABLE] = str(seconds)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_VARIABLE, None)
        else:
            os.environ[START_TIMEOUT_VARIABLE] = previous


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
    from ray.train import ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from neoray.cluster import job_env

    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    env = WORKER_ENV | {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    started_local = connect(cluster, num_workers)
    trainer = TorchTrainer(
        _run_worker,
        train_loop_config={
            "function": function,
            "argument": argument,
            "cwd": os.getcwd(),
            "env": job_env.share(),  # credentials, as an object: see neoray.cluster.job_env
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cluster.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(cluster.storage_path or default_storage).resolve()),
            failure_config=FailureConfig(
                max_failures=cluster.max_failures,
                # A placement that timed out is final (retried without limit otherwise).
                controller_failure_limit=-1 if cluster.placement_timeout_s is None else 0,
            ),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks),
        ),
    )
    try:
        with _start_timeout(cluster.placement_timeout_s):
            trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise placement_error(cluster, num_workers) from err
        raise
    finally:
        if started_local:
            import ray

            ray.shutdown()
