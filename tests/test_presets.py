"""The model presets in conf/model/: they load, and their sizes are the published ones."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from neoray.config import ConfigError, dataclass_from_config
from neoray.model import NeoXConfig
from neoray.model.presets import PRESET_DIR, available_presets, load_preset

# "Total params" of the Pythia paper (Biderman et al. 2023, table 1 of the released models).
PYTHIA_PARAMETERS = {
    "pythia_70m": 70_426_624,
    "pythia_160m": 162_322_944,
    "pythia_410m": 405_334_016,
    "pythia_1b": 1_011_781_632,
    "pythia_1_4b": 1_414_647_808,
    "pythia_2_8b": 2_775_208_960,
    "pythia_6_9b": 6_857_302_016,
    "pythia_12b": 11_846_072_320,
}


def test_every_preset_loads():
    assert set(available_presets()) == {"tiny", "neox_20b", *PYTHIA_PARAMETERS}
    for name in available_presets():
        assert isinstance(load_preset(name), NeoXConfig)


def test_neox_20b_size():
    config = load_preset("neox_20b")
    assert (config.num_layers, config.hidden_size, config.num_heads) == (44, 6144, 64)
    assert config.padded_vocab_size == 50432
    assert round(config.num_parameters() / 1e9, 2) == 20.55


@pytest.mark.parametrize("name", sorted(PYTHIA_PARAMETERS))
def test_pythia_parameter_counts(name):
    assert load_preset(name).num_parameters() == PYTHIA_PARAMETERS[name]


@pytest.mark.parametrize("name", ["neox_20b", *sorted(PYTHIA_PARAMETERS)])
def test_parameter_counts_equal_transformers_for_the_same_config(name):
    """Counted on `transformers`' own GPTNeoX, built without memory on the meta device."""
    import torch
    import transformers

    from neoray.model.hf import to_hf_config

    config = load_preset(name)
    with torch.device("meta"):
        reference = transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(**to_hf_config(config, torch.float32))
        )
    assert config.num_parameters() == sum(p.numel() for p in reference.parameters())


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="pythia_70m"):
        load_preset("pythia_7b")


def test_unknown_key_is_rejected_by_name():
    section = OmegaConf.load(PRESET_DIR / "tiny.yaml")
    section.hidden_dim = 64
    with pytest.raises(ConfigError, match="hidden_dim"):
        dataclass_from_config(NeoXConfig, section, "model")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_heads": 5}, "num_heads"),  # 64 is not divisible by 5
        ({"rotary_pct": 0.1875}, "rotary_pct"),  # 3 of 16 head dims: odd
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(load_preset("tiny"), **change)
