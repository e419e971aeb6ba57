"""lm-eval results as MLflow metric names and as the tables the jobs print."""

from __future__ import annotations

import math
import re
from typing import Any

MMLU_ROWS = ("mmlu", "mmlu_humanities", "mmlu_social_sciences", "mmlu_stem", "mmlu_other")
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(task: str, key: str) -> str | None:
    """MLflow name of lm-eval result `key` of `task` (`acc,none` -> `<task>/acc`,
    `exact_match,strict-match` -> `<task>/exact_match/strict-match`); None if not a metric."""
    if "," not in key:
        return None
    metric, result_filter = key.split(",", 1)
    name = f"{task}/{metric}" if result_filter == "none" else f"{task}/{metric}/{result_filter}"
    return _UNSAFE.sub("_", name)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every numeric metric and stderr of every task and group, under its MLflow name."""
    flat = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name = metric_name(task, key)
            if name is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                flat[name] = float(value)
    return flat


def headline_metrics(values: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    """(metric, value, stderr) of one task or group, stderr keys folded into their metric."""
    rows = []
    for key, value in values.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        metric, result_filter = key.split(",", 1)
        stderr = values.get(f"{metric}_stderr,{result_filter}")
        label = metric if result_filter == "none" else f"{metric} ({result_filter})"
        rows.append((label, float(value), stderr if isinstance(stderr, int | float) else None))
    return rows


def format_results(results: dict[str, Any], title: str) -> str:
    """The merged results as a plain-text table: groups first, then tasks, by name."""
    groups = set(results.get("groups", {}))
    names = sorted(results["results"], key=lambda n: (n not in groups, n))
    lines = [title, f"{'task':<40} {'metric':<28} {'value':>8} {'stderr':>8}"]
    for name in names:
        shots = results.get("n-shot", {}).get(name, "")
        for label, value, stderr in headline_metrics(results["results"][name]):
            err = f"{stderr:8.4f}" if stderr is not None else f"{'':>8}"
            lines.append(f"{name + f' ({shots}-shot)':<40} {label:<28} {value:8.4f} {err}")
    if results.get("failed"):
        lines.append(f"failed tasks: {', '.join(sorted(results['failed']))}")
    return "\n".join(lines)


def mmlu_comparison(zero_shot: dict[str, float], five_shot: dict[str, float]) -> str:
    """Markdown table of MMLU accuracy, zero- vs five-shot, from `flat_metrics` dicts."""
    lines = ["| MMLU | 0-shot acc | 5-shot acc | difference |", "|---|---|---|---|"]
    for row in MMLU_ROWS:
        zero, five = zero_shot.get(f"{row}/acc"), five_shot.get(f"{row}/acc")
        if zero is None or five is None:
            continue
        lines.append(f"| {row} | {zero:.4f} | {five:.4f} | {five - zero:+.4f} |")
    return "\n".join(lines)


def suite_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    """The metrics of a suite's own tasks and groups (`tasks`; all metrics if none match)."""
    flat = flat_metrics(results)
    own = {name: value for name, value in flat.items() if name.split("/")[0] in tasks}
    return own or flat


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(name, value) of the first metric by name that is not a stderr: a suite's one number."""
    for name, value in sorted(metrics.items()):
        if "_stderr" not in name:
            return name, value
    return None


def ledger_table(entries: list, suites: list[str] | None = None) -> str:
    """The evaluation ledger as a table, a row per step and a column per suite: the suite's
    headline score where done, else its state (failed with the attempts made)."""
    suites = suites or sorted({entry.suite for entry in entries})
    cells = {(entry.step, entry.suite): entry for entry in entries}
    width = max([10, *map(len, suites)])
    lines = [f"{'step':>10} " + " ".join(f"{suite:>{width}}" for suite in suites)]
    for step in sorted({entry.step for entry in entries}):
        row = []
        for suite in suites:
            entry = cells.get((step, suite))
            if entry is None:
                text = "-"
            elif entry.state == "done" and entry.headline in entry.metrics:
                text = f"{entry.metrics[entry.headline]:.4f}"
            elif entry.state == "failed":
                text = f"failed x{entry.attempts}"
            else:
                text = entry.state
            row.append(f"{text:>{width}}")
        lines.append(f"{step:>10} " + " ".join(row))
    named = {e.suite: e.headline for e in entries if e.state == "done" and e.headline}
    lines += [f"{suite}: {named[suite]}" for suite in suites if suite in named]
    lines += [
        f"step {e.step} {e.suite} {e.state}: {e.reason}"
        for e in entries
        if e.state in ("failed", "skipped") and e.reason
    ]
    return "\n".join(lines)
