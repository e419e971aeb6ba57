"""`jobs/evaluate.py`: which model, exported once, evaluated on a suite, logged to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray.config import dataclass_from_config, to_dict
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.report import format_results
from neoray.tracking import TrackingConfig


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
    import ray

    from neoray.evaluation.fanout import evaluate_suite

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    results = evaluate_suite(str(source.hf_dir), cfg)
    if tracking is not None and tracking.enabled and source.run_name:
        from neoray.evaluation.tracking import EvalTracker

        tracker = EvalTracker(tracking.uri, tracking.experiment)
        results["mlflow_run_id"] = tracker.log_evaluation(
            source.run_name, source.step, cfg.suite, results, str(source.hf_dir)
        )
    return results


def run_evaluate(cfg: Any) -> dict[str, Any]:
    """The job: validate everything, then export (if needed), evaluate, log and print."""
    from neoray.storage import StorageConfig

    eval_cfg = dataclass_from_config(EvalConfig, cfg.eval, "eval")
    tracking = dataclass_from_config(TrackingConfig, cfg.tracking, "tracking")
    storage = dataclass_from_config(StorageConfig, cfg.storage, "storage")
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


def mmlu_zero_vs_five_shot(
    source: ModelSource,
    data_dir: str | Path,
    limit: int | None = None,
    workers: int = 1,
    tracking: TrackingConfig | None = None,
) -> str:
    """Evaluate `source` on zero- and five-shot MMLU (conf/eval/mmlu_{0,5}shot.yaml) and
    return the comparison table (logged on the training run too when tracked), with a line
    on how often the two settings chose the same answer."""
    from neoray.evaluation.report import chosen_answers, flat_metrics, mmlu_comparison

    metrics, choices = [], []
    for suite, shots in (("mmlu_0shot", 0), ("mmlu_5shot", 5)):
        cfg = EvalConfig(
            suite=suite,
            tasks=["mmlu"],
            num_fewshot=shots,
            limit=limit,
            workers=workers,
            data_dir=str(data_dir),
        )
        results = evaluate(source, cfg, tracking)
        if results["failed"]:
            raise RuntimeError(f"{suite}: task(s) failed: {results['failed']}")
        metrics.append(flat_metrics(results))
        choices.append(chosen_answers(results))
    zero, five = choices
    same = sum(zero[key] == five.get(key) for key in zero)
    favourite = max(set(zero.values()), key=list(zero.values()).count)
    return (
        f"{mmlu_comparison(*metrics)}\n"
        f"the same answer in both settings for {same} of {len(zero)} questions; zero-shot "
        f"chose {'ABCD'[favourite]} for {list(zero.values()).count(favourite)} of them"
    )
