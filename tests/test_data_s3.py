"""The data pipeline on `s3://` inputs against a real S3 server (SeaweedFS): the same tokenizers
and token files as from local copies, right line numbers, and errors that name the URI."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zstandard
from corpora import make_big_jsonl, read_report
from distributed import run_command, torchrun_launcher
from layouts import ROOT, metrics, overrides

from neoray.corpus import expand_inputs
from neoray.data import remote as remote_module
from neoray.data.indexed import IndexedDataset
from neoray.data.mixture import build_mixture, data_fingerprint
from neoray.data.preprocess import PreprocessConfig, preprocess
from neoray.data.remote import upload_token_files
from neoray.storage import s3_client
from neoray.tokenizer.load import RELEASED_20B, load_tokenizer, released_20b_path
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer


def upload(client, bucket, root, prefix):
    """Every file under `root` to s3://bucket/prefix/<its path below root>."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}")


@pytest.fixture
def small_corpus(tmp_path):
    """Two .jsonl files and a .jsonl.zst at the top, one .jsonl a folder down, and a file that
    no input expands to."""
    root = tmp_path / "small"
    (root / "nested").mkdir(parents=True)
    texts = [f"document {n}: " + " ".join(["alpha beta", "gamma", "def f(x):"] * n) for n in range(60)]  # fmt: skip
    for name, part in [("a.jsonl", texts[:20]), ("b.jsonl", texts[20:40]),
                       ("nested/c.jsonl", texts[40:])]:  # fmt: skip
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    zst = "".join(json.dumps({"text": t.upper()}) + "\n" for t in texts).encode()
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    (root / "notes.md").write_text("not a corpus file")
    return root


def trained(inputs, output):
    cfg = TokenizerTrainConfig(input=inputs, output=str(output), vocab_size=400)
    return train_tokenizer(cfg, show_progress=False).to_json()


@pytest.mark.parametrize("pattern", ["*.jsonl", ""], ids=["glob", "folder"])
def test_tokenizer_trained_from_s3_equals_one_trained_locally(
    small_corpus, s3_server, s3_bucket, tmp_path, pattern
):
    upload(s3_server.client(), s3_bucket, small_corpus, "raw")
    remote = f"s3://{s3_bucket}/raw/{pattern}"
    local = str(small_corpus / pattern) if pattern else str(small_corpus)
    expected = {"*.jsonl": ["a.jsonl", "b.jsonl"],
                "": ["a.jsonl", "b.jsonl", "d.jsonl.zst", "nested/c.jsonl"]}[pattern]  # fmt: skip
    assert expand_inputs(remote) == [f"s3://{s3_bucket}/raw/{name}" for name in expected]
    assert expand_inputs(local) == [str(small_corpus / name) for name in expected]
    assert trained(remote, tmp_path / "s3.json") == trained(local, tmp_path / "local.json")


@pytest.mark.parametrize("pattern", ["", "/", "/**/*.jsonl", "/*/*.jsonl", "/?.jsonl*"])
def test_s3_uris_expand_as_local_paths_do(small_corpus, s3_server, s3_bucket, pattern):
    upload(s3_server.client(), s3_bucket, small_corpus, "raw")
    remote = expand_inputs(f"s3://{s3_bucket}/raw{pattern}")
    local = expand_inputs(f"{small_corpus}{pattern}")
    assert remote == [path.replace(str(small_corpus), f"s3://{s3_bucket}/raw") for path in local]


@pytest.fixture
def big_corpus(tmp_path):
    """A .jsonl of several shards, a .jsonl.zst of another, an empty .jsonl and a .txt; returns
    the folder and the malformed lines of each file by name."""
    root = tmp_path / "big"
    root.mkdir()
    bad = {"a.jsonl": make_big_jsonl(root / "a.jsonl", lines=1500, bad_every=97)}
    bad["b.jsonl.zst"] = make_big_jsonl(tmp_path / "b.jsonl", lines=400, bad_every=61)
    compressed = zstandard.ZstdCompressor().compress((tmp_path / "b.jsonl").read_bytes())
    (root / "b.jsonl.zst").write_bytes(compressed)
    (root / "c.jsonl").write_bytes(b"")
    (root / "d.txt").write_text("A whole book in one file.\n")
    return root, bad


