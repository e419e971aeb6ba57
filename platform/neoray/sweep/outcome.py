"""What a sweep found: each trial's status and final metric, the best trial, a plot of the
searched values against the metric, and `best.yaml` with the command that trains the best
configuration for real."""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neoray.config import redact, redact_text
from neoray.storage import publish_file
from neoray.sweep.config import SweepConfig
from neoray.sweep.space import is_log_scale, override

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED_EARLY: "KILLED", FAILED: "FAILED"}


@dataclass
class TrialOutcome:
    trial_id: str
    values: dict[str, Any]  # the sampled values, by space key
    status: str  # completed | stopped_early | failed
    metric: float | None  # the last value reported (None: never reported, or not finite)
    trained_steps: int
    error: str | None = None


def trial_outcome(result: Any, metric: str) -> TrialOutcome:
    """A Tune `Result` read: completed when its last report was at the run's last step,
    stopped early (by the scheduler) when before it, failed when it raised."""
    metrics = result.metrics or {}
    trained, total = metrics.get("trained_steps", 0), metrics.get("train_steps")
    if result.error is not None:
        status = FAILED
    else:
        status = COMPLETED if total is not None and trained >= total else STOPPED_EARLY
    value = metrics.get(metric)
    finite = isinstance(value, int | float) and math.isfinite(value)
    return TrialOutcome(
        trial_id=Path(result.path).name,  # trial folders are named by trial id (see run.py)
        values=dict(result.config["overrides"]),
        status=status,
        metric=float(value) if finite else None,
        trained_steps=int(trained),
        error=None if result.error is None else _raised(result.error),
    )


def _raised(error: BaseException) -> str:
    """What the trial raised: the last line of Tune's error (its first names the trial's
    process, which differs from trial to trial)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def common_failure(outcomes: list[TrialOutcome]) -> str | None:
    """The error every trial failed with, when all failed alike (a cause no retry fixes and
    no other values avoid: the sweep ends with it); None otherwise."""
    errors = {o.error for o in outcomes}
    if outcomes and all(o.status == FAILED for o in outcomes) and len(errors) == 1:
        return errors.pop()
    return None


def best_trial(outcomes: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """The best completed trial (trials stopped early trained less, so are not compared),
    or the best of any that reported when none completed."""
    for pool in ([o for o in outcomes if o.status == COMPLETED], outcomes):
        scored = [o for o in pool if o.metric is not None]
        if scored:
            return (min if mode == "min" else max)(scored, key=lambda o: o.metric)
    return None


def best_command(best: TrialOutcome, sweep: SweepConfig, base_overrides: list[str]) -> str:
    """The command that trains the best configuration as a run of its own (secrets given on
    the sweep's command line shown as "***": they are to be given again, from the environment
    preferably)."""
    overrides = [override(key, value) for key, value in best.values.items()]
    return redact_text(
        shlex.join(
            [
                "python",
                "jobs/pretrain.py",
                *base_overrides,
                *overrides,
                f"run_name={sweep.name}-best",
            ]
        )
    )


def write_best(
    path: Path, best: TrialOutcome, sweep: SweepConfig, base_overrides: list[str]
) -> str:
    """Write `best.yaml` (the values, the metric, the command); returns the command.

    `base_overrides` are the target run's: with a proxy, the values found on the proxy are
    given to the target model, and `proxy` says what the trials trained."""
    command = best_command(best, sweep, base_overrides)
    document = {
        "sweep": sweep.name,
        "trial": best.trial_id,
        "metric": sweep.metric,
        "value": best.metric,
        "trained_steps": best.trained_steps,
        "overrides": redact(best.values),
        "base_overrides": [redact_text(item) for item in base_overrides],
        "command": command,
    }
    if sweep.proxy is not None:
        document["proxy"] = dataclasses.asdict(sweep.proxy)
    text = yaml.safe_dump(document, sort_keys=False).encode()
    publish_file(path, lambda out: out.write(text))
    return command


def plot(outcomes: list[TrialOutcome], sweep: SweepConfig, path: Path) -> Path:
    """One panel per searched key: its value against the trial's last metric, completed
    trials as dots and trials stopped early as crosses (failed ones have no metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.space)
    figure, axes = plt.subplots(1, len(keys), figsize=(max(6, 4 * len(keys)), 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        categories: list[str] = []
        for status, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
            shown = [o for o in outcomes if o.status == status and o.metric is not None]
            xs = []
            for outcome in shown:
                value = outcome.values[key]
                if isinstance(value, int | float) and not isinstance(value, bool):
                    xs.append(value)
                else:
                    categories += [] if str(value) in categories else [str(value)]
                    xs.append(categories.index(str(value)))
            axis.scatter(xs, [o.metric for o in shown], marker=marker, label=status)
        numbers = [o.values[key] for o in outcomes if isinstance(o.values[key], int | float)]
        if categories:
            axis.set_xticks(range(len(categories)), categories)
        elif is_log_scale(sweep.space, key) or (
            numbers and min(numbers) > 0 and max(numbers) >= 100 * min(numbers)
        ):
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(sweep.metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(f"sweep {sweep.name}: {sweep.metric} at each trial's last validation", size=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
