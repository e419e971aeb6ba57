"""Which training sequences a run had seen by a step, when it first saw them, and how often.

A memorization study (Carlini et al. 2022, "Quantifying Memorization Across Neural Language
Models"; Pythia) needs, for a training sequence, the step at which the model first saw its
tokens and how many times it saw them by the checkpoint. The data order is a pure function of
the step (`neoray.data.loader`), so both are computed, not logged:

- a sequence is the first `width` tokens (prefix + continuation) of a sample of the train
  mixture, drawn (seeded) among the positions trained on so far and read from the `.bin` files
  through the sample index, exactly as the loader reads it;
- its tokens were seen once for every place where the same `width` tokens lie inside one
  trained sample (what the model had in one context): the sample itself, the same document
  again in a later epoch of its component, and exact duplicates of the window anywhere else in
  the data, as deduplication studies count them. Every window of every trained sample is hashed
  (a polynomial rolling hash, candidates then compared token by token) in one pass over each
  component's token stream, in stretches of consecutive samples, skipping stretches with no
  trained sample; the cost is that of reading the tokens trained on once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoray.data.gpt_dataset import GPTDataset
from neoray.data.mixture import BlendedDataset

BASE = 0x100000001B3  # odd, so invertible modulo 2**64: window hashes need its inverse
SCAN_TOKENS = 1 << 23  # tokens of the stream hashed at once (about 400 MB of working arrays)


@dataclass
class Window:
    """The first tokens of one sample of a split's mixture, and its exposure in training."""

    position: int  # the sample's index in the split's mixture (train: its place in training)
    split: str
    component: str
    tokens: np.ndarray
    documents: int = 1  # documents the tokens span: a sequence over a boundary is seen once
    # as a whole, though the document it continues into may have been seen many times
    times_seen: int = 0  # trained samples holding these exact tokens, by the checkpoint
    first_seen_step: int | None = None  # the first step that trained on them; None: never


def _powers(base: int, count: int) -> np.ndarray:
    powers = np.ones(count, dtype=np.uint64)
    if count > 1:
        powers[1:] = np.cumprod(np.full(count - 1, base, dtype=np.uint64))
    return powers


def window_hashes(tokens: np.ndarray, width: int) -> np.ndarray:
    """A 64-bit hash of every `width`-token window of `tokens` (uint64, one per start), the same
    for the same tokens wherever they are: sum_k (t[i + k] + 1) * BASE**k modulo 2**64, from
    prefix sums in O(len(tokens))."""
    count = len(tokens) - width + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = np.asarray(tokens).astype(np.uint64) + np.uint64(1)
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values * _powers(BASE, len(values)), out=prefix[1:])
    unshift = _powers(pow(BASE, -1, 2**64), count)
    return (prefix[width : width + count] - prefix[:count]) * unshift


def draw_positions(
    available: int, count: int, seed: int, per_step: int = 1, skipped: list[list[int]] = ()
) -> np.ndarray:
    """`count` distinct positions of the first `available` trained ones, seeded, ascending:
    [0, available) when no step was skipped; else the positions of the steps (`per_step`
    each) outside the `skipped` [first, last] step ranges."""
    if count > available:
        raise ValueError(f"{count} positions asked of {available}")
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(available, size=count, replace=False))
    for first, last in sorted(skipped):  # each range moves the positions from it on past it
        drawn[drawn >= first * per_step] += (last - first + 1) * per_step
    return drawn


def documents_spanned(data: GPTDataset, i: int, width: int) -> int:
    """How many documents the first `width` tokens of `data`'s sample i span."""
    position, offset = (int(v) for v in data.index.sample_idx[int(data.index.shuffle_idx[i])])
    sizes, doc_idx = data.data.sizes, data.index.doc_idx
    spanned, covered = 1, int(sizes[doc_idx[position]]) - offset
    while covered < width:
        position += 1
        spanned += 1
        covered += int(sizes[doc_idx[position]])
    return spanned


def read_windows(
    mixture: BlendedDataset, positions: np.ndarray, width: int, split: str = "train"
) -> list[Window]:
    """The first `width` tokens of the mixture's samples at `positions`."""
    windows = []
    for p in (int(p) for p in positions):
        data = mixture.datasets[mixture.dataset_index[p]]
        spanned = documents_spanned(data, int(mixture.sample_index[p]), width)
        windows.append(Window(p, split, mixture.source(p), mixture[p][:width], spanned))
    return windows


def count_exposures(
    mixture: BlendedDataset,
    served_by: int,
    global_batch_size: int,
    windows: list[Window],
    skipped: set[int] = frozenset(),
) -> None:
    """Set `times_seen` and `first_seen_step` of `windows` (all of one width) from the first
    `served_by` samples of the train `mixture`, served `global_batch_size` per step, less
    those of the `skipped` steps (never trained on)."""
    if not windows:
        return
    width = len(windows[0].tokens)
    targets = np.array([window_hashes(w.tokens, width)[0] for w in windows], dtype=np.uint64)
    order = np.argsort(targets, kind="stable")
    ordered = targets[order]
    served = mixture.dataset_index[:served_by]
    for d, data in enumerate(mixture.datasets):
        positions = np.flatnonzero(served == d)
        if not len(positions):
            continue
        # The k-th sample the mixture took from this component is its stream sample
        # shuffle_idx[k]; which step trained on each stream sample (-1: none yet).
        samples = np.asarray(data.index.shuffle_idx[: len(positions)], dtype=np.int64)
        step_of = np.full(int(samples.max()) + 1, -1, dtype=np.int64)
        step_of[samples] = positions // global_batch_size
        if skipped:
            step_of[np.isin(step_of, list(skipped))] = -1
        seq_len = data.seq_len
        stretch = max(1, SCAN_TOKENS // seq_len)
        for start in range(0, len(step_of), stretch):
            steps = step_of[start : start + stretch]
            if (steps < 0).all():
                continue
            tokens = data.stream(start, start + len(steps))
            hashes = window_hashes(tokens, width)
            at = np.arange(len(hashes))
            # A window counts where it lies inside one trained sample (seq_len + 1 tokens).
            inside = (at % seq_len <= seq_len + 1 - width) & (steps[at // seq_len] >= 0)
            for p in np.flatnonzero(inside & np.isin(hashes, ordered)):
                low = np.searchsorted(ordered, hashes[p], side="left")
                for t in order[low : np.searchsorted(ordered, hashes[p], side="right")]:
                    window = windows[t]
                    if np.array_equal(tokens[p : p + width], window.tokens):
                        step = int(steps[p // seq_len])
                        window.times_seen += 1
                        if window.first_seen_step is None or step < window.first_seen_step:
                            window.first_seen_step = step
