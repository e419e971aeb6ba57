"""neoray.storage: the local and S3 backends behave alike, against a real SeaweedFS."""

from __future__ import annotations

import concurrent.futures
import logging
import os

import pytest

from neoray.config import ConfigError, redact
from neoray.storage import (
    StorageConfig,
    StorageError,
    open_storage,
    publish_file,
    storage_from_uri,
)


def test_round_trip_list_and_delete(storage, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3000))
    storage.upload_file(source, "run/checkpoints/step_00000001/a.pt")
    storage.put_bytes("run/checkpoints/step_00000001/manifest.json", b"{}")
    storage.put_bytes("run2/checkpoints/x", b"other run")

    assert storage.exists("run/checkpoints/step_00000001/a.pt")
    assert not storage.exists("run/checkpoints/step_00000001/b.pt")
    assert storage.get_bytes("run/checkpoints/step_00000001/manifest.json") == b"{}"
    storage.download_file("run/checkpoints/step_00000001/a.pt", tmp_path / "back" / "a.pt")
    assert (tmp_path / "back" / "a.pt").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["a.pt"]  # no temporary left

    assert storage.list("run/") == [
        "run/checkpoints/step_00000001/a.pt",
        "run/checkpoints/step_00000001/manifest.json",
    ]
    assert storage.list("run") == [*storage.list("run/"), "run2/checkpoints/x"]
    assert len(storage.list("")) == 3
    storage.delete("run/checkpoints/step_00000001/a.pt")
    storage.delete("run/checkpoints/step_00000001/a.pt")  # deleting twice is not an error
    assert storage.list("run/") == ["run/checkpoints/step_00000001/manifest.json"]
    assert storage.uri("run/x").endswith("some/prefix/run/x" if "s3" in repr(storage) else "run/x")


def test_folders_lists_one_level(storage):
    for key in ("run/checkpoints/step_00000002/a", "run/checkpoints/step_00000001/b/c", "run/x"):
        storage.put_bytes(key, b"")
    assert storage.folders("run/checkpoints") == ["step_00000001", "step_00000002"]
    assert storage.folders("run") == ["checkpoints"]
    assert storage.folders("nothing") == []


def test_conditional_writes_let_exactly_one_racing_writer_win(storage):
    key = "run/evals/step_00000001/suite.json"
    assert storage.read_versioned(key) is None
    created = storage.put_if(key, b"first", None)
    assert storage.put_if(key, b"second", None) is None  # exists: create-if-absent loses
    assert storage.read_versioned(key) == (b"first", created)
    assert storage.put_if(key, b"stale", "0" * 32) is None
    updated = storage.put_if(key, b"updated", created)
    assert updated not in (None, created)
    assert storage.put_if(key, b"late", created) is None  # the version it read is gone
    assert storage.read_versioned(key) == (b"updated", updated)

    # Writers that all read the same version: exactly one replaces it.
    _, version = storage.read_versioned(key)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: storage.put_if(key, b"w%d" % i, version), range(8)))
    [winner] = [i for i, won in enumerate(wins) if won is not None]
    assert storage.read_versioned(key) == (b"w%d" % winner, wins[winner])


