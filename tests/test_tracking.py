"""neoray.tracking against a real MLflow server: one run per training run, found again by name."""

from __future__ import annotations

import time

import pytest
import services
from mlflow import MlflowClient

from neoray.tracking import (
    RUN_NAME_TAG,
    MLflowTracker,
    TrackingConfig,
    flatten,
    metric_key,
    redact,
)


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
