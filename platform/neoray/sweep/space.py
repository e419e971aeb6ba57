"""The search space: `key: {distribution: arguments}` entries turned into Ray Tune's
distributions, checked against the pretrain config before any trial starts, and each trial's
sampled values turned back into Hydra overrides.

A key is a config group (`model`, `parallel`: its options are config files) or a value of the
pretrain config (`optim.lr`). A distribution is one of Tune's sampling functions, named as in
`ray.tune` (`grid` is `grid_search`); its arguments are a list (positional) or a mapping:

    optim.lr: {loguniform: [1e-4, 3e-3]}
    optim.warmup: {choice: [0.01, 0.1]}
    model: {choice: [tiny, pythia_70m]}
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neoray.config import ConfigError, flatten, to_dict

# Tune's sampling functions, and which arguments are the range's ends (checked as corners).
DISTRIBUTIONS = {
    "uniform": (0, 1),
    "quniform": (0, 1),
    "loguniform": (0, 1),
    "qloguniform": (0, 1),
    "randint": (0, 1),  # the upper end is exclusive
    "qrandint": (0, 1),
    "lograndint": (0, 1),
    "qlograndint": (0, 1),
    "randn": (),
    "qrandn": (),
    "choice": None,  # one argument: the list of values, every one of them a corner
    "grid": None,
}
LOG_SCALE = ("loguniform", "qloguniform", "lograndint", "qlograndint")


def parse_entry(key: str, entry: Any) -> tuple[str, Any]:
    """(distribution, arguments) of one space entry, or a ConfigError that names it."""
    entry = to_dict(entry) if isinstance(entry, DictConfig | dict) else entry
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            f"sweep.space.{key}: expected one distribution and its arguments, "
            f"e.g. {{loguniform: [1e-4, 3e-3]}} or {{choice: [a, b]}}; got {entry!r}"
        )
    ((name, arguments),) = entry.items()
    if OmegaConf.is_config(arguments):
        arguments = OmegaConf.to_container(arguments)
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"sweep.space.{key}: unknown distribution {name!r}; Ray Tune's are "
            f"{', '.join(DISTRIBUTIONS)}"
        )
    if DISTRIBUTIONS[name] is None and (not isinstance(arguments, list) or not arguments):
        raise ConfigError(f"sweep.space.{key}: {name} takes a non-empty list of values")
    return name, arguments


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """Tune's domain for every key of the space."""
    from ray import tune

    domains = {}
    for key, entry in space.items():
        name, arguments = parse_entry(key, entry)
        if DISTRIBUTIONS[name] is None:
            function = tune.grid_search if name == "grid" else tune.choice
            domains[key] = function(arguments)
            continue
        function = getattr(tune, name)
        try:
            if isinstance(arguments, dict):
                domains[key] = function(**arguments)
            else:
                domains[key] = function(
                    *(arguments if isinstance(arguments, list) else [arguments])
                )
        except (TypeError, ValueError, AssertionError) as err:
            raise ConfigError(f"sweep.space.{key}: {name}{arguments!r} is refused: {err}") from err
    return domains


def corners(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Values each key can take at the edges of its distribution (every value of a choice)."""
    values = {}
    for key, entry in space.items():
        name, arguments = parse_entry(key, entry)
        ends = DISTRIBUTIONS[name]
        if ends is None:
            values[key] = list(arguments)
        elif ends and isinstance(arguments, list) and len(arguments) >= 2:
            low, high = arguments[0], arguments[1]
            values[key] = [low, high - 1 if name.endswith("randint") else high]
        else:
            values[key] = []
    return values


def is_log_scale(space: dict[str, Any], key: str) -> bool:
    return parse_entry(key, space[key])[0] in LOG_SCALE


def check_keys(space: dict[str, Any], pretrain: DictConfig, conf_dir: str | Path) -> None:
    """Every key is a config group or a value of the pretrain config (not a whole section)."""
    known = flatten(to_dict(pretrain))
    for key in space:
        if (Path(conf_dir) / key).is_dir():
            continue
        value = OmegaConf.select(pretrain, key, default=_MISSING)
        if value is _MISSING:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"sweep.space: unknown key {key!r}: not in the pretrain config{hint}")
        if isinstance(value, DictConfig):
            raise ConfigError(
                f"sweep.space.{key}: is a whole config section; search over its values "
                f"({', '.join(f'{key}.{k}' for k in list(value)[:3])}, ...)"
            )


def override(key: str, value: Any) -> str:
    """The Hydra override that sets `key` to `value` (numbers keep their exact repr)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float):
        text = repr(value)
    elif re.fullmatch(r"[\w./:+-]+", str(value)):
        text = str(value)
    else:  # quoted: Hydra reads `,` `[` `{` and spaces as syntax
        text = "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"


_MISSING = object()
