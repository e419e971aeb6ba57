"""`train.compile`: compiled transformer layers compute what the eager ones do."""

import os

import torch
from distributed import run_workers

from neoray.model.gpt_neox import Layer, NeoXConfig
from neoray.parallel.config import ParallelConfig
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank
from neoray.training.engine import init_distributed

CONFIG = NeoXConfig(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=64)


def _compiled_matches_eager(rank: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # read by PipelineModule
    init_distributed("gloo")  # joins the group run_workers made
    placement = place_rank(ParallelConfig(micro_batch_size=2))
    eager = build_pipeline(CONFIG, placement, seed=7)
    compiled = build_pipeline(CONFIG, placement, seed=7, compile_layers=True)
    assert [name for name, _ in compiled.named_parameters()] == [
        name for name, _ in eager.named_parameters()
    ], "compiling must not rename parameters (checkpoints and conversion rely on them)"
    # Compiled layers run their modules inside a compiled region (traced by torch.compile).
    traced = []
    for layer in compiled.forward_funcs:
        if isinstance(layer, Layer):
            layer.mlp.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    tokens = torch.randint(
        0, CONFIG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)
    )
    losses = []
    for module in (eager, compiled):
        loss = module.loss_fn(module(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert traced and all(traced), traced
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_layers_match_eager():
    run_workers(_compiled_matches_eager, 1, timeout=300)
