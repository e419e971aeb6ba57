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

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from layouts import RESUMED_AT, RUN, STEPS, copy_checkpoint, launch, local_copy, metrics, name
from layouts import training_state as state

from neoray.checkpoint import committed_checkpoints
from neoray.checkpoint.manifest import file_entry
from neoray.deepspeed_private import checkpoint_globals
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


class RunsCode:
    """Unpickled, it creates the file `marker`: what a bucket writer could put into a
    checkpoint file that DeepSpeed's own reader would unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_a_checkpoint_file_that_would_run_code_is_refused_on_resume(reference_runs, tmp_path):
    """A bucket writer replaces a model-states file of a tp=2 checkpoint with one that runs code
    when unpickled, and rewrites the manifest to match. The restart at the same layout refuses
    the file before running anything."""
    layout = (2, 1, 1)
    reference = reference_runs(layout)
    [manifest] = [m for m in committed_checkpoints(reference.storage, RUN) if m.step == RESUMED_AT]
    folder = tmp_path / "tampered"
    shutil.copytree(reference.folder(RESUMED_AT), folder)
    target, marker = "mp_rank_01_model_states.pt", tmp_path / "code-ran"
    with checkpoint_globals():
        states = torch.load(folder / target, map_location="cpu", weights_only=True)
    torch.save({**states, "note": RunsCode(marker)}, folder / target)
    tampered = dataclasses.replace(
        manifest,
        files=[
            file_entry(folder / e.path, e.path) if e.path == target else e for e in manifest.files
        ],
    )
    storage = LocalStorage(tmp_path / "store")
    copy_checkpoint(folder, tampered, storage)

    with pytest.raises(pytest.fail.Exception) as failure:
        launch(layout, tmp_path / "run", [f"storage.root={storage.root}"])
    assert "weights_only" in str(failure.value) and "Unsupported global" in str(failure.value)
    assert not marker.exists()
