"""The `sweep` config section (conf/sweep/<name>.yaml): what to search and how to stop trials."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neoray.config import ConfigError, dataclass_from_config, to_dict
from neoray.training.config import RUN_NAME

SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")


@dataclass
class SchedulerConfig:
    """`asha` stops trials whose metric trails the others' at each rung (Ray Tune's
    ASHAScheduler); `fifo` runs every trial to the end. Times are steps trained."""

    name: str = "asha"
    grace_period: int = 100  # steps every trial trains before it can be stopped
    reduction_factor: int = 2  # at each rung, 1 / reduction_factor of the trials go on

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(
                f"sweep.scheduler.name={self.name!r}: choose one of {', '.join(SCHEDULERS)}"
            )
        if self.grace_period < 1:
            raise ConfigError("sweep.scheduler.grace_period must be at least 1 step")
        if self.reduction_factor < 2:
            raise ConfigError("sweep.scheduler.reduction_factor must be at least 2")


@dataclass
class ProxyConfig:
    """The model the trials train, as changes to the target's shape."""

    width: int  # the trials' model.hidden_size, and the muP base width of proxy and target
    layers: int | None = None  # the trials' model.num_layers; null: the target's
    heads: int | None = None  # the trials' model.num_heads; null: the target's
    overrides: list[str] = field(default_factory=list)  # for the trials only (steps, layout)

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"sweep.proxy.{name} must be a positive integer, got {value!r}")


@dataclass
class SweepConfig:
    """A search space over pretrain config keys, and how Tune samples and runs it."""

    name: str
    space: dict[str, Any]
    fixed: list[str] = field(default_factory=list)  # pretrain overrides every trial shares
    num_samples: int = 8  # trials (with `grid` entries: repeats of the whole grid)
    max_concurrent_trials: int = 2
    metric: str = "val/loss"
    mode: str = "min"
    seed: int = 0  # the sampling of the space
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trial_cpus: float = 0  # each trial's driver (it only waits on its Ray Train run)
    max_trial_failures: int = 1  # a trial whose driver failed is started again this often
    proxy: ProxyConfig | None = None  # trials train this narrow copy of the target (muP)

    def __post_init__(self) -> None:
        if not RUN_NAME.fullmatch(self.name):
            raise ConfigError(
                f"sweep.name={self.name!r}: use letters, digits, '.', '_' and '-' "
                "(trials are named <sweep.name>-<trial id>)"
            )
        if not self.space:
            raise ConfigError("sweep.space: give at least one key to search over")
        if self.num_samples < 1:
            raise ConfigError("sweep.num_samples must be at least 1")
        if self.max_concurrent_trials < 1:
            raise ConfigError("sweep.max_concurrent_trials must be at least 1")
        if self.mode not in MODES:
            raise ConfigError(f"sweep.mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.trial_cpus < 0 or self.max_trial_failures < 0:
            raise ConfigError("sweep.trial_cpus and sweep.max_trial_failures must be >= 0")


def sweep_config(section: Any) -> SweepConfig:
    values = to_dict(section)
    if values.get("proxy") is not None:
        values["proxy"] = dataclass_from_config(ProxyConfig, values["proxy"], "sweep.proxy")
    values["scheduler"] = dataclass_from_config(
        SchedulerConfig, values.get("scheduler") or {}, "sweep.scheduler"
    )
    return dataclass_from_config(SweepConfig, values, "sweep")
