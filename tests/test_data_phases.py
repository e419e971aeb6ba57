"""Mixture phases (`data.phases`): before the switch, the batches of the first mixture; after
it, the next mixture's weights, each component continuing its own sample order; the validation
set the same throughout; and a resume refused when it rewrites a phase already trained on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from neoray.config import ConfigError
from neoray.data.config import ComponentConfig, DataConfig, PhaseConfig, data_config
from neoray.data.inspect import batch_samples
from neoray.data.loader import BatchSchedule, train_mixture
from neoray.data.mixture import build_mixture
from neoray.data.phases import evaluation_weights, mixture_record, rewritten_phases
from neoray.tokenizer.load import load_tokenizer

SCHEDULE = BatchSchedule(
    micro_batch_size=2, grad_accum_steps=2, data_parallel_size=2, train_steps=40
)
SWITCH = 15
ANNEAL = {"code": 0.2, "prose": 0.3, "extra": 0.5}


def phased(data: DataConfig, cache_dir: str | None = None) -> DataConfig:
    """The demo mixture, then from step SWITCH the ANNEAL weights, `extra` a component first
    sampled there (declared with weight 0; it reads prose's files: its own sample order)."""
    components = {**data.components, "extra": ComponentConfig(data.components["prose"].prefix, 0.0)}
    return dataclasses.replace(
        data,
        components=components,
        phases=[PhaseConfig(SWITCH, ANNEAL)],
        cache_dir=cache_dir or data.cache_dir,
    )


def served(mixture, name: str, start: int, stop: int) -> list[np.ndarray]:
    """The samples the mixture's positions [start, stop) take from component `name`, in order."""
    return [mixture[i] for i in range(start, stop) if mixture.source(i) == name]


def alone(data: DataConfig, prefix_of: str, samples: int):
    """`samples` samples of one component's sample order: a mixture of it alone."""
    only = {"only": ComponentConfig(data.components[prefix_of].prefix, 1.0)}
    return build_mixture(dataclasses.replace(data, components=only), "train", samples)


def test_a_switch_keeps_the_first_mixtures_batches_then_follows_the_next(demo_data, tmp_path):
    single = train_mixture(demo_data, SCHEDULE)
    mixture = train_mixture(phased(demo_data), SCHEDULE)
    g, total = SCHEDULE.global_batch_size, SCHEDULE.train_samples
    switch = SWITCH * g

    # Before the switch: the single-phase run's samples, as inspect_batch shows them.
    for i in range(switch):
        assert mixture.source(i) == single.source(i)
        assert np.array_equal(mixture[i], single[i]), i
    tokenizer = load_tokenizer(demo_data.tokenizer)
    for step in (0, SWITCH - 1):
        shown = batch_samples(mixture, tokenizer, SCHEDULE, step)
        assert [s.text for s in shown] == [
            s.text for s in batch_samples(single, tokenizer, SCHEDULE, step)
        ]
    after = batch_samples(mixture, tokenizer, SCHEDULE, SWITCH)
    assert [s.text for s in after] != [
        s.text for s in batch_samples(single, tokenizer, SCHEDULE, SWITCH)
    ]
    assert mixture.source(switch - 1) != "extra" and "extra" in {s.component for s in after}

    # After it: the new weights, each within one sample in every stretch from the switch.
    for stop in range(switch + g, total + 1, g):
        taken = [mixture.source(i) for i in range(switch, stop)]
        for name, weight in ANNEAL.items():
            assert abs(taken.count(name) - weight * (stop - switch)) <= 1, (name, stop)

    # code and prose continue their own order where the first mixture left them; extra starts
    # its own from the beginning (though it reads prose's files).
    for name in ("code", "prose"):
        own = served(mixture, name, 0, total)
        reference = alone(demo_data, name, len(own))
        assert all(np.array_equal(a, reference[k]) for k, a in enumerate(own)), name
    extra = served(mixture, "extra", 0, total)
    prose = alone(demo_data, "prose", len(extra))
    assert all(np.array_equal(a, prose[k]) for k, a in enumerate(extra))
    epochs_before, epochs_after = mixture.epochs(switch), mixture.epochs(total)
    assert epochs_before["extra"] == 0 < epochs_after["extra"]
    assert epochs_after["code"] > epochs_before["code"] == single.epochs(switch)["code"]

    # Built again from nothing (another cache folder): the same order.
    again = train_mixture(phased(demo_data, str(tmp_path)), SCHEDULE)
    assert np.array_equal(again.dataset_index, mixture.dataset_index)
    assert np.array_equal(again.sample_index, mixture.sample_index)
    assert all(np.array_equal(again[i], mixture[i]) for i in range(switch - g, switch + g))


def test_the_validation_set_is_one_for_the_whole_run(demo_data):
    """Validation mixes every component of every phase, by its share averaged over the phases
    (so `val/extra/loss` exists from step 0); without phases it is the components' mixture."""
    cfg = phased(demo_data)
    shares = evaluation_weights(cfg)
    assert shares == pytest.approx({"code": 0.45, "prose": 0.3, "extra": 0.25})
    validation = build_mixture(cfg, "validation", 400)
    assert validation.names == ["code", "prose", "extra"]
    taken = [validation.source(i) for i in range(400)]
    assert {n: taken.count(n) for n in shares} == pytest.approx(
        {n: 400 * s for n, s in shares.items()}, abs=1
    )
    plain = build_mixture(demo_data, "validation", 400)
    assert evaluation_weights(demo_data) == {"code": 0.7, "prose": 0.3}
    assert plain.names == ["code", "prose"]


def test_a_resume_may_add_future_phases_but_not_rewrite_trained_ones(demo_data):
    cfg = phased(demo_data)
    recorded = mixture_record(cfg)
    assert recorded == [
        {"from_step": 0, "components": {"code": 0.7, "prose": 0.3}},
        {"from_step": SWITCH, "components": ANNEAL},
    ]
    for step in (1, SWITCH, 30):
        assert rewritten_phases(cfg, recorded, step) is None
    # Declaring the anneal later, on a run saved before it starts, changes nothing trained.
    assert rewritten_phases(cfg, mixture_record(demo_data), SWITCH) is None
    # Editing a phase in the past (or its start, or the first mixture) is refused.
    edits = {
        "weights": [PhaseConfig(SWITCH, {**ANNEAL, "extra": 0.6})],
        "start": [PhaseConfig(SWITCH - 1, ANNEAL)],
        "removed": [],
    }
    for edit, phases in edits.items():
        said = rewritten_phases(dataclasses.replace(cfg, phases=phases), recorded, SWITCH + 1)
        assert said is not None and said.startswith(f"steps 0-{SWITCH} trained on"), edit
    reweighted = dataclasses.replace(
        cfg, components={**cfg.components, "code": ComponentConfig("x", 0.5)}
    )
    said = rewritten_phases(reweighted, recorded, 1)
    assert said == (
        "steps 0-0 trained on the mixture phases from step 0: code 0.7, prose 0.3, the config "
        "now gives from step 0: code 0.5, prose 0.3 for them"
    )
    assert rewritten_phases(cfg, [], 30) is None  # a checkpoint from before the record


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        (
            [{"from_step": 0, "components": {"b": 1}}],
            r"data\.phases\[0\]\.from_step=0: give a step after 0",
        ),
        (
            [{"from_step": 5, "components": {"b": 1}}, {"from_step": 5, "components": {"a": 1}}],
            r"data\.phases\[1\]\.from_step=5",
        ),
        (
            [{"from_step": 5, "components": {"c": 1}}],
            r"data\.phases\[0\]\.components: c not in data\.components \(a, b\)",
        ),
        ([{"from_step": 5, "components": {"b": 0}}], r"at least one positive"),
        ([{"from_step": 5, "weights": {"b": 1}}], r"data\.phases\[0\]: unknown field\(s\) weights"),
        ([5], r"data\.phases\[0\]=5: give a phase as \{from_step: 800"),
    ],
)
def test_bad_phases_are_refused_naming_the_field(phases, message):
    section = {
        "tokenizer": "t",
        "components": {"a": {"prefix": "a"}, "b": {"prefix": "b", "weight": 0}},
        "phases": phases,
    }
    with pytest.raises(ConfigError, match=message):
        data_config(section)
