"""Tokenizer training and loading: the released GPT-NeoX-20B file and NeoX-style training."""

import json
import os
import shutil
import subprocess
import sys
import unicodedata

import pytest
import zstandard

from neoray.config import ConfigError
from neoray.data.demo_corpus import code_documents, prose_documents, stdlib_code_files
from neoray.tokenizer.load import (
    RELEASED_20B,
    RELEASED_20B_ENV,
    load_tokenizer,
    released_20b_path,
)
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIB_REC = """def fibRec(n):
    if n < 2:
        return n
    else:
        return fibRec(n-1) + fibRec(n-2)"""


def test_released_20b_tokenizer_loads_and_counts_fibrec_as_39_tokens():
    assert os.path.getsize(released_20b_path()) == 2_467_981
    tok = load_tokenizer(RELEASED_20B)
    assert tok.vocab_size == 50277
    assert (tok.eod_id, tok.pad_id) == (0, 1)
    ids = tok.encode(FIB_REC)
    assert len(ids) == 39
    assert tok.decode(ids) == FIB_REC
    # Runs of 2..24 spaces are added tokens at the top of the vocabulary, longest first.
    assert tok.backend.token_to_id(" " * 24) == 50254
    assert tok.backend.token_to_id("  ") == 50276
    # The same file loads by path through the same interface.
    assert load_tokenizer(released_20b_path()).encode(FIB_REC) == ids


def test_released_20b_tokenizer_is_found_where_the_image_puts_it(tmp_path, monkeypatch):
    """The Docker image ships the file outside any package and names it in the environment."""
    shipped = tmp_path / "20B_tokenizer.json"
    shutil.copyfile(released_20b_path(), shipped)
    monkeypatch.setenv(RELEASED_20B_ENV, str(shipped))
    assert released_20b_path() == str(shipped)
    assert len(load_tokenizer(RELEASED_20B).encode(FIB_REC)) == 39
    monkeypatch.setenv(RELEASED_20B_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match=f"{RELEASED_20B_ENV}=.*missing.json"):
        load_tokenizer(RELEASED_20B)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One small corpus in all three input formats: .jsonl, .jsonl.zst and .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    code = list(code_documents(stdlib_code_files()[:40]))
    with open(root / "code.jsonl", "w") as f:
        for doc in code[:20]:
            f.write(json.dumps({"content": doc["text"]}) + "\n")
    with open(root / "code.jsonl.zst", "wb") as f:
        lines = "".join(json.dumps({"content": d["text"]}) + "\n" for d in code[20:])
        f.write(zstandard.ZstdCompressor().compress(lines.encode()))
    os.mkdir(root / "prose")
    for doc in prose_documents():
        (root / "prose" / f"{doc['topic']}.txt").write_text(doc["text"])
    return root


def train(corpus, tmp_path, **fields):
    inputs = [str(corpus / "code.jsonl*"), str(corpus / "prose" / "*.txt")]
    cfg = TokenizerTrainConfig(
        input=inputs, output=str(tmp_path / "tokenizer.json"), text_field="content", **fields
    )
    return train_tokenizer(cfg, show_progress=False)


def test_trains_a_neox_style_tokenizer(corpus, tmp_path):
    tok = train(corpus, tmp_path, vocab_size=1200)
    assert tok.vocab_size == 1200
    assert (tok.eod_id, tok.pad_id) == (0, 1)
    spaces = [tok.backend.token_to_id(" " * n) for n in range(24, 1, -1)]
    assert spaces == list(range(1200 - 23, 1200))
    # The file has the released tokenizer's pipeline.
    ours = json.loads((tmp_path / "tokenizer.json").read_text())
    with open(released_20b_path()) as f:
        released = json.load(f)
    assert ours["normalizer"] == released["normalizer"] == {"type": "NFC"}
    for part in ("pre_tokenizer", "decoder", "post_processor"):
        assert ours[part]["type"] == released[part]["type"] == "ByteLevel"
    for part in ("pre_tokenizer", "post_processor"):  # the decoder ignores the flag
        assert ours[part]["add_prefix_space"] is False
    assert ours["model"]["type"] == "BPE"
    # No merges of spaces: runs of 2+ spaces never reach BPE once they are added tokens.
    merges = [m if isinstance(m, str) else " ".join(m) for m in ours["model"]["merges"]]
    assert not [m for m in merges if "ĠĠ" in m or m == "Ġ Ġ"]

    loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.encode(FIB_REC) == tok.encode(FIB_REC)
    assert loaded.decode(loaded.encode(FIB_REC)) == FIB_REC
    # NFC: a decomposed é encodes like the composed one. No prefix space is added.
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café" and loaded.encode(decomposed) == loaded.encode("café")
    assert loaded.encode("return")[0] != loaded.encode(" return")[0]
    # Runs of spaces come out as the added tokens.
    pieces = loaded.backend.encode("x\n        y").tokens
    assert pieces == ["x", "Ċ", " " * 8, "y"]


def test_plain_scheme_keeps_newlines_with_indentation(corpus, tmp_path):
    tok = train(corpus, tmp_path, vocab_size=1200, space_runs=None)
    assert tok.vocab_size == 1200
    assert tok.backend.token_to_id("  ") is None
    pieces = tok.backend.encode("\n        return x").tokens
    assert pieces[0] == "Ċ" + "Ġ" * 7, "a newline and the indentation after it are one token"


def test_training_counts_bad_records_instead_of_failing(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"content": "fine text here"}\n{broken\n{"other": 1}\n\xff\xfe\n')
    cfg = TokenizerTrainConfig(
        input=[str(bad), str(corpus / "code.jsonl")],
        output=str(tmp_path / "t.json"),
        vocab_size=600,
        text_field="content",
    )
    train_tokenizer(cfg, show_progress=False)
    out = capsys.readouterr().out
    assert "'malformed_json': 1" in out and "'missing_field': 1" in out
    assert "'invalid_utf8': 1" in out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vocab_size": 100}, "train_tokenizer.vocab_size"),
        ({"space_runs": [1, 24]}, "train_tokenizer.space_runs"),
        ({"input": []}, "train_tokenizer.input"),
        ({"special_tokens": ["<|endoftext|>", "<|endoftext|>"]}, "train_tokenizer.special_tokens"),
    ],
)
def test_bad_config_names_the_field(tmp_path, fields, message):
    values = {"input": ["x.jsonl"], "output": str(tmp_path / "t.json"), **fields}
    with pytest.raises(ConfigError, match=message):
        TokenizerTrainConfig(**values)


def test_missing_input_fails_before_training(tmp_path):
    cfg = TokenizerTrainConfig(input=[str(tmp_path / "nope*.jsonl")], output=str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        train_tokenizer(cfg, show_progress=False)


def test_train_tokenizer_job(corpus, tmp_path):
    out = tmp_path / "job.json"
    result = subprocess.run(
        [sys.executable, "jobs/train_tokenizer.py", f"input={corpus}/code.jsonl",
         "text_field=content", "vocab_size=700", f"output={out}",
         f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "700 tokens" in result.stdout
    assert load_tokenizer(str(out)).vocab_size == 700


def test_a_malformed_tokenizer_file_is_named(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "trunc')  # cut short
    with pytest.raises(ValueError, match=r"tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(str(broken))
