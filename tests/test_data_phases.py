"""Mixture phases (`data.phases`): before the switch, the batches of the first mixture; after
it, the next mixture's weights, each component continuing its own sample order; the validation
set the same throughout; and a resume refused when it rewrites a phase already trained on."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from distributed import torchrun_launcher
from layouts import copy_checkpoint, metrics, overrides

from neoray.checkpoint.manifest import (
    checkpoint_key,
    committed_checkpoints,
    latest_checkpoint,
)
from neoray.config import ConfigError
from neoray.data.config import ComponentConfig, DataConfig, PhaseConfig, data_config
from neoray.data.inspect import batch_samples
from neoray.data.loader import BatchSchedule, train_mixture
from neoray.data.mixture import build_mixture
from neoray.data.phases import evaluation_weights, mixture_record, rewritten_phases
from neoray.storage import LocalStorage
from neoray.tokenizer.load import load_tokenizer
from neoray.tracking import find_run

ROOT = Path(__file__).resolve().parents[1]

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


# A real run across a switch: the tiny model at pp=2 (tests/layouts.py) under torchrun, 4 steps
# of 8 sequences, the anneal (with `extra`) from step 2, validation after steps 2 and 4.

LAYOUT = (1, 2, 1)
RUN = "phased"


def anneal(data: DataConfig, **weights: float) -> list[str]:
    """The overrides declaring `extra` and the phase from step 2 with `weights`."""
    phase = ",".join(f"{name}:{weight}" for name, weight in weights.items())
    prose = data.components["prose"].prefix
    return [
        f"+data.components.extra={{prefix:'{prose}',weight:0}}",
        f"data.phases=[{{from_step:2,components:{{{phase}}}}}]",
    ]


def pretrain(data: DataConfig, run_dir, store, *extra: str) -> subprocess.CompletedProcess:
    command = [
        *torchrun_launcher(2),
        "jobs/pretrain.py",
        "launcher=torchrun",
        *overrides(LAYOUT),
        "optim.decay_steps=4",  # one schedule whether a run stops at step 1 or 4
        "data=demo",
        f"data.root={data.root}",
        "train.eval_interval=2",
        "train.eval_iters=2",
        "checkpoint.interval=1",
        "checkpoint.keep_last=5",
        "tracking.experiment=data_phases",
        f"run_name={RUN}",
        f"run_dir={run_dir}",
        f"storage.root={store}",
        *extra,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result.stdout + result.stderr


def test_a_run_resumed_before_the_switch_trains_as_one_never_interrupted(
    demo_data, tmp_path, mlflow_tracking_uri
):
    """The uninterrupted run switches at step 2: `mixture/<component>` records each phase in
    metrics.jsonl and MLflow, the validation losses per component (`extra` included) run on
    across the switch, and every checkpoint records the phases. Its step-1 checkpoint, saved
    (as its manifest says) before the anneal was declared, resumes with it declared: the same
    losses, training and validation, as the uninterrupted run. Rewriting the phase after it was
    trained on is refused, naming the steps and the fix."""
    from mlflow.tracking import MlflowClient

    phases = anneal(demo_data, **ANNEAL)
    store = tmp_path / "store"
    succeeded(pretrain(demo_data, tmp_path / "run", store, "train.steps=4", *phases))

    rows = metrics(tmp_path / "run")
    first, second = {"code": 0.7, "prose": 0.3, "extra": 0.0}, ANNEAL
    assert {k[8:]: v for k, v in rows[0].items() if k.startswith("mixture/")} == first
    assert {k[8:]: v for k, v in rows[2].items() if k.startswith("mixture/")} == second
    assert not any(k.startswith("mixture/") for step in (1, 3) for k in rows[step])
    for step in (1, 3):  # after steps 2 and 4: every component's validation loss
        for name in ("code", "prose", "extra"):
            assert math.isfinite(rows[step][f"val/{name}/loss"]), (step, name)
    assert rows[1]["epochs/extra"] == 0 < rows[3]["epochs/extra"]
    storage = LocalStorage(store)
    saved = {m.step: m for m in committed_checkpoints(storage, RUN)}
    assert saved[4].mixture_phases == [
        {"from_step": 0, "components": {"code": 0.7, "prose": 0.3}},
        {"from_step": 2, "components": ANNEAL},
    ]
    client = MlflowClient(mlflow_tracking_uri)
    run = find_run(client, client.get_experiment_by_name("data_phases").experiment_id, RUN)
    history = client.get_metric_history(run.info.run_id, "mixture/extra")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (2, 0.5)]
    assert "'from_step': 2" in run.data.params["data.phases"]

    # Resumed at step 1 from a checkpoint saved before the anneal was declared.
    earlier = dataclasses.replace(saved[1], mixture_phases=saved[1].mixture_phases[:1])
    copy_checkpoint(store / checkpoint_key(RUN, 1), earlier, LocalStorage(tmp_path / "again"))
    output = succeeded(
        pretrain(
            demo_data,
            tmp_path / "resumed",
            tmp_path / "again",
            "train.steps=4",
            "tracking.enabled=false",
            *phases,
        )
    )
    assert f"resumed run '{RUN}' at step 1" in output
    resumed = metrics(tmp_path / "resumed")
    for step in (1, 2, 3):
        assert resumed[step]["loss"] == rows[step]["loss"], step
    for step in (1, 3):
        validation = {
            k: v for k, v in rows[step].items() if k.startswith("val/") and "time" not in k
        }
        assert {k: resumed[step][k] for k in validation} == validation

    # The anneal's weights rewritten after steps 2 and 3 trained on them: refused.
    edited = anneal(demo_data, code=0.2, prose=0.3, extra=0.6)
    refused = pretrain(demo_data, tmp_path / "run", store, "train.steps=5", *edited)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "steps 0-3 trained on the mixture phases" in said, said[-3000:]
    assert "from step 2: code 0.2, extra 0.5, prose 0.3, the config now gives" in said
    assert "data.phases=[{from_step: 4, components: {...}}]" in said
    assert "resumed run" not in said
    assert latest_checkpoint(storage, RUN).step == 4
