"""Sweeps: Ray Tune trials of real pretraining runs on a local Ray, ASHA stopping the trials
that trail, MLflow runs nested under the sweep's, best.yaml reproducing the best trial, a
killed driver continued by the same command, and bad sweeps refused before any trial."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import services
import yaml

from neoray.sweep.config import SweepConfig
from neoray.sweep.outcome import TrialOutcome, write_best

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow-sweep")) as server:
        yield server.url


def write_sweep(folder: Path, name: str, **settings) -> list[str]:
    """A sweep file of our own (conf/sweep/ holds the examples), found through Hydra's
    search path; returns the overrides that select it."""
    (folder / "sweep").mkdir(parents=True, exist_ok=True)
    (folder / "sweep" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **settings}))
    return [f"hydra.searchpath=[file://{folder}]", f"sweep={name}"]


def demo_base(demo_data, tmp_path: Path) -> list[str]:
    return [
        "data=demo",
        f"data.root={demo_data.root}",
        "data.seq_len=32",
        "parallel.micro_batch_size=4",
        "train.eval_iters=2",
        "train.peak_tflops=1.0",
        "train.log_interval=0",
        "tracking.system_metrics=false",
        f"storage.root={tmp_path / 'checkpoints'}",
    ]


def sweep_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "jobs/sweep.py", f"sweep_dir={tmp_path / 'sweep'}", *overrides]


def run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:  # say where it stood
        out, errors = (
            text.decode(errors="replace") if text else "" for text in (err.output, err.stderr)
        )
        raise AssertionError(f"timed out after {timeout} s", out[-5000:], errors[-8000:]) from None
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def environment(tracking_uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "DS_ACCELERATOR": "cpu"}


def trial_runs(tracking_uri: str, sweep: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("neoray").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`neoray.sweep` = '{sweep}'")
    parents = [r for r in runs if r.data.tags.get("neoray.run_name") == f"{sweep}.sweep"]
    assert len(parents) == 1
    parent = parents[0]
    trials = [r for r in runs if r.info.run_id != parent.info.run_id]
    return client, parent, trials


def final_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "val/loss" in row][-1]["val/loss"]


def test_asha_sweep_stops_trailing_trials_and_its_best_reproduces(
    demo_data, tracking_server, tmp_path
):
    """Four learning rates in grid order (two good, then two far too small), two trials at a
    time: the small ones reach ASHA's first rung behind the recorded ones and are stopped."""
    select = write_sweep(
        tmp_path / "conf",
        "asha4",
        space={"optim.lr": {"grid": [1e-2, 5e-3, 1e-6, 1e-7]}},
        fixed=["train.steps=16", "train.eval_interval=4", "optim.warmup=0.0", "optim.min_lr=0"],
        num_samples=1,
        max_concurrent_trials=2,
        scheduler={"name": "asha", "grace_period": 4, "reduction_factor": 2},
    )
    env = environment(tracking_server)
    base = demo_base(demo_data, tmp_path)
    result = run(sweep_command(tmp_path, *select, *base), env)

    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(tmp_path / "sweep" / "tune"))
    last = {t.trial_id: t.last_result for t in analysis.trials}
    assert len(last) == 4 and all(t.status == "TERMINATED" for t in analysis.trials)
    stopped = [i for i, r in last.items() if r["trained_steps"] < r["train_steps"]]
    completed = [i for i, r in last.items() if r["trained_steps"] == r["train_steps"] == 16]
    assert stopped and completed, last
    assert all(last[i]["val/loss"] > min(last[c]["val/loss"] for c in completed) for i in stopped)
    # two trials at a time: no moment (1 s slack, Tune's timestamps are whole seconds) has 3
    spans = [(r["timestamp"] - r["time_total_s"], r["timestamp"]) for r in last.values()]
    for start, _ in spans:
        assert sum(s < start + 1 - 1e-9 and start + 1 < e for s, e in spans) <= 2, spans

    client, parent, trials = trial_runs(tracking_server, "asha4")
    assert len(trials) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    status = {r.data.tags["neoray.sweep.trial"]: r for r in trials}
    for trial_id in stopped:
        assert status[trial_id].info.status == "KILLED"
        assert status[trial_id].data.tags["neoray.sweep.status"] == "stopped_early"
    for trial_id in completed:
        assert status[trial_id].info.status == "FINISHED"
        assert "val/loss" in status[trial_id].data.metrics
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "sweep.png"} <= artifacts

    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert best["trial"] in completed
    assert best["value"] == min(last[c]["val/loss"] for c in completed)
    assert parent.data.tags["best.trial"] == best["trial"]
    assert f"train it: {best['command']}" in result.stdout

    # the printed command trains the best configuration again, to the same validation loss
    command = shlex.split(best["command"])
    assert command[:2] == ["python", "jobs/pretrain.py"]
    rerun_dir = tmp_path / "best-run"
    run([sys.executable, *command[1:], f"run_dir={rerun_dir}"], env)
    trial_dir = tmp_path / "sweep" / "trials" / f"asha4-{best['trial']}"
    assert final_val_loss(rerun_dir) == pytest.approx(final_val_loss(trial_dir), rel=1e-6)
    assert final_val_loss(rerun_dir) == pytest.approx(best["value"], rel=1e-6)


