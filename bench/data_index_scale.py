"""Training-data indexes at the GPT-NeoX-20B run's size, against Megatron-Core's C++ helpers.

The run: 150,000 steps x 1,536 sequences = 230.4 M samples of 2,048 tokens, mixed from the
Pile's 22 components with the weights of conf/data/pile.yaml, split "995,4,1", seed 1234.

The data are synthetic `.idx` files (the project's `write_index`; the `.bin` is a sparse file of
the right length, never read): each component has the Pile's document count (PILE below, from
the Pile paper's datasheet) and its share of 300 B tokens (the Pile with the GPT-NeoX
tokenizer) in proportion to its raw size, document lengths log-normal (sigma 1) around the mean.
`--scale` shrinks samples, documents and tokens alike (so the epochs are the same); `--quick`
is `--scale 0.01`.

Each side runs in its own process, timed and measured (peak RSS, VmHWM); with `--rounds N`
the cold builds alternate which side goes first and the median of each side is reported:

- ours, cold: `build_mixture` with an empty cache: the blend, then the 22 sample indexes,
  several at a time (`gpt_datasets`), chunk by chunk into `.npy` files;
- ours, warm: `build_mixture` again (a rank's start with the cache present);
- Megatron-Core: `helpers_cpp.build_blending_indices` for the blend, and per component its
  GPTDataset recipe: doc_idx over all epochs with numpy, `build_sample_idx_int32`, the
  shuffle with numpy; every array saved with `np.save`, as Megatron caches them.

Each side's CPU time (user + system, all threads) is printed next to its wall time: on a
shared machine the wall time depends on what else runs, the CPU time much less.

Goals: cold time <= 0.8x Megatron-Core's, cold peak memory <= 2 GB, warm start < 5 s.

    .venv/bin/python bench/data_index_scale.py [--quick | --scale S] [--rounds N]
        [--megatron-site DIR]

Megatron-Core is not a dependency of neoray; install it for this benchmark only, e.g.
`pip install --no-deps --target /tmp/mcore megatron-core` and pass `--megatron-site /tmp/mcore`
(its wheel ships the compiled `helpers_cpp`; nothing else of it is imported).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from neoray.data.config import ComponentConfig, DataConfig
from neoray.data.gpt_dataset import split_documents
from neoray.data.indexed import IndexedDataset, bin_path, idx_path, write_index
from neoray.data.mixture import build_mixture

STEPS, BATCH, SEQ_LEN, SEED, SPLIT = 150_000, 1_536, 2_048, 1234, "995,4,1"
PILE_TOKENS = 300e9
# name: (weight from conf/data/pile.yaml, raw GiB, documents)
PILE = {
    "pile_cc": (18.11, 227.12, 54_953_117),
    "pubmed_central": (14.40, 90.27, 3_098_931),
    "books3": (12.07, 100.96, 196_640),
    "openwebtext2": (10.01, 62.77, 17_103_059),
    "arxiv": (8.96, 56.21, 1_264_405),
    "github": (7.59, 95.16, 19_021_454),
    "freelaw": (6.12, 51.15, 3_562_015),
    "stackexchange": (5.13, 32.20, 15_622_475),
    "uspto_backgrounds": (3.65, 22.90, 5_883_037),
    "pubmed_abstracts": (3.07, 19.26, 15_518_009),
    "gutenberg_pg19": (2.17, 10.88, 28_602),
    "opensubtitles": (1.55, 12.98, 446_612),
    "wikipedia_en": (1.53, 6.38, 6_033_151),
    "dm_mathematics": (1.24, 7.75, 1_014_997),
    "ubuntu_irc": (0.88, 5.52, 10_605),
    "bookcorpus2": (0.75, 6.30, 17_868),
    "europarl": (0.73, 4.59, 69_814),
    "hackernews": (0.62, 3.90, 831_198),
    "youtube_subtitles": (0.60, 3.73, 173_651),
    "philpapers": (0.38, 2.38, 33_990),
    "nih_exporter": (0.30, 1.89, 939_668),
    "enron_emails": (0.14, 0.88, 517_401),
}


def write_synthetic_pile(folder: str, scale: float) -> None:
    """The 22 components' `.idx` files (and sparse `.bin`s) under `folder`, once."""
    os.makedirs(folder, exist_ok=True)
    raw_total = sum(gib for _, gib, _ in PILE.values())
    for i, (name, (_, gib, documents)) in enumerate(PILE.items()):
        prefix = os.path.join(folder, name)
        if os.path.exists(idx_path(prefix)):
            continue
        count = max(1, round(documents * scale))
        tokens = PILE_TOKENS * scale * gib / raw_total
        lengths = np.random.default_rng(i).lognormal(0.0, 1.0, count)
        sizes = np.maximum(1, lengths * (tokens / lengths.sum())).astype(np.int32)
        del lengths
        with open(bin_path(prefix), "wb") as f:
            f.truncate(int(np.sum(sizes, dtype=np.int64)) * 2)  # uint16 tokens, sparse
        write_index(idx_path(prefix) + ".partial", sizes, np.dtype(np.uint16))
        os.replace(idx_path(prefix) + ".partial", idx_path(prefix))


