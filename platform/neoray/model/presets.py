"""Named model shapes: the Hydra configs in `conf/model/`, loaded as a `NeoXConfig`.

The YAML files are the single source of the presets, so a Hydra run (`model=pythia_410m`)
and Python code (`load_preset("pythia_410m")`) always agree on what a name means.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from neoray import CONF_DIR
from neoray.config import ConfigError, dataclass_from_config
from neoray.model.gpt_neox import NeoXConfig

PRESET_DIR = CONF_DIR / "model"


def available_presets() -> list[str]:
    """Names of the presets in `conf/model/`, sorted."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> NeoXConfig:
    """The `NeoXConfig` of preset `name` (a file `conf/model/<name>.yaml`)."""
    presets = available_presets()
    if name not in presets:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(presets)}")
    return dataclass_from_config(NeoXConfig, OmegaConf.load(PRESET_DIR / f"{name}.yaml"), "model")