def test_missing_keys_raise_file_not_found_naming_the_uri(storage, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing/here.*not found"):
        storage.get_bytes("nothing/here")
    with pytest.raises(FileNotFoundError, match=r"nothing/here"):
        storage.download_file("nothing/here", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_s3_multipart_upload_with_retries_config(s3_bucket, s3_server, tmp_path):
    """A file over the part size goes up in parts (S3's ETag of a multipart object ends in
    -<parts>) and comes back byte for byte."""
    config = StorageConfig(kind="s3", bucket=s3_bucket, multipart_chunk_mb=5, max_concurrency=4)
    storage = open_storage(config)
    data = os.urandom(12 * 2**20)
    (tmp_path / "big").write_bytes(data)
    storage.upload_file(tmp_path / "big", "big")
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big")
    assert head["ETag"].strip('"').endswith("-3")
    assert storage.get_bytes("big") == data
    assert storage.client.meta.config.retries["mode"] == "adaptive"


def test_s3_errors_name_the_uri(s3_server, s3_bucket, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-x/k: no such bucket"):
        open_storage(StorageConfig(kind="s3", bucket="no-such-bucket-x")).get_bytes("k")
    # Nothing listens on port 9 (discard): the request fails after its retries.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    down = StorageConfig(kind="s3", bucket=s3_bucket, max_attempts=2, connect_timeout=0.5)
    with pytest.raises(StorageError, match=rf"upload to s3://{s3_bucket}/k failed"):
        open_storage(down).put_bytes("k", b"x")
    # Refused credentials: a PermissionError (as the corpus reader raises) and a StorageError.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/k: access denied") as refused:
        open_storage(StorageConfig(kind="s3", bucket=s3_bucket)).get_bytes("k")
    assert isinstance(refused.value, PermissionError)


def test_credentials_are_not_in_reprs_configs_or_logs(s3_bucket, s3_server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    config = StorageConfig(kind="s3", bucket=s3_bucket)
    storage = open_storage(config)
    storage.put_bytes("a", b"x")
    storage.list("")
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("missing")
    assert caplog.records  # botocore logged its requests at DEBUG
    for text in (repr(storage), repr(config), caplog.text):
        assert s3_server.secret_key not in text


def test_local_publish_leaves_no_partial_file(tmp_path):
    """A write that fails midway leaves neither the final name nor a temporary behind."""

    def write_half_then_fail(out):
        out.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_file(tmp_path / "d" / "new", write_half_then_fail)
    assert list((tmp_path / "d").iterdir()) == []


def test_storage_from_uri(s3_bucket, tmp_path):
    storage, key = storage_from_uri(f"s3://{s3_bucket}/runs/x/checkpoints")
    assert key == "runs/x/checkpoints"
    storage.put_bytes(f"{key}/f", b"1")
    assert storage.uri(f"{key}/f") == f"s3://{s3_bucket}/runs/x/checkpoints/f"
    local, key = storage_from_uri(str(tmp_path / "a"))
    local.put_bytes(f"{key}/b", b"2")
    assert (tmp_path / "a" / "b").read_bytes() == b"2"
    assert local.uri(key) == str(tmp_path / "a")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "gcs"}, r"storage\.kind='gcs': choose one of local, s3"),
        ({"kind": "s3"}, r"set storage\.bucket=<name>"),
        ({"kind": "s3", "bucket": "b", "retry_mode": "legacy"}, r"storage\.retry_mode"),
        ({"multipart_chunk_mb": 1}, r"at least 5"),
    ],
)
def test_bad_storage_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        StorageConfig(**fields)


def test_redact_hides_secrets_at_any_depth():
    values = {
        "storage": {"bucket": "b", "aws_secret_access_key": "s3cr3t"},
        "api_token": "t",
        "db.password": "p",
        "data.tokenizer": "runs/tok.json",
        "tokens_seen": 10,
    }
    assert redact(values) == {
        "storage": {"bucket": "b", "aws_secret_access_key": "***"},
        "api_token": "***",
        "db.password": "***",
        "data.tokenizer": "runs/tok.json",
        "tokens_seen": 10,
    }


def test_a_conditional_write_whose_response_was_lost_is_recognised_as_ours(s3_bucket):
    """The server applies a conditional PutObject, its response is lost, and botocore sends the
    request again, which now fails its condition (412): the lease and the ledger claim taken
    by that write are still this writer's."""
    from neoray.checkpoint.lease import Holder, RunLease, lease_key
    from neoray.evaluation.ledger import Ledger

    storage = open_storage(StorageConfig(kind="s3", bucket=s3_bucket))
    lost = []

    def lose_first_response(response, request_dict, **_):
        conditional = {"If-Match", "If-None-Match"} & set(request_dict["headers"])
        if conditional and response is not None and response[0].status_code == 200 and not lost:
            lost.append(request_dict["url"])
            return 0  # retry at once, as after a connection dropped before the response
        return None

    events = storage.client.meta.events
    events.register_first("needs-retry.s3.PutObject", lose_first_response, unique_id="lose")
    try:
        RunLease(storage, "run", "ray job first", stale_after_s=60).acquire()
        assert len(lost) == 1
        assert Holder.from_bytes(storage.get_bytes(lease_key("run"))).owner == "ray job first"

        lost.clear()
        claim = Ledger(storage, "run").claim(10, "mmlu", "watcher a", version=None, attempts=1)
        assert len(lost) == 1
        assert claim is not None
        assert storage.read_versioned("run/evals/step_00000010/mmlu.json")[1] == claim.version
    finally:
        events.unregister("needs-retry.s3.PutObject", unique_id="lose")

    # Another writer's bytes in the object still make a refused write a lost race.
    assert storage.put_if(lease_key("run"), b"someone else", None) is None
