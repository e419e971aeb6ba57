"""The Megatron / GPT-NeoX MMIDIDX format, checked against a reader and a writer written here
from the format specification alone (struct-level, no neoray code)."""

import os
import struct

import numpy as np
import pytest

from neoray.data.indexed import (
    PARTIAL,
    IndexedDataset,
    IndexedDatasetWriter,
    IndexedFormatError,
    publish,
    token_dtype,
)

# Specification: magic, <Q version, <B dtype code, <Q sequence count, <Q doc-index length,
# int32 sizes, int64 byte pointers, int64 document index. Megatron/GPT-NeoX dtype codes:
SPEC_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}


def spec_read(prefix):
    """An independent reader following the MMIDIDX specification field by field."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    count, doc_count = struct.unpack("<QQ", raw[18:34])
    pos = 34
    sizes = list(struct.unpack(f"<{count}i", raw[pos : pos + 4 * count]))
    pos += 4 * count
    pointers = list(struct.unpack(f"<{count}q", raw[pos : pos + 8 * count]))
    pos += 8 * count
    doc_idx = list(struct.unpack(f"<{doc_count}q", raw[pos : pos + 8 * doc_count]))
    assert pos + 8 * doc_count == len(raw), "trailing bytes in .idx"
    item = np.dtype(SPEC_DTYPES[code]).itemsize
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    sequences = [
        np.frombuffer(data, SPEC_DTYPES[code], size, ptr).tolist()
        for size, ptr in zip(sizes, pointers, strict=True)
    ]
    assert len(data) == sum(sizes) * item
    return {"version": version, "code": code, "sizes": sizes, "pointers": pointers,
            "doc_idx": doc_idx, "sequences": sequences}  # fmt: skip


def spec_write(prefix, sequences, doc_idx, code):
    """An independent writer, as Megatron's/GPT-NeoX's preprocess_data.py lays files out."""
    dtype = np.dtype(SPEC_DTYPES[code])
    pointers, offset = [], 0
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            f.write(np.array(seq, dtype).tobytes())
            pointers.append(offset)
            offset += len(seq) * dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<QBQQ", 1, code, len(sequences), len(doc_idx)))
        f.write(struct.pack(f"<{len(sequences)}i", *[len(s) for s in sequences]))
        f.write(struct.pack(f"<{len(sequences)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def random_documents(rng, count, vocab):
    return [rng.integers(0, vocab, rng.integers(1, 40)).tolist() for _ in range(count)]


@pytest.mark.parametrize(("vocab", "code"), [(50277, 8), (100_000, 4)])
def test_written_files_match_the_specification(tmp_path, vocab, code):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 57, vocab)
    prefix = str(tmp_path / "out")
    writer = IndexedDatasetWriter(prefix, token_dtype(vocab))
    writer.add_document(docs[0])
    rest = docs[1:]
    writer.add_documents(np.concatenate(rest), np.array([len(d) for d in rest]))
    writer.finish()
    assert not os.path.exists(prefix + ".idx"), "nothing is published before publish()"
    publish(prefix)
    assert not os.path.exists(prefix + ".bin" + PARTIAL)

    spec = spec_read(prefix)
    assert spec["version"] == 1
    assert spec["code"] == code
    assert spec["sequences"] == docs
    assert spec["doc_idx"] == list(range(len(docs) + 1))
    assert spec["pointers"][1] == len(docs[0]) * np.dtype(SPEC_DTYPES[code]).itemsize


def test_reads_files_written_to_the_specification(tmp_path):
    rng = np.random.default_rng(1)
    sequences = random_documents(rng, 9, 200_000)
    # Sentence-split documents, as GPT-NeoX writes with --split-sentences: 3 docs of 2,3,4 seqs.
    doc_idx = [0, 2, 5, 9]
    prefix = str(tmp_path / "foreign")
    spec_write(prefix, sequences, doc_idx, code=4)
    data = IndexedDataset(prefix)
    assert data.dtype == np.int32
    assert len(data) == 9
    assert data.doc_idx.tolist() == doc_idx
    assert [data.get(i).tolist() for i in range(9)] == sequences
    assert data.get(3, offset=1, length=2).tolist() == sequences[3][1:3]
    assert data.num_tokens == sum(len(s) for s in sequences)


def test_token_dtype_follows_gpt_neox():
    assert token_dtype(50277) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32


def test_truncated_or_foreign_files_are_refused(tmp_path):
    prefix = str(tmp_path / "x")
    spec_write(prefix, [[1, 2, 3], [4, 5]], [0, 1, 2], code=8)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(IndexedFormatError, match="index describes 10"):
        IndexedDataset(prefix)
    spec_write(prefix, [[1, 2, 3]], [0, 1], code=8)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTMMIDX")
    with pytest.raises(IndexedFormatError, match="bad magic"):
        IndexedDataset(prefix)
    spec_write(prefix, [[1, 2, 3]], [0, 1], code=8)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(17)
        f.write(bytes([6]))  # a float dtype code
    with pytest.raises(IndexedFormatError, match="dtype code 6"):
        IndexedDataset(prefix)


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "y"), np.dtype(np.uint16))
    with pytest.raises(ValueError, match="outside the range"):
        writer.add_document([1, 70000])
    with pytest.raises(ValueError, match="sizes add up"):
        writer.add_documents(np.array([1, 2, 3]), np.array([2]))


def test_publish_replaces_an_old_pair_only_when_the_new_one_is_complete(tmp_path):
    prefix = str(tmp_path / "z")
    spec_write(prefix, [[1, 2]], [0, 1], code=8)
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    writer.add_document([7, 8, 9])
    writer.finish()
    # A torn .partial pair (data cut short) is refused and the old pair stays.
    with open(prefix + ".bin" + PARTIAL, "r+b") as f:
        f.truncate(2)
    with pytest.raises(IndexedFormatError):
        publish(prefix)
    assert IndexedDataset(prefix).get(0).tolist() == [1, 2]
    with open(prefix + ".bin" + PARTIAL, "r+b") as f:
        f.seek(0, 2)
        f.write(np.array([8, 9], np.uint16).tobytes())  # completes it again
    publish(prefix)
    assert spec_read(prefix)["sequences"] == [[7, 8, 9]]
