"""Config sections become dataclasses; wrong or missing fields are named in the error."""

import re
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from neoray.config import ConfigError, dataclass_from_config


@dataclass
class Example:
    path: str
    steps: int = 10


def test_builds_from_omegaconf_with_interpolation():
    section = OmegaConf.create({"root": "/data", "example": {"path": "${root}/x", "steps": 3}})
    assert dataclass_from_config(Example, section.example, "example") == Example("/data/x", 3)


def test_unknown_field_is_named_with_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"example: unknown field\(s\) stpes; valid fields are path, steps"
    ):
        dataclass_from_config(Example, {"path": "x", "stpes": 1}, "example")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_by_name(value):
    from neoray.tracking import TrackingConfig

    section = OmegaConf.create({"flush_timeout_s": value})
    with pytest.raises(ConfigError, match=rf"tracking\.flush_timeout_s={value}: give a finite"):
        dataclass_from_config(TrackingConfig, section, "tracking")


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"example: required field\(s\) path not set"):
        dataclass_from_config(Example, {"steps": 1}, "example")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"placement_strategy": "spread"}, "cluster.placement_strategy='spread'"),
        ({"placement_timeout_s": 0}, "cluster.placement_timeout_s=0"),
        ({"cpus_per_worker": 0}, "cluster.cpus_per_worker=0"),
    ],
)
def test_a_bad_cluster_setting_is_named_before_any_worker_starts(overrides, field):
    from neoray.cluster.ray_train import ClusterConfig

    with pytest.raises(ConfigError, match=re.escape(field)):
        ClusterConfig(**overrides)
    placed = ClusterConfig(placement_strategy="STRICT_SPREAD", placement_timeout_s=None)
    assert placed.placement_strategy == "STRICT_SPREAD"
