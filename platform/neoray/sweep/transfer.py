"""Sweeping a narrow proxy and transferring the result to the target model (muP).

A sweep with a `proxy` section (conf/sweep/<name>.yaml) runs its trials on a narrower (and
possibly shallower) copy of the target model and writes, in `best.yaml`, the command that
trains the target with the values found. The hyperparameters of a small model hold on a wide
one only under the Maximal Update Parametrization (`neoray.model.mup`), so a proxy sweep trains
the proxy and the target under muP, with the proxy's width as the base width of both.

The target is the run the sweep's `fixed` overrides and its command line give; the trials are
that run with the model's `width`, `layers` and `heads` replaced and the proxy's own
`overrides` (e.g. fewer steps, another layout) added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray.config import ConfigError, dataclass_from_config, to_dict
from neoray.model.flops import model_flops_per_token
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.config import ParallelConfig
from neoray.sweep.config import ProxyConfig, sweep_config
from neoray.sweep.space import parse_entry
from neoray.sweep.trial import compose_pretrain


def mup_overrides(proxy: ProxyConfig) -> list[str]:
    """What the proxy and the target share: muP, relative to the proxy's width."""
    return ["model.parametrization=mup", f"model.mup_base_width={proxy.width}"]


def target_overrides(proxy: ProxyConfig | None, base_overrides: list[str]) -> list[str]:
    """The overrides of the target run (with muP when the sweep has a proxy)."""
    return [*base_overrides, *mup_overrides(proxy)] if proxy else list(base_overrides)


def trial_base_overrides(proxy: ProxyConfig | None, base_overrides: list[str]) -> list[str]:
    """The overrides every trial shares: the target's, then the proxy's shape and its own
    overrides (a shorter run on fewer devices, typically)."""
    if proxy is None:
        return list(base_overrides)
    shape = [f"model.hidden_size={proxy.width}"]
    shape += [f"model.num_layers={proxy.layers}"] if proxy.layers else []
    shape += [f"model.num_heads={proxy.heads}"] if proxy.heads else []
    return [*target_overrides(proxy, base_overrides), *shape, *proxy.overrides]


def trial_count(space: dict[str, Any], num_samples: int) -> int:
    """How many trials a sweep runs: `num_samples` repeats of the grid of its `grid` keys."""
    entries = (parse_entry(key, entry) for key, entry in space.items())
    return num_samples * math.prod(len(values) for name, values in entries if name == "grid")


@dataclass(frozen=True)
class SweepCompute:
    trials: int
    model: NeoXConfig  # the trials'
    tokens_per_trial: int
    flops: float  # model FLOPs of all trials, each trained to its end (ASHA stops some earlier)


def sweep_compute(trial_cfg: Any, trials: int) -> SweepCompute:
    """The model FLOPs of `trials` runs of the pretrain config `trial_cfg` (a composed config:
    its data need not exist)."""
    values = to_dict(trial_cfg)
    model = dataclass_from_config(NeoXConfig, values["model"], "model")
    parallel = dataclass_from_config(ParallelConfig, values["parallel"], "parallel")
    seq_len = int(values["data"]["seq_len"])
    tokens = int(values["train"]["steps"]) * parallel.sequences_per_step * seq_len
    flops = float(trials * tokens * model_flops_per_token(model, seq_len))
    return SweepCompute(trials, model, tokens, flops)


def plan_sweep(name: str, conf_dir: str | Path) -> tuple[NeoXConfig, SweepCompute]:
    """The target model sweep `name` (conf/sweep/<name>.yaml) tunes, and what its trials
    cost, from the configs alone."""
    from omegaconf import OmegaConf

    path = Path(conf_dir) / "sweep" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(conf_dir) / "sweep").glob("*.yaml"))
        raise ConfigError(f"unknown sweep {name!r}; conf/sweep/ has {', '.join(known)}")
    sweep = sweep_config(OmegaConf.load(path))
    target_cfg = compose_pretrain(str(conf_dir), target_overrides(sweep.proxy, sweep.fixed))
    target = dataclass_from_config(NeoXConfig, to_dict(target_cfg)["model"], "model")
    trial_cfg = compose_pretrain(str(conf_dir), trial_base_overrides(sweep.proxy, sweep.fixed))
    return target, sweep_compute(trial_cfg, trial_count(sweep.space, sweep.num_samples))
