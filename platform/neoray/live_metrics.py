"""Live metrics for Prometheus, through Ray's metrics agent (`ray.util.metrics`).

A process that is part of a Ray cluster (a Ray Train worker, the scheduled-evaluation
watcher) sets gauges; each node's agent serves them on its metrics export port, where
Prometheus scrapes them (under the names below, prefixed `ray_`). `dashboards/` has the Grafana
dashboards that plot them. Outside Ray (a run under torchrun) nothing is exported.

Every metric is a gauge labelled with the run name (`run`), so a dashboard filters by run;
counts (skipped steps, failures) are gauges of the running total, present from the start.
"""

from __future__ import annotations

import time
from typing import Any

# name: (metrics.jsonl field, description); set from each training step's row.
TRAINING = {
    "neoray_train_step": ("step", "steps trained (the last step's index + 1)"),
    "neoray_train_tokens": ("tokens", "tokens trained on"),
    "neoray_train_loss": ("loss", "training loss of the last step"),
    "neoray_train_val_loss": ("val/loss", "in-loop validation loss, at each validation"),
    "neoray_train_tokens_per_second": ("tokens_per_s", "tokens per second, all devices"),
    "neoray_train_model_tflops": ("model_tflops_per_device", "model TFLOPS per device"),
    "neoray_train_mfu": ("mfu", "model FLOPs utilization"),
    "neoray_train_grad_norm": ("grad_norm", "global gradient norm before clipping"),
    "neoray_train_loss_scale": ("loss_scale", "fp16 loss scale (1 in fp32 and bf16)"),
    "neoray_train_step_seconds": ("step_time_s", "wall time of the last step"),
    "neoray_train_energy_kwh": ("energy/kwh", "energy of the run so far, kWh"),
    "neoray_train_power_watts": ("energy/power_w", "power of the run's devices, W"),
}
TRAINING_TOTALS = {
    "neoray_train_skipped_steps": "steps skipped for fp16 overflow, in total",
    "neoray_train_rollbacks": "rollbacks after a loss spike, in total",
}
CHECKPOINTS = {
    "neoray_checkpoint_committed_step": "step of the last committed checkpoint",
    "neoray_checkpoint_bytes": "bytes of the last committed checkpoint (all shards)",
    "neoray_checkpoint_upload_seconds": "seconds from a checkpoint's save to its commit",
    "neoray_checkpoint_lag_steps": "steps trained since the committed checkpoint was saved",
    "neoray_checkpoint_failures": "checkpoint uploads that failed, in total",
}
EVALUATION = {
    "neoray_eval_queue_depth": "selected (checkpoint, suite) pairs waiting to be evaluated",
    "neoray_eval_running": "evaluations in flight",
    "neoray_eval_seconds": "duration of the last evaluation of a suite",
    "neoray_eval_completed": "evaluations done, in total",
    "neoray_eval_failures": "evaluation attempts that failed, in total",
}
MAX_PENDING_STEPS = 10_000  # step end times kept for the save-to-commit time of checkpoints
ALL = [*TRAINING, *TRAINING_TOTALS, *CHECKPOINTS, *EVALUATION]  # every metric exported


def ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class Gauges:
    """Ray gauges by name, each labelled `run` (and `suite` for evaluation)."""

    def __init__(self, names: dict[str, str], run_name: str, tag_keys=("run",)) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name}
        self.gauges = {name: Gauge(name, text, tag_keys=tag_keys) for name, text in names.items()}

    def set(self, name: str, value: float, **tags: str) -> None:
        self.gauges[name].set(float(value), tags={**self.tags, **tags})


class TrainingExporter:
    """A TrainingObserver (rank 0) that keeps the training and checkpoint gauges current."""

    def __init__(self, run_name: str) -> None:
        names = {name: text for name, (_, text) in TRAINING.items()}
        self.gauges = Gauges({**names, **TRAINING_TOTALS, **CHECKPOINTS}, run_name)
        self.skipped = self.failures = 0
        self.done = 0
        self.finished_at: dict[int, float] = {}  # steps trained -> when (a checkpoint's save)
        for name in (*TRAINING_TOTALS, "neoray_checkpoint_failures"):
            self.gauges.set(name, 0)

    def on_start(self, resumed_from: int | None, earlier_rows: list[dict]) -> None:
        """Nothing to show: the step gauge moves with the first row."""

    def on_metrics(self, row: dict[str, Any]) -> None:
        self.done = row["step"] + 1
        self.finished_at[self.done] = time.monotonic()
        if len(self.finished_at) > MAX_PENDING_STEPS:  # no checkpoint for that long
            del self.finished_at[next(iter(self.finished_at))]
        for name, (field, _) in TRAINING.items():
            value = self.done if field == "step" else row.get(field)
            if isinstance(value, int | float):
                self.gauges.set(name, value)
        self.skipped += bool(row.get("step_skipped"))
        self.gauges.set("neoray_train_skipped_steps", self.skipped)

    def on_checkpoint(self, step: int, uri: str, size_bytes: int) -> None:
        self.gauges.set("neoray_checkpoint_committed_step", step)
        self.gauges.set("neoray_checkpoint_bytes", size_bytes)
        self.gauges.set("neoray_checkpoint_lag_steps", max(self.done - step, 0))
        saved = self.finished_at.pop(step, None)
        if saved is not None:
            self.gauges.set("neoray_checkpoint_upload_seconds", time.monotonic() - saved)
        self.finished_at = {s: t for s, t in self.finished_at.items() if s > step}

    def on_checkpoint_failed(self, step: int, error: str) -> None:
        self.failures += 1
        self.gauges.set("neoray_checkpoint_failures", self.failures)

    def on_rollback(self, step: int, count: int, seconds: float, description: str) -> None:
        self.gauges.set("neoray_train_rollbacks", count)


class EvaluationExporter:
    """The scheduled-evaluation watcher's gauges: queue, evaluations in flight, their
    duration per suite, completions and failures."""

    def __init__(self, run_name: str) -> None:
        self.gauges = Gauges(EVALUATION, run_name, tag_keys=("run", "suite"))
        self.completed = self.failures = 0
        for name in EVALUATION:
            if name != "neoray_eval_seconds":  # only once something was evaluated
                self.gauges.set(name, 0, suite="all")

    def queue(self, waiting: int, running: int) -> None:
        self.gauges.set("neoray_eval_queue_depth", waiting, suite="all")
        self.gauges.set("neoray_eval_running", running, suite="all")

    def evaluated(self, suite: str, seconds: float, failed: bool) -> None:
        self.gauges.set("neoray_eval_seconds", seconds, suite=suite)
        if failed:
            self.failures += 1
        else:
            self.completed += 1
        self.gauges.set("neoray_eval_completed", self.completed, suite="all")
        self.gauges.set("neoray_eval_failures", self.failures, suite="all")