def test_a_killed_sweep_driver_is_continued_by_the_same_command(
    demo_data, tracking_server, tmp_path
):
    select = write_sweep(
        tmp_path / "conf",
        "resume3",
        space={"optim.lr": {"grid": [1e-2, 3e-3, 1e-3]}},
        fixed=["train.steps=8", "train.eval_interval=4"],
        num_samples=1,
        max_concurrent_trials=1,
        scheduler={"name": "fifo"},
    )
    env = environment(tracking_server)
    command = sweep_command(tmp_path, *select, *demo_base(demo_data, tmp_path))
    driver = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from ray.tune import ExperimentAnalysis

    tune_dir = tmp_path / "sweep" / "tune"
    finished: set[str] = set()
    deadline = time.monotonic() + 300
    try:
        while not finished and time.monotonic() < deadline:
            time.sleep(2)
            if driver.poll() is not None:
                pytest.fail(f"the sweep ended (exit {driver.returncode}) before it was killed")
            try:
                trials = ExperimentAnalysis(str(tune_dir)).trials
            except Exception:  # no state written yet
                continue
            finished = {t.trial_id for t in trials if t.status == "TERMINATED"}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert finished, "no trial finished within 300 s"
    kept = {
        trial_id: (tmp_path / "sweep" / "trials" / f"resume3-{trial_id}" / "metrics.jsonl")
        for trial_id in finished
    }
    before = {trial_id: path.stat().st_mtime_ns for trial_id, path in kept.items()}

    result = run(command, env)
    assert "continuing sweep 'resume3'" in result.stdout
    analysis = ExperimentAnalysis(str(tune_dir))
    assert len(analysis.trials) == 3
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert all(t.last_result["trained_steps"] == 8 for t in analysis.trials)
    for trial_id, path in kept.items():  # finished trials were not run again
        assert path.stat().st_mtime_ns == before[trial_id], trial_id
    # FIFO trials share their driver process (Tune's reuse_actors); each is still a run of its
    # own in MLflow, with its own values
    continued = [t for t in analysis.trials if t.trial_id not in finished]
    assert len({t.last_result["pid"] for t in continued}) == 1, [t.last_result for t in continued]
    _, parent, runs = trial_runs(tracking_server, "resume3")
    for trial in analysis.trials:
        (record,) = [
            r
            for r in runs
            if r.data.tags["neoray.run_name"] == f"resume3-{trial.trial_id}"
            and "neoray.superseded_by" not in r.data.tags
        ]
        assert record.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert record.info.status == "FINISHED"
        assert float(record.data.params["optim.lr"]) == trial.config["overrides"]["optim.lr"]


