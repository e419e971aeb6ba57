"""A 3D layout is checked before anything is allocated; each error names the field and fix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neoray.config import ConfigError
from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig, validate_layout


def test_the_20b_layout_is_valid():
    parallel = ParallelConfig(
        tp=2, pp=4, dp=12, micro_batch_size=4, grad_accum_steps=32, global_batch_size=1536
    )
    validate_layout(load_preset("neox_20b"), parallel, world_size=96)
    assert parallel.sequences_per_step == 1536


@pytest.mark.parametrize(
    "model_overrides, parallel, world_size, expected",
    [
        ({}, ParallelConfig(tp=2, pp=2, dp=2), 4, r"4 processes .* = 8: launch 8 processes"),
        ({"num_heads": 6, "hidden_size": 96}, ParallelConfig(tp=4), None, r"model\.num_heads=6"),
        ({"intermediate_size": 250}, ParallelConfig(tp=4), None, r"MLP width \(250"),
        ({}, ParallelConfig(pp=3), None, r"model\.num_layers=2 .* parallel\.pp <= 2"),
        ({"vocab_size": 300}, ParallelConfig(tp=2), None, r"set model\.vocab_multiple=256"),
    ],
)
def test_bad_layouts_are_rejected(model_overrides, parallel, world_size, expected):
    model = load_preset("tiny")
    for key, value in model_overrides.items():
        setattr(model, key, value)
    with pytest.raises(ConfigError, match=expected):
        validate_layout(model, parallel, world_size)


def test_global_batch_must_match_the_product():
    with pytest.raises(ConfigError, match=r"set parallel\.grad_accum_steps=32"):
        ParallelConfig(dp=12, micro_batch_size=4, grad_accum_steps=1, global_batch_size=1536)
    with pytest.raises(ConfigError, match=r"change parallel\.micro_batch_size"):
        ParallelConfig(dp=7, micro_batch_size=4, global_batch_size=1536)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_beyond_one_are_rejected(stage):
    with pytest.raises(ConfigError, match=r"pipeline engine supports ZeRO stage 0 or 1"):
        ParallelConfig(zero_stage=stage)


def test_sizes_must_be_positive():
    with pytest.raises(ConfigError, match=r"parallel\.tp must be at least 1"):
        ParallelConfig(tp=0)


@given(
    tp=st.integers(1, 4),
    pp=st.integers(1, 4),
    dp=st.integers(1, 16),
    micro=st.integers(1, 4),
    accum=st.integers(1, 8),
    workers=st.integers(0, 256),
)
def test_a_shrunk_layout_keeps_the_global_batch_on_the_workers_left(
    tp, pp, dp, micro, accum, workers
):
    parallel = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch_size=micro, grad_accum_steps=accum)
    shrunk = parallel.shrunk_to(workers)
    fitting = [
        d
        for d in range(1, dp)
        if tp * pp * d <= workers and (micro * accum * dp) % (micro * d) == 0
    ]
    if not fitting:
        assert shrunk is None
        return
    assert (shrunk.tp, shrunk.pp, shrunk.micro_batch_size) == (tp, pp, micro)
    assert shrunk.dp == max(fitting) and shrunk.world_size <= workers
    assert shrunk.sequences_per_step == parallel.sequences_per_step
