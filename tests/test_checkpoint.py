"""Checkpoints: save policy, manifests, retention, and resuming real DeepSpeed runs exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from layouts import TINY, copy_checkpoint

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
from neoray.checkpoint.export import committed_manifest
from neoray.checkpoint.manifest import (
    MalformedManifestError,
    checkpoint_key,
    files_by_step,
    manifest_key,
    prune,
    sha256_file,
)
from neoray.config import ConfigError
from neoray.data.indexed import IndexedDatasetWriter, fingerprint, publish
from neoray.evaluation.testdata import commit_stand_in_checkpoint
from neoray.storage import LocalStorage, StorageConfig, join_key, open_storage

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


def cut_short(storage, run_name: str, step: int) -> str:
    """Truncate a committed checkpoint's manifest, as an interrupted write would; its URI."""
    key = manifest_key(run_name, step)
    storage.put_bytes(key, storage.get_bytes(key)[:40])
    return storage.uri(key)


def test_a_malformed_manifest_is_skipped_with_a_warning_and_named_when_asked_for(storage, caplog):
    """Cut-short manifests of an old step (1) and of the newest (4) next to a good one (3):
    listings, the latest checkpoint and `step=latest` take the good one, warning with each bad
    file's URI; asking for a malformed step by number fails naming its file."""
    for step in (1, 3, 4):
        commit_stand_in_checkpoint(storage, "run", step, created=0, final_step=4)
    old, newest = cut_short(storage, "run", 1), cut_short(storage, "run", 4)
    with caplog.at_level(logging.WARNING, logger="neoray.checkpoint.manifest"):
        assert [m.step for m in committed_checkpoints(storage, "run")] == [3]
        assert latest_checkpoint(storage, "run").step == 3
    assert old in caplog.text and newest in caplog.text
    config = getattr(storage, "config", None) or StorageConfig(root=storage.uri(""))
    assert committed_manifest("run", "latest", config)[1].step == 3
    with pytest.raises(MalformedManifestError, match=re.escape(old) + ": not a readable manifest"):
        committed_manifest("run", 1, config)
    with pytest.raises(MalformedManifestError, match=re.escape(newest)):
        checkpoint_from_uri(storage.uri(checkpoint_key("run", 4)))
    storage.put_bytes(manifest_key("run", 1), storage.get_bytes(manifest_key("run", 3)))
    with pytest.raises(MalformedManifestError, match="at step 3, not of this checkpoint"):
        read_manifest(storage, "run", 1)


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

RUN_SETTINGS = [
    "launcher=torchrun",
    *TINY,
    "optim.decay_steps=6",  # the same schedule whether a run stops at step 3 or 6
    "optim.warmup=0.2",
]


