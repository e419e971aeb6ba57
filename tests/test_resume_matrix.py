"""A run restarted at the layout it was saved with continues as if never interrupted, at every
layout of tp, pp, dp in {1, 2}, from local storage and from S3: real DeepSpeed runs under
torchrun (gloo).

Each layout's uninterrupted run (`reference_runs`, shared with the resharding tests) trains 10
steps, saving every step. Its step-6 checkpoint is published, files then manifest, to a fresh
folder or bucket, which is what a job that crashed right after that commit leaves behind; the
same job then starts again there. The same weights, optimizer state, schedule and data order
run the same arithmetic: its losses, learning rates, and final weights and optimizer state are
the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from layouts import RESUMED_AT, RUN, STEPS, copy_checkpoint, launch, local_copy, metrics, name
from layouts import training_state as state

from neoray.checkpoint import committed_checkpoints
from neoray.storage import LocalStorage, S3Storage, StorageConfig

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]


def storage_of(kind: str, tmp_path, request):
    """A new storage of `kind` and the job's overrides for it (for S3, a new bucket of the
    suite's server, which the environment then points at)."""
    if kind == "local":
        store = tmp_path / "store"
        return LocalStorage(store), [f"storage.root={store}"]
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(StorageConfig(kind="s3", bucket=bucket)), [
        "storage=s3",
        f"storage.bucket={bucket}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=name)
def test_a_run_restarted_at_its_own_layout_continues_as_if_never_interrupted(
    reference_runs, layout, kind, tmp_path, request
):
    reference = reference_runs(layout)
    saved = {m.step: m for m in committed_checkpoints(reference.storage, RUN)}
    storage, overrides = storage_of(kind, tmp_path, request)
    copy_checkpoint(reference.folder(RESUMED_AT), saved[RESUMED_AT], storage)

    output = launch(layout, tmp_path / "run", overrides)

    assert f"resumed run '{RUN}' at step {RESUMED_AT}" in output
    assert "resharded" not in output
    uninterrupted, resumed = metrics(reference.run_dir), metrics(tmp_path / "run")
    assert sorted(resumed) == list(range(RESUMED_AT, STEPS))
    for step, row in resumed.items():
        assert (row["loss"], row["lr"]) == (uninterrupted[step]["loss"], uninterrupted[step]["lr"])
    [final] = [m for m in committed_checkpoints(storage, RUN) if m.step == STEPS]
    assert final.topology == dict(zip(("tp", "pp", "dp"), layout, strict=True))
    expected, expected_weights = state(reference.folder(STEPS), saved[STEPS])
    got, got_weights = state(local_copy(storage, final, tmp_path / "final"), final)
    for plain, tensor in expected_weights.items():
        assert torch.equal(got_weights[plain], tensor), plain
    for key, tensors in expected.items():
        assert got[key].keys() == tensors.keys()
        for plain, tensor in tensors.items():
            assert torch.equal(got[key][plain], tensor), (key, plain)
