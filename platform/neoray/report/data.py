"""What a run left behind, in one place: its per-step rows and its MLflow run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from neoray.tracking import TrackingConfig, experiment_id, find_run, latest_per_step

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "checkpoint.step_"
EVAL_PREFIX = "eval/"


@dataclass
class RunData:
    run_name: str
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, one per step
    params: dict[str, str] = field(default_factory=dict)  # the config (redacted), from MLflow
    checkpoints: dict[int, str] = field(default_factory=dict)  # committed step -> URI
    # key -> (step, value), one per step: the latest logged (an evaluation may be redone)
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow run, when there is one


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line a crash cut short is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def collect(run_name: str, run_dir: Path, tracking: TrackingConfig) -> RunData:
    """Everything the report shows of `run_name`; parts that do not exist stay empty."""
    data = RunData(run_name, rows=read_rows(run_dir / "metrics.jsonl"))
    if not tracking.enabled:
        return data
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    run = find_run(client, experiment_id(client, tracking.experiment), run_name)
    if run is None:
        log.warning(
            "no MLflow run named %r in %s: the report shows metrics.jsonl only",
            run_name,
            tracking.uri,
        )
        return data
    data.run_id = run.info.run_id
    data.params = dict(run.data.params)
    data.checkpoints = {
        int(key[len(CHECKPOINT_TAG) :]): uri
        for key, uri in run.data.tags.items()
        if key.startswith(CHECKPOINT_TAG) and key[len(CHECKPOINT_TAG) :].isdigit()
    }
    for key in sorted(run.data.metrics):
        if key.startswith(EVAL_PREFIX):
            data.evals[key] = latest_per_step(client.get_metric_history(run.info.run_id, key))
    return data
