"""The model's layers built with a tensor-parallel group against the single-process model: same
loss, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_workers
from torch import nn

from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.gpt_neox import Layer
from neoray.parallel.convert import consolidate, shard, split_dim, to_plain_name
from neoray.parallel.pipeline import EmbeddingStage, FinalNormStage, NextTokenLoss, OutputStage

CONFIGS = {
    "parallel_residual": NeoXConfig(
        vocab_size=500, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=32
    ),
    "sequential_residual": NeoXConfig(
        vocab_size=500,
        num_layers=2,
        hidden_size=48,
        num_heads=2,
        max_seq_len=32,
        rotary_pct=1.0,
        parallel_residual=False,
    ),
}


def stages(config: NeoXConfig, group) -> nn.Sequential:
    """The pipeline's stage list run in one place (submodule names match the pipeline's)."""
    return nn.Sequential(
        EmbeddingStage(config, group),
        *(Layer(config, i, group) for i in range(config.num_layers)),
        FinalNormStage(config),
        OutputStage(config, group),
    )


def tp_worker(rank: int, config: NeoXConfig, full: dict, inputs, targets, out: str) -> None:
    world = dist.get_world_size()
    model = stages(config, dist.new_group(list(range(world))))
    model.load_state_dict(shard(full, config, rank, world))
    loss_fn = NextTokenLoss(model[-1].embed_out.group)  # the pipeline's loss
    loss_fn.output = model[-1].embed_out
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_parallel_matches_single_process(name, tmp_path):
    config = CONFIGS[name]
    torch.manual_seed(0)
    reference = GPTNeoX(config)
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    inputs = torch.randint(0, config.vocab_size, (2, 16))
    targets = torch.randint(0, config.vocab_size, (2, 16))
    targets[0, 3] = -100  # an ignored position
    expected = reference(inputs, targets)
    expected.backward()

    run_workers(tp_worker, 2, config, full, inputs, targets, str(tmp_path), timeout=120)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        torch.testing.assert_close(result["loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    grads = consolidate({(r, 0): results[r]["grads"] for r in range(2)}, config)
    for param_name, param in reference.named_parameters():
        torch.testing.assert_close(
            grads[param_name], param.grad, rtol=1e-4, atol=1e-6, msg=param_name
        )
    # Replicated parameters (layernorms, the row-parallel biases) get the same gradient on
    # every rank.
    replicated = [
        name for name in results[1]["grads"] if split_dim(to_plain_name(name, config)) is None
    ]
    assert any(name.endswith("dense_4h_to_h.bias") for name in replicated)
    for pipeline_name in replicated:
        torch.testing.assert_close(
            results[1]["grads"][pipeline_name], results[0]["grads"][pipeline_name]
        )


def test_shard_and_consolidate_round_trip():
    config = CONFIGS["parallel_residual"]
    full = GPTNeoX(config).state_dict()
    for tp in (1, 2, 4):
        shards = {(r, 0): shard(full, config, r, tp) for r in range(tp)}
        back = consolidate(shards, config)
        assert back.keys() == full.keys()
        for key, value in full.items():
            assert torch.equal(back[key], value), key
