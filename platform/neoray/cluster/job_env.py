"""Credentials and service settings that a job's Ray workers take from the job, on every node.

A worker process has the environment of the node it runs on, which on a cluster is not the
submitting process's: a node started without AWS credentials cannot read the job's bucket. A
runtime environment would carry them, but Ray shows every runtime environment in its
dashboard and state API. So the driver puts these variables into the object store once
(`share`, a small object owned by the driver: nothing lists its value) and each task or actor
receives the reference as an argument, applying it (`adopt`) before it touches S3 or MLflow.
Only variables set in the driver travel; a node's own settings (an instance role, its own
profile) stay in force where the driver has none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from neoray.storage import S3_SETTINGS

T = TypeVar("T")

JOB_ENV = (
    *S3_SETTINGS,
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def job_env() -> dict[str, str]:
    """The variables of JOB_ENV this process has."""
    return {name: os.environ[name] for name in JOB_ENV if name in os.environ}


def share() -> Any:
    """This job's variables as an object in Ray's object store (Ray connected); pass the
    reference to tasks and actors, which `adopt` it."""
    import ray

    return ray.put(job_env())


def adopt(env: dict[str, str] | Any) -> None:
    """Set the job's variables in this worker process (a dict, or the reference `share`
    returned). The process serves only this job, so they stay for its later tasks too."""
    if not isinstance(env, dict):
        import ray

        env = ray.get(env)
    os.environ.update(env)


def call_with(env: dict[str, str], function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` after adopting `env`: the body of a Ray task that needs the job's
    environment (`ray.remote(call_with).remote(share(), function, ...)`; Ray resolves the
    reference, a top-level argument, to the dict)."""
    adopt(env)
    return function(*args)


class JobTask:
    """`function` as a Ray task that runs with the job's environment on whichever node it
    lands, named after `function` in the dashboard. `options` are Ray's (num_cpus,
    scheduling_strategy, ...). Create it once Ray is connected."""

    def __init__(self, function: Callable[..., Any], **options: Any) -> None:
        import ray

        self.function = function
        self.env = share()
        self.task = ray.remote(call_with).options(name=function.__name__, **options)

    def remote(self, *args: Any) -> Any:
        """Submit `function(*args)`; returns its ObjectRef."""
        return self.task.remote(self.env, self.function, *args)
