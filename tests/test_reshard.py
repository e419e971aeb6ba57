"""Resuming a checkpoint at another (tp, pp, dp): real DeepSpeed runs under torchrun (gloo).

A tp=2 x pp=2 x dp=2 run trains 10 steps, saving every step. Its step-6 checkpoint is copied to
the storage of three other layouts (as a run moved to a cluster of another size), each of which
resumes it with the same global batch of 8 sequences and trains to step 10. Their losses must
be the original's, and their optimizer state after their first step the original's at that
step, gathered from the checkpoints both wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from layouts import RESUMED_AT, RUN, STEPS, TrainedRun, launch, metrics, name, training_state

from neoray.checkpoint import committed_checkpoints
from neoray.checkpoint.reshard import FP32, MOMENTS

SAVED = (2, 2, 2)
LAYOUTS = [(1, 2, 4), (2, 1, 2), (1, 1, 1)]


def moved_run(root: Path, layout: tuple[int, int, int]) -> TrainedRun:
    return TrainedRun(root / name(layout) / "run", root / name(layout) / "store")


def resume_moved(root: Path, saved: TrainedRun, layout: tuple[int, int, int], check=True):
    """Copy `saved`'s step-RESUMED_AT checkpoint to a new storage and train `layout` from it."""
    run = moved_run(root, layout)
    shutil.copytree(saved.folder(RESUMED_AT), run.folder(RESUMED_AT))
    return launch(layout, run.run_dir, [f"storage.root={run.store}"], check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_runs) -> tuple[Path, TrainedRun, dict]:
    root = tmp_path_factory.mktemp("reshard")
    saved = reference_runs(SAVED)
    logs = {layout: resume_moved(root, saved, layout) for layout in LAYOUTS}
    return root, saved, logs


def state_at(run: TrainedRun, step: int) -> tuple[dict, dict]:
    manifest = next(m for m in committed_checkpoints(run.storage, RUN) if m.step == step)
    return training_state(run.folder(step), manifest)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_a_checkpoint_resumes_at_another_layout_with_the_same_losses(runs, layout):
    root, saved, logs = runs
    original, resumed = metrics(saved.run_dir), metrics(moved_run(root, layout).run_dir)
    assert sorted(resumed) == list(range(RESUMED_AT, STEPS))
    for step, row in resumed.items():
        assert row["loss"] == pytest.approx(original[step]["loss"], rel=1e-5), step
    assert f"resharded step {RESUMED_AT} from tp=2, pp=2, dp=2 to tp={layout[0]}" in logs[layout]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_the_optimizer_state_after_the_first_resumed_step_is_the_original_layouts(runs, layout):
    root, saved, _ = runs
    first = RESUMED_AT + 1
    original, original_weights = state_at(saved, first)
    moved, moved_weights = state_at(moved_run(root, layout), first)
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
    root, saved, _ = runs
    layout = (3, 1, 1)  # the tiny model's 4 heads do not split over 3 tensor ranks
    result = resume_moved(root, saved, layout, check=False)
    assert result.returncode != 0
    assert "model.num_heads=4 is not divisible by parallel.tp=3" in result.stderr
    assert "resharded" not in result.stdout + result.stderr
    assert not (moved_run(root, layout).run_dir / "metrics.jsonl").exists()
