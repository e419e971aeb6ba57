"""Index caches at scale: the chunked builders give exactly the order the in-memory ones gave
(a resumed run sees the same samples), one process builds while the others wait and map the
files, the files are keyed on what they were built from, a crash leaves nothing that looks
complete, and a large blend is built in bounded memory."""

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neoray.data import gpt_dataset
from neoray.data.config import ComponentConfig, DataConfig
from neoray.data.gpt_dataset import doc_epochs, position_dtype, write_sample_index
from neoray.data.index_cache import MemoryBudget
from neoray.data.indexed import IndexedDataset, IndexedDatasetWriter, publish, write_index
from neoray.data.mixture import blend_chunks, blend_indices, build_mixture, load_or_build_blend

# ---- the order as the in-memory builders produced it (before the chunked ones) ----


def reference_blend(weights, size):
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    datasets, due = [], []
    for d in np.flatnonzero(w > 0):
        count = int(np.ceil(w[d] * size)) + 1
        datasets.append(np.full(count, d, dtype=np.int32))
        with np.errstate(over="ignore"):  # weights under ~1e-308: due at infinity
            due.append((np.arange(count) + 0.5) / w[d])
    dataset_of = np.concatenate(datasets)
    order = np.lexsort((dataset_of, np.concatenate(due)))[:size]
    dataset_index = dataset_of[order]
    sample_index = np.zeros(size, dtype=np.int64)
    for d in np.unique(dataset_index):
        chosen = dataset_index == d
        sample_index[chosen] = np.arange(int(chosen.sum()))
    return dataset_index, sample_index


def permuted(values, seed):
    order = values.copy()
    np.random.RandomState(seed).shuffle(order)
    return order


def reference_sample_index(sizes, documents, seq_len, num_samples, seed):
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    block = max(1, tokens_per_epoch // seq_len)
    streamed = -(-num_samples // block) * block
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_len < streamed:
        epochs += 1
    docs = documents.astype(np.int32)
    doc_idx = np.concatenate([permuted(docs, [seed, e, 0]) for e in range(epochs)])
    doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    starts = np.arange(streamed + 1, dtype=np.int64) * seq_len
    position = np.searchsorted(doc_ends, starts, side="right")
    offset = starts - (doc_ends[position] - sizes[doc_idx[position]])
    sample_idx = np.stack([position, offset], axis=1).astype(np.int32)
    dtype = np.uint32 if num_samples + block < 2**32 - 1 else np.int64
    shuffle_idx = np.concatenate([
        permuted(np.arange(b * block, (b + 1) * block, dtype=dtype), [seed, b, 1])
        for b in range(-(-num_samples // block))
    ])[:num_samples]  # fmt: skip
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


# ---- equivalence ----

weight = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 0.5, 1e-9, 1e-300, 18.11, 0.14]),  # ties, zeros, tiny
    st.floats(0.0, 100.0),
)
weight_vectors = st.lists(weight, min_size=1, max_size=22).filter(lambda w: sum(w) > 0)


@settings(max_examples=200, deadline=None)
@given(weights=weight_vectors, size=st.integers(0, 3000), chunk=st.integers(1, 700))
def test_chunked_blend_is_the_in_memory_order(weights, size, chunk):
    expected = reference_blend(weights, size)
    pieces = list(blend_chunks(weights, size, chunk))
    assert sum(len(d) for d, _ in pieces) == size
    if size:
        assert np.array_equal(np.concatenate([d for d, _ in pieces]), expected[0])
        assert np.array_equal(np.concatenate([s for _, s in pieces]), expected[1])
    dataset_index, sample_index = blend_indices(weights, size)
    assert np.array_equal(dataset_index, expected[0]) and np.array_equal(sample_index, expected[1])


PILE = [18.11, 14.40, 12.07, 10.01, 8.96, 7.59, 6.12, 5.13, 3.65, 3.07, 2.17, 1.55, 1.53, 1.24,
        0.88, 0.75, 0.73, 0.62, 0.60, 0.38, 0.30, 0.14]  # fmt: skip


@pytest.mark.parametrize("weights", [PILE, [1.0], [1, 1, 1], [3, 0, 1e-12, 3]])
def test_cached_blend_is_the_in_memory_order(tmp_path, weights):
    size = 300_000  # several stretches of BLEND_CHUNK-sized work
    blend = load_or_build_blend(weights, size, str(tmp_path))
    expected = reference_blend(weights, size)
    assert isinstance(blend.dataset_index, np.memmap)
    assert np.array_equal(blend.dataset_index, expected[0])
    assert np.array_equal(blend.sample_index, expected[1])
    assert blend.counts.tolist() == np.bincount(expected[0], minlength=len(weights)).tolist()


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 90), min_size=1, max_size=60).filter(lambda s: sum(s) > 0),
    seq_len=st.integers(1, 300),
    num_samples=st.integers(1, 400),
    seed=st.integers(0, 2**32 - 1),
    piece=st.integers(1, 50),
)
def test_streamed_sample_index_is_the_in_memory_one(
    tmp_path_factory, sizes, seq_len, num_samples, seed, piece
):
    """Empty documents, samples longer than an epoch, pieces smaller than an epoch."""
    assume(seq_len * num_samples <= 40 * sum(sizes))  # at most ~40 epochs: cheap examples
    folder = tmp_path_factory.mktemp("idx")
    sizes = np.array([5, *sizes], dtype=np.int32)  # document 0 is left out of the split
    documents = range(1, len(sizes))
    paths = {n: str(folder / f"{n}.npy") for n in ("doc_idx", "sample_idx", "shuffle_idx")}
    before, gpt_dataset.SAMPLE_CHUNK = gpt_dataset.SAMPLE_CHUNK, piece
    try:
        write_sample_index(sizes, documents, seq_len, num_samples, seed, paths)
    finally:
        gpt_dataset.SAMPLE_CHUNK = before
    expected = reference_sample_index(sizes, np.array(documents), seq_len, num_samples, seed)
    for name, path in paths.items():
        ours = np.load(path)
        assert ours.dtype == expected[name].dtype and np.array_equal(ours, expected[name]), name


