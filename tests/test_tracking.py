"""neoray.tracking against a real MLflow server: one run per training run, found again by name."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import services
from layouts import TINY
from mlflow import MlflowClient

from neoray.config import redact_text
from neoray.evaluation.ledger import Ledger
from neoray.evaluation.tracking import EvalTracker
from neoray.storage import StorageConfig, open_storage
from neoray.tracking import (
    RUN_NAME_TAG,
    SUPERSEDED_BY_TAG,
    MLflowTracker,
    TrackingConfig,
    experiment_id,
    find_run,
    flatten,
    metric_key,
    redact,
)
from neoray.tracking_queue import QueuedTracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def test_redact_hides_every_secret_at_any_depth():
    config = {
        "storage": {"kind": "s3", "aws_secret_access_key": "s3cr3t", "endpoint_url": "http://x"},
        "db_password": "hunter2",
        "data": {"tokenizer": "runs/tokenizer.json", "hf_token": "t0k"},
        "Credentials": {"user": "u"},
    }
    assert redact(config) == {
        "storage": {"kind": "s3", "aws_secret_access_key": "***", "endpoint_url": "http://x"},
        "db_password": "***",
        "data": {"tokenizer": "runs/tokenizer.json", "hf_token": "***"},
        "Credentials": "***",
    }
    assert config["storage"]["aws_secret_access_key"] == "s3cr3t"  # the input is left alone
    assert redact(flatten(config))["storage.aws_secret_access_key"] == "***"


@pytest.mark.parametrize(
    "key",
    ["password", "db_passwd", "hf_token", "client_secret", "api_key", "apikey", "basic_auth",
     "aws_credentials", "aws_secret_access_key", "ssh.private_key"],
)  # fmt: skip
def test_every_kind_of_secret_key_is_redacted(key):
    assert redact({"section": {key: "s3cr3t"}}) == {"section": {key: "***"}}
    assert redact(flatten({"section": {key: "s3cr3t"}})) == {f"section.{key}": "***"}


@pytest.mark.parametrize("key", ["tokenizer", "tokens_seen", "author", "authority", "secretary"])
def test_words_that_only_contain_a_secret_word_are_kept(key):
    assert redact({key: "kept"}) == {key: "kept"}


def test_passwords_inside_url_values_are_redacted():
    config = {
        "tracking": {"uri": "postgresql://neoray:hunter2@127.0.0.1:5432/mlflow"},
        "storage": {"endpoint_url": "https://key:s3cr3t@s3.example.com"},
        "data": {"inputs": ["s3://bucket/a.jsonl", "https://u:p4ss@host/b.jsonl"]},
        "plain": "http://127.0.0.1:5000",
    }
    text = str(redact(flatten(config)))
    for secret in ("hunter2", "s3cr3t", "p4ss"):
        assert secret not in text
    assert redact(config)["tracking"]["uri"] == "postgresql://neoray:***@127.0.0.1:5432/mlflow"
    assert redact(config)["data"]["inputs"][0] == "s3://bucket/a.jsonl"
    assert redact(config)["plain"] == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, shown",
    [
        ("http://admin:p@ssw0rd@h:5000/x", "http://admin:***@h:5000/x"),
        ("https://ghp_T0ken@github.com/org/repo", "https://***@github.com/org/repo"),
        ("http://127.0.0.1:5000/?token=abc&x=1", "http://127.0.0.1:5000/?token=***&x=1"),
        ("https://b.s3.example.com/k?X-Amz-Credential=AKIA/1&X-Amz-Signature=beef",
         "https://b.s3.example.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("MLflow at http://admin:S3cretPw@127.0.0.1:9 did not answer",
         "MLflow at http://admin:***@127.0.0.1:9 did not answer"),
        ("python jobs/pretrain.py storage.secret_key=abc tracking.uri=http://u:pw@h optim.lr=0.1",
         "python jobs/pretrain.py storage.secret_key=*** tracking.uri=http://u:***@h optim.lr=0.1"),
        ("tokenizer.path=runs/tok.json tokens_seen=5 s3://bucket/a.jsonl http://127.0.0.1:5000",
         "tokenizer.path=runs/tok.json tokens_seen=5 s3://bucket/a.jsonl http://127.0.0.1:5000"),
    ],
)  # fmt: skip
def test_redact_text_hides_passwords_tokens_and_secret_assignments(text, shown):
    assert redact_text(text) == shown
    assert redact({"value": text}) == {"value": shown}


def test_the_mlflow_queue_never_shows_the_tracking_password(capfd):
    def unreachable(fresh: bool):
        raise ConnectionError("connection refused")

    url = "http://admin:S3cretPw@127.0.0.1:9"
    queue = QueuedTracker(unreachable, uri=url, buffer_rows=10, flush_timeout_s=0.5, pause_s=0.1)
    queue.on_metrics({"step": 0, "loss": 1.0})
    queue.close()
    printed = capfd.readouterr().out
    assert "MLflow at http://admin:***@127.0.0.1:9 does not answer" in printed
    assert "did not answer within tracking.flush_timeout_s" in printed
    assert "S3cretPw" not in printed


def test_flatten_and_metric_names():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}}) == {"a.b.c": 1, "a.d": [1, 2]}
    assert metric_key("acc,none") == "acc_none"
    assert metric_key("system/gpu_0 util-%.x") == "system/gpu_0 util-_.x"


def tracker(server, run_name, params, **config):
    return MLflowTracker(
        TrackingConfig(uri=server.url, experiment="tests", **config),
        run_name,
        params,
        {"neoray.topology": "tp=1 pp=1 dp=2"},
    )


def test_one_run_per_training_run_resumed_by_name(mlflow_server):
    params = {
        "train": {"steps": 4, "seed": 1},
        "storage": {"bucket": "b", "secret_key": "dont-log-me"},
    }
    with tracker(mlflow_server, "run-a", params) as first:
        for step in range(3):
            first.on_metrics({"step": step, "loss": 7.0 - step, "step_skipped": False, "x": None})
        first.on_checkpoint(2, "s3://b/run-a/checkpoints/step_00000002", 1234)
        first.on_checkpoint_failed(3, "upload failed: connection refused")
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_NAME_TAG] == "run-a"
    assert run.data.tags["neoray.topology"] == "tp=1 pp=1 dp=2"
    assert run.data.params["storage.secret_key"] == "***"
    assert run.data.params["storage.bucket"] == "b"
    assert run.data.params["train.steps"] == "4"
    assert "dont-log-me" not in str(run.data)
    losses = client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(0, 7.0), (1, 6.0), (2, 5.0)]
    assert "x" not in run.data.metrics
    assert run.data.metrics["step_skipped"] == 0.0
    assert run.data.tags["checkpoint.step_00000002"] == "s3://b/run-a/checkpoints/step_00000002"
    [checkpoint] = client.get_metric_history(first.run_id, "checkpoint_step")
    assert (checkpoint.step, checkpoint.value) == (2, 2.0)
    assert "connection refused" in run.data.tags["checkpoint.failed.step_00000003"]

    # An evaluation nested under it carries the same name tag: it is not the training run.
    evaluation = client.create_run(
        run.info.experiment_id,
        tags={RUN_NAME_TAG: "run-a", "mlflow.parentRunId": first.run_id},
    )
    client.set_terminated(evaluation.info.run_id)

    # The same training run resumed with more steps: the same MLflow run, the first value of
    # a param kept (MLflow params are immutable) and the new one recorded as a tag.
    longer = {**params, "train": {"steps": 8, "seed": 1}}
    with tracker(mlflow_server, "run-a", longer) as resumed:
        resumed.on_metrics({"step": 3, "loss": 4.0})
    assert resumed.resumed and resumed.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.data.params["train.steps"] == "4"
    assert run.data.tags["neoray.param.train.steps"] == "8"
    losses = client.get_metric_history(first.run_id, "loss")
    assert [m.step for m in losses] == [0, 1, 2, 3]

    with tracker(mlflow_server, "run-b", params) as other:
        pass
    assert not other.resumed and other.run_id != first.run_id


def test_a_resumed_run_logs_the_rows_a_crash_kept_from_mlflow(mlflow_server):
    rows = [{"step": step, "loss": 7.0 - step} for step in range(5)]
    with tracker(mlflow_server, "crashed", {}) as first:
        for row in rows[:2]:  # the rows of steps 2 to 4 were still queued at the crash
            first.on_metrics(row)
    with tracker(mlflow_server, "crashed", {}) as restarted:
        restarted.on_start(4, rows)  # resumed from the step-4 checkpoint
        restarted.on_metrics({"step": 4, "loss": 3.0})  # trained again
    history = MlflowClient(mlflow_server.url).get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 7.0 - s) for s in range(5)]


def test_a_fresh_start_under_a_used_name_supersedes_its_run(mlflow_server, tmp_path):
    """Started from no checkpoint, a run of a used name gets a new MLflow run; the old one is
    kept, tagged with its successor, and lookups by name (training, evaluation) skip it."""
    with tracker(mlflow_server, "run-again", {}) as old:
        old.on_metrics({"step": 0, "loss": 9.0})
    evaluations = EvalTracker(mlflow_server.url, "tests")
    (tmp_path / "study.txt").write_text("x")
    old_eval = evaluations.log_study("run-again", 0, "s", {"m": 1.0}, {}, tmp_path, "test")
    with MLflowTracker(
        TrackingConfig(uri=mlflow_server.url, experiment="tests"), "run-again", fresh=True
    ) as new:
        new.on_metrics({"step": 0, "loss": 5.0})
    assert not new.resumed and new.superseded == old.run_id != new.run_id
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(old.run_id).data.tags[SUPERSEDED_BY_TAG] == new.run_id
    assert [m.value for m in client.get_metric_history(old.run_id, "loss")] == [9.0]
    assert [m.value for m in client.get_metric_history(new.run_id, "loss")] == [5.0]
    assert find_run(client, evaluations.experiment_id, "run-again").info.run_id == new.run_id
    assert evaluations.training_run_id("run-again") == new.run_id
    assert evaluations.evaluation_runs("run-again", 0) == []  # the old run's stays its own
    new_eval = evaluations.log_study("run-again", 0, "s", {"m": 2.0}, {}, tmp_path, "test")
    assert [r.info.run_id for r in evaluations.evaluation_runs("run-again", 0)] == [new_eval]
    assert client.get_run(old_eval).info.lifecycle_stage == "active"
    with tracker(mlflow_server, "run-again", {}) as resumed:
        pass
    assert resumed.run_id == new.run_id


def test_failed_training_marks_the_run_failed(mlflow_server):
    with pytest.raises(RuntimeError), tracker(mlflow_server, "run-fails", {}) as failing:
        raise RuntimeError("diverged")
    assert MlflowClient(mlflow_server.url).get_run(failing.run_id).info.status == "FAILED"


def test_system_metrics_are_sampled(mlflow_server):
    with tracker(mlflow_server, "run-system", {}, system_metrics_interval_s=0.2) as sampled:
        time.sleep(1.5)
    metrics = MlflowClient(mlflow_server.url).get_run(sampled.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


# MLflow outages: training's logging (QueuedTracker) waits for the server instead of failing.
# MLflow's client is told to fail fast, so the tests see the outage at once.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture
def stoppable_mlflow(tmp_path, monkeypatch):
    for name, value in FAIL_FAST.items():
        monkeypatch.setenv(name, value)
    service = services.StoppableMLflow(tmp_path)
    yield service
    service.stop()


def queued(url: str, run_name: str, buffer_rows: int) -> QueuedTracker:
    config = TrackingConfig(uri=url, experiment="tests", system_metrics=False)
    return QueuedTracker(
        functools.partial(MLflowTracker, config, run_name, {"train": {"steps": 30}}),
        uri=url,
        buffer_rows=buffer_rows,
        flush_timeout_s=120,
        pause_s=0.2,
    )


def test_rows_wait_for_mlflow_and_the_oldest_are_dropped_past_the_bound(stoppable_mlflow, capfd):
    url = stoppable_mlflow.server.url
    with queued(url, "run-down", buffer_rows=10) as tracker:  # MLflow is not started yet
        for step in range(30):
            tracker.on_metrics({"step": step, "loss": float(step)})
        tracker.on_checkpoint(29, "s3://b/run-down/checkpoints/step_00000029", 1)
        stoppable_mlflow.start()
    assert tracker.dropped_rows == 20
    out = capfd.readouterr().out
    assert f"MLflow at {url} does not answer" in out and "answers again" in out
    assert "20 metric rows were dropped" in out

    client = MlflowClient(url)
    run = find_run(client, client.get_experiment_by_name("tests").experiment_id, "run-down")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "30"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(20, 30)]
    assert run.data.tags["neoray.tracking.dropped_rows"] == "20"
    assert "checkpoint.step_00000029" in run.data.tags


def test_a_record_mlflow_refuses_is_reported_not_retried(stoppable_mlflow, capfd):
    stoppable_mlflow.start()
    url = stoppable_mlflow.server.url
    tracker = queued(url, "run-deleted", buffer_rows=10)
    tracker.on_metrics({"step": 0, "loss": 1.0})
    client = MlflowClient(url)
    deadline = time.monotonic() + 60
    while not (run := find_run(client, experiment_id(client, "tests"), "run-deleted")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.delete_run(run.info.run_id)  # every later write to it is refused
    tracker.on_metrics({"step": 1, "loss": 0.5})
    printed, deadline = "", time.monotonic() + 30
    while "refused a request" not in printed:  # printed when it happens, before the end
        assert time.monotonic() < deadline, printed
        time.sleep(0.1)
        printed += capfd.readouterr().out
    assert "this metrics record is skipped; training goes on" in printed
    started = time.monotonic()
    tracker.close()  # ending the deleted run is refused too
    assert time.monotonic() - started < 30
    assert tracker.refused and "refused requests of this run 2 times" in capfd.readouterr().out


@pytest.mark.slow
def test_training_goes_on_while_mlflow_is_down_and_logs_every_step(stoppable_mlflow, tmp_path):
    """The server is down when the job starts (it trains anyway), comes up, goes down while the
    job is still training or logging, and comes back: the job finishes and MLflow has every
    step once."""
    steps = 300
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MLFLOW_TRACKING_URI": stoppable_mlflow.server.url,
    }
    command = [
        sys.executable,
        "jobs/pretrain.py",
        "launcher=torchrun",
        "model=tiny",
        f"train.steps={steps}",
        "data.seq_len=64",
        "checkpoint.enabled=false",
        "tracking=server",
        "tracking.system_metrics=false",
        "tracking.flush_timeout_s=600",  # MLflow can take minutes to start on a loaded machine
        "run_name=outages",
        f"run_dir={run_dir}",
    ]
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(rows(run_dir)) >= 20, job, log)  # trains with MLflow down
        stoppable_mlflow.start()
        client = MlflowClient(stoppable_mlflow.server.url)
        wait_for(lambda: logged_steps(client, "outages"), job, log)
        assert job.poll() is None, "the job ended before MLflow could be stopped"
        stoppable_mlflow.stop()
        down_at = len(rows(run_dir))
        wait_for(lambda: len(rows(run_dir)) >= min(down_at + 20, steps), job, log)
        stoppable_mlflow.start()
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log.read_text()
    assert text.count("does not answer") == 2 and text.count("answers again") == 2, text[-3000:]
    run = find_run(client, experiment_id(client, "neoray"), "outages")
    assert run.info.status == "FINISHED"
    assert sorted(logged_steps(client, "outages")) == list(range(steps))


def rows(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def logged_steps(client: MlflowClient, run_name: str) -> list[int]:
    experiment = client.get_experiment_by_name("neoray")
    run = experiment and find_run(client, experiment.experiment_id, run_name)
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss")] if run else []


def wait_for(condition, job: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None or condition(), log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_a_run_restarted_from_scratch_logs_into_a_new_mlflow_run(mlflow_server, tmp_path):
    """A tiny run, resumed (the same MLflow run), then its checkpoints deleted and started
    again: a second MLflow run with only the new metrics, the first tagged superseded, and
    the evaluation ledger of the deleted checkpoints gone."""

    def pretrain(steps: int) -> None:
        command = [
            sys.executable,
            "jobs/pretrain.py",
            "launcher=torchrun",
            *TINY,
            f"train.steps={steps}",
            "checkpoint.interval=2",
            "run_name=reused",
            f"run_dir={tmp_path / 'run'}",
            f"storage.root={tmp_path / 'store'}",
            "tracking=server",
            f"tracking.uri={mlflow_server.url}",
            "tracking.experiment=restarts",
            "tracking.system_metrics=false",
        ]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    client = MlflowClient(mlflow_server.url)

    def live_run_id() -> str:
        return find_run(client, experiment_id(client, "restarts"), "reused").info.run_id

    def losses(run_id: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "loss")]

    pretrain(2)
    first = live_run_id()
    pretrain(4)  # resumes from step 2
    assert live_run_id() == first and losses(first) == [0, 1, 2, 3]
    shutil.rmtree(tmp_path / "store" / "reused" / "checkpoints")
    ledger = Ledger(open_storage(StorageConfig(root=str(tmp_path / "store"))), "reused")
    assert ledger.record(2, "mmlu_0shot", None, "done")  # the old step 2, evaluated
    pretrain(2)
    assert ledger.entries() == []
    second = live_run_id()
    assert second != first
    assert client.get_run(first).data.tags[SUPERSEDED_BY_TAG] == second
    assert losses(first) == [0, 1, 2, 3] and losses(second) == [0, 1]
