"""The memorization study's results: rates by times seen and by steps since first seen (per
mixture component), their tables and plots, and where they go (files, MLflow).

Times seen are grouped in powers of two (1, 2-3, 4-7, ...), as memorization grows roughly
with the log of the count (Carlini et al. 2022); steps since first seen in eight equal spans of
the steps trained.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ALL = "all"
SINCE_BINS = 8


def times_seen_bin(count: int) -> tuple[int, int]:
    """The power-of-two span [low, high] holding `count` ([0, 0] for never seen)."""
    if count < 1:
        return 0, 0
    low = 1 << (count.bit_length() - 1)
    return low, 2 * low - 1


def since_bin(steps: int, trained: int) -> tuple[int, int]:
    """The span [low, high] of SINCE_BINS equal spans of [1, trained] holding `steps`."""
    edges = np.unique(np.linspace(0, trained, SINCE_BINS + 1).round().astype(int))
    i = int(np.searchsorted(edges, steps, side="left"))
    return int(edges[i - 1]) + 1, int(edges[i])


def label(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _rates(rows: list[dict]) -> dict[str, float]:
    return {
        "sequences": len(rows),
        "extracted": sum(r["extracted"] for r in rows),
        "rate": float(np.mean([r["extracted"] for r in rows])) if rows else 0.0,
        "match_fraction": float(np.mean([r["match_fraction"] for r in rows])) if rows else 0.0,
    }


def _grouped(rows: list[dict], key) -> list[dict[str, Any]]:
    """Rates per (component, span of `key`), every component's rows also under "all"."""
    groups: dict[tuple[str, tuple[int, int]], list[dict]] = defaultdict(list)
    for row in rows:
        span = key(row)
        groups[ALL, span].append(row)
        groups[row["component"], span].append(row)
    return [
        {"component": component, "bin": label(*span), "low": span[0], "high": span[1]}
        | _rates(members)
        for (component, span), members in sorted(
            groups.items(), key=lambda item: (item[0][0] != ALL, item[0][0], item[0][1])
        )
    ]


def summarise(rows: list[dict], run_name: str, step: int, cfg) -> dict[str, Any]:
    """The study's figures: overall, held out, by times seen and by steps since first seen."""
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] != "train"]
    return {
        "run_name": run_name,
        "step": step,
        "prefix_tokens": cfg.prefix_tokens,
        "continuation_tokens": cfg.continuation_tokens,
        "seed": cfg.seed,
        **_rates(train),
        "heldout": _rates(heldout) | {"split": cfg.heldout_split},
        "by_times_seen": _grouped(train, lambda r: times_seen_bin(r["times_seen"])),
        "by_steps_since": _grouped(train, lambda r: since_bin(r["steps_since_first_seen"], step)),
    }


def _table(rows: list[dict], what: str) -> list[str]:
    lines = [
        f"| component | {what} | sequences | extracted | rate | match fraction |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['component']} | {row['bin']} | {row['sequences']} | {row['extracted']} | "
            f"{row['rate']:.1%} | {row['match_fraction']:.3f} |"
        )
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown: a headline, then the two tables."""
    heldout = summary["heldout"]
    head = (
        f"memorization of {summary['run_name']} at step {summary['step']}: "
        f"{summary['extracted']} of {summary['sequences']} training sequences extracted "
        f"({summary['rate']:.1%}; {summary['prefix_tokens']}-token prefix, "
        f"{summary['continuation_tokens']}-token continuation)"
    )
    if heldout["sequences"]:
        head += (
            f"; held out ({heldout['split']}): {heldout['extracted']} of "
            f"{heldout['sequences']} ({heldout['rate']:.1%})"
        )
    lines = [head, "", "by times seen:", ""]
    lines += _table(summary["by_times_seen"], "times seen")
    lines += ["", "by steps since first seen:", ""]
    lines += _table(summary["by_steps_since"], "steps since first seen")
    return "\n".join(lines)


def _plot_by(rows: list[dict], title: str, xlabel: str, path: Path, log_x: bool) -> None:
    from neoray.report.figures import axes, plt

    with axes(title, "extracted (k-extractable) rate", xlabel) as (figure, ax):
        for component in sorted({r["component"] for r in rows}, key=lambda c: (c != ALL, c)):
            mine = [r for r in rows if r["component"] == component]
            x = [(r["low"] + r["high"]) / 2 for r in mine]
            ax.plot(x, [r["rate"] for r in mine], "o-", ms=4, label=component)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs(rows: list[dict], summary: dict[str, Any], out: Path) -> Path:
    """`records.jsonl` (one line per sequence), `summary.json`, `memorization.md` and the two
    plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "records.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "memorization.md").write_text(format_summary(summary) + "\n")
    where = f"{summary['run_name']} step {summary['step']}"
    _plot_by(
        summary["by_times_seen"],
        f"memorization vs times seen ({where})",
        "times seen by the checkpoint",
        out / "rate_vs_times_seen.png",
        log_x=True,
    )
    _plot_by(
        summary["by_steps_since"],
        f"memorization vs steps since first seen ({where})",
        "steps since first seen",
        out / "rate_vs_steps_since.png",
        log_x=False,
    )
    return out