@pytest.mark.parametrize(
    "settings, overrides, message",
    [
        ({"space": {"optim.lrr": {"choice": [1e-3]}}}, [], r"unknown key 'optim\.lrr'.*optim\.lr"),
        ({"space": {"optim.lr": {"lognormal": [1, 2]}}}, [], r"unknown distribution 'lognormal'"),
        (
            {"space": {"optim.lr": {"choice": [1e-3]}}, "metric": "val/accuracy"},
            [],
            r"sweep\.metric='val/accuracy': the runs never report it",
        ),
        (
            {"space": {"optim.lr": {"choice": [1e-3]}}},
            ["train.eval_interval=0"],
            r"train\.eval_interval=0",
        ),
        ({"space": {"model": {"choice": ["tiny", "gpt5"]}}}, [], r"sweep\.space\.model='gpt5'"),
        (
            {"space": {"optim.lr": {"choice": [1e-3]}}, "max_concurrent_trials": 64},
            [],
            r"sweep\.max_concurrent_trials=64: each trial needs 1 CPU",
        ),
    ],
)
def test_bad_sweeps_are_refused_before_any_trial(tmp_path, settings, overrides, message):
    import re

    select = write_sweep(tmp_path / "conf", "bad", **settings)
    command = sweep_command(
        tmp_path, *select, "train.eval_interval=4", "tracking.enabled=false", *overrides
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert re.search(message, result.stderr + result.stdout), result.stderr[-3000:]
    assert not (tmp_path / "sweep" / "tune").exists()  # no trial started


def test_a_sweep_whose_data_is_missing_fails_at_once_naming_the_file(demo_data, tmp_path):
    """The demo data where the sweep runs lacks one component (as in a submitted job's copy
    of the project, which has no runs/): one error, naming the file, before any trial (so no
    trial and no retry of one), whatever the number of trials."""
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(demo_data.root, root, ignore=shutil.ignore_patterns("prose.*"))
    select = write_sweep(
        tmp_path / "conf", "nodata", space={"optim.lr": {"choice": [1e-3, 1e-2]}}, num_samples=6
    )
    base = [*demo_base(demo_data, tmp_path), f"data.root={root}", "tracking.enabled=false"]
    command = sweep_command(tmp_path, *select, *base, "train.eval_interval=4")
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    missing = f"data.components.prose: no token files at {root}/prose.idx"
    assert output.count(missing) == 1, output[-3000:]
    assert not (tmp_path / "sweep" / "tune").exists()  # no trial started, none retried
    assert elapsed < 60, elapsed  # no Ray started either


def test_best_yaml_and_its_command_show_no_secret(tmp_path):
    sweep = SweepConfig(name="lr", space={"optim.lr": [1e-3, 1e-4]})
    best = TrialOutcome("t1", {"optim.lr": 1e-3}, "completed", 2.5, 10)
    base = ["storage=s3", "storage.secret_key=abc", "tracking.uri=http://u:pw@127.0.0.1:5000"]
    command = write_best(tmp_path / "best.yaml", best, sweep, base)
    text = (tmp_path / "best.yaml").read_text()
    for shown in (command, text):
        assert "abc" not in shown and ":pw@" not in shown
        assert "storage.secret_key=***" in shown and "http://u:***@127.0.0.1:5000" in shown
    assert "optim.lr=0.001" in command


def test_the_preflight_names_a_missing_bucket_and_an_unwritable_root(s3_bucket, tmp_path):
    from neoray.config import ConfigError
    from neoray.storage import StorageConfig
    from neoray.sweep.preflight import check_storage

    check_storage(StorageConfig(kind="s3", bucket=s3_bucket))
    with pytest.raises(
        ConfigError, match=r"storage\.bucket='no-such-bucket-here': .*no-such-bucket-here"
    ):
        check_storage(StorageConfig(kind="s3", bucket="no-such-bucket-here"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"storage\.root=.*file/runs"):
        check_storage(StorageConfig(root=str(tmp_path / "file" / "runs")))


def test_a_sweep_ends_with_the_error_every_trial_failed_with():
    from neoray.sweep.outcome import common_failure

    def outcome(status, error=None):
        return TrialOutcome("t", {}, status, None, 0, error)

    same = "ConfigError: data.components.code: no token files at runs/data/demo/code.idx"
    assert common_failure([outcome("failed", same), outcome("failed", same)]) == same
    assert common_failure([outcome("failed", same), outcome("failed", "OSError: disk")]) is None
    assert common_failure([outcome("failed", same), outcome("completed")]) is None
    assert common_failure([]) is None
