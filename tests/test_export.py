"""Slim export: a DeepSpeed pipeline checkpoint of any (tp, pp) layout -> a Hugging Face dir.

Real engines train a few steps under torch.distributed (gloo), compute the loss of a held-out
batch and save with `engine.save_checkpoint`; the exported directory, loaded back (by us and
by transformers), must give the engine's loss to 1e-4 relative.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from distributed import run_workers

from neoray.checkpoint import Manifest, checkpoint_key
from neoray.checkpoint.export import (
    ExportConfig,
    check_output,
    consolidate_checkpoint,
    export_cached,
    export_directory,
    layer_files,
    resolve_export,
    run_export,
)
from neoray.checkpoint.manifest import file_entry
from neoray.config import ConfigError
from neoray.model.hf import load_hf
from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig
from neoray.parallel.convert import consolidate_directory
from neoray.storage import StorageConfig, open_storage
from neoray.training.config import OptimConfig, SyntheticDataConfig, TrainConfig
from neoray.training.data import SyntheticTokens

STEPS, SEQ_LEN, MICRO = 3, 32, 2
# Adam's eps is raised from 1e-8 as in test_parallel_parity: gradients that are zero in exact
# arithmetic would otherwise turn each tensor-parallel rank's rounding noise into steps of
# about lr, and the replicated copies (row-parallel biases) of the ranks would drift apart.
OPTIM = OptimConfig(lr=3e-3, eps=1e-6)
TAG = f"step_{STEPS:08d}"


def held_out_batch(vocab_size: int) -> torch.Tensor:
    data = SyntheticTokens(SyntheticDataConfig(seq_len=SEQ_LEN, seed=99), vocab_size)
    return torch.stack([torch.from_numpy(data[i]) for i in range(MICRO)])


def train_and_save(rank: int, tp: int, pp: int, dp: int, out: str) -> None:
    """Train STEPS steps, record the engine's held-out loss, save the checkpoint."""
    import os

    from neoray.model import GPTNeoX
    from neoray.parallel.convert import load_full_state_dict, shard_path
    from neoray.parallel.pipeline import build_pipeline
    from neoray.parallel.topology import place_rank
    from neoray.training.engine import build_engine, init_distributed

    world = str(tp * pp * dp)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world
    )
    init_distributed("gloo")
    config = load_preset("tiny")
    parallel = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch_size=MICRO)
    placement = place_rank(parallel)
    module = build_pipeline(config, placement, seed=3)
    # Start from one full state dict, as the parity tests do, so every layout trains the same
    # weights (a pipeline's own random init draws each stage and tensor-parallel rank apart).
    torch.manual_seed(0)
    full = GPTNeoX(config).state_dict()
    load_full_state_dict(module, full, config, placement.tp_rank, tp)
    engine = build_engine(module, parallel, OPTIM, TrainConfig(steps=STEPS))
    data = SyntheticTokens(SyntheticDataConfig(seq_len=SEQ_LEN, seed=5), config.vocab_size)

    def batches():
        i = placement.dp_rank * 1000
        while True:
            tokens = torch.stack([torch.from_numpy(data[i + j]) for j in range(MICRO)])
            i += MICRO
            yield tokens[:, :-1], tokens[:, 1:]

    stream = batches()
    for _ in range(STEPS):
        engine.train_batch(data_iter=stream)
    held_out = held_out_batch(config.vocab_size)
    loss = engine.eval_batch(iter([(held_out[:, :-1], held_out[:, 1:])])).item()
    engine.save_checkpoint(out, tag=TAG)
    if placement.dp_rank == 0:  # the engine's weights as the training code saves them
        path = shard_path(Path(out) / "final", placement.tp_rank, placement.pp_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(engine.module.state_dict(), path)
    if rank == 0:
        manifest = Manifest(
            run_name="local",
            step=STEPS,
            tokens_seen=0,
            topology={"tp": tp, "pp": pp, "dp": dp},
            model=vars(config),
            config={},
            code_version="test",
            created="2026-01-01T00:00:00Z",
        )
        (Path(out) / TAG / "manifest.json").write_text(manifest.to_json())
        (Path(out) / "engine_loss.json").write_text(json.dumps(loss))


def check_export_reproduces_the_engine_loss(tmp_path, tp, pp, dp):
    """Train and save on (tp, pp, dp) processes; the export's loss is the engine's."""
    run_workers(train_and_save, tp * pp * dp, tp, pp, dp, str(tmp_path), timeout=600)
    step_dir = tmp_path / TAG
    assert {rank for _, rank in layer_files(step_dir)} == set(range(tp))
    engine_loss = json.loads((tmp_path / "engine_loss.json").read_text())
    expected = consolidate_directory(tmp_path / "final", load_preset("tiny"))
    exported = consolidate_checkpoint(step_dir, load_preset("tiny"))
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name

    out = export_directory(step_dir, tmp_path / "hf", dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    batch = held_out_batch(load_preset("tiny").vocab_size)
    ours = load_hf(out).eval()
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        our_loss = ours(batch[:, :-1], batch[:, 1:]).item()
        logits = theirs(batch[:, :-1]).logits[..., : ours.config.vocab_size]
        their_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten()
        ).item()
    print(f"({tp},{pp},{dp}) engine {engine_loss:.6f} ours {our_loss:.6f} hf {their_loss:.6f}")
    assert abs(our_loss - engine_loss) / engine_loss < 1e-4
    assert abs(their_loss - engine_loss) / engine_loss < 1e-4
    return step_dir, out


def commit_to_storage(step_dir: Path, storage, run_name: str) -> Manifest:
    """Upload a checkpoint folder as training commits it: every file, then the manifest."""
    local = json.loads((step_dir / "manifest.json").read_text())
    files = [file_entry(p, p.name) for p in sorted(step_dir.iterdir()) if p.name != "manifest.json"]
    manifest = Manifest(
        run_name=run_name,
        step=local["step"],
        tokens_seen=0,
        topology={"tp": 2, "pp": 2, "dp": 2},
        model=local["model"],
        config={},
        code_version="test",
        created="2026-01-01T00:00:00Z",
        files=files,
    )
    for entry in files:
        storage.upload_file(
            step_dir / entry.path, f"{checkpoint_key(run_name, manifest.step)}/{entry.path}"
        )
    storage.put_bytes(
        f"{checkpoint_key(run_name, manifest.step)}/manifest.json", manifest.to_json().encode()
    )
    return manifest


@pytest.mark.slow
def test_export_of_a_2x2x2_checkpoint_gives_the_engine_loss_and_is_published(tmp_path, s3_bucket):
    step_dir, local_export = check_export_reproduces_the_engine_loss(tmp_path, 2, 2, 2)
    storage = open_storage(StorageConfig(kind="s3", bucket=s3_bucket, prefix="runs"))
    manifest = commit_to_storage(step_dir, storage, "run-a")
    uri = storage.uri(checkpoint_key("run-a", manifest.step))

    first = resolve_export(
        ExportConfig(checkpoint=uri, dtype="fp32", cache_dir=str(tmp_path / "c1"))
    )
    assert (first.run_name, first.step) == ("run-a", STEPS)
    weights = (first.hf_dir / "model.safetensors").read_bytes()
    assert weights == (local_export / "model.safetensors").read_bytes()
    published = f"{checkpoint_key('run-a', STEPS)}/hf_fp32"
    assert storage.exists(f"{published}/export.json")

    # A published export whose weights were changed, or whose export.json names a path out of
    # the destination, is not used: the export is built again from the verified shards.
    storage.put_bytes(f"{published}/model.safetensors", weights[: len(weights) // 2])
    redone = resolve_export(
        ExportConfig(checkpoint=uri, dtype="fp32", cache_dir=str(tmp_path / "c3"))
    )
    assert (redone.hf_dir / "model.safetensors").read_bytes() == weights
    assert storage.get_bytes(f"{published}/model.safetensors") == weights  # published again
    listing = json.loads(storage.get_bytes(f"{published}/export.json"))
    listing["files"]["../../escaped"] = listing["files"]["config.json"]
    storage.put_bytes(f"{published}/export.json", json.dumps(listing).encode())
    storage.put_bytes(f"{checkpoint_key('run-a', STEPS)}/escaped", b"{}")
    redone = resolve_export(
        ExportConfig(checkpoint=uri, dtype="fp32", cache_dir=str(tmp_path / "c4" / "cache"))
    )
    assert (redone.hf_dir / "model.safetensors").read_bytes() == weights
    assert not list(tmp_path.rglob("escaped"))

    # Another machine takes the published export; the shards are not needed any more.
    for entry in manifest.files:
        storage.delete(f"{checkpoint_key('run-a', STEPS)}/{entry.path}")
    config = ExportConfig(
        checkpoint="run-a", step="latest", dtype="fp32", cache_dir=str(tmp_path / "c2")
    )
    second = resolve_export(config, StorageConfig(kind="s3", bucket=s3_bucket, prefix="runs"))
    assert (second.hf_dir / "model.safetensors").read_bytes() == weights


def test_half_precision_export_and_bad_directories(tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        export_directory(missing, tmp_path / "out")
    (missing / "manifest.json").write_text(json.dumps({"model": vars(load_preset("tiny"))}))
    with pytest.raises(FileNotFoundError, match="no DeepSpeed layer files"):
        consolidate_checkpoint(missing, load_preset("tiny"))
    assert not (tmp_path / "out").exists()


def pretrain_two_steps(root: Path, run_dir: Path, seed: int) -> Path:
    """Run `X` trained for two steps from the initial weights of `seed`; its step-2 folder."""
    result = subprocess.run(
        [
            sys.executable,
            "jobs/pretrain.py",
            "launcher=torchrun",
            "run_name=X",
            "train.steps=2",
            f"train.seed={seed}",
            "data.seq_len=32",
            "train.peak_tflops=1.0",
            "tracking.enabled=false",
            f"storage.root={root}",
            f"run_dir={run_dir}",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / checkpoint_key("X", 2)


@pytest.mark.slow
def test_a_run_retrained_under_its_name_exports_its_new_weights(tmp_path, s3_bucket):
    """Train X, export it (cached, published and copied to output=), delete the run, train X
    again from other initial weights: every export of step 2 is of the new weights."""
    root, cache = tmp_path / "runs", str(tmp_path / "exports")
    s3_config = StorageConfig(kind="s3", bucket=s3_bucket, prefix="runs")
    s3 = open_storage(s3_config)
    exported = []
    for seed in (1, 2):
        shutil.rmtree(root, ignore_errors=True)  # the run deleted
        step_dir = pretrain_two_steps(root, tmp_path / "run", seed)
        truth = export_directory(step_dir, tmp_path / f"truth{seed}", "fp32").joinpath(
            "model.safetensors"
        )
        # S3: retention deletes a checkpoint's listed files and leaves its published export
        for key in s3.list(checkpoint_key("X", 2)):
            if "/hf_" not in key:
                s3.delete(key)
        commit_to_storage(step_dir, s3, "X")
        exports = [
            run_export(ExportConfig(checkpoint=str(step_dir), dtype="fp32", cache_dir=cache)),
            run_export(
                ExportConfig(
                    checkpoint=str(step_dir),
                    dtype="fp32",
                    cache_dir=cache,
                    output=str(tmp_path / "out"),  # the second export replaces the first
                )
            ),
            run_export(
                ExportConfig(checkpoint="X", step="2", dtype="fp32", cache_dir=cache),
                StorageConfig(root=str(root)),
            ),
            run_export(
                ExportConfig(
                    checkpoint=s3.uri(checkpoint_key("X", 2)), dtype="fp32", cache_dir=cache
                )
            ),
            run_export(
                ExportConfig(checkpoint="X", step="latest", dtype="fp32", cache_dir=cache + "2"),
                s3_config,
            ),
        ]
        # Three exports of the same checkpoint at once into an empty cache: one is published,
        # the others find it there; none fails on the rename.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            racing = [
                pool.submit(export_cached, step_dir, tmp_path / f"race{seed}", "fp32")
                for _ in range(3)
            ]
            exports += [future.result().hf_dir for future in racing]
        for hf_dir in exports:
            assert (hf_dir / "model.safetensors").read_bytes() == truth.read_bytes(), hf_dir
        exported.append(truth.read_bytes())
    assert exported[0] != exported[1]


def test_output_that_is_not_an_export_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's files")
    never = ExportConfig(checkpoint=str(tmp_path / "no-such-checkpoint"), output=str(mine))
    with pytest.raises(ConfigError, match=r"output=.*mine exists and is not an export"):
        run_export(never)
    with pytest.raises(ConfigError, match="is not an export"):
        run_export(ExportConfig(checkpoint="x", step="1", output="."))  # the working directory
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    # An export.json that is not ours, or an export with the user's files beside it: refused,
    # nothing deleted.
    (mine / "export.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not an export"):
        run_export(never)
    listing = {"files": {"model.safetensors": "0" * 64}, "checkpoint": {"id": "1"}}
    (mine / "export.json").write_text(json.dumps(listing))
    (mine / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"files it did not write \(notes.txt\)"):
        run_export(never)
    assert sorted(p.name for p in mine.iterdir()) == [
        "export.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert (mine / "notes.txt").read_text() == "the user's files"


def test_an_empty_or_exported_output_folder_is_accepted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty) == empty
    listing = {"files": {"config.json": "0" * 64}, "checkpoint": {"id": "1"}}
    (empty / "export.json").write_text(json.dumps(listing))
    (empty / "config.json").write_text("{}")
    assert check_output(empty) == empty  # an earlier export, replaced
