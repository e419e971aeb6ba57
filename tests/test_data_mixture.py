"""Weighted mixtures: weights honoured, splits respected, the Pile's config complete."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from neoray.config import ConfigError
from neoray.data.config import data_config
from neoray.data.gpt_dataset import split_documents
from neoray.data.indexed import IndexedDataset
from neoray.data.mixture import blend_indices, build_mixture

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("weights", [[0.7, 0.3], [18.11, 14.40, 0.14, 2.17], [1, 0, 3]])
def test_blend_honours_weights_within_one_percent_in_every_window(weights):
    size = 10_000
    dataset_index, sample_index = blend_indices(weights, size)
    w = np.array(weights) / np.sum(weights)
    counts = np.bincount(dataset_index, minlength=len(w))
    assert np.all(np.abs(counts / size - w) < 0.01)
    assert np.all(np.abs(counts - w * size) <= 1.5), "exact up to rounding"
    for start in range(0, size, 1000):  # every stretch of 1,000, not just the total
        window = np.bincount(dataset_index[start : start + 1000], minlength=len(w))
        assert np.all(np.abs(window / 1000 - w) < 0.01)
    for d in range(len(w)):  # each dataset's samples are taken in order, none twice
        assert sample_index[dataset_index == d].tolist() == list(range(counts[d]))


def test_demo_mixture_honours_weights_and_splits(demo_data):
    mixture = build_mixture(demo_data, "train", 10_000)
    counts = {name: 0 for name in mixture.names}
    for i in range(len(mixture)):
        counts[mixture.source(i)] += 1
    weights = {n: c.weight / sum(x.weight for x in demo_data.components.values())
               for n, c in demo_data.components.items()}  # fmt: skip
    for name in counts:
        assert abs(counts[name] / 10_000 - weights[name]) < 0.01
    # Every sample of a component is made of that component's training documents only.
    for d, name in enumerate(mixture.names):
        data = IndexedDataset(demo_data.components[name].prefix)
        train = split_documents(len(data), demo_data.split)[0]
        doc_idx = np.asarray(mixture.datasets[d].index.doc_idx)
        assert doc_idx.min() >= train.start and doc_idx.max() < train.stop
    sample = mixture[123]
    owner = mixture.datasets[mixture.dataset_index[123]]
    assert np.array_equal(sample, owner[int(mixture.sample_index[123])])
    assert len(sample) == demo_data.seq_len + 1

    validation = build_mixture(demo_data, "validation", 100)
    for d, name in enumerate(validation.names):
        data = IndexedDataset(demo_data.components[name].prefix)
        held_out = split_documents(len(data), demo_data.split)[1]
        assert set(np.asarray(validation.datasets[d].index.doc_idx).tolist()) <= set(held_out)


def test_pile_config_has_the_22_components_of_the_pile_paper():
    section = OmegaConf.create({"data": OmegaConf.load(CONF / "data" / "pile.yaml")})
    cfg = data_config(section.data)
    assert len(cfg.components) == 22
    weights = {name: c.weight for name, c in cfg.components.items()}
    assert sum(weights.values()) == pytest.approx(100.0, abs=0.01)
    assert weights["pile_cc"] == 18.11 and weights["enron_emails"] == 0.14
    assert weights["github"] == 7.59
    assert cfg.components["github"].prefix.endswith("/github")
    assert cfg.tokenizer == "gpt-neox-20b" and cfg.split == "995,4,1"


def test_bad_data_config_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.components\.code: unknown field\(s\) wieght"):
        data_config({"tokenizer": "t", "components": {"code": {"prefix": "p", "wieght": 1}}})
    with pytest.raises(ConfigError, match="data: unknown field"):
        data_config({"tokenizer": "t", "components": {"c": {"prefix": "p"}}, "seqlen": 5})
    with pytest.raises(ConfigError, match="weight"):
        data_config({"tokenizer": "t", "components": {"c": {"prefix": "p", "weight": -1}}})


def test_missing_token_files_say_how_to_build_them(tmp_path):
    cfg = data_config({"tokenizer": "t", "components": {"code": {"prefix": str(tmp_path / "x")}}})
    with pytest.raises(FileNotFoundError, match=r"data\.components\.code: .*jobs/preprocess\.py"):
        build_mixture(cfg, "train", 10)
