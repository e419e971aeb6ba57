"""The `neoray` console script, as installed."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The console script installed next to the interpreter running the tests.
NEORAY = str(Path(sys.executable).parent / "neoray")


def neoray(*args: str) -> str:
    return subprocess.run(
        [NEORAY, *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_presets_lists_every_preset_with_its_size():
    out = neoray("presets")
    assert re.search(r"neox_20b\s+20,554\.6", out)
    assert re.search(r"pythia_70m\s+70\.4", out)


def test_plan_of_the_20b_run_is_close_to_the_paper():
    out = neoray("plan", "neox_20b", "--devices", "96", "--tflops", "117")
    hours = float(re.search(r"training time: ([\d,]+) hours", out).group(1).replace(",", ""))
    assert abs(hours - 1830) / 1830 < 0.10
    assert "471.9 B tokens" in out


def test_plan_rejects_an_unknown_preset():
    result = subprocess.run([NEORAY, "plan", "nope"], capture_output=True, text=True)
    assert result.returncode == 1 and "neoray plan: invalid choice: 'nope'" in result.stderr


def test_plan_shows_a_proxy_sweeps_share_of_the_run():
    """The 20B muP sweep (32 trials on a hidden-1,024 proxy) costs a small share of the run,
    as counted here from the FLOPs per token of each model."""
    from neoray.model.flops import model_flops_per_token
    from neoray.model.presets import load_preset

    out = neoray("plan", "neox_20b", "--sweep", "neox_20b_mup")
    share = float(re.search(r"sweep neox_20b_mup: 32 trials .*, ([\d.]+)% of this run", out)[1])
    target = load_preset("neox_20b")
    proxy = dataclasses.replace(target, hidden_size=1024, num_heads=16)
    trial_tokens = 10_000 * 256 * 2048  # proxy.overrides: 10,000 steps of 8 x 4 x 8 sequences
    expected = (32 * trial_tokens * model_flops_per_token(proxy, 2048)) / (
        150_000 * 1536 * 2048 * model_flops_per_token(target, 2048)
    )
    assert share == pytest.approx(100 * expected, abs=0.05)
    assert share < 7  # the goal for the 20B plan

    result = subprocess.run(
        [NEORAY, "plan", "pythia_70m", "--sweep", "neox_20b_mup"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "tunes a model of hidden 6144 x 44 layers" in result.stderr
