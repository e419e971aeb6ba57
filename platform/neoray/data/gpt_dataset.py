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

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from neoray.data.indexed import IndexedDataset


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


def _permuted(values: np.ndarray, seed: list[int]) -> np.ndarray:
    """A copy of `values` in the order of a legacy RandomState seeded with `seed` (stable
    across numpy versions and machines)."""
    order = values.copy()
    np.random.RandomState(seed).shuffle(order)
    return order


def build_doc_idx(documents: np.ndarray, num_epochs: int, seed: int) -> np.ndarray:
    """The split's documents, `num_epochs` times, each epoch in its own seeded order."""
    documents = documents.astype(np.int32)
    return np.concatenate([_permuted(documents, [seed, e, 0]) for e in range(num_epochs)])


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int
) -> np.ndarray:
    """Start of every sample, plus an end marker: rows of (position in doc_idx, offset).

    Sample i covers stream positions [i * seq_len, (i + 1) * seq_len] inclusive; row i is where
    position i * seq_len falls. This is GPT-NeoX's `build_sample_idx`, vectorised.
    """
    doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if starts[-1] >= doc_ends[-1]:
        raise ValueError(f"{num_samples} samples of {seq_len} tokens need more epochs")
    position = np.searchsorted(doc_ends, starts, side="right")
    offset = starts - (doc_ends[position] - sizes[doc_idx[position]])
    return np.stack([position, offset], axis=1).astype(np.int32)


def build_shuffle_idx(num_samples: int, block: int, seed: int) -> np.ndarray:
    """The order of the first `num_samples` samples: blocks of `block` samples, each block
    permuted on its own (seed (seed, b)), so a longer run's order starts with a shorter one's."""
    dtype = np.uint32 if num_samples + block < 2**32 - 1 else np.int64
    blocks = [
        _permuted(np.arange(b * block, (b + 1) * block, dtype=dtype), [seed, b, 1])
        for b in range(-(-num_samples // block))
    ]
    return np.concatenate(blocks)[:num_samples]


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


@dataclass(frozen=True)
class SampleIndex:
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray


def _cache_paths(cache_prefix: str) -> dict[str, str]:
    return {name: f"{cache_prefix}_{name}.npy" for name in ("doc_idx", "sample_idx", "shuffle_idx")}


def _save_atomically(path: str, array: np.ndarray) -> None:
    partial = f"{path}.{os.getpid()}.partial.npy"
    np.save(partial, array)
    os.replace(partial, path)


def build_sample_index(
    sizes: np.ndarray, documents: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> SampleIndex:
    """The index of the first `num_samples` samples; the stream is built to the end of the
    last shuffle block they reach, since a block's permutation draws from all of it."""
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    block = samples_per_block(tokens_per_epoch, seq_len)
    streamed = -(-num_samples // block) * block
    doc_idx = build_doc_idx(documents, epochs_needed(tokens_per_epoch, seq_len, streamed), seed)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, streamed)
    shuffle_idx = build_shuffle_idx(num_samples, block, seed)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx)


def load_or_build_sample_index(
    data: IndexedDataset,
    documents: range,
    seq_len: int,
    num_samples: int,
    seed: int,
    cache_dir: str | None = None,
) -> SampleIndex:
    """The sample index, from the cache when present (written atomically when built).

    The index is built from the documents' sizes alone, so the cache is keyed on them (a
    digest of the split's sizes) as well as the settings: re-running preprocessing into the
    same prefix, with another tokenizer say, builds a new index rather than reusing one whose
    positions no longer fit. Concurrent builders (several ranks) write identical files, so the
    last rename wins safely.
    """
    base = os.path.basename(data.prefix)
    folder = cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(data.prefix))
    sizes = np.ascontiguousarray(data.sizes[documents.start : documents.stop])
    digest = hashlib.sha256(sizes.tobytes()).hexdigest()[:16]
    # "ep": the per-epoch order of this module (an index of another scheme is never reused)
    key = f"docs{documents.start}-{documents.stop}_{num_samples}ns_{seq_len}sl_{seed}s_ep_{digest}"
    paths = _cache_paths(os.path.join(folder, f"{base}_{key}"))
    if all(os.path.exists(p) for p in paths.values()):
        return SampleIndex(**{name: np.load(p, mmap_mode="r") for name, p in paths.items()})
    index = build_sample_index(
        data.sizes, np.arange(documents.start, documents.stop), seq_len, num_samples, seed
    )
    os.makedirs(folder, exist_ok=True)
    for name, path in paths.items():
        _save_atomically(path, getattr(index, name))
    return index


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
    ) -> None:
        self.data = data
        self.seq_len = seq_len
        # One epoch: the tokens of these documents (a sample consumes seq_len of them).
        self.tokens_per_epoch = int(
            np.sum(data.sizes[documents.start : documents.stop], dtype=np.int64)
        )
        self.index = load_or_build_sample_index(
            data, documents, seq_len, num_samples, seed, cache_dir
        )

    def __len__(self) -> int:
        return len(self.index.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i as int64 tokens; a sample may span several documents."""
        sample = int(self.index.shuffle_idx[i])
        return self.stream(sample, sample + 1)

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
