"""Weighted mixtures of GPT datasets (Pile-style components), per train/validation/test split."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from neoray.data.config import DataConfig
from neoray.data.gpt_dataset import GPTDataset, gpt_datasets, split_documents
from neoray.data.index_cache import NpyWriter, load_or_build
from neoray.data.indexed import IndexedDataset, bin_path, fingerprint, token_files_exist
from neoray.data.phases import split_phases
from neoray.data.remote import index_folder

SPLITS = ("train", "validation", "test")


BLEND_CHUNK = 1 << 20  # samples (about) of the blend built at once: ~60 MB of work arrays
BLEND_SCHEME = "due1"  # the due-time order of `blend_chunks` (another order, another name)


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _due(w: np.float64, start: int, stop: int) -> np.ndarray:
    """Due times of samples [start, stop) of a dataset of normalised weight `w` (a weight
    under about 1e-308 puts them all at infinity, last)."""
    with np.errstate(over="ignore"):
        return (np.arange(start, stop) + 0.5) / w


def _due_before(w: np.float64, count: int, t: float) -> int:
    """How many of a dataset's first `count` samples are due strictly before `t`, with due
    times computed exactly as `_due` computes them (due times increase with k)."""
    if t == np.inf:
        return count
    k = int(min(max(np.ceil(t * w - 0.5), 0.0), count))
    while k > 0 and _due(w, k - 1, k)[0] >= t:
        k -= 1
    while k < count and _due(w, k, k + 1)[0] < t:
        k += 1
    return k


def blend_chunks(
    weights: Sequence[float], size: int, chunk: int = BLEND_CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`blend_indices`, in consecutive pieces of about `chunk` samples (bounded memory).

    Dataset d's k-th sample is due at time (k + 0.5) / weight_d (weights normalised), and
    samples are served in order of due time, ties to the lower d; each dataset offers its
    first ceil(weight_d * size) + 1 samples. Time is cut at t = chunk, 2 chunk, ...: the
    samples due before a cut all come before those due after it, so each stretch is ordered on
    its own (a stable sort of the datasets' due times laid out d after d breaks ties to the
    lower d) and the stretches, laid end to end, are the whole order.
    """
    w = _normalised(weights)
    active = np.flatnonzero(w > 0)
    counts = [int(np.ceil(w[d] * size)) + 1 for d in active]
    last_due = [_due(w[d], c - 1, c)[0] for d, c in zip(active, counts, strict=True)]
    finite = max((t for t in last_due if t < np.inf), default=0.0)  # tiny weights: due at inf
    taken = [0] * len(active)
    emitted, cut = 0, 0
    while emitted < size:
        cut += 1
        t = float(cut) * chunk if float(cut - 1) * chunk <= finite else np.inf
        upto = [_due_before(w[d], c, t) for d, c in zip(active, counts, strict=True)]
        due = np.concatenate(
            [_due(w[d], a, b) for d, a, b in zip(active, taken, upto, strict=True)]
        )
        dataset = np.repeat(active.astype(np.int32), np.subtract(upto, taken))
        sample = np.concatenate(
            [np.arange(a, b, dtype=np.int64) for a, b in zip(taken, upto, strict=True)]
        )
        order = np.argsort(due, kind="stable")[: size - emitted]
        if t == np.inf and len(order) < size - emitted:
            raise RuntimeError("the datasets offer fewer samples than the blend needs")
        emitted += len(order)
        taken = upto
        yield dataset[order], sample[order]


def blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of `size` samples: which dataset serves it, and which of that dataset's samples.

    Dataset d's k-th sample is due at time (k + 0.5) / weight_d, and samples are served in order
    of due time (ties to the lower d). So after any n samples each dataset has served about
    weight_d * n of them, within one: the weights hold in every stretch of the order, not just on
    average, and no random numbers are involved. In memory; `load_or_build_blend` caches it.
    """
    pieces = list(blend_chunks(weights, size))
    if not pieces:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def phased_blend_chunks(
    weights: Sequence[float], later: Sequence[tuple[int, Sequence[float]]], size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`blend_chunks` of `size` samples whose weights change: `weights` from sample 0, and
    each (start, weights) of `later` from sample `start` on (starts increasing). Each phase is
    blended on its own, and a dataset's samples in it are numbered on from where the earlier
    phases left that dataset: a dataset continues its own order across a switch."""
    phases = [(0, weights), *later]
    taken = np.zeros(len(weights), np.int64)
    for p, (start, phase_weights) in enumerate(phases):
        stop = min(phases[p + 1][0] if p + 1 < len(phases) else size, size)
        if stop <= start:
            return
        counts = np.zeros(len(weights), np.int64)
        for dataset, sample in blend_chunks(phase_weights, stop - start, BLEND_CHUNK):
            yield dataset, sample + taken[dataset]
            counts += np.bincount(dataset, minlength=len(weights))
        taken += counts


@dataclass(frozen=True)
class Blend:
    """A cached blend: the two per-sample arrays (memory-mapped) and each dataset's count."""

    dataset_index: np.ndarray
    sample_index: np.ndarray
    counts: np.ndarray


