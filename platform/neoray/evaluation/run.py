"""`jobs/evaluate.py`: which model, exported once, evaluated on a suite, logged to MLflow."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray import CONF_DIR
from neoray.cluster.ray_start import start_or_join
from neoray.cluster.submit import check_durable_locations
from neoray.config import ConfigError, dataclass_from_config, to_dict
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.memorization import SUITE as MEMORIZATION
from neoray.evaluation.memorization import MemorizationConfig, memorization_suite
from neoray.evaluation.report import format_results
from neoray.evaluation.schedule import ScheduleConfig
from neoray.live_metrics import EvaluationExporter, ray_connected
from neoray.storage import StorageConfig
from neoray.tracking import TrackingConfig

SUITE_DIR = CONF_DIR / "eval"


@dataclass
class ModelSource:
    """A Hugging Face directory to evaluate and the training run and step it belongs to."""

    hf_dir: Path
    run_name: str | None
    step: int


def resolve_source(
    checkpoint: str,
    step: str | int | None = None,
    run_name: str | None = None,
    cache_dir: str | Path = "runs/exports",
    dtype: str = "fp16",
    storage: Any = None,
) -> ModelSource:
    """A Hugging Face directory (used as is), or a committed checkpoint (a URI, a local step
    directory, or a run name and step in `storage`), exported once and cached."""
    from neoray.checkpoint.export import ExportConfig, resolve_export

    if (Path(checkpoint) / "config.json").is_file():
        return ModelSource(Path(checkpoint), run_name, int(step or 0))
    config = ExportConfig(checkpoint=checkpoint, step=step, dtype=dtype, cache_dir=str(cache_dir))
    export = resolve_export(config, storage)
    return ModelSource(export.hf_dir, export.run_name, export.step)


def evaluate(
    source: ModelSource, cfg: EvalConfig, tracking: TrackingConfig | None = None
) -> dict[str, Any]:
    """Evaluate `source` on `cfg`'s suite over Ray and log the results (see module doc)."""
    from neoray.evaluation.fanout import evaluate_suite

    start_or_join(log_to_driver=False)
    results = evaluate_suite(str(source.hf_dir), cfg)
    if tracking is not None and tracking.enabled and source.run_name:
        from neoray.evaluation.tracking import EvalTracker

        tracker = EvalTracker(tracking.uri, tracking.experiment)
        results["mlflow_run_id"] = tracker.log_evaluation(
            source.run_name, source.step, cfg.suite, results, str(source.hf_dir), cfg.tasks
        )
    return results


def run_evaluate(cfg: Any) -> dict[str, Any]:
    """The job: validate everything, then export (if needed), evaluate, log and print."""
    eval_cfg = dataclass_from_config(EvalConfig, cfg.eval, "eval")
    check_tasks(eval_cfg)
    tracking = dataclass_from_config(TrackingConfig, cfg.tracking, "tracking")
    storage = dataclass_from_config(StorageConfig, cfg.storage, "storage")
    check_durable_locations(tracking=tracking)
    values = to_dict(cfg)
    source = resolve_source(
        values["checkpoint"],
        values.get("step"),
        values.get("run_name"),
        values["cache_dir"],
        values["dtype"],
        storage,
    )
    results = evaluate(source, eval_cfg, tracking)
    where = f"{source.run_name} step {source.step}" if source.run_name else str(source.hf_dir)
    print(format_results(results, f"{eval_cfg.suite} on {where}"))
    if results["failed"]:
        raise SystemExit(f"{len(results['failed'])} task(s) failed: {results['failed']}")
    return results


def load_suite(
    name: str, settings: dict[str, Any], suite_dir: str | None = None
) -> EvalConfig | MemorizationConfig:
    """Suite `name` (`<suite_dir>/<name>.yaml`, else `conf/eval/<name>.yaml`) with `settings`
    (the job's `eval.*`) applied; a file with `suite: memorization` is the memorization study
    (`neoray.evaluation.memorization`)."""
    from omegaconf import OmegaConf

    folders = ([Path(suite_dir)] if suite_dir else []) + [SUITE_DIR]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            suite = to_dict(OmegaConf.load(folder / f"{name}.yaml"))
            if suite.get("suite") == MEMORIZATION:  # the memorization study, not lm-eval tasks
                return memorization_suite(settings, suite, f"suite {name}")
            # the job's task folders (eval.task_dirs) and the suite's own
            folders = [*(settings.get("task_dirs") or []), *(suite.get("task_dirs") or [])]
            values = {**settings, **suite, "task_dirs": folders}
            return dataclass_from_config(EvalConfig, values, f"suite {name}")
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    where = " or ".join(str(folder) for folder in folders)
    raise ConfigError(f"suites: no suite {name!r} in {where}; choose from {', '.join(known)}")


def check_tasks(suite: EvalConfig) -> None:
    """Refuse a suite that names a task lm-eval knows neither among its own tasks nor in the
    suite's task folders, before anything starts."""
    from neoray.evaluation.mirror import task_manager

    known = set(task_manager(None, suite.task_dirs).all_tasks)
    unknown = [name for name in suite.tasks if name not in known and not Path(name).is_file()]
    if unknown:
        raise ConfigError(
            f"suite {suite.suite}: lm-eval has no task, group or tag {', '.join(unknown)} (nor "
            f"do its task folders {suite.task_dirs}); add the folder that defines it with "
            "eval.task_dirs=[<folder>] (the heldout tasks: jobs/heldout_task.py writes one)"
        )


