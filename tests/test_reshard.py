"""Resuming a checkpoint at another (tp, pp, dp): real DeepSpeed runs under torchrun (gloo).

A tp=2 x pp=2 x dp=2 run trains 10 steps, saving every step. Its step-6 checkpoint is copied to
the storage of three other layouts (as a run moved to a cluster of another size), each of which
resumes it with the same global batch of 8 sequences and trains to step 10. Their losses must
be the original's, and their optimizer state after their first step the original's at that
step, gathered from the checkpoints both wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed import run_command, torchrun_launcher

from neoray.checkpoint import committed_checkpoints
from neoray.checkpoint.reshard import FP32, MOMENTS, full_states, read_saved_ranks
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.convert import consolidate
from neoray.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
RUN = "moved"
SAVED = (2, 2, 2)
# (tp, pp, dp) -> gradient accumulation steps giving 8 sequences a step (micro batches of 2)
LAYOUTS = {SAVED: 2, (1, 2, 4): 1, (2, 1, 2): 2, (1, 1, 1): 4}
RESUMED_AT, STEPS = 6, 10


def name(layout: tuple[int, int, int]) -> str:
    return "tp{}_pp{}_dp{}".format(*layout)


def launch(root: Path, layout: tuple[int, int, int], *overrides: str, check: bool = True):
    """Train `layout` to step 10 under torchrun; with check=False, the completed process (one
    process launched: a refused layout is refused before the launch size is checked)."""
    tp, pp, dp = layout
    args = [
        "jobs/pretrain.py",
        "launcher=torchrun",
        "model=tiny",
        "data.seq_len=32",
        "parallel.micro_batch_size=2",
        f"parallel.grad_accum_steps={LAYOUTS.get(layout, 1)}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.dp={dp}",
        f"train.steps={STEPS}",
        "train.peak_tflops=1.0",
        "optim.warmup=0.2",
        "checkpoint.interval=1",
        "checkpoint.keep_last=5",
        f"run_name={RUN}",
        f"run_dir={root / 'runs' / name(layout)}",
        f"storage.root={root / name(layout)}",
        *overrides,
    ]
    command = torchrun_launcher(tp * pp * dp if check else 1) + args
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if check:
        return run_command(command, timeout=300, cwd=ROOT, env=env)
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def step_folder(root: Path, layout: tuple[int, int, int], step: int) -> Path:
    return root / name(layout) / RUN / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reshard")
    logs = {SAVED: launch(root, SAVED)}
    for layout in LAYOUTS:
        if layout != SAVED:
            shutil.copytree(
                step_folder(root, SAVED, RESUMED_AT), step_folder(root, layout, RESUMED_AT)
            )
            logs[layout] = launch(root, layout)
    return root, logs


def losses(root: Path, layout: tuple[int, int, int]) -> dict[int, float]:
    text = (root / "runs" / name(layout) / "metrics.jsonl").read_text()
    return {row["step"]: row["loss"] for row in map(json.loads, text.splitlines())}


def training_state(folder: Path) -> tuple[dict, dict]:
    """{fp32 | exp_avg | exp_avg_sq: {plain name: full tensor}} of a checkpoint, and its
    weights as DeepSpeed's per-layer files hold them, joined across tensor ranks."""
    manifest = committed_checkpoints(LocalStorage(folder.parents[2]), RUN)
    manifest = next(m for m in manifest if m.step == int(folder.name[5:]))
    config = NeoXConfig(**manifest.model)
    names = {n for r in read_saved_ranks(folder, manifest) for g in r.shapes for n in g}
    full, _, _ = full_states(folder, manifest, names, config)
    layers = {}
    for path in folder.glob("layer_*-model_*-model_states.pt"):
        index, tp_rank = (int(v) for v in re.findall(r"\d+", path.name)[:2])
        state = torch.load(path, weights_only=True)
        layers[tp_rank, index] = {f"{index}.{key}": value for key, value in state.items()}
    return full, consolidate(layers, config)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != SAVED], ids=name)
def test_a_checkpoint_resumes_at_another_layout_with_the_same_losses(runs, layout):
    root, logs = runs
    saved, resumed = losses(root, SAVED), losses(root, layout)
    assert sorted(resumed) == list(range(RESUMED_AT, STEPS))
    for step in resumed:
        assert resumed[step] == pytest.approx(saved[step], rel=1e-5), step
    assert f"resharded step {RESUMED_AT} from tp=2, pp=2, dp=2 to tp={layout[0]}" in logs[layout]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != SAVED], ids=name)
def test_the_optimizer_state_after_the_first_resumed_step_is_the_original_layouts(runs, layout):
    root, _ = runs
    first = RESUMED_AT + 1
    original, original_weights = training_state(step_folder(root, SAVED, first))
    moved, moved_weights = training_state(step_folder(root, layout, first))
    # The master weights read from the optimizer partitions are the weights DeepSpeed saved
    # per layer (fp32 training): the partition reading is right on both layouts.
    for weights, state in ((original_weights, original), (moved_weights, moved)):
        assert weights.keys() == state[FP32].keys()
        for plain, tensor in weights.items():
            assert torch.equal(tensor, state[FP32][plain]), plain
    if layout[0] == SAVED[0] and layout[2] == SAVED[2]:
        # Only the pipeline split changed: every sum runs in the same order, bit for bit.
        for key in (FP32, *MOMENTS):
            for plain, tensor in original[key].items():
                assert torch.equal(moved[key][plain], tensor), (key, plain)
        return
    # Another tp or dp sums gradients in another order (float rounding, ~1e-7 relative). The
    # moments follow the gradients: equal to 1e-6 of each tensor's scale. Adam divides by the
    # root of the second moment, which turns those roundings into up to ~1% of one update for
    # a near-zero gradient, so the weights are equal to 1e-6 in absolute terms (updates are of
    # the order of the learning rate, 1e-4 here).
    for key in MOMENTS:
        assert moved[key].keys() == original[key].keys()
        for plain, tensor in original[key].items():
            error = (moved[key][plain] - tensor).abs().max().item()
            assert error <= 1e-6 * tensor.abs().max().item(), (key, plain, error)
    for plain, tensor in original[FP32].items():
        torch.testing.assert_close(moved[FP32][plain], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_layout_that_cannot_hold_the_model_is_refused_before_any_weight_is_read(runs):
    root, _ = runs
    layout = (3, 1, 1)  # the tiny model's 4 heads do not split over 3 tensor ranks
    shutil.copytree(step_folder(root, SAVED, RESUMED_AT), step_folder(root, layout, RESUMED_AT))
    result = launch(root, layout, check=False)
    assert result.returncode != 0
    assert "model.num_heads=4 is not divisible by parallel.tp=3" in result.stderr
    assert "resharded" not in result.stdout + result.stderr
    assert not (root / "runs" / name(layout) / "metrics.jsonl").exists()
