"""GPT samples: GPT-NeoX's index construction, contiguity across documents, and an order that
is the same in every process for the same seed."""

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoray.data import gpt_dataset
from neoray.data.gpt_dataset import (
    GPTDataset,
    build_sample_idx,
    doc_epochs,
    sample_idx_chunks,
    split_documents,
)
from neoray.data.indexed import IndexedDataset, IndexedDatasetWriter, publish


def reference_split(splits_string, size):
    """GPT-NeoX's get_train_valid_test_split_, transcribed."""
    splits = [float(s) for s in splits_string.split(",")]
    while len(splits) < 3:
        splits.append(0.0)
    splits = splits[:3]
    splits = [s / sum(splits) for s in splits]
    index = [0]
    for i, split in enumerate(splits):
        index.append(index[i] + round(split * float(size)))
    diff = index[-1] - size
    for i in range(1, len(index)):
        index[i] -= diff
    return index


def reference_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """GPT-NeoX's helpers.build_sample_idx (C++), transcribed loop for loop."""
    sample_idx = np.zeros([num_samples + 1, 2], dtype=np.int32)
    doc_idx_index, doc_offset = 0, 0
    for sample_index in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
    return sample_idx


@pytest.mark.parametrize(("split", "size"), [("995,4,1", 1000), ("949,50,1", 79),
                                             ("98,2", 13), ("1,1,1", 10), ("100,0,0", 7)])  # fmt: skip
def test_splits_follow_gpt_neox(split, size):
    bounds = reference_split(split, size)
    ranges = split_documents(size, split)
    assert [(r.start, r.stop) for r in ranges] == list(itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_the_shuffles_range_is_refused(seed):
    from neoray.config import ConfigError
    from neoray.data.config import ComponentConfig, DataConfig

    with pytest.raises(ConfigError, match=f"data.seed={seed}"):
        DataConfig(components={"a": ComponentConfig(prefix="a")}, tokenizer="t", seed=seed)


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="995,4,1"):
        split_documents(10, "train")


@pytest.mark.parametrize("seq_len", [1, 7, 64, 300])
def test_sample_index_matches_gpt_neox(seq_len):
    rng = np.random.default_rng(seq_len)
    sizes = rng.integers(1, 120, 200).astype(np.int32)
    sizes[::17] = 1  # one-token documents stress the boundaries
    doc_idx = rng.permutation(np.tile(np.arange(200, dtype=np.int32), 2))
    num_samples = (int(sizes[doc_idx].sum()) - 1) // seq_len
    ours = build_sample_idx(sizes, doc_idx, seq_len, num_samples)
    assert np.array_equal(ours, reference_sample_idx(sizes, doc_idx, seq_len, num_samples))


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 100), min_size=1, max_size=40).filter(lambda s: sum(s) > 1),
    seq_len=st.integers(1, 200),
    epochs=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    piece=st.integers(1, 30),
    rows=st.integers(1, 30),
    fewer=st.integers(0, 5),
)
def test_vectorised_sample_idx_is_gpt_neox_loop(sizes, seq_len, epochs, seed, piece, rows, fewer):
    """Samples longer than a document or an epoch, doc_idx given in pieces and rows cut in
    pieces of any size: the rows are those of GPT-NeoX's loop, and each epoch's shuffled
    (document, size) rows are the documents' own permutation. (Empty documents: see
    test_data_index_scale; where doc_idx starts with one, GPT-NeoX's first row points at it
    and ours past it, to the same tokens.)"""
    sizes = np.array(sizes, dtype=np.int32)
    documents = range(len(sizes))
    doc_rows = np.concatenate(list(doc_epochs(sizes, documents, epochs, seed)))
    doc_idx = doc_rows[:, 0]
    expected_order = [np.random.RandomState([seed, e, 0]).permutation(len(sizes))
                      for e in range(epochs)]  # fmt: skip
    assert np.array_equal(doc_idx, np.concatenate(expected_order).astype(np.int32))
    assert np.array_equal(doc_rows[:, 1], sizes[doc_idx])
    num_samples = max(0, (int(sizes[doc_idx].sum()) - 1) // seq_len - fewer)
    pieces = [doc_rows[i : i + piece, 1] for i in range(0, len(doc_rows), piece)]
    before, gpt_dataset.SAMPLE_CHUNK = gpt_dataset.SAMPLE_CHUNK, rows
    try:
        chunks = list(sample_idx_chunks(pieces, seq_len, num_samples, np.int32))
    finally:
        gpt_dataset.SAMPLE_CHUNK = before
    one_document = int(sizes.max()) // seq_len + 1  # the starts one document can hold
    assert all(len(chunk) <= max(rows, one_document) for chunk in chunks)
    ours = np.concatenate(chunks)
    assert np.array_equal(ours, reference_sample_idx(sizes, doc_idx, seq_len, num_samples))


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory):
    rng = np.random.default_rng(7)
    prefix = str(tmp_path_factory.mktemp("gpt") / "docs")
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    for _ in range(120):
        writer.add_document([*rng.integers(2, 5000, rng.integers(1, 90)).tolist(), 0])
    writer.finish()
    publish(prefix)
    return prefix