def test_preprocessing_s3_inputs_writes_what_local_copies_give(
    big_corpus, s3_server, s3_bucket, tmp_path
):
    root, bad = big_corpus
    upload(s3_server.client(), s3_bucket, root, "corpus")
    shard_mb = 0.02
    assert (root / "a.jsonl").stat().st_size > 4 * shard_mb * 2**20, "a.jsonl spans many shards"
    outputs = {}
    for name, inputs in [("local", [str(root / "*.jsonl"), str(root / "b.jsonl.zst"), str(root / "d.txt")]),
                         ("s3", [f"s3://{s3_bucket}/corpus/*.jsonl", f"s3://{s3_bucket}/corpus/b.jsonl.zst",
                                 f"s3://{s3_bucket}/corpus/d.txt"])]:  # fmt: skip
        prefix = str(tmp_path / name / "out")
        cfg = PreprocessConfig(
            input=inputs, tokenizer=RELEASED_20B, output_prefix=prefix, shard_mb=shard_mb
        )
        summary = preprocess(cfg, show_progress=False)
        outputs[name] = {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx")}
    assert outputs["s3"] == outputs["local"]
    assert summary.documents == 1500 + 400 + 1 - sum(map(len, bad.values()))
    report = read_report(prefix)
    assert [(r["file"], r["line"]) for r in report] == [
        (f"s3://{s3_bucket}/corpus/{name}", line) for name, lines in bad.items() for line in lines
    ]


def test_tokenizer_loads_from_s3(s3_server, s3_bucket):
    s3_server.client().upload_file(released_20b_path(), s3_bucket, "tokenizers/20b.json")
    uri = f"s3://{s3_bucket}/tokenizers/20b.json"
    tokenizer = load_tokenizer(uri)
    assert tokenizer.source == uri
    assert tokenizer.to_json() == load_tokenizer(RELEASED_20B).to_json()


def test_a_missing_object_or_bucket_is_named(s3_bucket, tmp_path):
    missing = [f"s3://{s3_bucket}/no/such.json", "s3://no-such-bucket-anywhere/tokenizer.json"]
    for uri in missing:
        with pytest.raises(FileNotFoundError, match=uri):
            load_tokenizer(uri)
    for uri in [f"s3://{s3_bucket}/no/such.jsonl", "s3://no-such-bucket-anywhere/*.jsonl"]:
        cfg = PreprocessConfig(
            input=[uri], tokenizer=RELEASED_20B, output_prefix=str(tmp_path / "out")
        )
        with pytest.raises(FileNotFoundError, match=uri.replace("*", r"\*")):
            preprocess(cfg, show_progress=False)


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_credentials_fail_fast_naming_the_uri(s3_server, s3_bucket, monkeypatch, variable):
    s3_server.client().put_object(Bucket=s3_bucket, Key="t.json", Body=b"{}")
    monkeypatch.setenv(variable, "wrong")
    requests = []  # every HTTP request the shared client sends, retries included
    s3_client().meta.events.register("before-send.s3", lambda **_: requests.append(1))
    for call, uri in [(load_tokenizer, f"s3://{s3_bucket}/t.json"),
                      (expand_inputs, f"s3://{s3_bucket}/*.jsonl")]:  # fmt: skip
        with pytest.raises(PermissionError, match=uri.replace("*", r"\*")):
            call(uri)
    assert len(requests) == 2  # one request each: refused credentials are not retried


# Token files in S3: the same samples, order and fingerprint as the same files on disk.


def publish_demo(demo_data, bucket, folder="demo"):
    """The demo data's components uploaded to s3://bucket/folder/<name>; the config reading
    them there (the sample-order index files in the token cache)."""
    components = {}
    for name, component in demo_data.components.items():
        uri = f"s3://{bucket}/{folder}/{name}"
        upload_token_files(component.prefix, uri)
        components[name] = dataclasses.replace(component, prefix=uri, input=None)
    return dataclasses.replace(demo_data, components=components)


@pytest.fixture
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEORAY_TOKEN_CACHE", str(tmp_path / "token-cache"))
    return tmp_path / "token-cache"


def test_token_files_in_s3_give_the_samples_of_local_files(demo_data, s3_bucket, token_cache):
    remote = publish_demo(demo_data, s3_bucket)
    local, s3 = build_mixture(demo_data, "train", 300), build_mixture(remote, "train", 300)
    assert [s3.source(i) for i in range(300)] == [local.source(i) for i in range(300)]
    assert all(np.array_equal(s3[i], local[i]) for i in range(300))
    assert data_fingerprint(remote) == data_fingerprint(demo_data)
    for component in remote.components.values():
        dataset = IndexedDataset(component.prefix)
        assert dataset.sampled_id_outside(10) is not None  # read straight from the bucket
    assert (token_cache / "index").is_dir() and (token_cache / "blocks").is_dir()


def test_the_block_cache_stays_in_its_bound_and_keys_on_the_object_version(
    demo_data, s3_bucket, token_cache, monkeypatch
):
    monkeypatch.setattr(remote_module, "BLOCK_BYTES", 4096)
    monkeypatch.setenv("NEORAY_TOKEN_CACHE_GB", str(10 * 4096 / 2**30))
    code, prose = (demo_data.components[n].prefix for n in ("code", "prose"))
    uri = f"s3://{s3_bucket}/demo/code"
    upload_token_files(code, uri)
    local, remote = IndexedDataset(code), IndexedDataset(uri)
    for i in range(len(local)):  # every block, many more than the bound holds
        assert np.array_equal(remote.get(i), local.get(i))
        held = sum(p.stat().st_size for p in (token_cache / "blocks").rglob("*.blk"))
        assert held <= 10 * 4096
    # The same name, other contents: read from the new version's own blocks, never the old.
    upload_token_files(prose, uri)
    replaced = IndexedDataset(uri)
    assert len(replaced) == len(IndexedDataset(prose))
    assert all(np.array_equal(replaced.get(i), IndexedDataset(prose).get(i)) for i in range(20))
    assert len(list((token_cache / "blocks").iterdir())) == 2
    with pytest.raises(FileNotFoundError, match=f"{uri}.bin: replaced while this run reads it"):
        for i in range(len(local)):  # the old version's blocks were evicted: read again
            remote.get(i)


def test_missing_token_files_in_s3_are_named(demo_data, s3_bucket, token_cache):
    remote = publish_demo(demo_data, s3_bucket)
    missing = dataclasses.replace(remote.components["code"], prefix=f"s3://{s3_bucket}/nothing")
    cfg = dataclasses.replace(remote, components={**remote.components, "code": missing})
    with pytest.raises(FileNotFoundError, match=f"no token files at s3://{s3_bucket}/nothing.idx"):
        build_mixture(cfg, "train", 10)


def test_training_on_token_files_in_s3_at_tp2_has_the_losses_of_local_files(
    demo_data, s3_server, s3_bucket, tmp_path
):
    """The demo data trained on at tp=2 from its local folder and from the bucket (tokenizer
    included): step for step the same losses, so the same batches."""
    publish_demo(demo_data, s3_bucket)
    s3_server.client().upload_file(demo_data.tokenizer, s3_bucket, "demo/tokenizer.json")
    losses = {}
    for where, root in [("local", demo_data.root), ("s3", f"s3://{s3_bucket}/demo")]:
        run_dir = tmp_path / where
        command = [
            *torchrun_launcher(2),
            "jobs/pretrain.py",
            "launcher=torchrun",
            *overrides((2, 1, 1)),
            "data=demo",
            f"data.root={root}",
            "data.seq_len=32",
            "train.steps=3",
            "train.eval_interval=0",
            "checkpoint.enabled=false",
            "tracking.enabled=false",
            f"run_dir={run_dir}",
        ]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "NEORAY_TOKEN_CACHE": str(tmp_path / "cache")}  # fmt: skip
        run_command(command, timeout=300, cwd=ROOT, env=env)
        losses[where] = [row["loss"] for row in metrics(run_dir).values()]
    assert len(losses["s3"]) == 3 and losses["s3"] == losses["local"]


def test_preprocessing_into_s3_publishes_the_files_written_locally(
    small_corpus, s3_server, s3_bucket, tmp_path
):
    outputs = {}
    for prefix in [str(tmp_path / "local" / "out"), f"s3://{s3_bucket}/tokens/out"]:
        cfg = PreprocessConfig(
            input=[str(small_corpus)], tokenizer=RELEASED_20B, output_prefix=prefix
        )
        summary = preprocess(cfg, show_progress=False)
        assert summary.output_prefix == prefix and summary.documents == 120
        outputs[prefix[:2]] = IndexedDataset(prefix)
    local, remote = outputs.values()
    assert len(remote) == len(local) == 120
    assert all(np.array_equal(remote.get(i), local.get(i)) for i in range(len(local)))
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == [
        f"tokens/out{s}" for s in sorted((".bin", ".idx", ".report.json", ".skipped.jsonl"))
    ]