def load_or_build_blend(
    weights: Sequence[float],
    size: int,
    folder: str,
    later: Sequence[tuple[int, Sequence[float]]] = (),
) -> Blend:
    """The blend of `size` samples (weights changing at the samples of `later`, as in
    `phased_blend_chunks`), from `folder` when cached, else built there by one process.

    The order depends on nothing but the weights, the phases and the size, so the file names
    carry a digest of exactly those (and of the scheme).
    """
    phases = [[int(start), [float(x) for x in w]] for start, w in later]
    key = json.dumps(
        [BLEND_SCHEME, [float(x) for x in weights], int(size)] + [phases] * bool(phases)
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    names = ("dataset_index", "sample_index", "counts")
    paths = {n: os.path.join(folder, f"blend_{size}ns_{digest}_{n}.npy") for n in names}

    def build(partials: dict[str, str]) -> None:
        dataset_out = NpyWriter(partials["dataset_index"], (size,), np.int32)
        sample_out = NpyWriter(partials["sample_index"], (size,), np.int64)
        counts = np.zeros(len(weights), np.int64)
        for dataset, sample in phased_blend_chunks(weights, later, size):
            dataset_out.write(dataset)
            sample_out.write(sample)
            counts += np.bincount(dataset, minlength=len(weights))
        dataset_out.close()
        sample_out.close()
        np.save(partials["counts"], counts)

    arrays = load_or_build(paths, build, f"the blend of {size} samples ({paths['counts']})")
    return Blend(**arrays)


class TokenIdError(ValueError):
    """A sample holds a token id that has no embedding row."""


class BlendedDataset:
    """Samples drawn from several datasets in the proportions of their weights.

    Given `vocab_size`, every sample served is checked to hold token ids in [0, vocab_size):
    one pass over a few thousand tokens, next to a training step's cost nothing, and an id
    past the vocabulary is named with its component, file and document instead of failing as
    an index error inside the embedding (the start of a run checks only a sample of the files,
    `IndexedDataset.sampled_id_outside`).
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        dataset_index: np.ndarray,
        sample_index: np.ndarray,
        names: Sequence[str],
        vocab_size: int | None = None,
    ) -> None:
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.sample_index = sample_index
        self.names = list(names)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        d, sample = int(self.dataset_index[i]), int(self.sample_index[i])
        tokens = self.datasets[d][sample]
        vocab = self.vocab_size
        if vocab is not None and len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
            self._refuse(d, sample, tokens)
        return tokens

    def _refuse(self, d: int, sample: int, tokens: np.ndarray) -> None:
        position = int(np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))[0])
        dataset = self.datasets[d]
        document = dataset.data.document_of(dataset.sequence_at(sample, position))
        raise TokenIdError(
            f"data.components.{self.names[d]}: {bin_path(dataset.data.prefix)} holds token id "
            f"{int(tokens[position])} in document {document}, outside model.vocab_size="
            f"{self.vocab_size:,}: the data was tokenized for another vocabulary, or the file "
            "is damaged; preprocess it again with data.tokenizer"
        )

    def source(self, i: int) -> str:
        """Name of the component sample i comes from."""
        return self.names[self.dataset_index[i]]

    def components(self, indices: np.ndarray) -> np.ndarray:
        """Index into `names` of the component each sample comes from."""
        return self.dataset_index[indices].astype(np.int64)

    def epochs(self, samples: int) -> dict[str, float]:
        """Epochs of each component that the first `samples` samples consume: the tokens they
        take from it over the tokens of its documents in this split."""
        taken = np.bincount(self.dataset_index[:samples], minlength=len(self.names))
        return {
            name: int(taken[d]) * data.seq_len / max(data.tokens_per_epoch, 1)
            for d, (name, data) in enumerate(zip(self.names, self.datasets, strict=True))
        }


def build_mixture(
    cfg: DataConfig,
    split: str,
    num_samples: int,
    vocab_size: int | None = None,
    global_batch_size: int | None = None,
) -> BlendedDataset:
    """`num_samples` samples of `split` mixed from the configured components (with token ids
    checked against `vocab_size`, if given, as they are served), in the phases `split_phases`
    gives it (the train split's `data.phases` need the run's `global_batch_size`).

    Each component gets a GPTDataset over its share of documents, sized to exactly the number
    of its samples the blend uses (repeating epochs where the weight asks for more data than the
    component has, as the Pile does). A component with no documents in this split, or weight 0
    in every phase, is left out.
    The blend and every component's sample index are cached files (`data.cache_dir`, default:
    next to the first component's data, resp. each component's), built once by one process
    (the components' at the same time, `gpt_datasets`) and memory-mapped by every process
    that asks for them.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    phases = split_phases(cfg, split, global_batch_size)
    names, data, documents = [], [], []
    for name, component in cfg.components.items():
        if not token_files_exist(component.prefix):
            raise FileNotFoundError(
                f"data.components.{name}: no token files at {component.prefix}.idx; build them "
                "with jobs/preprocess.py (e.g. `python jobs/preprocess.py data=demo`)"
            )
        dataset = IndexedDataset(component.prefix)
        docs = split_documents(len(dataset), cfg.split)[SPLITS.index(split)]
        if len(docs) and any(weights[name] > 0 for _, weights in phases):
            names.append(name)
            data.append(dataset)
            documents.append(docs)
    weights = [[weights[name] for name in names] for _, weights in phases]
    for p, ((start, _), phase) in enumerate(zip(phases, weights, strict=True)):
        if start < num_samples and sum(phase) <= 0:
            where = "data.components" if p == 0 else f"data.phases[{p - 1}]"
            raise ValueError(
                f"{where}: no component it weights has documents in the {split} split ({cfg.split})"
            )
    folder = cfg.cache_dir or index_folder(data[0].prefix)
    later = [(start, w) for (start, _), w in zip(phases[1:], weights[1:], strict=True)]
    blend = load_or_build_blend(weights[0], num_samples, folder, later)
    parts = [(data[d], documents[d], max(int(n), 1)) for d, n in enumerate(blend.counts)]
    datasets = gpt_datasets(parts, cfg.seq_len, cfg.seed, cfg.cache_dir)
    return BlendedDataset(datasets, blend.dataset_index, blend.sample_index, names, vocab_size)


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """Each component's token-file `fingerprint`, recorded in every checkpoint's manifest so
    that whoever rebuilds the training order later can tell the files are still the same."""
    return {name: fingerprint(c.prefix) for name, c in cfg.components.items()}


def changed_components(cfg: DataConfig, recorded: dict[str, str]) -> dict[str, tuple[str, str]]:
    """component -> (recorded, current) fingerprint of each component of `cfg` whose token
    files differ from those `recorded` (a manifest's `data_fingerprint`). Components added or
    removed since are not compared: they change the mixture, not a component's files."""
    changed = {}
    for name, component in cfg.components.items():
        if name in recorded and (now := fingerprint(component.prefix)) != recorded[name]:
            changed[name] = (recorded[name], now)
    return changed
