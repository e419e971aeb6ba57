"""muP: activations that keep their size as the model widens (the coordinate check), a
learning rate tuned at one width that holds at 4x the width, and sweeps that tune a narrow
proxy and hand the result to the target model. The export and the parallel layouts of a muP
model are tested with the others (test_hf.py, test_parallel_parity.py)."""

from __future__ import annotations

import math
import shlex

import pytest
import yaml

from neoray import CONF_DIR
from neoray.config import ConfigError
from neoray.sweep.config import ProxyConfig, SweepConfig
from neoray.sweep.outcome import TrialOutcome, write_best
from neoray.sweep.run import check_sweep, check_target
from neoray.sweep.transfer import target_overrides, trial_base_overrides
from neoray.sweep.trial import compose_pretrain
from neoray.training.config import pretrain_config
from neoray.training.mup_check import PROBES, coordinate_check, growth, lr_grid_losses

WIDTHS = [64, 128, 256, 512]


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard():
    """After 4 Adam steps at one learning rate, each activation's mean |x| grows with the
    width under the standard parametrization (the updates grow with the fan-in) and stays
    flat under muP: slope of log(mean |x|) against log(width) near 0 for every probe."""
    mup = coordinate_check("mup", WIDTHS, seeds=1)
    standard = coordinate_check("standard", WIDTHS, seeds=1)
    mup_slopes = {probe: growth(mup[probe]) for probe in PROBES}
    standard_slopes = {probe: growth(standard[probe]) for probe in PROBES}
    print(f"slopes: mup {mup_slopes}, standard {standard_slopes}")
    assert all(abs(slope) < 0.25 for slope in mup_slopes.values()), mup_slopes
    for probe in ("attention", "mlp", "layer"):
        assert standard_slopes[probe] > 0.5, standard_slopes
    assert standard_slopes["logits"] > 0.2, standard_slopes


def test_best_learning_rate_of_a_4x_narrower_proxy_holds_under_mup_only():
    """A grid of learning rates (factor 2 apart) for 30 steps on a Markov chain, at widths 32
    (the proxy, muP's base) and 128. Under muP the wide model's best lr is within one grid step
    of the proxy's; under the standard parametrization it moves down (two steps when measured:
    2^-4 -> 2^-6), the reason a standard sweep only tunes the model it runs."""
    grid = [2.0**-k for k in range(7, 3, -1)]  # 2^-3 is far worse for all four (3.4 to 4.9)
    best, losses = {}, {}
    for parametrization in ("mup", "standard"):
        for width in (32, 128):
            losses[parametrization, width] = lr_grid_losses(parametrization, width, 32, grid)
            found = losses[parametrization, width]
            best[parametrization, width] = min(found, key=found.get)
    steps = {p: round(math.log2(best[p, 32] / best[p, 128])) for p in ("mup", "standard")}
    print(f"best lr: {best}; proxy / target in grid steps: {steps}; losses: {losses}")
    assert abs(steps["mup"]) <= 1, (best, losses)
    assert steps["standard"] >= 1, (best, losses)
    # muP's wider model is better at the lr the proxy chose
    assert losses["mup", 128][best["mup", 32]] < losses["mup", 32][best["mup", 32]]


def compose(overrides: list[str]):
    return pretrain_config(compose_pretrain(str(CONF_DIR), overrides))


def test_a_proxy_sweeps_trials_train_the_proxy_and_best_yaml_trains_the_target(tmp_path):
    proxy = ProxyConfig(width=32, layers=1, heads=2, overrides=["train.steps=20"])
    sweep = SweepConfig(name="lr", space={"optim.lr": {"grid": [1e-3, 1e-2]}}, proxy=proxy)
    base = ["model=tiny", "train.steps=200"]
    trial = compose(trial_base_overrides(proxy, base))
    target_run = target_overrides(proxy, base)
    target = compose(target_run)
    shape = lambda m: (m.hidden_size, m.num_layers, m.num_heads, m.parametrization)  # noqa: E731
    assert shape(trial.model) == (32, 1, 2, "mup") and trial.train.steps == 20
    assert shape(target.model) == (64, 2, 4, "mup") and target.train.steps == 200
    assert trial.model.mup_base_width == target.model.mup_base_width == 32

    best = TrialOutcome("t1", {"optim.lr": 1e-2}, "completed", 2.5, 20)
    command = write_best(tmp_path / "best.yaml", best, sweep, target_run)
    document = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert document["proxy"] == {
        "width": 32,
        "layers": 1,
        "heads": 2,
        "overrides": ["train.steps=20"],
    }
    assert document["command"] == command
    words = shlex.split(command)
    assert words[:2] == ["python", "jobs/pretrain.py"]
    rerun = compose([w for w in words[2:] if not w.startswith("run_name=")])
    assert shape(rerun.model) == shape(target.model) and rerun.model.mup_base_width == 32
    assert (rerun.optim.lr, rerun.train.steps) == (1e-2, 200)


@pytest.mark.parametrize(
    "proxy, message",
    [
        (ProxyConfig(width=30), r"sweep\.proxy: the trials' model: model\.hidden_size \(30\)"),
        (ProxyConfig(width=32, heads=8), r"sweep\.proxy: the trials' model: .*rotary"),
    ],
)
def test_a_proxy_that_is_no_model_is_refused_by_name(proxy, message):
    sweep = SweepConfig(name="lr", space={"optim.lr": {"grid": [1e-3]}}, proxy=proxy)
    with pytest.raises(ConfigError, match=message):
        check_sweep(sweep, str(CONF_DIR), trial_base_overrides(proxy, ["model=tiny"]))


def test_a_target_that_is_no_model_is_refused_by_name():
    proxy = ProxyConfig(width=32)
    with pytest.raises(ConfigError, match=r"sweep\.proxy: the target model .*num_heads"):
        check_target(str(CONF_DIR), target_overrides(proxy, ["model=tiny", "model.num_heads=5"]))
    with pytest.raises(ConfigError, match=r"sweep\.proxy\.width must be a positive integer"):
        ProxyConfig(width=0)
