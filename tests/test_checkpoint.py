"""Checkpoints: save policy, manifests, retention, and resuming real DeepSpeed runs exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from layouts import copy_checkpoint

from neoray.checkpoint import (
    CheckpointConfig,
    CorruptCheckpointError,
    FileEntry,
    Manifest,
    checkpoint_from_uri,
    committed_checkpoints,
    download,
    latest_checkpoint,
    read_manifest,
)
from neoray.checkpoint.manifest import checkpoint_key, manifest_key, prune, sha256_file
from neoray.config import ConfigError
from neoray.storage import LocalStorage, join_key

ROOT = Path(__file__).resolve().parents[1]


def test_save_policy_interval_milestones_and_final():
    config = CheckpointConfig(interval=100, milestones=True)
    saved = {step for step in range(0, 1001) if config.should_save(step, final_step=1000)}
    # Pythia's released early checkpoints: steps 0 and 1, 2, 4, ... 512 (Biderman et al. 2023).
    pythia_early = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512}
    assert saved == pythia_early | set(range(100, 1001, 100))
    plain = CheckpointConfig(interval=3)
    assert [s for s in range(0, 8) if plain.should_save(s, final_step=7)] == [3, 6, 7]
    assert not CheckpointConfig(enabled=False).should_save(7, final_step=7)


@pytest.mark.parametrize(
    "field, value",
    [("interval", 0), ("keep_last", 0), ("max_staging_gb", 0), ("max_staging_gb", -1)],
)
def test_bad_checkpoint_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"checkpoint.{field}={value}"):
        CheckpointConfig(**{field: value})


def fake_checkpoint(storage, run_name: str, step: int, commit: bool = True) -> Manifest:
    """A checkpoint of two small files, committed (manifest written) or not."""
    files = []
    for name, data in (("a.pt", b"a" * (step + 1)), ("b.pt", b"b" * 7)):
        storage.put_bytes(join_key(checkpoint_key(run_name, step), name), data)
        path = Path(storage.uri(join_key(checkpoint_key(run_name, step), name)))
        files.append(FileEntry(name, len(data), sha256_file(path)))
    manifest = Manifest(
        run_name=run_name,
        step=step,
        tokens_seen=step * 10,
        topology={"tp": 1, "pp": 1, "dp": 1},
        model={"hidden_size": 8},
        config={"train.steps": 9},
        code_version="test",
        created="2026-01-01T00:00:00+00:00",
        files=files,
    )
    if commit:
        storage.put_bytes(manifest_key(run_name, step), manifest.to_json().encode())
    return manifest


def test_a_checkpoint_without_manifest_does_not_exist(tmp_path):
    storage = LocalStorage(tmp_path)
    first = fake_checkpoint(storage, "run", 1)
    fake_checkpoint(storage, "run", 2, commit=False)  # an upload that never finished
    fake_checkpoint(storage, "run-other", 3)
    assert [m.step for m in committed_checkpoints(storage, "run")] == [1]
    assert latest_checkpoint(storage, "run") == first
    assert read_manifest(storage, "run", 1) == first
    assert latest_checkpoint(storage, "nobody") is None
    found, manifest = checkpoint_from_uri(storage.uri(checkpoint_key("run", 1)))
    assert manifest == first and found.uri("") == str(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint_from_uri(str(tmp_path / "run" / "checkpoints"))


@pytest.mark.parametrize("name", ["../evil.pt", "/tmp/evil.pt", "sub/../../evil.pt", ".hidden", ""])
def test_a_manifest_naming_a_path_outside_the_checkpoint_is_rejected(tmp_path, name):
    """Names in a manifest come from the bucket: anything but a plain file name is refused
    before a byte is written, as a corrupt checkpoint (resume then falls back)."""
    storage = LocalStorage(tmp_path / "store")
    manifest = fake_checkpoint(storage, "run", 1)
    manifest.files.append(FileEntry(name, 2, "0" * 64))
    storage.put_bytes(join_key(checkpoint_key("run", 1), "x"), b"xx")  # something to fetch
    with pytest.raises(CorruptCheckpointError, match="not a plain file name"):
        download(storage, manifest, tmp_path / "dest" / "step", [name])
    assert not (tmp_path / "evil.pt").exists() and not (tmp_path / "dest").exists()
    bad_run = json.loads(manifest.to_json()) | {"run_name": "../other"}
    with pytest.raises(ValueError, match="not a plain name"):
        Manifest.from_json(json.dumps(bad_run))


class RecordingStorage(LocalStorage):
    def __init__(self, root):
        super().__init__(root)
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        super().delete(key)


@pytest.mark.parametrize("milestones, kept", [(True, [1, 2, 4, 5, 6]), (False, [5, 6])])
def test_retention_keeps_last_and_milestones_deleting_manifest_first(tmp_path, milestones, kept):
    storage = RecordingStorage(tmp_path)
    for step in range(1, 7):
        fake_checkpoint(storage, "run", step)
    config = CheckpointConfig(keep_last=2, milestones=milestones)
    deleted = prune(storage, "run", config.keep_last, config.is_milestone)
    assert [m.step for m in committed_checkpoints(storage, "run")] == kept
    assert deleted == sorted(set(range(1, 7)) - set(kept))
    for step in deleted:  # each: its manifest, then its files, before the next checkpoint
        folder = checkpoint_key("run", step)
        assert storage.deleted[:3] == [
            f"{folder}/manifest.json",
            f"{folder}/a.pt",
            f"{folder}/b.pt",
        ]
        del storage.deleted[:3]
    assert storage.list(checkpoint_key("run", deleted[0])) == []


def test_retention_deletes_orphans_older_than_the_newest_commit(tmp_path):
    """Files of a step without a manifest (a failed upload, a deletion cut short) go once a
    newer checkpoint is committed; an uncommitted step newer than it may be uploading, and
    stays, as do other runs' files."""
    storage = LocalStorage(tmp_path)
    fake_checkpoint(storage, "run", 1, commit=False)  # never committed
    fake_checkpoint(storage, "run", 2)
    storage.put_bytes(join_key(checkpoint_key("run", 1), "hf_fp16", "export.json"), b"{}")
    half_pruned = fake_checkpoint(storage, "run", 3)
    storage.delete(manifest_key("run", 3))
    storage.delete(join_key(checkpoint_key("run", 3), half_pruned.files[0].path))
    fake_checkpoint(storage, "run", 4)
    fake_checkpoint(storage, "run", 5, commit=False)  # in flight
    fake_checkpoint(storage, "run-2", 1, commit=False)  # another run's
    assert prune(storage, "run", keep_last=5, is_milestone=lambda step: False) == []
    remaining = {key.split("/")[2] for key in storage.list("run/")}
    assert remaining == {"step_00000002", "step_00000004", "step_00000005"}
    assert len(storage.list("run-2/")) == 2
    assert [m.step for m in committed_checkpoints(storage, "run")] == [2, 4]


