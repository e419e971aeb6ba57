"""The GPT-NeoX module against an independent implementation: `transformers`' GPTNeoX."""

import math

import pytest
import torch
import torch.nn.functional as F

from neoray.config import ConfigError
from neoray.model import GPTNeoX, NeoXConfig, loss
from neoray.model.hf import transformers_name
from neoray.model.loss import linear_cross_entropy


def test_logits_match_transformers(pair):
    ours, theirs = pair
    idx = torch.randint(0, ours.config.vocab_size, (3, 64))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_loss_and_gradients_match_transformers(pair):
    """Our fused output-layer loss gives HF's loss and HF's gradients on every parameter."""
    ours, theirs = pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 48))
    targets = idx[:, 1:].clone()
    targets[0, :5] = -100
    labels = torch.cat([idx[:, :1], targets], dim=1)  # HF shifts labels itself
    ours.zero_grad()
    theirs.zero_grad()
    our_loss = ours(idx[:, :-1], targets)
    their_loss = theirs(idx, labels=labels).loss
    our_loss.backward()
    their_loss.backward()
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(
            p.grad, theirs_grads[transformers_name(name)].grad, rtol=1e-4, atol=1e-6, msg=name
        )


@pytest.mark.parametrize("chunk_rows", [128, 5000])
def test_fused_cross_entropy_equals_plain_cross_entropy(monkeypatch, chunk_rows):
    monkeypatch.setattr(loss, "CHUNK_BYTES", chunk_rows * 200 * 4)  # 11 chunks, then one
    torch.manual_seed(1)
    hidden = torch.randn(1300, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(200, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 200, (1300,))
    targets[::9] = -100
    fused = linear_cross_entropy(hidden, weight, targets)
    (2.5 * fused).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.T, targets)
    (2.5 * plain).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    torch.testing.assert_close(fused_grads[1], weight.grad)


def test_activation_checkpointing_changes_nothing():
    torch.manual_seed(2)
    config = NeoXConfig(vocab_size=256, num_layers=4, hidden_size=32, num_heads=4, max_seq_len=32)
    plain = GPTNeoX(config)
    chunked = GPTNeoX(NeoXConfig(**{**config.__dict__, "checkpoint_activations": 2}))
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 32))
    losses = [m(idx, idx.roll(-1, 1)) for m in (plain, chunked)]
    for value in losses:
        value.backward()
    assert losses[0].item() == losses[1].item()
    for a, b in zip(plain.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_neox_initialization_scales():
    config = NeoXConfig(vocab_size=4096, num_layers=8, hidden_size=256, num_heads=4, max_seq_len=16)
    model = GPTNeoX(config)
    small = math.sqrt(2 / (5 * 256))
    wang = 2 / (8 * math.sqrt(256))
    layer = model.layers[0]
    assert model.embed_in.weight.std().item() == pytest.approx(small, rel=0.03)
    assert layer.attention.query_key_value.weight.std().item() == pytest.approx(small, rel=0.03)
    assert layer.attention.dense.weight.std().item() == pytest.approx(wang, rel=0.03)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(wang, rel=0.03)
    assert layer.attention.query_key_value.bias.abs().max().item() == 0.0
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.final_layer_norm):
        assert norm.weight.min().item() == norm.weight.max().item() == 1.0
        assert norm.bias.abs().max().item() == 0.0


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"hidden_size": 100, "num_heads": 3}, "model.num_heads"),
        ({"hidden_size": 64, "num_heads": 4, "rotary_pct": 0.1}, "rotary_pct"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"rotary_pct": 1.5}, "model.rotary_pct"),
    ],
)
def test_bad_config_names_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        NeoXConfig(
            **{"vocab_size": 100, "num_layers": 1, "hidden_size": 64, "num_heads": 4, **fields}
        )


def test_sequence_longer_than_max_is_refused():
    model = GPTNeoX(
        NeoXConfig(vocab_size=100, num_layers=1, hidden_size=32, num_heads=2, max_seq_len=16)
    )
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
