"""Evaluation runs in MLflow, nested under the training run they evaluate.

The training run is the live run of experiment `neoray` tagged `neoray.run_name=<run name>`
(not one superseded by a fresh start of that name, see `neoray.tracking.find_run`); it is
created (with that tag) when evaluation comes first. Each (checkpoint step, suite) gets one
child run tagged `neoray.eval.suite`, `neoray.eval.step`, `neoray.run_name` and
`mlflow.parentRunId`; evaluating the same pair again replaces it, so nothing is duplicated.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from neoray.evaluation.report import flat_metrics, mmlu_comparison, suite_metrics
from neoray.tracking import PARENT_TAG, RUN_NAME_TAG, experiment_id, find_run

SUITE_TAG = "neoray.eval.suite"
STEP_TAG = "neoray.eval.step"
SHOTS_TAG = "neoray.eval.num_fewshot"
BATCH = 1000  # MLflow's limit on metrics per log_batch call


class EvalTracker:
    def __init__(self, tracking_uri: str, experiment: str = "neoray") -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def _search(self, query: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=query)

    def training_run_id(self, run_name: str) -> str:
        """The training run of `run_name` (the one that is not an evaluation), created if absent."""
        found = find_run(self.client, self.experiment_id, run_name)
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id, tags={RUN_NAME_TAG: run_name}, run_name=run_name
        )
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def evaluation_runs(self, run_name: str, step: int, suite: str | None = None) -> list:
        """The evaluation runs of `step` (of one suite) under the live training run: those of
        a run superseded by a fresh start of the same name are its own, and stay."""
        training = find_run(self.client, self.experiment_id, run_name)
        if training is None:
            return []
        query = (
            f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STEP_TAG}` = '{step}' "
            f"and tags.`{PARENT_TAG}` = '{training.info.run_id}'"
        )
        if suite is not None:
            query += f" and tags.`{SUITE_TAG}` = '{suite}'"
        return self._search(query)

    def log_evaluation(
        self,
        run_name: str,
        step: int,
        suite: str,
        results: dict[str, Any],
        source: str,
        tasks: list[str] | None = None,
    ) -> str:
        """Log a suite's merged results as the child run for (step, suite); its run id.

        The metrics of the suite's own `tasks` (groups such as `mmlu` included) also go on the
        training run as `eval/<suite>/<metric>` at `step`: there the MLflow UI draws them
        across training, next to the loss."""
        shots = sorted({str(n) for n in results.get("n-shot", {}).values()})

        def fill(run_id: str, parent: str) -> None:
            self._log_results(run_id, parent, step, suite, results, tasks)

        return self._replace_evaluation(
            run_name, step, suite, {SHOTS_TAG: ",".join(shots), "neoray.eval.source": source}, fill
        )

    def log_study(
        self,
        run_name: str,
        step: int,
        suite: str,
        metrics: dict[str, float],
        summary: dict[str, float],
        artifacts: Path,
        source: str,
    ) -> str:
        """Log a study that is not an lm-eval suite (memorization) as the child run for (step,
        suite): its `metrics` and the files in `artifacts`; `summary` also goes on the training
        run as `eval/<suite>/<metric>` at `step`. Its run id."""
        from mlflow.entities import Metric

        def fill(run_id: str, parent: str) -> None:
            now = int(time.time() * 1000)
            self._log_batches(run_id, [Metric(k, v, now, step) for k, v in sorted(metrics.items())])
            self._log_batches(
                parent, [Metric(f"eval/{suite}/{k}", v, now, step) for k, v in summary.items()]
            )
            self.client.log_artifacts(run_id, str(artifacts))
            self.client.set_terminated(run_id, "FINISHED")

        return self._replace_evaluation(run_name, step, suite, {"neoray.eval.source": source}, fill)

    def _replace_evaluation(
        self, run_name: str, step: int, suite: str, tags: dict[str, str], fill
    ) -> str:
        """Create the child run of (step, suite) under the training run, have `fill(run_id,
        parent_run_id)` log into it, then delete the earlier runs of the pair; its run id."""
        parent = self.training_run_id(run_name)
        earlier = self.evaluation_runs(run_name, step, suite)
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"eval {suite} step {step}",
            tags={
                PARENT_TAG: parent,
                RUN_NAME_TAG: run_name,
                SUITE_TAG: suite,
                STEP_TAG: str(step),
                **tags,
            },
        )
        run_id = run.info.run_id
        try:
            fill(run_id, parent)
        except BaseException:
            self.client.delete_run(run_id)  # no partial run beside the earlier, complete one
            raise
        for old in earlier:  # replaced only once the new run is complete
            self.client.delete_run(old.info.run_id)
        return run_id

    def _log_results(
        self,
        run_id: str,
        parent: str,
        step: int,
        suite: str,
        results: dict[str, Any],
        tasks: list[str] | None,
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in sorted(flat_metrics(results).items())]
        self._log_batches(run_id, metrics)
        if tasks and not results.get("failed"):
            summary = suite_metrics(results, tasks)
            self._log_batches(
                parent, [Metric(f"eval/{suite}/{k}", v, now, step) for k, v in summary.items()]
            )
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifacts(run_id, write_artifacts(results, Path(tmp)))
        self.client.set_terminated(run_id, "FAILED" if results.get("failed") else "FINISHED")

    def _log_batches(self, run_id: str, metrics: list) -> None:
        for first in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[first : first + BATCH])

    def metrics_of(self, run_name: str, step: int, suite: str) -> dict[str, float]:
        runs = self.evaluation_runs(run_name, step, suite)
        return dict(runs[0].data.metrics) if runs else {}

    def log_mmlu_comparison(
        self, run_name: str, step: int, zero_suite: str, five_suite: str
    ) -> str | None:
        """The zero- vs five-shot MMLU table of a checkpoint, also logged on the training run
        as `eval/step_<step>/mmlu_0shot_vs_5shot.md`; None until both suites are logged."""
        zero = self.metrics_of(run_name, step, zero_suite)
        five = self.metrics_of(run_name, step, five_suite)
        if not zero or not five:
            return None
        table = mmlu_comparison(zero, five)
        self.client.log_text(
            self.training_run_id(run_name), table, f"eval/step_{step:08d}/mmlu_0shot_vs_5shot.md"
        )
        return table


def write_artifacts(results: dict[str, Any], out: Path) -> str:
    """`results.json` (lm-eval's results without samples) and `samples/<task>.jsonl`."""
    samples = results.get("samples", {})
    summary = {key: value for key, value in results.items() if key != "samples"}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "samples").mkdir()
    for task, rows in samples.items():
        with open(out / "samples" / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    return str(out)
