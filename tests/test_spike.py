"""Loss spikes (`train.spike`): a batch of garbage tokens at a known step, written into the token
files themselves, makes the loss spike; the run rolls back in-process to the checkpoint before
it, skips the batches from there through the spike's, and ends with the very losses and
weights of a run told to skip the same steps from the start (`train.skip_steps`), at a
tensor-parallel layout; too many spikes stop the run with the history of its rollbacks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_command, torchrun_launcher
from layouts import ROOT, TINY, metrics, training_state

from neoray.checkpoint.manifest import checkpoint_key, latest_checkpoint
from neoray.config import ConfigError
from neoray.storage import LocalStorage

STEPS, GARBAGE_AT, CHECKPOINT_EVERY = 12, 8, 3
SKIPPED = [6, 8]  # rolled back to the checkpoint of step 6; skip_batches=2 ends at the spike's
GLOBAL_BATCH = 8  # micro batches of 2, accumulated 4 times, dp=1
SPIKE = [
    "train.spike.enabled=true",
    "train.spike.factor=1.2",
    "train.spike.window=3",
    "train.spike.warmup=4",
    "train.spike.skip_batches=2",
]


def garbage_at(data, step: int, seed: int = 0) -> None:
    """Overwrite, in the .bin files, every token of every sample that training step `step`
    reads (in the run's own order: STEPS steps of GLOBAL_BATCH) with uniform random ids."""
    from neoray.data.indexed import bin_path
    from neoray.data.loader import BatchSchedule, train_mixture

    mixture = train_mixture(data, BatchSchedule(2, 4, 1, STEPS))
    rng = np.random.default_rng(seed)
    for position in range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH):
        part = mixture.datasets[int(mixture.dataset_index[position])]
        sample = int(part.index.shuffle_idx[int(mixture.sample_index[position])])
        at, offset = (int(v) for v in part.index.sample_idx[sample])
        tokens = np.memmap(bin_path(part.data.prefix), mode="r+", dtype=part.data.dtype)
        left = part.seq_len + 1  # a sample may run on into the next documents
        while left:
            document = int(part.index.doc_idx[at])
            count = min(int(part.data.sizes[document]) - offset, left)
            first = int(part.data.pointers[document]) // part.data.dtype.itemsize + offset
            tokens[first : first + count] = rng.integers(0, 1000, count)
            left, at, offset = left - count, at + 1, 0
        tokens.flush()


def spiky_copy(demo_data, root: Path, steps: list[int]):
    """The demo data copied to `root`, with garbage at training `steps`."""
    import dataclasses

    shutil.copytree(Path(demo_data.tokenizer).parent, root, ignore=shutil.ignore_patterns("raw"))
    components = {
        name: dataclasses.replace(c, prefix=str(root / Path(c.prefix).name))
        for name, c in demo_data.components.items()
    }
    data = dataclasses.replace(
        demo_data, components=components, tokenizer=str(root / "tokenizer.json"), seq_len=32
    )
    for step in steps:
        garbage_at(data, step)
    return data


