"""Damaged token files and token ids past the vocabulary, written for real as a user would meet
them: refused before training by the job's config check (and on opening, on the workers),
naming the component and the file, leaving nothing half-built in the index cache."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from test_pretrain_job import compose_pretrain

from neoray.config import ConfigError
from neoray.data.config import DataConfig, data_config
from neoray.data.index_cache import NpyWriter, load_or_build, lock_file
from neoray.data.indexed import (
    FINGERPRINT_BLOCKS,
    IndexedDatasetWriter,
    IndexedFormatError,
    publish,
)
from neoray.data.mixture import TokenIdError, build_mixture
from neoray.training.config import pretrain_config

VOCAB = 1024  # model=tiny's vocabulary
SIZES_AT = 9 + 8 + 1 + 8 + 8  # where an .idx's int32 sizes begin (after the header)


def write_tokens(prefix: Path, documents: list[np.ndarray]) -> None:
    """`documents` as a published .bin/.idx pair, as preprocessing writes it."""
    writer = IndexedDatasetWriter(str(prefix), np.dtype(np.uint16))
    writer.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
    writer.finish()
    publish(str(prefix))


def small_corpus(root: Path, code_ids: tuple[int, int] = (0, VOCAB)) -> None:
    """The demo data's two components, 40 documents of 50 tokens each; code's ids drawn from
    `code_ids`."""
    rng = np.random.default_rng(0)
    write_tokens(root / "code", [rng.integers(*code_ids, 50) for _ in range(40)])
    write_tokens(root / "prose", [rng.integers(0, VOCAB, 50) for _ in range(40)])


def set_size(prefix: Path, sequence: int, size: int) -> None:
    """Overwrite the size of one sequence in `prefix`.idx, as a damaged or hand-edited file."""
    with open(f"{prefix}.idx", "r+b") as f:
        f.seek(SIZES_AT + 4 * sequence)
        f.write(struct.pack("<i", size))


def job_config(root: Path):
    """The pretrain job's config on the demo data layout under `root` (no tokenizer file:
    the token files are the thing under test)."""
    return compose_pretrain(
        "data=demo", f"data.root={root}", "data.seq_len=64", "data.tokenizer_training=null"
    )


def mixture_config(root: Path) -> DataConfig:
    return data_config(
        {
            "components": {"code": {"prefix": str(root / "code")}},
            "tokenizer": str(root / "tokenizer.json"),
            "split": "1,0,0",
            "seq_len": 64,
            "cache_dir": str(root / "cache"),
        }
    )


def cached_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "cache")) if (root / "cache").exists() else []


@pytest.mark.parametrize(
    "size, reason",
    [
        (-5, "sequence 3 has a negative size (-5 tokens)"),
        # larger than the file, yet the last sequence still ends where the .bin does
        (
            10_000,
            "sequence 4 starts at byte 400 of the .bin, but the sizes before it end at byte 20300",
        ),
    ],
)
def test_a_damaged_index_is_refused_before_training_naming_the_file(tmp_path, size, reason):
    small_corpus(tmp_path)
    set_size(tmp_path / "code", 3, size)
    where = re.escape(f"data.components.code: {tmp_path}/code.idx: {reason}")
    with pytest.raises(ConfigError, match=where + ".*rebuild it with jobs/preprocess.py"):
        pretrain_config(job_config(tmp_path))
    # a worker opening the mixture (no job check before it) refuses it the same way
    with pytest.raises(IndexedFormatError, match=re.escape(f"{tmp_path}/code.idx: {reason}")):
        build_mixture(mixture_config(tmp_path), "train", 100)
    assert cached_files(tmp_path) == []


def test_token_ids_of_another_vocabulary_are_refused_before_training(tmp_path):
    small_corpus(tmp_path, code_ids=(VOCAB, 2 * VOCAB))
    with pytest.raises(
        ConfigError,
        match=re.escape(f"data.components.code: {tmp_path}/code.bin holds token id ")
        + r"\d+ \(document 0, token 0 of the file\), outside model\.vocab_size=1,024",
    ):
        pretrain_config(job_config(tmp_path))


def test_a_stray_token_id_is_named_when_its_sample_is_served(tmp_path):
    """An id the start's sample of blocks misses is caught before the model sees it."""
    documents = [np.full(1000, 7, np.uint16) for _ in range(4200)]  # 4.2M tokens
    blocks_every = 4_200_000 // FINGERPRINT_BLOCKS  # tokens; the first 32,768 of each are read
    documents[(10 * blocks_every + 40_000) // 1000][0] = 5000  # between two read blocks
    small_corpus(tmp_path)
    write_tokens(tmp_path / "code", documents)  # in place of the small one
    pretrain_config(job_config(tmp_path))  # the sample misses it

    samples = 4_200_000 // 64  # an epoch: the stray token is in one of them
    mixture = build_mixture(mixture_config(tmp_path), "train", samples, VOCAB)
    with pytest.raises(
        TokenIdError,
        match=re.escape(
            f"data.components.code: {tmp_path}/code.bin holds token id 5000 in "
            f"document {(10 * blocks_every + 40_000) // 1000}, outside model.vocab_size=1,024"
        ),
    ):
        for i in range(len(mixture)):
            mixture[i]


def test_a_failed_index_build_leaves_no_partial_files(tmp_path):
    paths = {name: str(tmp_path / f"{name}.npy") for name in ("first", "second")}

    def build(partials: dict[str, str]) -> None:
        first = NpyWriter(partials["first"], (4,), np.int64)
        first.write(np.arange(4))
        first.close()
        NpyWriter(partials["second"], (4,), np.int64).write(np.arange(5))  # one too many

    with pytest.raises(ValueError, match="more than the 4 values"):
        load_or_build(paths, build, "two arrays")
    assert os.listdir(tmp_path) == [lock_file(paths).name]  # the builders' lock, no array
