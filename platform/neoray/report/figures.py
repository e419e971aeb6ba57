"""The report's plots, one function per section; each returns None when the run has nothing
to show there (the page then says so)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from neoray.report.data import RunData


def png_base64(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


@contextmanager
def axes(title: str, ylabel: str, xlabel: str = "tokens") -> Iterator:
    figure, ax = plt.subplots(figsize=(8, 3.6))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if "step" in xlabel:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    yield figure, ax
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()


def _series(rows: list[dict], key: str, x: str = "tokens") -> tuple[list, list]:
    chosen = [row for row in rows if row.get(key) is not None and x in row]
    return [row[x] for row in chosen], [row[key] for row in chosen]


def loss(data: RunData):
    if not data.rows:
        return None
    validation = sorted({k for row in data.rows for k in row if k.startswith("val/")})
    with axes("loss", "cross-entropy (nats/token)") as (figure, ax):
        ax.plot(*_series(data.rows, "loss"), lw=0.8, label="train")
        for key in (k for k in validation if k.endswith("/loss")):
            label = "validation" if key == "val/loss" else f"validation: {key.split('/')[1]}"
            ax.plot(*_series(data.rows, key), "o-", ms=3, label=label)
    return figure


def epochs(data: RunData):
    keys = sorted({k for row in data.rows for k in row if k.startswith("epochs/")})
    if not keys:
        return None
    with axes("epochs of each mixture component trained on", "epochs") as (figure, ax):
        for key in keys:
            ax.plot(*_series(data.rows, key), "o-", ms=3, label=key.split("/", 1)[1])
    return figure


def learning_rate(data: RunData):
    if not data.rows:
        return None
    with axes("learning rate", "lr", xlabel="step") as (figure, ax):
        ax.plot(*_series(data.rows, "lr", x="step"))
    return figure


def throughput(data: RunData):
    if not data.rows:
        return None
    with axes("throughput", "tokens/s", xlabel="step") as (figure, ax):
        ax.plot(*_series(data.rows, "tokens_per_s", x="step"), lw=0.8, color="C0")
        mfu = ax.twinx()
        steps, values = _series(data.rows, "mfu", x="step")
        mfu.plot(steps, [100 * v for v in values], lw=0.8, color="C1")
        mfu.set_ylabel("MFU (%)", color="C1")
    return figure


def checkpoints(data: RunData):
    if not data.checkpoints:
        return None
    steps = sorted(data.checkpoints)
    with axes("committed checkpoints", "", xlabel="step") as (figure, ax):
        ax.stem(steps, [1] * len(steps))
        ax.set_yticks([])
    return figure


def evaluations(data: RunData):
    """One panel per kind of suite; zero- and five-shot MMLU share one, to compare them."""
    groups: dict[str, list[str]] = {}
    for key in data.evals:
        if "stderr" in key:  # the metrics themselves, not their standard errors
            continue
        suite = key.split("/")[1]
        group = "MMLU" if suite.startswith("mmlu") else suite
        groups.setdefault(group, []).append(key)
    if not groups:
        return None
    figure, panels = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (group, keys) in zip(panels[0], groups.items(), strict=True):
        for key in keys:
            steps, values = zip(*data.evals[key], strict=True)
            ax.plot(steps, values, "o-", ms=3, label=key.split("/", 1)[1])
        ax.set_title(group)
        ax.set_xlabel("checkpoint step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def energy(data: RunData):
    if not any("energy/kwh" in row for row in data.rows):
        return None
    estimated = any(row.get("energy/estimated") for row in data.rows)
    title = "energy and CO2" + (" (ESTIMATE: utilisation x rated power)" if estimated else "")
    with axes(title, "kWh") as (figure, ax):
        ax.plot(*_series(data.rows, "energy/kwh"), "o-", ms=5, lw=2.5, color="C0", label="kWh")
        co2 = ax.twinx()
        co2.plot(*_series(data.rows, "energy/co2_kg"), "s--", ms=3, color="C2", label="kg CO2")
        co2.set_ylabel("kg CO2", color="C2")
    return figure
