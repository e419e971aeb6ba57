"""Energy and CO2: the grid arithmetic (the GPT-NeoX-20B paper's mix), RAPL counters with
wrap-around, the plan's projection of the 20B run, and a training run metering each node once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import run_command, torchrun_launcher

from neoray.config import ConfigError
from neoray.energy.grid import PAPER_MIX, EnergyConfig, co2_kg, mix_intensity
from neoray.energy.meter import RaplCounters

ROOT = Path(__file__).resolve().parents[1]
PAPER_MWH = 66.24


def test_the_papers_mix_gives_0_479_t_per_mwh_and_31_7_t_not_35():
    assert mix_intensity(PAPER_MIX) == pytest.approx(0.304 * 0.95 + 0.313 * 0.6078, rel=1e-12)
    config = EnergyConfig()
    assert round(config.kg_per_kwh, 3) == 0.479
    assert round(co2_kg(PAPER_MWH * 1000, config) / 1000, 1) == 31.7
    plain = EnergyConfig(grid_g_per_kwh=380, pue=1.5)
    assert co2_kg(10.0, plain) == pytest.approx(10 * 1.5 * 0.38)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"grid_mix": {"coal": 0.5, "peat": 0.5}}, r"unknown source\(s\) peat"),
        ({"grid_mix": {"coal": 0.5, "wind": 0.2}}, r"add up to 0\.700, not 1"),
        ({"pue": 0.9}, r"energy\.pue=0\.9"),
        ({"grid_g_per_kwh": -1.0}, r"energy\.grid_g_per_kwh=-1\.0"),
    ],
)
def test_bad_energy_settings_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        EnergyConfig(**fields)


def write_domain(root: Path, name: str, energy_uj: int, max_uj: int = 2**32) -> Path:
    domain = root / name
    domain.mkdir(parents=True, exist_ok=True)
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return domain


def test_rapl_adds_packages_once_and_survives_wrap_around(tmp_path):
    package0 = write_domain(tmp_path, "intel-rapl:0", 1_000_000, max_uj=10_000_000)
    package1 = write_domain(tmp_path, "intel-rapl:1", 5_000_000)
    write_domain(tmp_path, "intel-rapl:0:0", 0)  # cores of package 0: already in its count
    counters = RaplCounters(str(tmp_path))
    assert [Path(d).name for d in counters.domains] == ["intel-rapl:0", "intel-rapl:1"]
    (package0 / "energy_uj").write_text("3000000")
    (package1 / "energy_uj").write_text("5500000")
    assert counters.read() == pytest.approx(2.0 + 0.5)
    (package0 / "energy_uj").write_text("1000000")  # wrapped at 10 J: 7 J + 1 J more
    assert counters.read() == pytest.approx(2.5 + 8.0)
    assert RaplCounters.readable(str(tmp_path))
    assert not RaplCounters.readable(str(tmp_path / "absent"))


def test_the_plan_projects_the_20b_runs_energy_within_15_percent():
    neoray = str(Path(sys.executable).parent / "neoray")
    result = subprocess.run(
        [neoray, "plan", "neox_20b", "--devices", "96", "--tflops", "117"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"energy: ([\d.]+) MWh .* -> ([\d.]+) t CO2 at 0\.479", result.stdout)
    assert found, result.stdout
    mwh, tonnes = float(found.group(1)), float(found.group(2))
    assert abs(mwh - PAPER_MWH) / PAPER_MWH < 0.15, mwh
    assert tonnes == pytest.approx(mwh * 0.47904, abs=0.06)


@pytest.mark.slow
def test_a_run_meters_each_node_once_and_logs_energy_and_co2(tmp_path):
    """Two ranks on one CPU node: one meter (local rank 0), RAPL where readable, else the
    estimate, labelled; readings every 2 steps and at the end."""
    run_dir = tmp_path / "run"
    command = torchrun_launcher(2)
    command += [
        "jobs/pretrain.py",
        "launcher=torchrun",
        "parallel.dp=2",
        "data.seq_len=32",
        "train.steps=5",
        "train.peak_tflops=1.0",
        "train.eval_interval=0",
        "checkpoint.enabled=false",
        "tracking.enabled=false",
        "energy.interval=2",
        "energy.pue=1.5",
        "energy.grid_g_per_kwh=400",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run_command(command, timeout=300, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metered = [row for row in rows if "energy/kwh" in row]
    assert [row["step"] for row in metered] == [1, 3, 4]
    assert all(row["energy/meters"] == 1 for row in metered)  # not one per rank
    estimated = 0.0 if RaplCounters.readable() else 1.0
    assert all(row["energy/estimated"] == estimated for row in metered)
    kwh = [row["energy/kwh"] for row in metered]
    assert 0 < kwh[0] < kwh[1] < kwh[2]
    for row in metered:
        assert row["energy/co2_kg"] == pytest.approx(row["energy/kwh"] * 1.5 * 0.4, rel=1e-12)
        assert row["energy/power_w"] > 0 and row["energy/average_power_w"] > 0
