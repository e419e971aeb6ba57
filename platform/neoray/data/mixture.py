"""Weighted mixtures of GPT datasets (Pile-style components), per train/validation/test split."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from neoray.data.config import DataConfig
from neoray.data.gpt_dataset import GPTDataset, split_documents
from neoray.data.indexed import IndexedDataset, fingerprint, idx_path

SPLITS = ("train", "validation", "test")


def blend_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of `size` samples: which dataset serves it, and which of that dataset's samples.

    Dataset d's k-th sample is due at time (k + 0.5) / weight_d, and samples are served in order
    of due time (ties to the lower d). So after any n samples each dataset has served about
    weight_d * n of them, within one: the weights hold in every stretch of the order, not just on
    average, and no random numbers are involved.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    datasets, due = [], []
    for d in np.flatnonzero(w > 0):
        count = int(np.ceil(w[d] * size)) + 1
        datasets.append(np.full(count, d, dtype=np.int32))
        due.append((np.arange(count) + 0.5) / w[d])
    dataset_of = np.concatenate(datasets)
    order = np.lexsort((dataset_of, np.concatenate(due)))[:size]
    dataset_index = dataset_of[order]
    # Within a dataset due times increase with k, so its samples come out as 0, 1, 2, ...
    sample_index = np.zeros(size, dtype=np.int64)
    for d in np.unique(dataset_index):
        chosen = dataset_index == d
        sample_index[chosen] = np.arange(int(chosen.sum()))
    return dataset_index, sample_index


class BlendedDataset:
    """Samples drawn from several datasets in the proportions of their weights."""

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        dataset_index: np.ndarray,
        sample_index: np.ndarray,
        names: Sequence[str],
    ) -> None:
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.sample_index = sample_index
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]

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


def build_mixture(cfg: DataConfig, split: str, num_samples: int) -> BlendedDataset:
    """`num_samples` samples of `split` mixed from the configured components.

    Each component gets a GPTDataset over its share of documents, sized to exactly the number
    of its samples the blend uses (repeating epochs where the weight asks for more data than the
    component has, as the Pile does). A component with no documents in this split is left out.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    names, data, documents, weights = [], [], [], []
    for name, component in cfg.components.items():
        if not os.path.exists(idx_path(component.prefix)):
            raise FileNotFoundError(
                f"data.components.{name}: no token files at {component.prefix}.idx; build them "
                "with jobs/preprocess.py (e.g. `python jobs/preprocess.py data=demo`)"
            )
        dataset = IndexedDataset(component.prefix)
        docs = split_documents(len(dataset), cfg.split)[SPLITS.index(split)]
        if len(docs) and component.weight > 0:
            names.append(name)
            data.append(dataset)
            documents.append(docs)
            weights.append(component.weight)
    if not names:
        raise ValueError(f"no component has documents in the {split} split ({cfg.split})")
    dataset_index, sample_index = blend_indices(weights, num_samples)
    datasets = []
    for d in range(len(names)):
        needed = int(np.sum(dataset_index == d))
        datasets.append(
            GPTDataset(data[d], documents[d], cfg.seq_len, max(needed, 1), cfg.seed, cfg.cache_dir)
        )
    return BlendedDataset(datasets, dataset_index, sample_index, names)


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """Each component's token-file `fingerprint`, recorded in every checkpoint's manifest so
    that whoever rebuilds the training order later can tell the files are still the same."""
    return {name: fingerprint(c.prefix) for name, c in cfg.components.items()}