def run_args(tmp_path: Path, run_name: str, *overrides: str) -> list[str]:
    return [
        "jobs/pretrain.py",
        *RUN_SETTINGS,
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


def trained(tmp_path: Path, run_name: str, *overrides: str) -> str:
    """The output of `one_process`, which must succeed."""
    result = one_process(tmp_path, run_name, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


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


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_run_resumes_past_malformed_manifests_naming_them(tmp_path, kind, request):
    """Steps 1-3 committed, then the manifests of step 1 (old) and step 3 (the newest) cut
    short. The next start warns naming both, resumes from step 2, deletes step 3's manifest
    (training saves that step again), and retention later deletes step 1 like any old one."""
    settings = ["checkpoint.interval=1", "checkpoint.keep_last=3"]
    storage = LocalStorage(tmp_path / "store")
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")  # its environment reaches the job
        settings += ["storage=s3", f"storage.bucket={bucket}"]
        storage = open_storage(StorageConfig(kind="s3", bucket=bucket))
    first = one_process(tmp_path, "cut", "train.steps=3", *settings)
    assert first.returncode == 0, first.stderr[-3000:]
    old, newest = cut_short(storage, "cut", 1), cut_short(storage, "cut", 3)
    result = one_process(tmp_path, "cut", "train.steps=4", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"{old}: not a readable manifest" in output
    assert f"{newest}: not a readable manifest" in output
    assert "resumed run 'cut' at step 2" in output
    assert f"deleted {newest}: its checkpoint is corrupt" in output
    assert [m.step for m in committed_checkpoints(storage, "cut")] == [2, 3, 4]
    assert 1 not in files_by_step(storage, "cut")


def test_a_run_whose_every_manifest_is_malformed_is_refused_not_started_over(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    commit_stand_in_checkpoint(storage, "lost", 2, created=0, final_step=4)
    bad = cut_short(storage, "lost", 2)
    result = one_process(tmp_path, "lost", "train.steps=4")
    assert result.returncode != 0
    assert f"{bad}: not a readable manifest" in result.stdout + result.stderr
    assert "the manifests of its checkpoints at steps [2] cannot be read" in result.stderr
    assert storage.get_bytes(manifest_key("lost", 2)) == Path(bad).read_bytes()  # kept
    assert list(files_by_step(storage, "lost")) == [2]


def write_tokens(prefix: Path, seed: int, documents: int = 100) -> None:
    """Token files of random documents (ids within the tiny model's vocabulary)."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for _ in range(documents):
        writer.add_document(np.append(rng.integers(2, 1000, int(rng.integers(20, 80))), 0))
    writer.finish()
    publish(str(prefix))


def test_resuming_on_changed_token_files_is_refused_unless_accepted(tmp_path):
    """A run on a mixture of two components' token files commits step 2; `prose` is then
    re-tokenized into the same prefix. Resuming is refused before any weight is read, naming
    the component and both fingerprints; with data.accept_changed_data=[prose] it resumes,
    says so, and its next checkpoint records the new fingerprint."""
    root = tmp_path / "data"
    root.mkdir()
    write_tokens(root / "code", seed=0)
    write_tokens(root / "prose", seed=1)
    data = (
        "data=demo",
        f"data.root={root}",
        "data.tokenizer_training.vocab_size=1000",
        "train.eval_interval=0",
        "checkpoint.interval=2",
    )
    trained(tmp_path, "mix", "train.steps=2", *data)
    saved = fingerprint(str(root / "prose"))
    write_tokens(root / "prose", seed=2)
    now = fingerprint(str(root / "prose"))

    refused = one_process(tmp_path, "mix", "train.steps=4", *data)
    assert refused.returncode != 0
    changed = (
        f"data.components.prose ({root / 'prose'}.bin/.idx: fingerprint saved {saved}, now {now})"
    )
    assert changed in refused.stderr, refused.stderr[-3000:]
    assert "data.accept_changed_data=[prose]" in refused.stderr
    assert "resumed" not in refused.stdout + refused.stderr
    storage = LocalStorage(tmp_path / "store")
    assert latest_checkpoint(storage, "mix").step == 2

    accepted = "data.accept_changed_data=[prose]"
    output = trained(tmp_path, "mix", "train.steps=4", *data, accepted)
    assert "data.components.prose: token files changed since step 2" in output
    assert "resumed run 'mix' at step 2" in output
    manifest = latest_checkpoint(storage, "mix")
    assert manifest.step == 4
    assert manifest.data_fingerprint == {"code": fingerprint(str(root / "code")), "prose": now}


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own at tmp_path/disk (mounting one needs root), for a real full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)])
    if mount.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def resize(disk: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def used_bytes(disk: Path) -> int:
    stat = os.statvfs(disk)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_a_save_that_fills_the_disk_keeps_the_staged_checkpoint_it_would_supersede(
    tmp_path, small_disk
):
    """Storage is down (a file stands where the run's checkpoints go), so step 1 stays staged;
    the staging disk (a tmpfs) has room for one checkpoint and a half, so step 2's save fails
    for real (ENOSPC). The run stops saying so, step 1 stays staged intact, and the next start,
    with storage back and room on the disk, commits exactly those files and resumes from them."""
    settings = (f"checkpoint.staging_dir={small_disk}", "checkpoint.interval=1")
    down = tmp_path / "store" / "disk" / "checkpoints"
    down.parent.mkdir(parents=True)
    down.write_text("storage is down")
    sizing = one_process(tmp_path, "disk", "train.steps=1", *settings)
    assert "are not committed" in sizing.stderr, sizing.stderr[-3000:]
    one_checkpoint = used_bytes(small_disk)
    subprocess.run(["rm", "-rf", str(small_disk / "disk")], check=True)
    resize(small_disk, one_checkpoint * 3 // 2)

    full = one_process(tmp_path, "disk", "train.steps=2", *settings)
    assert full.returncode != 0
    assert "saving checkpoint step 2 of run 'disk' to" in full.stderr, full.stderr[-3000:]
    assert "MB free there" in full.stderr and "steps [1] stay staged" in full.stderr
    staging = small_disk / "disk" / "rank_00000"
    assert not (staging / "step_00000002").exists()  # what was written of it is deleted
    marker = json.loads((staging / "step_00000001.staged.json").read_text())
    staged = {p.name: p for p in (staging / "step_00000001").iterdir()}
    assert {name: path.stat().st_size for name, path in staged.items()} == marker["files"]
    digests = {name: sha256_file(path) for name, path in staged.items()}

    down.unlink()
    resize(small_disk, 64 << 20)
    again = one_process(tmp_path, "disk", "train.steps=2", *settings)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed run 'disk' at step 1" in again.stdout + again.stderr
    storage = LocalStorage(tmp_path / "store")
    assert [m.step for m in committed_checkpoints(storage, "disk")] == [1, 2]
    assert {e.path: e.sha256 for e in read_manifest(storage, "disk", 1).files} == digests
