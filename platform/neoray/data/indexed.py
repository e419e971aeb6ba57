"""Megatron / GPT-NeoX memory-mapped indexed datasets: `<prefix>.bin` + `<prefix>.idx`.

This is the format written by Megatron-LM's and GPT-NeoX's `preprocess_data.py` ("MMIDIDX"),
so token files move freely between those tools and neoray. The `.bin` file holds the tokens of
every sequence back to back. The `.idx` file, all little-endian:

    magic      9 bytes          b"MMIDIDX\\x00\\x00"
    version    uint64           1
    dtype      uint8            code of the token dtype (DTYPES)
    count      uint64           number of sequences
    doc_count  uint64           length of the document index
    sizes      int32[count]     tokens in each sequence
    pointers   int64[count]     byte offset of each sequence in the .bin file
    doc_idx    int64[doc_count] index of the first sequence of each document, then `count`

neoray writes one sequence per document (its tokens followed by `<|endoftext|>`), so `doc_idx`
is 0, 1, ..., count, as GPT-NeoX writes it when sentences are not split.

Files are written under temporary names and published by `publish`, which renames the `.idx`
last: a crash leaves either no `.idx` or the previous complete pair, never a torn one.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence

import numpy as np

from neoray.data.remote import BlockCache, RemoteObject, cached_copy, is_remote

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Codes 6 and 7 (floats) mean different things in different Megatron versions and never hold
# tokens, so they are rejected rather than guessed.
DTYPES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
DTYPE_CODES = {np.dtype(t): code for code, t in DTYPES.items()}
PARTIAL = ".partial"
LAYOUT_CHUNK = 1 << 20  # sequences whose sizes and pointers are checked at once (~40 MB)


class IndexedFormatError(ValueError):
    """A .bin/.idx pair is not a valid, complete MMIDIDX dataset."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else int32 (GPT-NeoX's `best_fitting_dtype`)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_files_exist(prefix: str) -> bool:
    """Whether `<prefix>.idx` exists, on disk or in S3 (it is published after the `.bin`)."""
    if not is_remote(prefix):
        return os.path.exists(idx_path(prefix))
    try:
        RemoteObject.look_up(idx_path(prefix))
    except FileNotFoundError:
        return False
    return True


class IndexedDatasetWriter:
    """Appends documents to `<prefix>.bin.partial`; `finish` writes `<prefix>.idx.partial`.

    Token data goes straight to disk; only the per-document sizes stay in memory (4 bytes each).
    """

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        if np.dtype(dtype) not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} cannot be stored; use one of {list(DTYPE_CODES)}")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._sizes: list[np.ndarray] = []
        self._data = open(bin_path(prefix) + PARTIAL, "wb")  # noqa: SIM115 (closed in finish)

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents given as their concatenated tokens and each one's length."""
        if int(np.sum(sizes, dtype=np.int64)) != len(tokens):
            raise ValueError(
                f"sizes add up to {int(np.sum(sizes))}, but {len(tokens)} tokens given"
            )
        info = np.iinfo(self.dtype)
        if len(tokens) and (tokens.min() < info.min or tokens.max() > info.max):
            raise ValueError(f"token ids outside the range of {self.dtype}")
        self._data.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.append(np.asarray(sizes, dtype=np.int32))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([len(tokens)]))

    def finish(self) -> None:
        """Close the .bin and write the .idx, both still under their `.partial` names."""
        self._data.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        write_index(idx_path(self.prefix) + PARTIAL, sizes, self.dtype)


