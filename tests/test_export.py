"""Slim export: a DeepSpeed pipeline checkpoint of any (tp, pp) layout -> a Hugging Face dir.

Real engines train a few steps under torch.distributed (gloo), compute the loss of a held-out
batch and save with `engine.save_checkpoint`; the exported directory, loaded back (by us and
by transformers), must give the engine's loss to 1e-4 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from distributed import run_workers

from neoray.checkpoint.export import consolidate_checkpoint, export_directory, layer_files
from neoray.model.hf import load_hf
from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig
from neoray.parallel.convert import consolidate_directory
from neoray.train.config import OptimConfig, SyntheticDataConfig, TrainConfig
from neoray.train.data import SyntheticTokens

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

    import deepspeed

    from neoray.model import GPTNeoX
    from neoray.parallel.convert import load_full_state_dict, shard_path
    from neoray.parallel.pipeline import build_pipeline
    from neoray.parallel.topology import place_rank
    from neoray.train.engine import build_engine

    world = str(tp * pp * dp)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world
    )
    deepspeed.init_distributed(dist_backend="gloo")
    config = load_preset("tiny")
    parallel = ParallelConfig(tp=tp, pp=pp, dp=dp, micro_batch_size=MICRO)
    placement = place_rank(parallel)
    module = build_pipeline(config, placement, seed=3)
    # Start from one full state dict, as the parity tests do: the random init of a pipeline
    # seeds each tensor-parallel rank differently and draws final_layer_norm.weight at random
    # (init_weights matches "layernorm"), so the ranks' replicated copies would differ.
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
        manifest = {"format": 1, "step": STEPS, "model": vars(config), "config": {}}
        (Path(out) / TAG / "manifest.json").write_text(json.dumps(manifest))
        (Path(out) / "engine_loss.json").write_text(json.dumps(loss))


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 2)])
def test_export_reproduces_the_engine_loss(tmp_path, tp, pp, dp):
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


def test_half_precision_export_and_bad_directories(tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        export_directory(missing, tmp_path / "out")
    (missing / "manifest.json").write_text(json.dumps({"model": vars(load_preset("tiny"))}))
    with pytest.raises(FileNotFoundError, match="no DeepSpeed layer files"):
        consolidate_checkpoint(missing, load_preset("tiny"))
    assert not (tmp_path / "out").exists()
