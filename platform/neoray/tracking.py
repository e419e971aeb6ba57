"""Experiment tracking in MLflow: one run per training run, found again by its name.

A run is identified by the tag `neoray.run_name` in the configured experiment, so a training
run that resumes from a checkpoint (a restart under the same name, Ray Train replacing a failed
worker) keeps logging into the run it started. A run that starts from no checkpoint under a
name already used (its checkpoints were deleted to start it afresh) gets a new MLflow run, so
that old and new metrics never share a step; the old one is kept, tagged
`neoray.superseded_by=<new run id>`, and lookups by name skip it. Its params are the flattened
job config with secrets redacted (`redact`, from `neoray.config`); its metrics are the
engine's per-step rows; each
committed checkpoint is a tag `checkpoint.step_<step:08d> = <uri>` plus a metric
`checkpoint_step` at that step, which is how evaluation finds checkpoints. Only global rank 0
creates a tracker.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neoray.config import ConfigError, flatten, redact, redact_text
from neoray.environment import temporary_environment

__all__ = [
    "RUN_NAME_TAG",
    "SUPERSEDED_BY_TAG",
    "MLflowTracker",
    "TrackingConfig",
    "find_run",
    "flatten",
    "latest_per_step",
    "metric_key",
    "ray_job_tags",
    "redact",
]

log = logging.getLogger(__name__)
RUN_NAME_TAG = "neoray.run_name"
SUPERSEDED_BY_TAG = "neoray.superseded_by"  # on a training run replaced by a fresh one
PARENT_TAG = "mlflow.parentRunId"  # set on nested (evaluation) runs
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
TAG_VALUE_LIMIT = 8000  # MLflow's limit on a tag value
BATCH_LIMIT = 100  # params per log_batch call
SEARCH_LIMIT = 1000  # runs of one name looked at: the training run and its evaluations


@dataclass
class TrackingConfig:
    """Where runs are logged. The embedded default is a SQLite file in the working directory;
    `tracking=server` points at an MLflow server shared by the cluster."""

    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "neoray"
    system_metrics: bool = True  # CPU, memory, disk, network (and GPU) of rank 0's node
    system_metrics_interval_s: float = 10.0
    # While MLflow is down, training goes on: rows wait in memory (the oldest dropped past this
    # many) and the end of the run waits this long for them to be logged.
    buffer_rows: int = 20_000
    flush_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.buffer_rows < 1:
            raise ConfigError(
                f"tracking.buffer_rows={self.buffer_rows} must be at least 1 (metric rows kept "
                "while MLflow is down)"
            )
        if self.flush_timeout_s < 0:
            raise ConfigError(
                f"tracking.flush_timeout_s={self.flush_timeout_s} must be >= 0 (seconds the end "
                "of a run waits for MLflow)"
            )


# What to fix when MLflow refuses a job for good, by its error code.
REFUSAL_FIXES = {
    "UNAUTHENTICATED": "the credentials are wrong or missing: check MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "PERMISSION_DENIED": "this user may not use the experiment: ask for access, or choose "
    "another tracking.experiment",
    "ENDPOINT_NOT_FOUND": "no MLflow tracking API answers at this address: check the host, port "
    "and path of tracking.uri",
}
CHECK_TIMEOUT_S = "10"  # seconds for the check's one request; MLflow down passes it anyway


def check_access(config: TrackingConfig) -> None:
    """Refuse a run that an MLflow server refuses for good (wrong password, wrong URL), before
    training starts, with the reason: once training runs, such a refusal turns tracking off for
    the whole run. One cheap authenticated request, made as the run makes it (MLflow's own
    client, so its credentials and TLS settings apply), without retries: looking up
    `tracking.experiment`. MLflow merely down (connection refused, timeouts, 5xx) passes:
    training goes on and logs once it is back. Only HTTP servers are asked; a local store has
    no credentials to get wrong."""
    if not config.enabled or not config.uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from neoray.tracking_queue import is_transient

    once = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": CHECK_TIMEOUT_S}
    try:
        with temporary_environment(**once):
            MlflowClient(tracking_uri=config.uri).get_experiment_by_name(config.experiment)
    except Exception as error:  # sorted by is_transient below
        if is_transient(error):
            reason = redact_text(str(error).splitlines()[0][:200])
            log.warning(
                "MLflow at %s could not be asked whether it accepts this run (%s); training "
                "starts anyway and logs once it answers",
                redact_text(config.uri),
                reason,
            )
            return
        code, answer = type(error).__name__, ""
        if isinstance(error, MlflowException):
            code, answer = error.error_code, f"HTTP {error.get_http_status_code()}, "
        raise ConfigError(
            f"tracking.uri={redact_text(config.uri)}: MLflow refuses this run ({answer}{code}): "
            f"{REFUSAL_FIXES.get(code, 'check tracking.uri and tracking.experiment')}. "
            f"It said: {redact_text(str(error).splitlines()[0][:300])}"
        ) from error


def metric_key(name: str) -> str:
    """`name` with every character MLflow refuses in a metric name (`^[/\\w.\\- ]*$`) made `_`."""
    return re.sub(r"[^/\w.\- ]", "_", name)


def ray_job_tags() -> dict[str, str]:
    """The Ray job this process belongs to: its submission id (set for a job submitted through
    the Jobs API) and Ray's job id (from RAY_JOB_ID or a connected Ray)."""
    from neoray.cluster.submit import submitted_job_id

    tags = {}
    submission = submitted_job_id()
    if submission:
        tags["ray.submission_id"] = submission
    job_id = os.environ.get("RAY_JOB_ID")
    if not job_id:
        try:
            import ray

            if ray.is_initialized():
                job_id = ray.get_runtime_context().get_job_id()
        except ImportError:
            pass
    if job_id:
        tags["ray.job_id"] = job_id
    return tags


