"""Preprocessing: reading every input format, skipping bad records with their file and line,
byte-range shards, the Ray executor, and never publishing a torn .bin/.idx pair."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard
from corpora import make_big_jsonl, read_report

from neoray.config import ConfigError
from neoray.corpus import Document, LineCounter, Shard, plan_shards, read_records
from neoray.data.indexed import IndexedDataset
from neoray.data.preprocess import PreprocessConfig, preprocess
from neoray.tokenizer.load import RELEASED_20B, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(RELEASED_20B)


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


@pytest.fixture
def bad_corpus(tmp_path):
    """Files with one bad record of every kind, at known lines. Returns (inputs, good, bad)."""
    write_lines(tmp_path / "a.jsonl", [
        b'{"text": "good one"}',
        b'{"text": "broken',                  # 2 malformed_json
        b'{"other": "x"}',                    # 3 missing_field
        b'{"text": 5}',                       # 4 missing_field (not a string)
        b'{"text": "caf\xe9"}',               # 5 invalid_utf8 (latin-1 byte)
        b'{"text": "   "}',                   # 6 empty_document
        b"",                                  # 7 blank line: not a record
        b'{"text": "lone \\ud800 surrogate"}',  # 8 invalid_utf8 (escaped)
        b"[1, 2]",                            # 9 malformed_json (not an object)
        b'{"text": "good two\\nwith a newline"}',
    ])  # fmt: skip
    zst = "".join(json.dumps({"text": t}) + "\n" for t in ["zst one", "{x", "zst two"])
    zst = zst.replace('"{x"', "{x")  # line 2 becomes malformed
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst.encode()))
    (tmp_path / "c.txt").write_text("A whole book.\n\nIn one file.\n")
    (tmp_path / "d.txt").write_bytes(b"line one\nline two\nbad \xff here\n")  # invalid_utf8, line 3
    (tmp_path / "e.txt").write_text("  \n\n")  # empty_document
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.zst"), str(tmp_path / "*.txt")]
    good = ["good one", "good two\nwith a newline", "zst one", "zst two",
            "A whole book.\n\nIn one file.\n"]  # fmt: skip
    bad = [
        ("a.jsonl", 2, "malformed_json"),
        ("a.jsonl", 3, "missing_field"),
        ("a.jsonl", 4, "missing_field"),
        ("a.jsonl", 5, "invalid_utf8"),
        ("a.jsonl", 6, "empty_document"),
        ("a.jsonl", 8, "invalid_utf8"),
        ("a.jsonl", 9, "malformed_json"),
        ("b.jsonl.zst", 2, "malformed_json"),
        ("d.txt", 3, "invalid_utf8"),
        ("e.txt", 1, "empty_document"),
    ]
    return inputs, good, bad


def test_bad_records_are_skipped_counted_and_reported(bad_corpus, tmp_path, tokenizer):
    inputs, good, bad = bad_corpus
    prefix = str(tmp_path / "out" / "corpus")
    summary = preprocess(
        PreprocessConfig(input=inputs, tokenizer=RELEASED_20B, output_prefix=prefix),
        show_progress=False,
    )
    data = IndexedDataset(prefix)
    assert [data.get(i).tolist() for i in range(len(data))] == [
        [*tokenizer.encode(text), tokenizer.eod_id] for text in good
    ]
    assert data.dtype == np.uint16
    report = read_report(prefix)
    assert [(os.path.basename(r["file"]), r["line"], r["kind"]) for r in report] == bad
    assert all(r["detail"] for r in report)
    expected = {"malformed_json": 3, "missing_field": 2, "invalid_utf8": 3, "empty_document": 2}
    assert summary.skipped == expected
    with open(prefix + ".report.json") as f:
        totals = json.load(f)
    assert totals["skipped"] == expected
    assert totals["documents"] == len(good) == summary.documents
    assert totals["tokens"] == data.num_tokens
    assert "skipped: empty_document: 2" in summary.describe()
    assert sorted(os.listdir(tmp_path / "out")) == [
        "corpus.bin", "corpus.idx", "corpus.report.json", "corpus.skipped.jsonl"
    ]  # fmt: skip


@pytest.mark.parametrize("shard_bytes", [1, 7, 1000, 10**9])
def test_byte_range_shards_cover_every_line_once(tmp_path, shard_bytes):
    path = str(tmp_path / "big.jsonl")
    bad = make_big_jsonl(path, lines=300)
    whole = list(read_records(Shard(path)))
    shards = plan_shards([path], shard_bytes)
    assert len(shards) == (
        1 if shard_bytes > os.path.getsize(path) else -(-os.path.getsize(path) // shard_bytes)
    )
    records, lines_before = [], 0
    for shard in shards:
        counter = LineCounter()
        for record in read_records(shard, "text", counter):
            records.append((type(record).__name__, lines_before + record.line,
                            getattr(record, "text", None)))  # fmt: skip
        lines_before += counter.lines
    assert lines_before == 300
    assert records == [(type(r).__name__, r.line, getattr(r, "text", None)) for r in whole]
    assert [line for kind, line, _ in records if kind == "Skipped"] == bad
    assert sum(isinstance(r, Document) for r in whole) == 300 - len(bad)


def files_of(prefix):
    return {s: open(prefix + s, "rb").read() for s in (".bin", ".idx", ".skipped.jsonl")}


def test_sharded_and_ray_runs_write_identical_files(tmp_path, ray_local):
    path = str(tmp_path / "big.jsonl")
    bad = make_big_jsonl(path)
    outputs = {}
    for name, executor, shard_mb in [("whole", "local", 64), ("sharded", "local", 0.02),
                                     ("ray", "ray", 0.02)]:  # fmt: skip
        prefix = str(tmp_path / name)
        cfg = PreprocessConfig(
            input=[path], tokenizer=RELEASED_20B, output_prefix=prefix, executor=executor,
            shard_mb=shard_mb, batch_size=64,
        )  # fmt: skip
        preprocess(cfg, show_progress=False)
        outputs[name] = files_of(prefix)
    assert os.path.getsize(path) > 8 * 0.02 * 2**20, "the sharded runs really use many shards"
    assert outputs["sharded"] == outputs["whole"]
    assert outputs["ray"] == outputs["whole"]
    assert [r["line"] for r in read_report(str(tmp_path / "ray"))] == bad


def test_a_killed_run_leaves_no_valid_looking_pair(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    make_big_jsonl(str(corpus), lines=40_000, bad_every=10**9)
    prefix = str(tmp_path / "out")
    script = (
        "from neoray.data.preprocess import PreprocessConfig, preprocess\n"
        f"preprocess(PreprocessConfig(input=[{str(corpus)!r}], tokenizer={RELEASED_20B!r}, "
        f"output_prefix={prefix!r}, shard_mb=0.25, batch_size=64), show_progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = prefix + ".bin.partial"
    deadline = time.monotonic() + 60
    while not (os.path.exists(partial) and os.path.getsize(partial) > 0):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(prefix + ".idx")
    assert not os.path.exists(prefix + ".bin")
    with pytest.raises(FileNotFoundError):
        IndexedDataset(prefix)


def test_a_failed_run_cleans_up_and_keeps_the_previous_output(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "first version"}\n')
    prefix = str(tmp_path / "out")
    preprocess(
        PreprocessConfig(input=[str(good)], tokenizer=RELEASED_20B, output_prefix=prefix),
        show_progress=False,
    )
    before = files_of(prefix)
    # The second input is not zstd at all: reading it fails after the first shard was written.
    (tmp_path / "b.jsonl.zst").write_bytes(b"this is not zstd data\n" * 100)
    cfg = PreprocessConfig(
        input=[str(good), str(tmp_path / "b.jsonl.zst")],
        tokenizer=RELEASED_20B,
        output_prefix=prefix,
    )
    with pytest.raises(zstandard.ZstdError):
        preprocess(cfg, show_progress=False)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert files_of(prefix) == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"executor": "spark"}, "preprocess.executor"),
        ({"shard_mb": 0}, "preprocess.shard_mb"),
        ({"tokenizer": ""}, "preprocess.tokenizer"),
    ],
)
def test_bad_config_names_the_field(fields, message):
    values = {"input": ["x.jsonl"], "tokenizer": "t.json", "output_prefix": "out", **fields}
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig(**values)


def test_unsupported_or_missing_inputs_fail_up_front(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    for inputs, error in [([str(tmp_path / "notes.md")], ValueError),
                          ([str(tmp_path / "missing*.jsonl")], FileNotFoundError)]:  # fmt: skip
        cfg = PreprocessConfig(
            input=inputs, tokenizer=RELEASED_20B, output_prefix=str(tmp_path / "o")
        )
        with pytest.raises(error):
            preprocess(cfg, show_progress=False)
    assert not any(name.startswith("o.") for name in os.listdir(tmp_path))


def test_preprocess_job(bad_corpus, tmp_path):
    inputs, good, _ = bad_corpus
    prefix = tmp_path / "job" / "out"
    result = subprocess.run(
        [sys.executable, "jobs/preprocess.py", f"input=[{','.join(inputs)}]",
         f"tokenizer={RELEASED_20B}", f"output_prefix={prefix}", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(good)} documents" in result.stdout
    assert "malformed_json: 3" in result.stdout
    assert len(IndexedDataset(str(prefix))) == len(good)
