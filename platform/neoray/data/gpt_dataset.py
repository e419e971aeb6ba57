"""GPT training samples over an indexed dataset, in a seeded order cached next to the data.

As in GPT-NeoX (and Megatron-LM), documents are laid end to end in a shuffled order, epoch after
epoch, and the stream is cut into samples of `seq_len + 1` tokens: the extra token is the target
of the last position, and it is also the first token of the next sample. Three index arrays
describe this and are cached as `.npy` files next to the data:

- doc_idx: the document order, epoch after epoch, each epoch its own permutation of the split;
- sample_idx: where each sample starts, as (position in doc_idx, offset in that document);
- shuffle_idx: the order in which samples are served.

Unlike GPT-NeoX, whose shuffles are sized to the whole run, every permutation here covers a
fixed stretch, as OLMo's per-epoch shuffles do: epoch e's documents are permuted with the seed
(seed, e), and the samples are served in blocks of one epoch's worth, block b permuted with the
seed (seed, b). So the first n samples are the same whatever the run's length: a run extended
past its planned `train.steps` continues the same sequence, and any step's batch is a function
of the data, `seq_len`, the seed and the step alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from neoray.data.index_cache import MemoryBudget, NpyWriter, load_or_build
from neoray.data.indexed import IndexedDataset
from neoray.data.remote import index_folder


def split_documents(num_documents: int, split: str) -> list[range]:
    """Document ranges of the train/validation/test splits, e.g. "995,4,1" (GPT-NeoX's rule).

    Weights are normalised; the boundaries are rounded, and any rounding excess is taken off
    the end so the last boundary is exactly `num_documents`.
    """
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError as err:
        raise ValueError(
            f"split {split!r}: expected comma-separated weights like '995,4,1'"
        ) from err
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split {split!r}: give up to three non-negative weights, not all zero")
    weights += [0.0] * (3 - len(weights))
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + round(weight / sum(weights) * num_documents))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [range(bounds[i], bounds[i + 1]) for i in range(3)]


def _shuffled(values: np.ndarray, seed: list[int]) -> np.ndarray:
    """`values`, shuffled in place in the order of a legacy RandomState seeded with `seed`
    (stable across numpy versions and machines)."""
    np.random.RandomState(seed).shuffle(values)
    return values


def doc_epochs(
    sizes: np.ndarray,
    documents: range,
    num_epochs: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """The split's documents, `num_epochs` times, each epoch in its own seeded order, one epoch
    at a time: rows of (document, size), int32. Column 0 is the doc_idx. Documents past int32
    are refused at the call.

    A row is shuffled as one 8-byte item, so the sizes come along in the epoch's order (the
    permutation depends on the seed and the count alone, so it is the documents' own) and the
    samples are cut without looking up a document's size at a random place of `sizes`.
    """
    if len(documents) and documents.stop - 1 > np.iinfo(np.int32).max:
        raise ValueError(f"document {documents.stop - 1} does not fit doc_idx's int32")

    def epoch(e: int) -> np.ndarray:
        rows = np.empty((len(documents), 2), dtype=np.int32)
        rows[:, 0] = np.arange(documents.start, documents.stop, dtype=np.int32)
        rows[:, 1] = sizes[documents.start : documents.stop]
        _shuffled(rows.view(np.int64).reshape(-1), [seed, e, 0])
        return rows

    return (epoch(e) for e in range(num_epochs))


def position_dtype(doc_idx_length: int) -> np.dtype:
    """dtype of sample_idx: int32 (GPT-NeoX's) while every position in a doc_idx of this
    length fits it, int64 beyond (a doc_idx of more than 2**31 - 1 documents)."""
    return np.dtype(np.int32) if doc_idx_length <= np.iinfo(np.int32).max else np.dtype(np.int64)


def sample_idx_chunks(
    doc_sizes: Iterable[np.ndarray],
    seq_len: int,
    num_samples: int,
    dtype: npt.DTypeLike = np.int64,
) -> Iterator[np.ndarray]:
    """Start of every sample, plus an end marker: rows of (position in doc_idx, offset), in
    pieces of at most SAMPLE_CHUNK rows (or the starts of one document, if more), from the
    sizes of doc_idx's documents given in pieces (memory bounded by the pieces).

    Sample i covers stream positions [i * seq_len, (i + 1) * seq_len] inclusive; row i is where
    position i * seq_len falls: in the first document that ends after it. A document ending at
    stream position E has ceil(E / seq_len) sample starts before its end, so the starts in each
    document come from differences of those counts, in one pass over documents and samples.
    This is GPT-NeoX's `build_sample_idx`, vectorised piece by piece.
    """
    next_sample, first, tokens_before = 0, 0, 0
    for piece in doc_sizes:
        if not len(piece):
            continue
        doc_ends = np.cumsum(piece, dtype=np.int64)
        doc_ends += tokens_before
        starts_before_end = np.minimum(-(-doc_ends // seq_len), num_samples + 1)
        a = 0  # documents [a, b) of the piece give at most SAMPLE_CHUNK rows (or one document)
        while a < len(piece) and next_sample <= num_samples:
            b = int(np.searchsorted(starts_before_end, next_sample + SAMPLE_CHUNK, "right"))
            b = max(b, a + 1)
            in_doc = np.diff(starts_before_end[a:b], prepend=next_sample)
            stop = int(starts_before_end[b - 1])
            rows = np.empty((stop - next_sample, 2), dtype=dtype)
            rows[:, 0] = np.repeat(np.arange(first + a, first + b, dtype=dtype), in_doc)
            doc_starts = doc_ends[a:b] - piece[a:b]
            rows[:, 1] = np.arange(next_sample, stop, dtype=np.int64) * seq_len - np.repeat(
                doc_starts, in_doc
            )
            yield rows
            next_sample, a = stop, b
        if next_sample == num_samples + 1:
            return
        first, tokens_before = first + len(piece), int(doc_ends[-1])
    raise ValueError(f"{num_samples} samples of {seq_len} tokens need more epochs")


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int
) -> np.ndarray:
    """`sample_idx_chunks` in memory, as one array of `position_dtype`."""
    dtype = position_dtype(len(doc_idx))
    chunks = sample_idx_chunks([sizes[doc_idx]], seq_len, num_samples, dtype)
    return np.concatenate(list(chunks))


def shuffle_dtype(num_samples: int, block: int) -> np.dtype:
    """uint32 while every sample number of the blocks fits, else int64."""
    return np.dtype(np.uint32) if num_samples + block < 2**32 - 1 else np.dtype(np.int64)


def shuffle_idx_blocks(num_samples: int, block: int, seed: int) -> Iterator[np.ndarray]:
    """The order of the first `num_samples` samples: blocks of `block` samples, each block
    permuted on its own (seed (seed, b)), so a longer run's order starts with a shorter one's.
    Yields the blocks, the last one cut to `num_samples`."""
    dtype = shuffle_dtype(num_samples, block)
    for b in range(-(-num_samples // block)):
        order = _shuffled(np.arange(b * block, (b + 1) * block, dtype=dtype), [seed, b, 1])
        yield order[: num_samples - b * block]


def _write_shuffle_idx(path: str, num_samples: int, block: int, seed: int) -> None:
    out = NpyWriter(path, (num_samples,), shuffle_dtype(num_samples, block))
    for order in shuffle_idx_blocks(num_samples, block, seed):
        out.write(order)
    out.close()


def epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs whose tokens make `num_samples` samples (one token overlaps each next)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens")
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_len < num_samples:
        epochs += 1
    return epochs


def samples_per_block(tokens_per_epoch: int, seq_len: int) -> int:
    """The samples of one epoch's tokens (at least one): the stretch each shuffle covers."""
    return max(1, tokens_per_epoch // seq_len)


SAMPLE_CHUNK = 1 << 20  # doc_idx entries, or sample_idx rows, handled at once (~50 MB)
BUILD_WORK_BYTES = 100 << 20  # what a build holds besides its epochs and shuffle block


@dataclass(frozen=True)
class SampleIndex:
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray


def write_sample_index(
    sizes: np.ndarray,
    documents: range,
    seq_len: int,
    num_samples: int,
    seed: int,
    paths: dict[str, str],
    budget: MemoryBudget | None = None,
) -> None:
    """Write the index of the first `num_samples` samples to `paths` (doc_idx, sample_idx,
    shuffle_idx -> .npy path), an epoch or a block at a time. The stream is built to the end
    of the last shuffle block they reach, since a block's permutation draws from all of it.

    A second thread writes shuffle_idx meanwhile (numpy's shuffles release the GIL). The build
    holds an epoch of (document, size) rows and a shuffle block at a time; it reserves that
    much of `budget`, if given, before it starts.
    """
    tokens_per_epoch = int(np.sum(sizes[documents.start : documents.stop], dtype=np.int64))
    block = samples_per_block(tokens_per_epoch, seq_len)
    streamed = -(-num_samples // block) * block
    num_epochs = epochs_needed(tokens_per_epoch, seq_len, streamed)
    epochs = doc_epochs(sizes, documents, num_epochs, seed)  # refuses ids past int32
    length = num_epochs * len(documents)
    held = 8 * len(documents) + shuffle_dtype(num_samples, block).itemsize * block
    reserved = budget.reserve(held + BUILD_WORK_BYTES) if budget else contextlib.nullcontext()
    with reserved, ThreadPoolExecutor(1) as pool:
        shuffled = pool.submit(_write_shuffle_idx, paths["shuffle_idx"], num_samples, block, seed)
        doc_out = NpyWriter(paths["doc_idx"], (length,), np.int32)
        dtype = position_dtype(length)
        sample_out = NpyWriter(paths["sample_idx"], (streamed + 1, 2), dtype)

        def doc_sizes() -> Iterator[np.ndarray]:  # writes doc_idx as the pieces go by
            for epoch in epochs:
                for i in range(0, len(epoch), SAMPLE_CHUNK):
                    doc_out.write(epoch[i : i + SAMPLE_CHUNK, 0])
                    yield epoch[i : i + SAMPLE_CHUNK, 1]

        pieces = doc_sizes()
        for rows in sample_idx_chunks(pieces, seq_len, streamed, dtype):
            sample_out.write(rows)
        for _ in pieces:  # the documents past the last sample's start
            pass
        doc_out.close()
        sample_out.close()
        shuffled.result()


def load_or_build_sample_index(
    data: IndexedDataset,
    documents: range,
    seq_len: int,
    num_samples: int,
    seed: int,
    cache_dir: str | None = None,
    budget: MemoryBudget | None = None,
) -> SampleIndex:
    """The sample index, memory-mapped from the cache; built there first (by one process,
    `index_cache.load_or_build`) when missing, within `budget` if given.

    The index is built from the documents' sizes alone, so the cache is keyed on them (a
    digest of the split's sizes) as well as the settings: re-running preprocessing into the
    same prefix, with another tokenizer say, builds a new index rather than reusing one whose
    positions no longer fit.
    """
    base = os.path.basename(data.prefix)
    folder = cache_dir if cache_dir is not None else index_folder(data.prefix)
    sizes = np.ascontiguousarray(data.sizes[documents.start : documents.stop])
    digest = hashlib.sha256(memoryview(sizes)).hexdigest()[:16]
    # "ep": the per-epoch order of this module (an index of another scheme is never reused)
    key = f"docs{documents.start}-{documents.stop}_{num_samples}ns_{seq_len}sl_{seed}s_ep_{digest}"
    names = ("doc_idx", "sample_idx", "shuffle_idx")
    paths = {name: os.path.join(folder, f"{base}_{key}_{name}.npy") for name in names}

    def build(partials: dict[str, str]) -> None:
        write_sample_index(data.sizes, documents, seq_len, num_samples, seed, partials, budget)

    arrays = load_or_build(paths, build, f"the sample index of {data.prefix} ({key})")
    return SampleIndex(**arrays)


class GPTDataset:
    """`num_samples` samples of `seq_len + 1` tokens from documents `documents` of `data`."""

    def __init__(
        self,
        data: IndexedDataset,
        documents: range,
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.data = data
        self.seq_len = seq_len
        # One epoch: the tokens of these documents (a sample consumes seq_len of them).
        self.tokens_per_epoch = int(
            np.sum(data.sizes[documents.start : documents.stop], dtype=np.int64)
        )
        self.index = load_or_build_sample_index(
            data, documents, seq_len, num_samples, seed, cache_dir, budget
        )

    def __len__(self) -> int:
        return len(self.index.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i as int64 tokens; a sample may span several documents."""
        sample = int(self.index.shuffle_idx[i])
        return self.stream(sample, sample + 1)

    def sequence_at(self, i: int, position: int) -> int:
        """The sequence of `data` that token `position` of sample i (`self[i]`) comes from."""
        at, offset = (int(v) for v in self.index.sample_idx[int(self.index.shuffle_idx[i])])
        offset += position
        while offset >= (size := int(self.data.sizes[int(self.index.doc_idx[at])])):
            offset -= size
            at += 1
        return int(self.index.doc_idx[at])

    def stream(self, start: int, stop: int) -> np.ndarray:
        """The unshuffled samples [start, stop) as one int64 stretch of the token stream,
        `(stop - start) * seq_len + 1` tokens (consecutive samples share a token): what a scan
        over many samples reads at once (e.g. counting where a window recurs)."""
        first, first_offset = (int(v) for v in self.index.sample_idx[start])
        last, last_offset = (int(v) for v in self.index.sample_idx[stop])
        doc_idx = self.index.doc_idx
        if first == last:
            tokens = self.data.get(
                int(doc_idx[first]), first_offset, last_offset - first_offset + 1
            )
        else:
            pieces = [self.data.get(int(doc_idx[first]), first_offset)]
            pieces += [self.data.get(int(doc_idx[p])) for p in range(first + 1, last)]
            pieces.append(self.data.get(int(doc_idx[last]), 0, last_offset + 1))
            tokens = np.concatenate(pieces)
        return tokens.astype(np.int64)


BUILD_WORKERS = min(4, os.cpu_count() or 1)  # indexes built at once (each with a helper thread)
BUILD_MEMORY = 1_200_000_000  # bytes those builds may hold together (see write_sample_index)


def gpt_datasets(
    parts: Sequence[tuple[IndexedDataset, range, int]],
    seq_len: int,
    seed: int,
    cache_dir: str | None = None,
) -> list[GPTDataset]:
    """A GPTDataset for each (data, documents, num_samples) of `parts`, their missing indexes
    built at the same time: BUILD_WORKERS at once, the largest first (so that no large one is
    left to run alone at the end), within BUILD_MEMORY together. Each index has its own lock,
    so processes starting together share the builds out."""
    budget = MemoryBudget(BUILD_MEMORY)
    largest_first = sorted(range(len(parts)), key=lambda i: -(len(parts[i][1]) + parts[i][2]))
    with ThreadPoolExecutor(BUILD_WORKERS) as pool:
        futures = {}
        for i in largest_first:
            data, documents, num_samples = parts[i]
            futures[i] = pool.submit(
                GPTDataset, data, documents, seq_len, num_samples, seed, cache_dir, budget
            )
        try:
            return [futures[i].result() for i in range(len(parts))]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