def latest_per_step(history: Any) -> list[tuple[int, float]]:
    """(step, value) of a metric history, one per step, by step: the value logged last (by
    timestamp; of equal timestamps, the one later in the history). A (step, suite) evaluated
    again logs another point at the same step, and MLflow cannot delete the earlier one, so
    every reader of such a history takes the latest."""
    latest: dict[int, tuple[int, float]] = {}
    for point in history:
        if point.step not in latest or point.timestamp >= latest[point.step][0]:
            latest[point.step] = (point.timestamp, point.value)
    return [(step, value) for step, (_, value) in sorted(latest.items())]


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    """The live training run of `run_name`: the newest run of the experiment tagged
    `neoray.run_name=<run_name>` that is neither superseded by a fresh start nor nested under
    another run of that name (evaluation runs carry their training run's name; a sweep's trial
    runs are nested under the sweep's run, of another name); None if there is none yet."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = {_quoted(run_name)}",
        order_by=["attributes.start_time ASC"],
        max_results=SEARCH_LIMIT,
    )
    same_name = {run.info.run_id for run in runs}
    live = [
        run
        for run in runs
        if run.data.tags.get(PARENT_TAG) not in same_name and SUPERSEDED_BY_TAG not in run.data.tags
    ]
    return live[-1] if live else None


def experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


class MLflowTracker:
    """The MLflow run of one training run; a TrainingObserver (on_metrics, on_checkpoint,
    on_checkpoint_failed, on_rollback, on_start). Use it as a context manager: leaving the block ends the run as
    FINISHED, or FAILED on an exception.

    `fresh`: the training run starts from no checkpoint, so an existing run of that name is
    superseded by a new one rather than continued. Params already logged (by the first attempt
    of a resumed run) keep their values, as MLflow wants; a param whose value changed on resume
    (say, a longer `train.steps`) is recorded as tag `neoray.param.<key>` instead.
    """

    def __init__(
        self,
        config: TrackingConfig,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        fresh: bool = False,
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=config.uri)
        experiment = experiment_id(self.client, config.experiment)
        found = find_run(self.client, experiment, run_name)
        self.resumed = found is not None and not fresh
        # the run id a fresh start replaced
        self.superseded: str | None = found.info.run_id if found and fresh else None
        if self.resumed:
            run = found
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment, run_name=run_name, tags={RUN_NAME_TAG: run_name}
            )
        if self.superseded is not None:  # tagged once its successor exists, so it names one
            self.client.set_tag(self.superseded, SUPERSEDED_BY_TAG, run.info.run_id)
        self.run_id: str = run.info.run_id
        self._log_params(redact(flatten(params or {})), run.data.params)
        self.set_tags(tags or {})
        self._monitor = None
        if config.system_metrics:
            self._monitor = _system_metrics_monitor(
                self.run_id, config.system_metrics_interval_s, config.uri, self.resumed
            )

    def _log_params(self, params: Mapping[str, Any], logged: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new: list[Param] = []
        changed: dict[str, str] = {}
        for key, value in params.items():
            text = str(value)[:PARAM_VALUE_LIMIT]
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:
                changed[f"neoray.param.{key}"] = text
        for start in range(0, len(new), BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=new[start : start + BATCH_LIMIT])
        self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:TAG_VALUE_LIMIT]) for key, value in tags.items()]
        for start in range(0, len(items), BATCH_LIMIT):
            self.client.log_batch(self.run_id, tags=items[start : start + BATCH_LIMIT])

    def log_metrics(self, values: Mapping[str, Any], step: int) -> None:
        """Numeric values (booleans as 0/1) at `step`; None and non-numbers are left out."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        metrics = [
            Metric(metric_key(key), float(value), timestamp, step)
            for key, value in values.items()
            if isinstance(value, int | float)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_metrics(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        self.log_metrics({key: value for key, value in row.items() if key != "step"}, step)

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        self.set_tags({f"checkpoint.step_{step:08d}": uri})
        self.log_metrics({"checkpoint_step": step, "checkpoint_bytes": size_bytes}, step)

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        self.set_tags({f"checkpoint.failed.step_{step:08d}": error})

    def on_rollback(self, step: int, count: int, seconds: float, description: str) -> None:
        """Metrics `train/rollback` (the run's rollbacks so far) and `train/rollback_s` (its
        time) at the spike's step, and tag `neoray.rollback.<count>` saying what was done."""
        self.log_metrics({"train/rollback": count, "train/rollback_s": seconds}, step)
        self.set_tags({f"neoray.rollback.{count}": description})

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        """A resumed run logs the rows of steps before `resumed_from` that this run lacks: a
        crashed process loses the rows still queued for MLflow, and the steps before its
        checkpoint are not trained again. Steps from `resumed_from` on are trained again and
        logged as they come. (Whether the run is new was decided when it was opened.)"""
        if resumed_from is None:
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        missing = [
            row for row in earlier_rows if row["step"] < resumed_from and row["step"] not in logged
        ]
        for row in missing:
            self.on_metrics(row)
        if missing:
            log.info(
                "MLflow run %s lacked the metrics of %d steps before step %d (a crash kept them "
                "from it); logged them from metrics.jsonl",
                self.run_id,
                len(missing),
                resumed_from,
            )

    def close(self, failed: bool = False) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)


def _system_metrics_monitor(run_id: str, interval_s: float, uri: str, resume: bool) -> Any:
    """MLflow's sampler of CPU/memory/disk/network (GPU when present, via pynvml) for this node,
    logged as `system/...` metrics every `interval_s` seconds from a background thread."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri
    )
    monitor.start()
    return monitor