def command(world: int, root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A run of STEPS steps on the data under `root`, at a learning rate high enough for the
    tiny model to learn the data within a few steps (so that garbage stands out)."""
    return [
        *torchrun_launcher(world),
        "jobs/pretrain.py",
        "launcher=torchrun",
        *TINY,
        "data=demo",
        f"data.root={root}",
        "parallel.grad_accum_steps=4",
        f"train.steps={STEPS}",
        "train.eval_interval=0",
        "train.log_interval=1",
        "optim.lr=1e-2",
        "optim.min_lr=1e-3",
        "optim.warmup=0",
        f"checkpoint.interval={CHECKPOINT_EVERY}",
        "energy.enabled=false",
        f"run_dir={run_dir}",
        f"storage.root={run_dir / 'store'}",
        *extra,
    ]


NO_MLFLOW = "tracking.enabled=false"


def environment() -> dict[str, str]:
    """The runs' environment, read when they start (after conftest points MLflow elsewhere)."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_a_spike_is_rolled_back_and_skipped_as_if_its_batches_were_never_there(
    demo_data, tmp_path, mlflow_tracking_uri
):
    """At tp=2: the spike at GARBAGE_AT rolls back to the checkpoint of step 6 and skips steps
    6..8; every loss, learning rate and gradient norm, and the final weights and optimizer
    state, equal bit for bit those of a run configured to skip steps 6..8 from the start. The
    rollback is in the progress output, the manifests and MLflow."""
    from mlflow import MlflowClient

    from neoray.training.config import OptimConfig
    from neoray.training.schedule import learning_rate

    root = tmp_path / "data"
    spiky_copy(demo_data, root, [GARBAGE_AT])
    tp2 = ["parallel.tp=2"]
    rolled, skipping = tmp_path / "rolled", tmp_path / "skipping"
    runs = [
        command(2, root, rolled, *tp2, *SPIKE, "run_name=spiky", "tracking.enabled=true"),
        command(
            2, root, skipping, *tp2, f"train.skip_steps=[{SKIPPED}]", "run_name=skipping", NO_MLFLOW
        ),
    ]
    with ThreadPoolExecutor(2) as pool:  # side by side (most of each is start-up); one MLflow
        out, _ = pool.map(lambda c: run_command(c, 300, cwd=ROOT, env=environment()), runs)
    assert re.search(
        r"spike at step 8 \(loss [\d.]+ > 1\.2 x [\d.]+, the median of the last 3 steps\): "
        r"rolled back to the checkpoint of step 6, skipping the batches of steps 6\.\.8 "
        r"\[rollback 1: 3 trained steps undone, [\d.]+ s\]",
        out,
    ), out[-3000:]

    rows, expected = metrics(rolled), metrics(skipping)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 9, 10, 11]  # the undone steps' rows are gone
    for step, row in expected.items():
        for key in ("loss", "lr", "grad_norm"):
            assert rows[step][key] == row[key], (step, key)
    # the skipped steps advanced the schedule: step 9 trains at the schedule's step-9 rate
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup=0)
    assert rows[9]["lr"] == pytest.approx(learning_rate(9, optim, STEPS), rel=1e-12)

    final = {}
    for run_dir, name in ((rolled, "spiky"), (skipping, "skipping")):
        store = LocalStorage(run_dir / "store")
        manifest = latest_checkpoint(store, name)
        assert (manifest.step, manifest.skipped_steps) == (STEPS, [SKIPPED])
        assert manifest.tokens_seen == (STEPS - 3) * GLOBAL_BATCH * 32
        final[name] = training_state(store.root / checkpoint_key(name, STEPS), manifest)
    for (state, layers), (other_state, other_layers) in [(final["spiky"], final["skipping"])]:
        for kind in state:
            for key, tensor in state[kind].items():
                assert torch.equal(tensor, other_state[kind][key]), (kind, key)
        assert all(torch.equal(t, other_layers[k]) for k, t in layers.items())

    client = MlflowClient(mlflow_tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "attributes.run_name = 'spiky'")
    history = client.get_metric_history(run.info.run_id, "train/rollback")
    assert [(m.step, m.value) for m in history] == [(GARBAGE_AT, 1.0)]
    assert run.data.metrics["train/rollback_s"] > 0
    assert run.data.tags["neoray.rollback.1"].startswith("spike at step 8 (loss ")


