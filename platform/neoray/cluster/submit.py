"""Jobs on a Ray cluster through the Jobs API: submit `python jobs/<job>.py <overrides>` with
this project as the job's working directory, follow its logs, ask its status, stop it.

The project directory is uploaded (Ray caps a package at 512 MiB; outputs, data, checkpoints,
the virtual environment and git history are left out), and `platform/neoray` goes along as a
Python module for the driver and every worker. So the code that runs is the code submitted, on
any cluster whose nodes have the dependencies installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# Never uploaded (gitignore syntax, relative to the project root). Ray also honours .gitignore.
EXCLUDES = [
    "/.git",
    "/.venv",
    "/.neoray",
    "/runs",
    "/outputs",
    "/multirun",
    "/mlruns",
    "/mlruns.db",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    "/.pytest_cache",
    "/.ruff_cache",
    "*.pt",
    "*.safetensors",
    "*.bin",
    "*.idx",
]
# Settings a job keeps from the submitting shell (never credentials: a runtime environment is
# visible in the dashboard). Everything else comes from the cluster's environment.
FORWARDED_ENV = ("DS_ACCELERATOR",)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A job cannot be submitted as asked; the message says what to do."""


def submitted_job_id() -> str | None:
    """The submission id when this process runs in (or under) a job submitted through the Ray
    Jobs API, else None."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return None
    return json.loads(config).get("metadata", {}).get("job_submission_id")


def check_durable_locations(storage: Any = None, tracking: Any = None) -> None:
    """Refuse, inside a submitted job, a local storage root or an MLflow store given as a
    relative path: the job's working directory is Ray's temporary copy of the project, deleted
    by `neoray down`, and each new upload of the code is a new folder, so checkpoints and runs
    kept there are lost and a resubmitted run starts over. Outside a submitted job: nothing."""
    from neoray.config import ConfigError

    if submitted_job_id() is None:
        return
    where = "in a submitted Ray job the working directory is Ray's temporary copy of the project"
    if storage is not None and storage.kind == "local" and not Path(storage.root).is_absolute():
        raise ConfigError(
            f"storage.root={storage.root!r} is relative: {where}, so checkpoints there are lost. "
            "Use storage=s3 storage.bucket=<bucket> (the `neoray up` stack's bucket) or an "
            "absolute storage.root on a disk every node shares"
        )
    if tracking is not None and tracking.enabled and _relative_store(tracking.uri):
        raise ConfigError(
            f"tracking.uri={tracking.uri!r} is a relative path: {where}, so runs logged there are "
            "lost. Use tracking=server (MLFLOW_TRACKING_URI of the cluster, e.g. the `neoray up` "
            "stack's MLflow) or an absolute path"
        )


def _relative_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file store or SQLite file given by a relative path."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return not uri[len(scheme) :].startswith("/")
    return "://" not in uri and not Path(uri).is_absolute()


def cluster_address(address: str | None) -> str:
    """The Jobs API to use: `address`, RAY_ADDRESS, or the local stack of `neoray up` (whose
    token authentication is then set up for this process)."""
    from neoray.cluster.stack import running_stack

    if address or os.environ.get("RAY_ADDRESS"):
        return address or os.environ["RAY_ADDRESS"]
    stack = running_stack()
    if stack is None:
        raise SubmitError(
            "no Ray cluster: start the local one with `neoray up`, or pass --address "
            "http://<head>:8265 (or set RAY_ADDRESS)"
        )
    for key, value in stack.client_env().items():
        os.environ.setdefault(key, value)
    return stack.ray_dashboard


def client(address: str | None = None) -> Any:
    url = cluster_address(address)  # before importing Ray, which reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url)


def entrypoint(job: str, overrides: list[str], python: str = "python") -> str:
    script = PROJECT_ROOT / "jobs" / f"{job}.py"
    if not script.exists():
        jobs = sorted(p.stem for p in (PROJECT_ROOT / "jobs").glob("*.py"))
        raise SubmitError(f"no job {job!r}: choose one of {', '.join(jobs)}")
    return shlex.join([python, f"jobs/{job}.py", *overrides])


def runtime_env() -> dict[str, Any]:
    from neoray.code_version import code_version

    return {
        "working_dir": str(PROJECT_ROOT),
        "py_modules": [str(PROJECT_ROOT / "platform" / "neoray")],
        "excludes": EXCLUDES,
        "env_vars": {
            "NEORAY_CODE_VERSION": code_version(),
            **{key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
        },
    }


def submit(
    job: str, overrides: list[str], address: str | None = None, python: str = "python"
) -> str:
    """Submit `jobs/<job>.py` with Hydra `overrides`; returns the submission id."""
    command = entrypoint(job, overrides, python)
    return client(address).submit_job(
        entrypoint=command, runtime_env=runtime_env(), metadata={"neoray.job": job}
    )


def follow(submission_id: str, address: str | None = None) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while (final := status(submission_id, address)) not in TERMINAL:
        time.sleep(0.5)  # the log stream can close a moment before the status settles
    return final


def status(submission_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(submission_id).value)


def logs(submission_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(submission_id)


def stop(submission_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(submission_id)
