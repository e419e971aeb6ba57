"""Mixture phases: which component weights make which samples of each split, and the record of
them a checkpoint keeps so that a resumed run cannot rewrite the mixture it already trained on.

The train split follows `data.phases`: the weights of `data.components` from step 0, each
phase's from its `from_step` (step N's samples being [N * G, (N + 1) * G), G the global batch
size). Validation and test keep one mixture for the whole run, so that `val/loss` and
`val/<component>/loss` are measured on the same samples before and after a switch: each
component weighted by its share averaged over the phases (without phases: the components'
weights, exactly as given). A component first trained in a later phase thus has its validation
loss from the start of the run, showing what the switch does to it. (Phases added or edited
when a run is resumed change that set from then on.)
"""

from __future__ import annotations

from typing import Any

from neoray.data.config import DataConfig

Phase = tuple[int, dict[str, float]]  # (first sample, component -> weight)


def split_phases(cfg: DataConfig, split: str, global_batch_size: int | None) -> list[Phase]:
    """The phases of `split`'s mixture, each from its first sample; the train split needs the
    `global_batch_size` to place phases given in steps."""
    phases = cfg.mixture_phases()
    if split != "train":
        return [(0, evaluation_weights(cfg))]
    if len(phases) > 1 and global_batch_size is None:
        raise ValueError("data.phases are given in steps: the train mixture needs the batch size")
    return [(step * (global_batch_size or 0), weights) for step, weights in phases]


def evaluation_weights(cfg: DataConfig) -> dict[str, float]:
    """The validation and test mixture's weights (see the module's docstring)."""
    phases = cfg.mixture_phases()
    if len(phases) == 1:
        return phases[0][1]
    shares = {name: 0.0 for name in cfg.components}
    for _, weights in phases:
        total = sum(weights.values())
        for name, weight in weights.items():
            shares[name] += weight / total / len(phases)
    return shares


def mixture_metrics(cfg: DataConfig, step: int, start: int) -> dict[str, float]:
    """`mixture/<component>` (its share of the train mixture) at the first step a job trains
    (`start`) and at the first step of each phase, so that the metrics (MLflow's included)
    keep the mixture's history; empty on other steps."""
    phases = cfg.mixture_phases()
    if step != start and step not in {first for first, _ in phases}:
        return {}
    current = [weights for first, weights in phases if first <= step][-1]
    total = sum(current.values())
    return {f"mixture/{name}": weight / total for name, weight in current.items()}


def mixture_record(cfg: DataConfig) -> list[dict[str, Any]]:
    """The declared phases as a checkpoint's manifest records them (`mixture_phases`): each
    one's first step and its positive weights."""
    return [
        {"from_step": step, "components": {n: w for n, w in weights.items() if w > 0}}
        for step, weights in cfg.mixture_phases()
    ]


def rewritten_phases(cfg: DataConfig, recorded: list[dict[str, Any]], step: int) -> str | None:
    """What `cfg` changes in the phases of `recorded` (a manifest's `mixture_phases`) that
    steps before `step` trained on, said in words; None when it changes none of them. Phases
    starting at `step` or later may be added, edited or removed freely: nothing trained on
    them yet."""
    if not recorded:
        return None  # a checkpoint from before mixtures were recorded

    def trained(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for p in phases if p["from_step"] < step]

    before, now = trained(recorded), trained(mixture_record(cfg))
    if before == now:
        return None
    return (
        f"steps 0-{step - 1} trained on the mixture phases {_said(before)}, the config now "
        f"gives {_said(now)} for them"
    )


def _said(phases: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"from step {p['from_step']}: "
        + ", ".join(f"{name} {weight:g}" for name, weight in sorted(p["components"].items()))
        for p in phases
    )