def pile_config(folder: str, cache_dir: str) -> DataConfig:
    components = {
        name: ComponentConfig(prefix=os.path.join(folder, name), weight=weight)
        for name, (weight, _, _) in PILE.items()
    }
    return DataConfig(
        components=components, tokenizer="gpt-neox-20b", split=SPLIT, seq_len=SEQ_LEN,
        seed=SEED, cache_dir=cache_dir,
    )  # fmt: skip


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def cpu_seconds() -> float:
    """User and system time of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ours(folder: str, cache_dir: str, samples: int) -> dict:
    start, cpu = time.perf_counter(), cpu_seconds()
    mixture = build_mixture(pile_config(folder, cache_dir), "train", samples)
    seconds = time.perf_counter() - start
    counts = np.array([len(d) for d in mixture.datasets])
    return {"seconds": seconds, "cpu": cpu_seconds() - cpu, "peak": peak_rss(),
            "counts": counts.tolist()}  # fmt: skip


def load_helpers(site: str | None):
    """Megatron-Core's compiled `helpers_cpp`, loaded on its own (no torch, no megatron.core)."""
    roots = [site] if site else sys.path
    for root in roots:
        found = glob.glob(os.path.join(root, "megatron/core/datasets/helpers_cpp*.so"))
        if found:
            spec = importlib.util.spec_from_file_location("helpers_cpp", found[0])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    sys.exit(
        "Megatron-Core's compiled helpers were not found. Install it for this benchmark only:\n"
        "  pip install --no-deps --target /tmp/mcore megatron-core\n"
        "and run again with --megatron-site /tmp/mcore"
    )


