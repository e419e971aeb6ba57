"""The report as one self-contained HTML page: figures embedded as PNG, no script, no links
out, so it can be mailed, archived or opened from an artifact store as it is."""

from __future__ import annotations

import html
import statistics
from collections.abc import Callable
from pathlib import Path

from neoray.report import figures
from neoray.report.data import RunData, collect
from neoray.storage import publish_file
from neoray.tracking import TrackingConfig

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; }
.missing { color: #777; font-style: italic; }
.estimate { color: #a60; font-weight: bold; }
"""

# (title, figure, what to say when there is nothing to draw)
SECTIONS: list[tuple[str, Callable, str]] = [
    ("Loss", figures.loss, "No steps recorded in metrics.jsonl."),
    (
        "Epochs per mixture component",
        figures.epochs,
        "Not logged (synthetic data, or no validation yet).",
    ),
    ("Learning rate", figures.learning_rate, "No steps recorded."),
    ("Throughput and MFU", figures.throughput, "No steps recorded."),
    ("Checkpoints", figures.checkpoints, "No committed checkpoint recorded in MLflow."),
    (
        "Evaluations across checkpoints",
        figures.evaluations,
        "No evaluations yet: run jobs/evaluate.py or jobs/eval_watch.py on this run's checkpoints.",
    ),
    ("Energy and CO2", figures.energy, "No energy readings (energy.enabled=false)."),
]


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _last(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return values[-1] if values else None


def summary(data: RunData) -> list[tuple[str, str]]:
    rows = data.rows
    if not rows:
        return [("steps", "none recorded")]
    facts = [
        ("steps trained", f"{rows[-1]['step'] + 1:,}"),
        ("tokens", f"{rows[-1].get('tokens', 0):,}"),
        ("last training loss", f"{_last(rows, 'loss'):.4f}" if _last(rows, "loss") else "-"),
    ]
    if _last(rows, "val/loss") is not None:
        facts.append(("last validation loss", f"{_last(rows, 'val/loss'):.4f}"))
    facts.append(("median tokens/s", f"{statistics.median(r['tokens_per_s'] for r in rows):,.0f}"))
    facts.append(("median MFU", f"{statistics.median(r['mfu'] for r in rows):.1%}"))
    if _last(rows, "energy/kwh") is not None:
        label = " (estimate)" if any(r.get("energy/estimated") for r in rows) else ""
        facts.append(("energy", f"{_last(rows, 'energy/kwh'):.6g} kWh{label}"))
        facts.append(("CO2", f"{_last(rows, 'energy/co2_kg'):.6g} kg{label}"))
    facts.append(("committed checkpoints", str(len(data.checkpoints))))
    return facts


def render(data: RunData) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>neoray run {html.escape(data.run_name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run {html.escape(data.run_name)}</h1>",
        _table(summary(data)),
    ]
    if any(row.get("energy/estimated") for row in data.rows):
        parts.append(
            "<p class='estimate'>Energy is an ESTIMATE on this run: no counter was readable "
            "(no NVML GPU, no readable RAPL), so it is utilisation x energy.cpu_watts.</p>"
        )
    for title, draw, missing in SECTIONS:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        figure = draw(data)
        if figure is None:
            parts.append(f"<p class='missing'>{html.escape(missing)}</p>")
        else:
            alt = html.escape(title)
            image = figures.png_base64(figure)
            parts.append(f"<figure><img alt='{alt}' src='data:image/png;base64,{image}'></figure>")
        if title == "Checkpoints" and data.checkpoints:
            parts.append(
                _table([(f"step {s:,}", uri) for s, uri in sorted(data.checkpoints.items())])
            )
    parts.append("<h2>Config</h2>")
    if data.params:
        parts.append(_table(sorted(data.params.items())))
    else:
        parts.append("<p class='missing'>No MLflow run found: the config is not recorded.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_name: str, run_dir: Path, tracking: TrackingConfig, output: Path) -> Path:
    """Write the report of `run_name` to `output` (atomically) and attach it to the run's
    MLflow run when there is one."""
    data = collect(run_name, run_dir, tracking)
    page = render(data).encode()
    publish_file(output, lambda out: out.write(page))
    if data.run_id is not None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking.uri).log_artifact(data.run_id, str(output))
    return output