def write_index(path: str, sizes: np.ndarray, dtype: np.dtype) -> None:
    """Write an .idx for one-sequence-per-document data with the given sequence sizes."""
    count = len(sizes)
    pointers = np.zeros(count, np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    doc_idx = np.arange(count + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, dtype="<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())


class IndexedDataset:
    """Read-only, memory-mapped view of `<prefix>.bin` + `<prefix>.idx`.

    Checks on opening that the header is MMIDIDX version 1, that the sequences lie back to back
    with sizes of zero or more, and that the .bin file is exactly as long as the index says, so
    a truncated, damaged or mismatched pair fails here, not mid-training.

    An `s3://` prefix is read through this node's cache (`neoray.data.remote`): the `.idx`
    whole, the `.bin` by blocks; a missing object raises FileNotFoundError as a missing file.
    """

    def __init__(self, prefix: str, suffix: str = "") -> None:
        self.prefix = prefix
        index_file = idx_path(prefix) + suffix
        data_file = bin_path(prefix) + suffix
        remote = None
        if is_remote(prefix):  # the .idx first: it is published last
            index = np.memmap(cached_copy(index_file), mode="r", dtype=np.uint8)
            remote = RemoteObject.look_up(data_file)
        else:
            index = np.memmap(index_file, mode="r", dtype=np.uint8)
        header_size = len(MAGIC) + 8 + 1 + 8 + 8
        if len(index) < header_size or bytes(index[: len(MAGIC)]) != MAGIC:
            raise IndexedFormatError(f"{index_file}: not an MMIDIDX index (bad magic)")
        version, code, count, doc_count = struct.unpack_from("<QBQQ", index, len(MAGIC))
        if version != VERSION:
            raise IndexedFormatError(f"{index_file}: version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise IndexedFormatError(f"{index_file}: unsupported dtype code {code}")
        expected = header_size + count * (4 + 8) + doc_count * 8
        if len(index) < expected:
            raise IndexedFormatError(f"{index_file}: {len(index)} bytes, expected {expected}")
        self.dtype = np.dtype(DTYPES[code])
        self.sizes = np.frombuffer(index, "<i4", count, header_size)
        self.pointers = np.frombuffer(index, "<i8", count, header_size + count * 4)
        self.doc_idx = np.frombuffer(index, "<i8", doc_count, header_size + count * 12)
        end = self._check_layout(index_file)
        # The check read every page of the index: drop them from this process (they stay in the
        # page cache; a later read maps them again), or a process that opens the Pile's 22
        # files holds 1.7 GB of them in its resident memory until it exits.
        index._mmap.madvise(mmap.MADV_DONTNEED)
        data_bytes = remote.size if remote else os.path.getsize(data_file)
        if data_bytes != end:
            raise IndexedFormatError(
                f"{data_file}: {data_bytes} bytes, but the index describes {end}"
            )
        self._data: np.ndarray | BlockCache | None = None
        if remote and data_bytes:
            self._data = BlockCache(remote, self.dtype)
        elif data_bytes:
            self._data = np.memmap(data_file, mode="r", dtype=self.dtype)

    def _check_layout(self, index_file: str) -> int:
        """The bytes the sequences fill, once every size is checked to be zero or more and
        every sequence to start where the one before it ends (as the format lays them out).
        A damaged .idx would otherwise be read as it is: a negative size fails deep inside
        numpy while the sample index is built, and a size past the next sequence's start reads
        a short sample at some training step. One pass over the index, a chunk at a time."""
        itemsize = self.dtype.itemsize
        end = 0  # where the next sequence must start
        for first in range(0, len(self.sizes), LAYOUT_CHUNK):
            sizes = self.sizes[first : first + LAYOUT_CHUNK].astype(np.int64)
            negative = np.flatnonzero(sizes < 0)
            if len(negative):
                i = first + int(negative[0])
                raise IndexedFormatError(
                    f"{index_file}: sequence {i} has a negative size ({int(sizes[negative[0]])} "
                    f"tokens); the index is damaged: rebuild it with jobs/preprocess.py"
                )
            nbytes = sizes * itemsize
            ends = np.cumsum(nbytes) + end
            starts = ends - nbytes
            moved = np.flatnonzero(self.pointers[first : first + LAYOUT_CHUNK] != starts)
            if len(moved):
                i = first + int(moved[0])
                raise IndexedFormatError(
                    f"{index_file}: sequence {i} starts at byte {int(self.pointers[i])} of the "
                    f".bin, but the sizes before it end at byte {int(starts[moved[0]])}; the "
                    "index's sizes and pointers disagree (a damaged index): rebuild it with "
                    "jobs/preprocess.py"
                )
            end = int(ends[-1])
        return end

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.sizes, dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `i`, from `offset`, `length` of them (default: to its end)."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) of a {size}-token sequence")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        if self._data is None:
            return np.zeros(0, self.dtype)
        return np.asarray(self._data[start : start + length])

    def document_of(self, sequence: int) -> int:
        """The document sequence `sequence` belongs to (its own number, for one sequence per
        document as neoray writes; several sequences per document for sentence-split files)."""
        return int(np.searchsorted(self.doc_idx, sequence, side="right")) - 1

    def sequence_at(self, position: int) -> int:
        """The sequence holding token `position` of the .bin (counted in tokens)."""
        byte = position * self.dtype.itemsize
        return int(np.searchsorted(self.pointers, byte, side="right")) - 1

    def sampled_id_outside(self, vocab_size: int) -> tuple[int, int] | None:
        """(position in the .bin, id) of a token id outside [0, vocab_size) in the blocks of the
        .bin `fingerprint` reads (64 of 64 KiB, spread evenly), or None. Checking every token of
        a Pile-sized corpus would take minutes at each start; data tokenized for another
        vocabulary has large ids everywhere, so a sample finds it. None at once when the token
        dtype cannot hold such an id. The batches check every token they serve
        (`BlendedDataset`), so a stray id elsewhere is still named before the model sees it."""
        info = np.iinfo(self.dtype)
        if self._data is None or (info.min >= 0 and info.max < vocab_size):
            return None
        block = FINGERPRINT_BLOCK_BYTES // self.dtype.itemsize
        for b in range(FINGERPRINT_BLOCKS):
            start = len(self._data) * b // FINGERPRINT_BLOCKS
            if isinstance(self._data, BlockCache):
                tokens = self._data.peek(start, start + block)
            else:
                tokens = np.asarray(self._data[start : start + block])
            outside = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
            if len(outside):
                return start + int(outside[0]), int(tokens[outside[0]])
        return None


FINGERPRINT_BLOCKS = 64  # blocks of the .bin hashed by `fingerprint`
FINGERPRINT_BLOCK_BYTES = 1 << 16


def fingerprint(prefix: str) -> str:
    """A digest that changes when `<prefix>.bin/.idx` are rebuilt or replaced: the sha256 of
    the whole `.idx` (every document's size and position), the `.bin`'s length and 64 blocks of
    64 KiB spread evenly over it. Hashing all of a Pile-sized `.bin` would take minutes at every
    training start; another tokenizer or corpus changes sizes and sampled tokens alike.
    Files in S3 give the digest of the same files on disk: the bytes read are the same."""
    digest = hashlib.sha256()
    index_file = idx_path(prefix)
    if is_remote(prefix):
        index_file = cached_copy(index_file)
    with open(index_file, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    for block in _fingerprint_blocks(prefix):
        digest.update(block)
    return digest.hexdigest()


def _fingerprint_blocks(prefix: str) -> Iterator[bytes]:
    """The `.bin`'s length (8 bytes), then the FINGERPRINT_BLOCKS blocks `fingerprint` hashes."""
    if is_remote(prefix):
        data = RemoteObject.look_up(bin_path(prefix))
        yield data.size.to_bytes(8, "little")
        for block in range(FINGERPRINT_BLOCKS):
            start = data.size * block // FINGERPRINT_BLOCKS
            yield data.read(start, start + FINGERPRINT_BLOCK_BYTES)
        return
    size = os.path.getsize(bin_path(prefix))
    yield size.to_bytes(8, "little")
    with open(bin_path(prefix), "rb") as f:
        for block in range(FINGERPRINT_BLOCKS):
            f.seek(size * block // FINGERPRINT_BLOCKS)
            yield f.read(FINGERPRINT_BLOCK_BYTES)


def publish(prefix: str) -> IndexedDataset:
    """Verify the `.partial` pair of `prefix` and give it its final names.

    The old `.idx` goes first and the new `.idx` arrives last, so at every instant the files on
    disk are either a complete verified pair or lack an `.idx`.
    """
    IndexedDataset(prefix, suffix=PARTIAL)
    if os.path.exists(idx_path(prefix)):
        os.remove(idx_path(prefix))
    os.replace(bin_path(prefix) + PARTIAL, bin_path(prefix))
    os.replace(idx_path(prefix) + PARTIAL, idx_path(prefix))
    return IndexedDataset(prefix)