def checkpoint_watcher(
    storage,
    run_name: str,
    suites: list[EvalConfig | MemorizationConfig],
    schedule,
    tracking: TrackingConfig,
    cache_dir: str | Path = "runs/exports",
    dtype: str = "fp16",
    tokenizer: str | None = None,
    say: Callable[[str], None] = print,
):
    """A `Watcher` of `run_name` whose evaluations export the checkpoint (once per step, into
    `cache_dir`, deleted once the step's suites are settled), fan the suite out over the
    connected Ray cluster and log it to MLflow under the run."""
    from neoray.checkpoint.export import Checkpoint, export_committed
    from neoray.checkpoint.manifest import checkpoint_key
    from neoray.evaluation.memorization import as_suite_results, study_checkpoint
    from neoray.evaluation.memorization_report import log_to_mlflow
    from neoray.evaluation.watch import ExportCache, Watcher

    exports = ExportCache(
        lambda storage, manifest: (
            export_committed(storage, manifest, cache_dir, dtype, tokenizer).hf_dir
        ),
        cache_dir,
    )

    def evaluate_checkpoint(storage, manifest, suite) -> dict[str, Any]:
        hf_dir = exports.get(storage, manifest)
        if isinstance(suite, MemorizationConfig):
            found = Checkpoint(manifest, storage=storage)
            return as_suite_results(study_checkpoint(found, suite, hf_dir))
        return evaluate(ModelSource(hf_dir, manifest.run_name, manifest.step), suite)

    log = None
    if tracking.enabled:
        from neoray.evaluation.tracking import EvalTracker

        tracker = EvalTracker(tracking.uri, tracking.experiment)
        both_mmlu = {"mmlu_0shot", "mmlu_5shot"} <= {suite.suite for suite in suites}

        def log(manifest, suite, results: dict[str, Any]) -> str:
            if isinstance(suite, MemorizationConfig):
                summary = results["summary"]
                return log_to_mlflow(tracking, summary, Path(summary["output"]), summary["source"])
            source = storage.uri(checkpoint_key(manifest.run_name, manifest.step))
            run_id = tracker.log_evaluation(
                run_name, manifest.step, suite.suite, results, source, suite.tasks
            )
            if both_mmlu:  # the zero- vs five-shot table, once both are in
                tracker.log_mmlu_comparison(run_name, manifest.step, "mmlu_0shot", "mmlu_5shot")
            return run_id

    metrics = EvaluationExporter(run_name) if ray_connected() else None
    return Watcher(
        storage,
        run_name,
        suites,
        schedule,
        evaluate_checkpoint,
        log,
        say,
        metrics=metrics,
        release=exports.release,
    )


def eval_watch_settings(
    cfg: Any,
) -> tuple[list[EvalConfig | MemorizationConfig], ScheduleConfig, TrackingConfig, StorageConfig]:
    """The scheduled-evaluation config, checked: its suites, schedule, tracking and storage."""
    values = to_dict(cfg)
    if not values.get("suites"):
        raise ConfigError("suites is empty: name at least one suite, e.g. 'suites=[mmlu_0shot]'")
    suites = [
        load_suite(name, values["eval"], values.get("suite_dir")) for name in values["suites"]
    ]
    for suite in suites:
        if isinstance(suite, EvalConfig):
            check_tasks(suite)
    schedule = dataclass_from_config(ScheduleConfig, cfg.schedule, "schedule")
    tracking = dataclass_from_config(TrackingConfig, cfg.tracking, "tracking")
    return suites, schedule, tracking, dataclass_from_config(StorageConfig, cfg.storage, "storage")


def stop_on_sigterm(watcher) -> None:
    """SIGTERM stops `watcher` (its claims in flight are taken over once stale). A process
    forked from this one inherits the handler: lm-eval's bootstrap stderr (of perplexity and
    other metrics without a closed form) runs in a forked multiprocessing pool that
    `Pool.terminate` stops with SIGTERM. There the signal ends the process, as by default;
    stopping that copy of the watcher instead would leave the pool's join waiting forever,
    and the evaluation with it."""
    owner = os.getpid()

    def on_sigterm(signum, _frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        watcher.stop()

    signal.signal(signal.SIGTERM, on_sigterm)


def run_eval_watch(cfg: Any) -> dict:
    """The scheduled-evaluation job (conf/eval_watch.yaml): every setting is checked and the
    storage reached before Ray starts; then the watcher runs until stopped or finished."""
    from neoray.checkpoint.manifest import checkpoints_key
    from neoray.evaluation.ledger import Ledger
    from neoray.evaluation.report import ledger_table
    from neoray.storage import StorageError, open_storage

    values = to_dict(cfg)
    suites, schedule, tracking, storage_config = eval_watch_settings(cfg)
    check_durable_locations(storage_config, tracking)
    storage = open_storage(storage_config)
    run_name = str(values["run_name"])
    try:
        storage.folders(checkpoints_key(run_name))
    except (StorageError, OSError) as err:
        raise SystemExit(
            f"eval_watch: cannot reach {storage.uri(checkpoints_key(run_name))}: {err}"
        ) from err

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    start_or_join(log_to_driver=False)
    watcher = checkpoint_watcher(
        storage,
        run_name,
        suites,
        schedule,
        tracking,
        values["cache_dir"],
        values["dtype"],
        values.get("tokenizer"),
        say,
    )
    stop_on_sigterm(watcher)
    try:
        settled = watcher.run()
    except KeyboardInterrupt:
        watcher.stop()
        settled = dict(watcher.settled)
    print(ledger_table(Ledger(storage, run_name).entries(), list(watcher.suites)), flush=True)
    if watcher.running:  # stopped mid-evaluation: its claims are taken over once stale
        say(f"stopped with {len(watcher.running)} evaluation(s) in flight")
        os._exit(1)
    return settled
