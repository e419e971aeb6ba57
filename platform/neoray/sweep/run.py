"""`jobs/sweep.py`: check the sweep, run it with Ray Tune, record what it found.

Everything that can be wrong in the sweep is refused before any trial starts: the space's
keys and distributions, each key's extreme values as a pretrain config, the metric (one the
runs report at validation), the trials' token files and checkpoint storage as seen from where
the sweep runs (`preflight`), and whether the cluster can place `max_concurrent_trials`
trials. A sweep whose every trial failed with the same error ends with that error.
Tune keeps the sweep's state under `<sweep_dir>/tune`: running the same command again after
the driver died continues it, without running finished trials again.

MLflow gets one run for the sweep (`<name>.sweep`) and, nested under it, each trial's own
training run, marked completed (FINISHED), stopped early (KILLED) or failed (FAILED) at the
end; the sweep's run holds the best trial's values, its metric, `best.yaml` and a plot.

A sweep with a `proxy` trains its trials on a narrow copy of the target model under muP, and
`best.yaml`'s command trains the target (`neoray.sweep.transfer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from neoray.cluster.submit import check_durable_locations, check_outputs
from neoray.config import ConfigError, dataclass_from_config
from neoray.sweep.config import SweepConfig, sweep_config
from neoray.sweep.outcome import (
    MLFLOW_STATUS,
    TrialOutcome,
    best_trial,
    common_failure,
    plot,
    trial_outcome,
    write_best,
)
from neoray.sweep.preflight import check_reachable
from neoray.sweep.space import check_keys, corners, override, tune_space
from neoray.sweep.transfer import target_overrides, trial_base_overrides
from neoray.sweep.trial import TrialContext, run_trial, trial_run_name
from neoray.tracking import (
    MLflowTracker,
    TrackingConfig,
    check_access,
    experiment_id,
    find_run,
    metric_key,
)
from neoray.training.config import PretrainConfig, compose_pretrain, pretrain_config
from neoray.training.job import cluster_config

# What a trial's driver process takes (Python, Ray Train's controller); reserving it also makes
# the trial's resource request non-empty when it asks for no CPU, which Ray requires.
TRIAL_DRIVER_MEMORY = 512 * 2**20
# Seconds a trial that the scheduler stopped gets to end by itself before Tune kills its driver
# (and with it the trial's Ray Train run). Tune's default, 600 s, lets a stopped trial whose
# driver is still waiting on its run hold the run's workers, and the sweep, for ten minutes.
STOPPED_TRIAL_GRACE_S = 20
TRIAL_CLEANUP_VARIABLE = "TUNE_FORCE_TRIAL_CLEANUP_S"


class SweepFailed(RuntimeError):
    """Every trial failed, with the same error: the sweep ends with it."""


@dataclass
class SweepResult:
    sweep: SweepConfig
    outcomes: list[TrialOutcome]
    best: TrialOutcome | None
    command: str | None  # trains the best configuration


def reported_metrics(config: PretrainConfig) -> list[str]:
    """What a run reports at each validation, and so what a sweep can select on."""
    from neoray.training.config import SyntheticDataConfig

    components = (
        ["synthetic"] if isinstance(config.data, SyntheticDataConfig) else config.data.components
    )
    return ["loss", "val/loss", "val/ppl", *(f"val/{name}/loss" for name in components)]


def check_sweep(
    sweep: SweepConfig, conf_dir: str, base_overrides: list[str]
) -> tuple[DictConfig, PretrainConfig, list[PretrainConfig]]:
    """The base pretrain config (Hydra's and typed), once the whole sweep is known to be
    runnable, and the configs of the space's extreme values."""
    base_cfg = compose_pretrain(conf_dir, base_overrides)
    try:
        base = pretrain_config(base_cfg)
    except ConfigError as err:
        if sweep.proxy is None:
            raise
        raise ConfigError(f"sweep.proxy: the trials' model: {err}") from err
    check_keys(sweep.space, base_cfg, conf_dir)
    tune_space(sweep.space)  # the distributions and their arguments
    extremes = []
    for key, values in corners(sweep.space).items():
        for value in values:
            try:
                extremes.append(
                    pretrain_config(
                        compose_pretrain(conf_dir, [*base_overrides, override(key, value)])
                    )
                )
            except Exception as err:  # a Hydra error (an unknown group option) or ConfigError
                raise ConfigError(f"sweep.space.{key}={value!r}: {err}") from err
    if not base.train.eval_interval:
        raise ConfigError(
            f"sweep.metric={sweep.metric!r}: runs report it at validation, which "
            "train.eval_interval=0 turns off; set train.eval_interval (e.g. 50)"
        )
    reported = reported_metrics(base)
    if sweep.metric not in reported:
        raise ConfigError(
            f"sweep.metric={sweep.metric!r}: the runs never report it; choose one of "
            f"{', '.join(reported)}"
        )
    return base_cfg, base, extremes


def check_target(conf_dir: str, target: list[str]) -> None:
    """A sweep with a proxy: the target run it tunes is itself a valid pretrain config."""
    try:
        pretrain_config(compose_pretrain(conf_dir, target))
    except Exception as err:  # a Hydra error or ConfigError
        raise ConfigError(f"sweep.proxy: the target model (trained by best.yaml): {err}") from err


def check_capacity(sweep: SweepConfig, base: PretrainConfig, base_cfg: DictConfig) -> None:
    """Refuse (rather than wait forever) when the cluster cannot place the concurrent trials:
    each needs its Ray Train workers, all at once, plus its driver."""
    import ray

    cluster = cluster_config(base_cfg)
    workers = base.parallel.world_size
    needs = {"CPU": workers * cluster.cpus_per_worker + sweep.trial_cpus}
    if cluster.use_gpu:
        needs["GPU"] = workers
    available = ray.cluster_resources()
    for resource, per_trial in needs.items():
        have = available.get(resource, 0)
        if per_trial * sweep.max_concurrent_trials > have:
            fits = int(have // per_trial) if per_trial else 0
            raise ConfigError(
                f"sweep.max_concurrent_trials={sweep.max_concurrent_trials}: each trial needs "
                f"{per_trial:g} {resource} ({workers} workers) and the cluster has {have:g}: "
                + (
                    f"set sweep.max_concurrent_trials={fits}"
                    if fits
                    else "give the cluster more, or make the trial smaller (parallel.*)"
                )
            )


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # outcome.trial_outcome reads the trial id back from the folder


def _fit(tuner: Any) -> Any:
    """`tuner.fit()` with Tune's grace for stopped trials set to STOPPED_TRIAL_GRACE_S (Tune
    reads it from the environment; it is restored afterwards, unless the user had set it)."""
    previous = os.environ.get(TRIAL_CLEANUP_VARIABLE)
    if previous is None:
        os.environ[TRIAL_CLEANUP_VARIABLE] = str(STOPPED_TRIAL_GRACE_S)
    try:
        return tuner.fit()
    finally:
        if previous is None:
            os.environ.pop(TRIAL_CLEANUP_VARIABLE, None)


def reuse_trial_actors(sweep: SweepConfig) -> bool:
    """Whether a trial's driver process is kept for the next trial (Tune's `reuse_actors`):
    a new one costs a Ray worker's start and its imports of Ray Tune, torch and neoray, a
    few seconds of each trial. Only under FIFO, where every trial ends by itself: a trial that
    ASHA stopped may still be waiting on its Ray Train run, and Tune would fail the next
    trial that it handed the busy process."""
    return sweep.scheduler.name == "fifo"


def _tuner(sweep: SweepConfig, context: TrialContext, storage: Path) -> Any:
    """A new Tuner, or the sweep's own restored when its state exists (the driver died)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"CPU": sweep.trial_cpus, "memory": TRIAL_DRIVER_MEMORY},
    )
    path = storage / "tune"
    if tune.Tuner.can_restore(str(path)):
        print(f"continuing sweep {sweep.name!r} from {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    if sweep.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="trained_steps",
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
            max_t=10**12,  # trials end themselves at train.steps
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={"overrides": tune_space(sweep.space)},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            # The generator limits concurrency itself: Tune ignores `max_concurrent_trials`
            # when it is given a search generator (and trial drivers ask for no CPU, so
            # nothing else would hold the other trials back).
            search_alg=BasicVariantGenerator(
                random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials
            ),
            num_samples=sweep.num_samples,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=reuse_trial_actors(sweep),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures),
        ),
    )


def _parent_run(tracking: TrackingConfig, sweep: SweepConfig, base_overrides: list[str]):
    params = {"sweep": dataclasses.asdict(sweep), "base_overrides": " ".join(base_overrides)}
    return MLflowTracker(
        dataclasses.replace(tracking, system_metrics=False),
        f"{sweep.name}.sweep",
        params,
        {"neoray.sweep": sweep.name},
    )


def _record_trials(tracking: TrackingConfig, sweep: SweepConfig, outcomes: list[TrialOutcome]):
    """Mark each trial's MLflow run with how it ended (a stopped trial's workers were killed
    before they could)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    experiment = experiment_id(client, tracking.experiment)
    for outcome in outcomes:
        run = find_run(client, experiment, trial_run_name(sweep.name, outcome.trial_id))
        if run is None:  # failed before its rank 0 started tracking
            continue
        client.set_tag(run.info.run_id, "neoray.sweep.status", outcome.status)
        client.set_terminated(run.info.run_id, MLFLOW_STATUS[outcome.status])


def run_sweep(cfg: DictConfig, command_line: list[str], conf_dir: str) -> SweepResult:
    """Run (or continue) the sweep of `cfg.sweep`; every trial's pretrain config is composed
    from the sweep's `fixed` overrides, then `command_line`'s, then its sampled values."""
    from neoray.cluster.ray_start import start_or_join

    sweep = sweep_config(cfg.sweep)
    target = target_overrides(sweep.proxy, [*sweep.fixed, *command_line])
    base_overrides = trial_base_overrides(sweep.proxy, [*sweep.fixed, *command_line])
    if sweep.proxy is not None:
        check_target(conf_dir, target)
    base_cfg, base, extremes = check_sweep(sweep, conf_dir, base_overrides)
    tracking = dataclass_from_config(TrackingConfig, base_cfg.get("tracking"), "tracking")
    check_durable_locations(base.storage if base.checkpoint.enabled else None, tracking)
    check_outputs("sweep", cfg)
    check_outputs("sweep trials", base_cfg)
    check_reachable([base, *extremes])
    check_access(tracking)
    storage = Path(cfg.sweep_dir).resolve()
    cluster = cluster_config(base_cfg)
    started = start_or_join(cluster.address, use_gpu=cluster.use_gpu, dashboard=True)
    try:
        check_capacity(sweep, base, base_cfg)
        parent_run = _parent_run(tracking, sweep, base_overrides) if tracking.enabled else None
        with parent_run or contextlib.nullcontext() as parent:
            context = TrialContext(
                sweep=sweep.name,
                sweep_dir=str(storage),
                conf_dir=conf_dir,
                base_overrides=list(base_overrides),
                cwd=os.getcwd(),
                parent_run_id=parent.run_id if parent else None,
            )
            results = _fit(_tuner(sweep, context, storage))
            outcomes = [trial_outcome(result, sweep.metric) for result in results]
            result = _summarize(sweep, outcomes, target, storage)
            if parent is not None:
                _record_trials(tracking, sweep, outcomes)
                _log_summary(parent, sweep, result, storage)
            if (error := common_failure(outcomes)) is not None:
                raise SweepFailed(f"every trial of sweep {sweep.name!r} failed: {error}")
            return result
    finally:
        if started:
            import ray

            ray.shutdown()


def _summarize(
    sweep: SweepConfig, outcomes: list[TrialOutcome], target: list[str], storage: Path
) -> SweepResult:
    best = best_trial(outcomes, sweep.mode)
    command = write_best(storage / "best.yaml", best, sweep, target) if best else None
    plot(outcomes, sweep, storage / "sweep.png")
    return SweepResult(sweep, outcomes, best, command)


def _log_summary(parent: MLflowTracker, sweep: SweepConfig, result: SweepResult, storage: Path):
    counts = {}
    for outcome in result.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    parent.set_tags({f"neoray.sweep.{status}": str(n) for status, n in counts.items()})
    if result.best is not None:
        best = result.best
        parent.set_tags(
            {
                "best.trial": best.trial_id,
                "best.command": result.command,
                **{f"best.{key}": str(value) for key, value in best.values.items()},
            }
        )
        if best.metric is not None:
            parent.log_metrics({f"best/{metric_key(sweep.metric)}": best.metric}, step=0)
        parent.client.log_artifact(parent.run_id, str(storage / "best.yaml"))
    parent.client.log_artifact(parent.run_id, str(storage / "sweep.png"))
