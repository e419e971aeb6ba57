"""Shared fixtures. Services (S3, MLflow, Ray) are started by the fixtures that need them."""

import pytest
import torch
import transformers

from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.hf import save_hf

# Parallel and sequential residual, rotary on a quarter, all or half of each head, odd head counts.
CONFIGS = {
    "parallel_rot25": NeoXConfig(
        vocab_size=1000, num_layers=3, hidden_size=96, num_heads=6, max_seq_len=96
    ),
    "sequential_rot100_5heads": NeoXConfig(
        vocab_size=700,
        num_layers=2,
        hidden_size=80,
        num_heads=5,
        max_seq_len=96,
        rotary_pct=1.0,
        parallel_residual=False,
    ),
    "parallel_rot50_3heads_ffn100": NeoXConfig(
        vocab_size=300,
        num_layers=2,
        hidden_size=48,
        num_heads=3,
        max_seq_len=96,
        rotary_pct=0.5,
        intermediate_size=100,
        rotary_base=500.0,
        vocab_multiple=64,
    ),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    """A random neoray model and the same weights loaded by transformers from our export."""
    torch.manual_seed(0)
    ours = GPTNeoX(CONFIGS[request.param]).eval()
    out = save_hf(ours, tmp_path_factory.mktemp("hf") / request.param)
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    return ours, theirs
