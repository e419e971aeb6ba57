"""One trial of a sweep: the function Ray Tune runs per sampled configuration.

As Ray Train V2 expects inside Tune, the trial is only a driver: it composes the trial's
pretrain config (the sweep's base overrides, then the sampled values, then its own run name
and folder) and starts the usual Ray Train run of it, whose workers report each validation
to Ray Train; Ray Tune's callback forwards rank 0's report to this trial, where a scheduler
such as ASHA may stop it. A worker that dies is replaced by Ray Train and the run resumes
from its last committed checkpoint, as any pretraining run does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neoray.sweep.space import override
from neoray.training.config import compose_pretrain


@dataclass
class TrialContext:
    """What every trial of a sweep shares (sent to the trial actors with the function)."""

    sweep: str
    sweep_dir: str  # absolute: trials write under <sweep_dir>/trials/<run name>
    conf_dir: str
    base_overrides: list[str] = field(default_factory=list)
    cwd: str = "."
    parent_run_id: str | None = None  # the sweep's MLflow run


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_overrides(context: TrialContext, values: dict[str, Any], run_name: str) -> list[str]:
    """The pretrain overrides of one trial: base, sampled, then its run name and folder."""
    return [
        *context.base_overrides,
        *(override(key, value) for key, value in values.items()),
        f"run_name={run_name}",
        f"run_dir={context.sweep_dir}/trials/{run_name}",
    ]


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune's trainable: `config["overrides"]` holds this trial's sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from neoray.cluster.ray_train import enter_job_directory
    from neoray.tracking import PARENT_TAG
    from neoray.training.config import pretrain_config
    from neoray.training.job import cluster_config, run_on_ray, worker_job

    enter_job_directory(context.cwd)  # relative paths in the config mean the sweep's directory
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(context.sweep, trial_id)
    cfg = compose_pretrain(
        context.conf_dir, trial_overrides(context, config["overrides"], run_name)
    )
    tags = {"neoray.sweep": context.sweep, "neoray.sweep.trial": trial_id}
    if context.parent_run_id:
        tags[PARENT_TAG] = context.parent_run_id
    job = worker_job(cfg, pretrain_config(cfg), "ray", tags, report_validation=True)
    # The trial owns its run across its restarts (a failed trial retried, a sweep continued).
    owner = f"tune trial {context.sweep}/{trial_id}"
    run_on_ray(job, cluster_config(cfg), callbacks=(TuneReportCallback(),), owner=owner)
