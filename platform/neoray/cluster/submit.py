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


# What each job writes to a local folder that outlives it, by config field: a submitted job's
# working directory is Ray's temporary copy of the project, deleted by `neoray down` and new at
# every upload, so a relative path there loses what a rerun needs. Caches (`cache_dir`) and
# Hydra's own log folders are left out: a rerun makes them again.
WRITTEN_PATHS: dict[str, dict[str, str]] = {
    "pretrain": {
        "run_dir": "metrics.jsonl, staged checkpoints and Ray Train's state",
        "checkpoint.staging_dir": "staged checkpoints (a restarted run commits them)",
        "cluster.storage_path": "Ray Train's state",
    },
    "sweep": {
        "sweep_dir": "the sweep's Tune state (a rerun continues from it) and its trials' runs"
    },
    # A sweep's trials are pretrain runs whose run_dir the sweep puts under sweep_dir; their
    # config has the sweep file's `fixed` overrides, which the sweep's own config lacks.
    "sweep trials": {
        "checkpoint.staging_dir": "the trials' staged checkpoints",
        "cluster.storage_path": "Ray Train's state",
    },
    "report": {"output": "the report"},
    "export": {"output": "the exported model"},
    "memorization": {"output_dir": "the memorization records and tables"},
    "token_report": {"output_dir": "the token report"},
    "preprocess": {"output_prefix": "the tokenized dataset"},
    "train_tokenizer": {"output": "the tokenizer"},
    "mirror_eval_data": {"output": "the evaluation data mirror"},
}
# Jobs that write checkpoints, leases or ledgers under storage.root (others only read there).
STORAGE_WRITERS = ("pretrain", "sweep trials", "eval_watch")
WHERE = "in a submitted Ray job the working directory is Ray's temporary copy of the project"


def check_durable_locations(storage: Any = None, tracking: Any = None) -> None:
    """Refuse, inside a submitted job, a local storage root or an MLflow store given as a
    relative path: the job's working directory is Ray's temporary copy of the project, deleted
    by `neoray down`, and each new upload of the code is a new folder, so checkpoints and runs
    kept there are lost and a resubmitted run starts over. Outside a submitted job: nothing."""
    from neoray.config import ConfigError

    if submitted_job_id() is None:
        return
    if storage is not None and storage.kind == "local" and not Path(storage.root).is_absolute():
        raise ConfigError(_relative_root(storage.root))
    if tracking is not None and tracking.enabled and _relative_store(tracking.uri):
        raise ConfigError(
            f"tracking.uri={tracking.uri!r} is a relative path: {WHERE}, so runs logged there are "
            "lost. Use tracking=server (MLFLOW_TRACKING_URI of the cluster, e.g. the `neoray up` "
            "stack's MLflow) or an absolute path"
        )


def _relative_root(root: str) -> str:
    return (
        f"storage.root={root!r} is relative: {WHERE}, so checkpoints there are lost. "
        "Use storage=s3 storage.bucket=<bucket> (the `neoray up` stack's bucket) or an "
        "absolute storage.root on a disk every node shares"
    )


def relative_outputs(job: str, cfg: Any) -> list[str]:
    """What is wrong with the folders job `job` (its composed config `cfg`) would write to when
    submitted: one message per field of WRITTEN_PATHS, or a local storage root, given as a
    relative path. A field that is unset, or cannot be resolved here (it needs the job's
    environment), is left to the job."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def value(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except OmegaConfBaseException:
            return None

    problems = []
    for key, kept in WRITTEN_PATHS.get(job, {}).items():
        path = value(key)
        if isinstance(path, str) and "://" not in path and not Path(path).is_absolute():
            problems.append(
                f"{key}={path!r} is relative: {WHERE}, deleted by `neoray down`, so {kept} "
                f"would be lost. Give {key} an absolute path on a disk the nodes keep"
            )
    root = value("storage.root")
    if (
        job in STORAGE_WRITERS
        and value("storage.kind") == "local"
        and value("checkpoint.enabled") is not False
        and isinstance(root, str)
        and not Path(root).is_absolute()
    ):
        problems.append(_relative_root(root))
    return problems


def check_outputs(job: str, cfg: Any) -> None:
    """Inside a submitted job, refuse the relative folders of `relative_outputs` (a job
    submitted other than by `neoray submit`, e.g. a KubeRay RayJob, was not checked before)."""
    from neoray.config import ConfigError

    if submitted_job_id() is not None and (problems := relative_outputs(job, cfg)):
        raise ConfigError("; ".join(problems))


def check_submission(job: str, overrides: list[str]) -> None:
    """Refuse, before anything is uploaded, a job whose config (composed here as the job would
    compose it) writes to a relative folder. The MLflow store is checked by the job itself: it
    comes from the cluster's environment (MLFLOW_TRACKING_URI), not the submitting shell's."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base=None):
            cfg = compose(config_name=job, overrides=overrides)
            parts = [job]
            if job == "sweep":  # its config includes pretrain's: with `fixed`, the trials' too
                cfg = compose(
                    config_name=job, overrides=[*(cfg.sweep.get("fixed") or []), *overrides]
                )
                parts.append("sweep trials")
    except HydraException as err:
        raise SubmitError(f"{job} {shlex.join(overrides)}: {err}") from err
    if problems := [problem for part in parts for problem in relative_outputs(part, cfg)]:
        raise SubmitError("\n".join(problems))


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
    from neoray.cluster.ray_start import private_token

    private_token()  # the token file it sends, this user's alone
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
    check_submission(job, overrides)
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