def test_download_verifies_size_and_sha256(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    manifest = fake_checkpoint(storage, "run", 3)
    assert sorted(p.name for p in download(storage, manifest, tmp_path / "a").iterdir()) == [
        "a.pt",
        "b.pt",
    ]
    b = Path(storage.uri(join_key(checkpoint_key("run", 3), "b.pt")))
    b.write_bytes(b"c" * 7)  # same size, other bytes
    with pytest.raises(CorruptCheckpointError, match=r"step_00000003/b.pt: sha256 differs"):
        download(storage, manifest, tmp_path / "b")
    b.write_bytes(b"c" * 3)
    with pytest.raises(CorruptCheckpointError, match=r"b.pt: 3 bytes, the manifest says 7"):
        download(storage, manifest, tmp_path / "c", files=["b.pt"])
    b.unlink()
    with pytest.raises(CorruptCheckpointError, match=r"b.pt: missing"):
        download(storage, manifest, tmp_path / "d", files=["b.pt"])
    with pytest.raises(CorruptCheckpointError, match=r"z.pt: not listed in the manifest"):
        download(storage, manifest, tmp_path / "d", files=["z.pt"])


# Real runs: DeepSpeed engines under torchrun (gloo), the tiny model, a few steps.

TINY = [
    "launcher=torchrun",
    "model=tiny",
    "data.seq_len=32",
    "parallel.micro_batch_size=2",
    "train.peak_tflops=1.0",
    "optim.decay_steps=6",  # the same schedule whether a run stops at step 3 or 6
    "optim.warmup=0.2",
]


def run_args(tmp_path: Path, run_name: str, *overrides: str) -> list[str]:
    return [
        "jobs/pretrain.py",
        *TINY,
        f"run_name={run_name}",
        f"run_dir={tmp_path / 'runs' / run_name}",
        f"storage.root={tmp_path / 'store'}",
        *overrides,
    ]


def one_process(tmp_path: Path, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *run_args(tmp_path, run_name, *overrides)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )


# A dp=2 run (tests/layouts.py): 10 steps of 8 sequences (2 per micro batch, 2 micro batches),
# saving every step and keeping five. Resuming it exactly is tests/test_resume_matrix.py.
DP2 = (1, 1, 2)


@pytest.fixture
def dp2_copy(reference_runs, tmp_path) -> Path:
    """A copy of the dp=2 run's last checkpoint in `tmp_path/store`, as run `split`."""
    from layouts import RUN, STEPS

    reference = reference_runs(DP2)
    manifest = read_manifest(reference.storage, RUN, STEPS)
    storage = LocalStorage(tmp_path / "store")
    copy = dataclasses.replace(manifest, run_name="split")
    copy_checkpoint(reference.folder(STEPS), copy, storage)
    return tmp_path


def test_manifest_lists_every_rank_file_and_is_written_last(reference_runs):
    from layouts import RUN, STEPS

    reference = reference_runs(DP2)
    manifests = committed_checkpoints(reference.storage, RUN)
    assert [m.step for m in manifests] == list(range(STEPS - 4, STEPS + 1))  # keep_last=5
    manifest = manifests[-1]
    assert manifest.topology == {"tp": 1, "pp": 1, "dp": 2}
    assert manifest.tokens_seen == STEPS * 2 * 2 * 2 * 32  # steps x micro x accum x dp x seq
    assert manifest.model["hidden_size"] == 64
    assert manifest.config["train.steps"] == STEPS
    folder = reference.folder(STEPS)
    names = {entry.path for entry in manifest.files}
    assert {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "layer_00-model_00-model_states.pt",
    } <= names
    assert names | {"manifest.json"} == {p.name for p in folder.iterdir()}
    for entry in manifest.files:
        assert entry.size == (folder / entry.path).stat().st_size
        assert entry.sha256 == sha256_file(folder / entry.path)
    last_file = max((folder / name).stat().st_mtime_ns for name in names)
    assert (folder / "manifest.json").stat().st_mtime_ns >= last_file
    staging = reference.run_dir / "staging"
    assert not any(staging.rglob("*.pt"))  # uploaded shards are not kept locally


def test_resuming_with_another_global_batch_is_refused(dp2_copy):
    result = one_process(dp2_copy, "split", "train.steps=12")  # 2 sequences a step, saved 8
    assert result.returncode != 0, result.stdout[-2000:]
    assert "trained with a global batch of 8 sequences" in result.stderr
    assert "this run's is 2 (dp=1)" in result.stderr
    assert "resharded" not in result.stderr + result.stdout


def test_resuming_another_model_is_refused_naming_the_fields(dp2_copy):
    result = one_process(
        dp2_copy, "split", "train.steps=12", "parallel.grad_accum_steps=4", "model.num_layers=3"
    )
    assert result.returncode != 0, result.stdout[-2000:]
    assert "is of another model: model.num_layers=3 (saved: 2)" in result.stderr


def test_diverged_weights_are_not_saved(tmp_path):
    """lr=1e30 makes step 1's loss NaN: step 1's checkpoint (after the finite step 0) is the
    last one committed, and the run stops after two non-finite losses."""
    result = one_process(
        tmp_path,
        "diverge",
        "train.steps=10",
        "checkpoint.interval=1",
        "train.max_nonfinite_steps=2",
        "optim.lr=1e30",
        "optim.min_lr=1e30",
        "optim.warmup=0",
    )
    assert result.returncode != 0
    assert "the loss was not finite for 2 consecutive steps" in result.stderr
    assert "not saving step 2: its loss is not finite" in result.stdout + result.stderr
    storage = LocalStorage(tmp_path / "store")
    assert [m.step for m in committed_checkpoints(storage, "diverge")] == [1]