def test_a_spike_past_max_rollbacks_stops_the_run_with_the_history(demo_data, tmp_path):
    """Garbage at steps 8 and 10, one rollback allowed: the first is rolled back (to step 6,
    skipping 6..8), the second stops the run, naming both; the checkpoint committed between
    them (step 9) records the skipped steps, so a restart keeps skipping them (and, its
    history being its own, rolls the second back)."""
    root = tmp_path / "data"
    spiky_copy(demo_data, root, [GARBAGE_AT, 10])
    run_dir = tmp_path / "run"
    bound = ["train.spike.max_rollbacks=1", "train.spike.rollback_window=100"]
    done = subprocess.run(
        command(1, root, run_dir, *SPIKE, *bound, "run_name=bounded", NO_MLFLOW),
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert re.search(
        r"SpikeError: spike at step 10 \(loss [\d.]+ > 1\.2 x [\d.]+, the median of the last 3 "
        r"steps\) after 1 rollbacks within train\.spike\.rollback_window=100 steps "
        r"\(train\.spike\.max_rollbacks=1\); stopping\. Rollbacks so far:\n  spike at step 8 "
        r"\(loss [\d.]+ > 1\.2 x [\d.]+, the median of the last 3 steps\): rolled back to the "
        r"checkpoint of step 6, skipping the batches of steps 6\.\.8\n",
        output,
    ), output[-3000:]
    store = LocalStorage(run_dir / "store")
    manifest = latest_checkpoint(store, "bounded")
    assert (manifest.step, manifest.skipped_steps) == (9, [SKIPPED])
    assert [s for s in range(12) if manifest.trained_on(s)] == [0, 1, 2, 3, 4, 5]
    assert sorted(metrics(run_dir)) == [0, 1, 2, 3, 4, 5, 9]  # step 10 never finished

    # Started again, it resumes at step 9 still skipping 6..8, and judges step 10 against the
    # losses its metrics.jsonl kept: rolled back to step 9, skipping 9..10.
    again = run_command(
        command(1, root, run_dir, *SPIKE, *bound, "run_name=bounded", NO_MLFLOW),
        timeout=300,
        cwd=ROOT,
        env=environment(),
    )
    assert re.search(
        r"spike at step 10 \(loss [\d.]+ > 1\.2 x [\d.]+, the median of the last 3 steps\): "
        r"rolled back to the checkpoint of step 9, skipping the batches of steps 9\.\.10 ",
        again,
    ), again[-3000:]
    manifest = latest_checkpoint(store, "bounded")
    assert (manifest.step, manifest.skipped_steps) == (STEPS, [[6, 10]])
    assert manifest.tokens_seen == (STEPS - 5) * GLOBAL_BATCH * 32


def test_exposure_counts_only_the_steps_trained(demo_data, tmp_path):
    """The memorization study's sequences and exposure counts leave skipped steps out: drawn
    positions land outside them, and a sequence of a skipped step was never seen."""
    from neoray.data.exposure import count_exposures, draw_positions, read_windows
    from neoray.data.loader import BatchSchedule, train_mixture

    drawn = draw_positions(9 * GLOBAL_BATCH, 9 * GLOBAL_BATCH, 0, GLOBAL_BATCH, [SKIPPED])
    steps = sorted(set((drawn // GLOBAL_BATCH).tolist()))
    assert steps == [0, 1, 2, 3, 4, 5, 9, 10, 11]
    data = spiky_copy(demo_data, tmp_path / "data", [])
    mixture = train_mixture(data, BatchSchedule(2, 4, 1, STEPS))
    positions = np.array([5 * GLOBAL_BATCH, 7 * GLOBAL_BATCH, 9 * GLOBAL_BATCH])
    windows = read_windows(mixture, positions, 16)
    count_exposures(mixture, STEPS * GLOBAL_BATCH, GLOBAL_BATCH, windows, {6, 7, 8})
    assert [w.first_seen_step for w in windows] == [5, None, 9]
    assert [w.times_seen for w in windows] == [1, 0, 1]


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.spike.factor=1.0", "train.spike.factor=1.0"),
        ("train.spike.window=0", "train.spike.window=0"),
        ("train.spike.max_rollbacks=-1", "train.spike.max_rollbacks=-1"),
        ("+train.spike.windw=5", "train.spike: unknown field(s) windw"),
        ("train.skip_steps=[[5,3]]", "train.skip_steps[0]=[5, 3]"),
        ("train.skip_steps=[7]", "train.skip_steps[0]=7"),
        ("checkpoint.enabled=false", "train.spike.enabled=true rolls back"),
    ],
)
def test_bad_spike_settings_are_named_before_anything_starts(override, field):
    from hydra import compose, initialize_config_dir

    from neoray.training.config import pretrain_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=["train.spike.enabled=true", override])
    with pytest.raises(ConfigError, match=re.escape(field)):
        pretrain_config(cfg)