def test_positions_past_int32_widen_and_document_ids_past_int32_are_refused():
    assert position_dtype(2**31 - 1) == np.int32 and position_dtype(2**31) == np.int64
    with pytest.raises(ValueError, match="int32"):
        doc_epochs(np.zeros(1, np.int32), range(2**31, 2**31 + 1), 1, 0)


def test_builds_hold_no_more_than_the_budget_together_and_a_large_one_runs_alone():
    budget, held, peaks, lock = MemoryBudget(100), [0], [], threading.Lock()

    def build(nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                held[0] += nbytes
                peaks.append(held[0])
            time.sleep(0.05)
            with lock:
                held[0] -= nbytes

    threads = [threading.Thread(target=build, args=(n,)) for n in (60, 60, 30, 250, 10, 40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(peaks) == 6, "every build ran"
    assert all(peak <= 100 or peak == 250 for peak in peaks), peaks  # 250: alone


# ---- one builder, content keys, crashes, memory ----


def write_component(prefix, sizes):
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    writer.add_documents(np.arange(int(sum(sizes))) % 1000, np.asarray(sizes))
    writer.finish()
    publish(prefix)


def small_config(root, weights, seq_len=64):
    rng = np.random.default_rng(0)
    components = {}
    for i, w in enumerate(weights):
        prefix = str(root / f"c{i}")
        if not os.path.exists(prefix + ".idx"):
            write_component(prefix, rng.integers(1, 400, 300))
        components[f"c{i}"] = ComponentConfig(prefix=prefix, weight=w)
    return DataConfig(components=components, tokenizer="t", seq_len=seq_len, split="98,2,0")


STARTER = """
import hashlib, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from neoray.data.config import ComponentConfig, DataConfig
from neoray.data.mixture import build_mixture
root, go = sys.argv[1], sys.argv[2]
components = {f"c{i}": ComponentConfig(prefix=f"{root}/c{i}", weight=w)
              for i, w in enumerate([5.0, 3.0, 1.0])}
cfg = DataConfig(components=components, tokenizer="t", seq_len=64, split="98,2,0")
while not os.path.exists(go):
    time.sleep(0.01)
mixture = build_mixture(cfg, "train", 2_000_000)
digest = hashlib.sha256(mixture.dataset_index.tobytes() + mixture.sample_index.tobytes())
for d in mixture.datasets:
    digest.update(d.index.shuffle_idx.tobytes() + d.index.sample_idx.tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_concurrent_starters_one_builds_all_map_the_same(tmp_path):
    small_config(tmp_path, [5.0, 3.0, 1.0])  # the token files
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    starters = [
        subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), str(go)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    time.sleep(1.5)  # all of them imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=120) for p in starters]
    assert all(p.returncode == 0 for p in starters), [err for _, err in outputs]
    builds = [line for _, err in outputs for line in err.splitlines() if line.startswith("built")]
    assert len([b for b in builds if "blend" in b]) == 1, builds
    assert len([b for b in builds if "sample index" in b]) == 3, builds  # one per component
    assert len({out for out, _ in outputs}) == 1, "every starter maps the same arrays"


def test_cache_is_keyed_on_sizes_and_weights(tmp_path):
    cfg = small_config(tmp_path, [2.0, 1.0])
    first = build_mixture(cfg, "train", 5_000)
    files = set(glob.glob(str(tmp_path / "*.npy")))
    assert len(files) == 3 + 2 * 3, "the blend (3 arrays) and each component's index (3)"
    reweighted = build_mixture(small_config(tmp_path, [1.0, 2.0]), "train", 5_000)
    new = set(glob.glob(str(tmp_path / "*.npy"))) - files
    assert len([f for f in new if "blend_" in os.path.basename(f)]) == 3
    assert not np.array_equal(reweighted.dataset_index, first.dataset_index)
    write_component(str(tmp_path / "c1"), np.full(300, 50))  # c1 re-tokenized: other sizes
    rebuilt = build_mixture(cfg, "train", 5_000)
    assert np.array_equal(rebuilt.dataset_index, first.dataset_index), "same weights, same blend"
    assert np.array_equal(rebuilt.datasets[0].index.doc_idx, first.datasets[0].index.doc_idx)
    assert not np.array_equal(
        rebuilt.datasets[1].index.sample_idx[:50], first.datasets[1].index.sample_idx[:50]
    )
    assert len(set(glob.glob(str(tmp_path / "*.npy"))) - files - new) == 3, "c1's new index"


SLOW_BUILDER = """
import sys
from neoray.data import mixture
mixture.BLEND_CHUNK = 10  # many tiny stretches: a build slow enough to be interrupted
mixture.load_or_build_blend([5.0, 3.0, 1.0], 3_000_000, sys.argv[1])
"""


def test_a_crash_mid_build_leaves_nothing_that_looks_complete(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    builder = subprocess.Popen([sys.executable, "-c", SLOW_BUILDER, str(tmp_path)], env=env)
    deadline = time.monotonic() + 60
    while not glob.glob(str(tmp_path / "*.partial.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert glob.glob(str(tmp_path / "*.partial.npy")), "killed mid-build"
    assert not [f for f in os.listdir(tmp_path) if f.endswith("index.npy")], "no final file"
    blend = load_or_build_blend([5.0, 3.0, 1.0], 3_000_000, str(tmp_path))
    assert not glob.glob(str(tmp_path / "*.partial.npy")), "the leftovers were removed"
    expected = reference_blend([5.0, 3.0, 1.0], 3_000_000)
    assert np.array_equal(blend.dataset_index, expected[0])
    assert np.array_equal(blend.sample_index, expected[1])


PEAK = """
import sys
from neoray.data.mixture import load_or_build_blend
load_or_build_blend([18.11, 14.40, 12.07, 10.01, 8.96, 7.59, 6.12, 5.13, 3.65, 3.07, 2.17,
                     1.55, 1.53, 1.24, 0.88, 0.75, 0.73, 0.62, 0.60, 0.38, 0.30, 0.14],
                    20_000_000, sys.argv[1])
print(next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM")) * 1024)
"""


@pytest.mark.slow
def test_a_20m_sample_blend_builds_in_bounded_memory(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    peak = int(out.stdout.split()[-1])
    # The finished arrays alone (int32 + int64 per sample) are 240 MB; the in-memory build
    # held several times that. The chunked build holds a stretch at a time.
    whole_arrays = 20_000_000 * (4 + 8)
    assert peak < whole_arrays, f"peak RSS {peak / 1e6:.0f} MB"
    blend = load_or_build_blend(PILE, 20_000_000, str(tmp_path))  # cached: mapped, not built
    w = np.array(PILE) / sum(PILE)
    assert int(blend.counts.sum()) == 20_000_000
    assert np.all(np.abs(blend.counts - w * 20_000_000) <= 1.5)
    assert np.array_equal(np.bincount(blend.dataset_index, minlength=22), blend.counts)


def resident_file_pages() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile"))


def test_opening_token_files_leaves_the_index_pages_it_checked_out_of_memory(tmp_path):
    """The Pile's 22 `.idx` files are 1.75 GB: held after the open's check, they alone would
    take most of an index build's 2 GB."""
    prefix = str(tmp_path / "big")
    sizes = np.full(4_000_000, 3, dtype=np.int32)  # a 56 MB .idx
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(sizes.sum()) * 2)
    write_index(prefix + ".idx", sizes, np.dtype(np.uint16))
    before = resident_file_pages()
    data = IndexedDataset(prefix)
    assert resident_file_pages() - before < 8 << 20
    assert int(data.sizes[-1]) == 3 and int(data.pointers[-1]) == 6 * (len(sizes) - 1)