def megatron(folder: str, cache_dir: str, samples: int, counts: list[int], site: str) -> dict:
    """Megatron-Core's way to the same indexes: the blend in C++, each component's doc_idx over
    all its epochs and shuffle in numpy, sample_idx in C++ (megatron/core/datasets)."""
    helpers = load_helpers(site)
    os.makedirs(cache_dir, exist_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    weights = np.array([w for w, _, _ in PILE.values()], dtype=np.float64)
    weights /= weights.sum()
    dataset_index = np.zeros(samples, dtype=np.int16)
    dataset_sample_index = np.zeros(samples, dtype=np.int64)
    helpers.build_blending_indices(
        dataset_index, dataset_sample_index, weights, len(weights), samples, False
    )
    np.save(os.path.join(cache_dir, "blend_dataset_index.npy"), dataset_index)
    np.save(os.path.join(cache_dir, "blend_sample_index.npy"), dataset_sample_index)
    del dataset_index, dataset_sample_index
    rng = np.random.RandomState(SEED)
    for name, needed in zip(PILE, counts, strict=True):
        data = IndexedDataset(os.path.join(folder, name))
        docs = split_documents(len(data), SPLIT)[0]
        documents = np.arange(docs.start, docs.stop, dtype=np.int32)
        tokens_per_epoch = int(np.sum(data.sizes[documents], dtype=np.int64))
        epochs = 1
        while (epochs * tokens_per_epoch - 1) // SEQ_LEN < needed:
            epochs += 1
        doc_idx = np.mgrid[0:epochs, 0 : len(documents)][1]
        doc_idx[:] = documents
        doc_idx = doc_idx.reshape(-1).astype(np.int32)
        rng.shuffle(doc_idx)
        sizes = np.asarray(data.sizes)
        sample_idx = helpers.build_sample_idx_int32(
            sizes, doc_idx, SEQ_LEN, epochs, tokens_per_epoch, True, 1
        )
        shuffle_idx = np.arange(len(sample_idx) - 1, dtype=np.uint32)
        rng.shuffle(shuffle_idx)
        for array, kind in ((doc_idx, "doc"), (sample_idx, "sample"), (shuffle_idx, "shuffle")):
            np.save(os.path.join(cache_dir, f"{name}_{kind}_idx.npy"), array)
        del doc_idx, sample_idx, shuffle_idx
    return {"seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu, "peak": peak_rss()}


def in_child(*args: str) -> dict:
    """Run one side in a fresh process; its result is the last line it prints (JSON)."""
    out = subprocess.run(
        [sys.executable, __file__, "--side", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="--scale 0.01")
    parser.add_argument("--megatron-site", default=None, help="where megatron-core is installed")
    parser.add_argument("--workdir", default="/tmp/neoray-bench-data-index")
    parser.add_argument("--rounds", type=int, default=1, help="cold builds of each side")
    parser.add_argument("--side", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        kind, folder, cache_dir, samples = args.side[:4]
        if kind == "ours":
            result = ours(folder, cache_dir, int(samples))
        else:
            counts = json.loads(args.side[4])
            result = megatron(folder, cache_dir, int(samples), counts, args.side[5] or None)
        print(json.dumps(result))
        return

    scale = 0.01 if args.quick else args.scale
    samples = round(STEPS * BATCH * scale)
    load_helpers(args.megatron_site)  # fail early, with the install hint
    folder = os.path.join(args.workdir, f"pile_{scale:g}")
    start = time.perf_counter()
    write_synthetic_pile(folder, scale)
    docs = sum(len(IndexedDataset(os.path.join(folder, n))) for n in PILE)
    print(f"synthetic Pile at scale {scale:g}: {docs:,} documents, {samples:,} samples of "
          f"{SEQ_LEN} tokens ({time.perf_counter() - start:.0f} s to write or find)")  # fmt: skip
    ours_cache, theirs_cache = (os.path.join(args.workdir, f"cache_{s}") for s in ("ours", "mc"))

    def cold_ours() -> dict:
        shutil.rmtree(ours_cache, ignore_errors=True)
        return in_child("ours", folder, ours_cache, str(samples))

    def cold_theirs(counts: list[int]) -> dict:
        shutil.rmtree(theirs_cache, ignore_errors=True)
        site = args.megatron_site or ""
        return in_child("megatron", folder, theirs_cache, str(samples), json.dumps(counts), site)

    # Rounds alternate which side goes first, so load from elsewhere on the machine falls on
    # both alike; each side's median round is reported.
    colds, theirs_runs, warm = [], [], None
    for round_index in range(args.rounds):
        if round_index % 2 == 0:
            colds.append(cold_ours())
            warm = warm or in_child("ours", folder, ours_cache, str(samples))
            theirs_runs.append(cold_theirs(colds[0]["counts"]))
        else:
            theirs_runs.append(cold_theirs(colds[0]["counts"]))
            colds.append(cold_ours())
    for cache in (ours_cache, theirs_cache):
        shutil.rmtree(cache, ignore_errors=True)
    cold = sorted(colds, key=lambda r: r["seconds"])[len(colds) // 2]
    theirs = sorted(theirs_runs, key=lambda r: r["seconds"])[len(theirs_runs) // 2]
    print("rounds, seconds: ours", [round(r["seconds"], 1) for r in colds],
          "Megatron-Core", [round(r["seconds"], 1) for r in theirs_runs])  # fmt: skip

    print(f"{'':28} {'seconds':>9} {'CPU s':>9} {'peak RSS GB':>12}")
    for name, r in (("ours, cold cache", cold), ("ours, warm cache (a start)", warm),
                    ("Megatron-Core helpers", theirs)):  # fmt: skip
        print(f"{name:28} {r['seconds']:9.1f} {r['cpu']:9.1f} {r['peak'] / 1e9:12.2f}")
    print(f"warm start: {warm['seconds']:.2f} s (goal < 5 s); "
          f"cold peak: {cold['peak'] / 1e9:.2f} GB (goal <= 2 GB)")  # fmt: skip
    print(
        f"ratio ours/Megatron-Core time: {cold['seconds'] / theirs['seconds']:.2f}x (goal <= 0.80x)"
        f"; CPU time: {cold['cpu'] / theirs['cpu']:.2f}x"
    )


if __name__ == "__main__":
    main()
