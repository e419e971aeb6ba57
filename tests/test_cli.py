"""The `neoray` console script, as installed."""

import re
import subprocess
import sys
from pathlib import Path

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