def mlflow_metrics(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(the child run's metrics, the headline ones that also go on the training run)."""
    metrics = {key: float(summary[key]) for key in ("rate", "match_fraction", "sequences")}
    if summary["heldout"]["sequences"]:
        metrics["heldout/rate"] = summary["heldout"]["rate"]
        metrics["heldout/match_fraction"] = summary["heldout"]["match_fraction"]
    headline = dict(metrics)
    for table, name in (("by_times_seen", "times_seen"), ("by_steps_since", "steps_since")):
        for row in summary[table]:
            scope = "" if row["component"] == ALL else f"{row['component']}/"
            metrics[f"{scope}{name}/{row['bin']}/rate"] = row["rate"]
            metrics[f"{scope}{name}/{row['bin']}/sequences"] = float(row["sequences"])
            if row["component"] == ALL and name == "times_seen":
                headline[f"times_seen/{row['bin']}/rate"] = row["rate"]
    for component in {row["component"] for row in summary["by_times_seen"]} - {ALL}:
        mine = [r for r in summary["by_times_seen"] if r["component"] == component]
        extracted = sum(r["extracted"] for r in mine)
        metrics[f"{component}/rate"] = extracted / sum(r["sequences"] for r in mine)
    return metrics, headline


def plot_across_checkpoints(history: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """Rate against checkpoint step, overall and per times-seen span, from the training run's
    `eval/memorization/...` metrics; False (nothing drawn) with fewer than two checkpoints."""
    from neoray.report.figures import axes, plt

    if len({step for points in history.values() for step, _ in points}) < 2:
        return False
    with axes("memorization across checkpoints", "extracted rate", "checkpoint step") as (
        figure,
        ax,
    ):
        for name, points in sorted(history.items()):
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, "o-", ms=4, label=name)
        ax.set_ylim(-0.02, 1.02)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def log_to_mlflow(tracking, summary: dict[str, Any], out: Path, source: str) -> str:
    """The study as the `memorization` child run of the training run at the checkpoint's step
    (metrics, records, tables, plots); the headline rates on the training run, and the plot
    across every checkpoint evaluated so far there. Returns the child run's id."""
    import tempfile

    from neoray.evaluation.memorization import SUITE
    from neoray.evaluation.tracking import EvalTracker
    from neoray.tracking import latest_per_step

    tracker = EvalTracker(tracking.uri, tracking.experiment)
    metrics, headline = mlflow_metrics(summary)
    run_id = tracker.log_study(
        summary["run_name"], summary["step"], SUITE, metrics, headline, out, source
    )
    parent = tracker.training_run_id(summary["run_name"])
    prefix = f"eval/{SUITE}/"
    names = [k for k in tracker.client.get_run(parent).data.metrics if k.startswith(prefix)]
    history = {
        name[len(prefix) :]: latest_per_step(tracker.client.get_metric_history(parent, name))
        for name in names
        if name.endswith("rate") and not name.startswith(f"{prefix}heldout")
    }
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "memorization_across_checkpoints.png"
        if plot_across_checkpoints(history, plot):
            tracker.client.log_artifact(parent, str(plot), "eval")
    return run_id