def test_samples_are_consecutive_slices_of_the_shuffled_document_stream(dataset_prefix, tmp_path):
    data = IndexedDataset(dataset_prefix)
    ds = GPTDataset(
        data, range(10, 110), seq_len=32, num_samples=500, seed=3, cache_dir=str(tmp_path)
    )
    doc_idx = np.asarray(ds.index.doc_idx)
    assert len(doc_idx) % 100 == 0 and len(doc_idx) > 100, "several whole epochs"
    for epoch in np.split(doc_idx, len(doc_idx) // 100):
        assert sorted(epoch.tolist()) == list(range(10, 110)), "each epoch: every document once"
    stream = np.concatenate([data.get(int(d)) for d in doc_idx])
    shuffle = np.asarray(ds.index.shuffle_idx)
    block = ds.tokens_per_epoch // 32
    assert len(ds) == 500 and len(set(shuffle.tolist())) == 500
    for b in range(500 // block):  # every whole block serves exactly its own samples
        served = shuffle[b * block : (b + 1) * block]
        assert sorted(served.tolist()) == list(range(b * block, (b + 1) * block))
    for i in range(500):
        start = int(shuffle[i]) * 32
        assert ds[i].tolist() == stream[start : start + 33].tolist()
        assert ds[i].dtype == np.int64


@pytest.mark.parametrize("seq_len, seed", [(1, 0), (16, 5), (32, 3), (200, 9), (5000, 2)])
def test_a_longer_order_starts_with_the_shorter_one(dataset_prefix, tmp_path, seq_len, seed):
    """Extending a run (more samples) keeps every sample already planned, in its place; short
    documents, samples longer than an epoch and one-token samples included."""
    data = IndexedDataset(dataset_prefix)
    tokens = int(data.sizes[0:120].sum())
    for short in (1, 7, tokens // seq_len, tokens // seq_len + 1, 3 * tokens // seq_len // 2):
        if short < 1:
            continue
        a = GPTDataset(data, range(0, 120), seq_len, short, seed, str(tmp_path / f"a{short}"))
        b = GPTDataset(data, range(0, 120), seq_len, 2 * short, seed, str(tmp_path / f"b{short}"))
        assert len(a) == short and len(b) == 2 * short
        assert all(np.array_equal(a[i], b[i]) for i in range(short)), short


def test_index_is_cached_and_reused(dataset_prefix, tmp_path):
    data = IndexedDataset(dataset_prefix)
    first = GPTDataset(data, range(0, 120), 16, 200, seed=1, cache_dir=str(tmp_path))
    cached = sorted(os.listdir(tmp_path))
    assert cached[0].startswith(".neoray-index-")  # the builders' lock, then the index
    assert len(cached) == 4 and all(name.endswith(".npy") for name in cached[1:])
    again = GPTDataset(data, range(0, 120), 16, 200, seed=1, cache_dir=str(tmp_path))
    assert isinstance(again.index.doc_idx, np.memmap), "loaded from the cache, not rebuilt"
    assert all(np.array_equal(first[i], again[i]) for i in range(200))
    other = GPTDataset(data, range(0, 120), 16, 200, seed=2, cache_dir=str(tmp_path))
    assert not np.array_equal(
        np.asarray(other.index.shuffle_idx), np.asarray(first.index.shuffle_idx)
    )


def test_rewritten_data_at_the_same_prefix_gets_a_new_index(tmp_path):
    """Preprocessing run again into the same prefix (other documents, as after retraining the
    tokenizer): the cached index of the old data must not be used with the new tokens."""
    prefix, cache = str(tmp_path / "docs"), str(tmp_path / "cache")

    def write(seed: int) -> IndexedDataset:
        rng = np.random.default_rng(seed)
        writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
        for _ in range(50):
            writer.add_document([*rng.integers(2, 5000, rng.integers(1, 90)).tolist(), 0])
        writer.finish()
        publish(prefix)
        return IndexedDataset(prefix)

    old = GPTDataset(write(1), range(0, 50), 16, 100, seed=1, cache_dir=cache)
    new_data = write(2)
    new = GPTDataset(new_data, range(0, 50), 16, 100, seed=1, cache_dir=cache)
    fresh = GPTDataset(new_data, range(0, 50), 16, 100, seed=1, cache_dir=str(tmp_path / "c2"))
    assert not np.array_equal(np.asarray(new.index.sample_idx), np.asarray(old.index.sample_idx))
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        assert np.array_equal(np.asarray(getattr(new.index, name)), getattr(fresh.index, name))
    assert all(np.array_equal(new[i], fresh[i]) for i in range(100))
    arrays = [name for name in os.listdir(cache) if name.endswith(".npy")]
    assert len(arrays) == 6  # both indexes, each under its own key


ORDER_SCRIPT = """
import hashlib, sys
from neoray.data.gpt_dataset import GPTDataset
from neoray.data.indexed import IndexedDataset
prefix, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = GPTDataset(IndexedDataset(prefix), range(0, 120), 24, 300, seed, cache_dir=cache)
print(hashlib.sha256(b"".join(ds[i].tobytes() for i in range(len(ds)))).hexdigest())
"""


def test_order_is_identical_across_processes(dataset_prefix, tmp_path):
    def digest_in_new_process(cache, seed):
        out = subprocess.run(
            [sys.executable, "-c", ORDER_SCRIPT, dataset_prefix, str(tmp_path / cache), str(seed)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return out.stdout.strip()

    # Separate caches: each process builds the index itself.
    a, b = digest_in_new_process("a", 42), digest_in_new_process("b", 42)
    here = GPTDataset(
        IndexedDataset(dataset_prefix), range(0, 120), 24, 300, 42, str(tmp_path / "c")
    )
    mine = hashlib.sha256(b"".join(here[i].tobytes() for i in range(300))).hexdigest()
    assert a == b == mine
    assert digest_in_new_process("d", 43) != a
