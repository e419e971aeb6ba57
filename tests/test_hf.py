"""Reading and writing Hugging Face GPTNeoX checkpoints, including what must be refused."""

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.hf import CheckpointError, load_hf, save_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A checkpoint written by transformers itself, from a model transformers initialised."""
    torch.manual_seed(3)
    config = transformers.GPTNeoXConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=200,
        rotary_pct=0.5,
        rotary_emb_base=10000,
        max_position_embeddings=64,
        use_parallel_residual=False,
        tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("theirs") / "model"
    model.save_pretrained(path)
    return path, model


def test_hf_checkpoint_loads_into_ours(hf_dir):
    path, theirs = hf_dir
    ours = load_hf(path).eval()
    assert not ours.config.parallel_residual and ours.config.rotary_pct == 0.5
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


def test_round_trip_keeps_every_tensor_and_dtype(tmp_path):
    model = GPTNeoX(
        NeoXConfig(vocab_size=300, num_layers=2, hidden_size=32, num_heads=2, max_seq_len=32)
    )
    out = save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_hf(out, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=name)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_legacy_pickle_free_bin_and_old_buffers(tmp_path, hf_dir):
    """Older hub checkpoints: pytorch_model.bin (read with weights_only) and stored buffers."""
    path, theirs = hf_dir
    state = load_file(path / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(state, legacy / "pytorch_model.bin")
    ours = load_hf(legacy).eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


def _copy_with(src, dst, *, drop=(), add=None, reshape=None, config=None):
    """A copy of checkpoint `src` with tensors dropped, added or reshaped, or config edited."""
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    for name in drop:
        del state[name]
    state.update(add or {})
    for name, shape in (reshape or {}).items():
        state[name] = torch.zeros(shape)
    save_file(state, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"drop": ["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]},
            "missing tensors.*layers.1.mlp.dense_h_to_4h.bias",
        ),
        (
            {"add": {"gpt_neox.layers.0.extra.weight": torch.zeros(2)}},
            "unexpected tensors.*layers.0.extra.weight",
        ),
        (
            {"reshape": {"gpt_neox.layers.0.attention.dense.weight": (64, 32)}},
            "attention.dense.weight has shape",
        ),
        ({"config": {"tie_word_embeddings": True}}, "tie_word_embeddings"),
        ({"config": {"hidden_act": "relu"}}, "hidden_act='relu'"),
        ({"config": {"model_type": "llama"}}, "model_type"),
        ({"config": {"num_attention_heads": 5}}, "num_heads"),
        ({"config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, "rope type"),
    ],
)
def test_bad_checkpoints_are_refused_by_name(tmp_path, hf_dir, edit, message):
    path, _ = hf_dir
    bad = _copy_with(path, tmp_path / "bad", **edit)
    with pytest.raises(ValueError, match=message):
        load_hf(bad)


def test_missing_files_and_fields_are_refused(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="required field 'vocab_size' is missing"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_failed_export_leaves_nothing(tmp_path):
    model = GPTNeoX(
        NeoXConfig(vocab_size=100, num_layers=1, hidden_size=16, num_heads=2, max_seq_len=8)
    )
    with pytest.raises(FileNotFoundError):
        save_hf(model, tmp_path / "out", tokenizer=tmp_path / "no-such-tokenizer.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=64, num_heads=4, rotary_pct=0.25, mup_base_width=32),
        dict(
            hidden_size=96, num_heads=3, rotary_pct=1.0, mup_base_width=24, parallel_residual=False
        ),
        dict(hidden_size=48, num_heads=6, rotary_pct=0.5, mup_base_width=48),
    ],
)
def test_mup_model_exports_to_a_standard_gptneox_with_equal_logits(tmp_path, shape):
    """muP's attention 1/head_dim and logits multiplier are folded into the query weights and
    the output embedding: transformers' GPTNeoX computes the same logits, and reading the
    export back gives a standard model."""
    config = NeoXConfig(
        vocab_size=300, num_layers=2, max_seq_len=64, parametrization="mup", **shape
    )
    torch.manual_seed(1)
    ours = GPTNeoX(config).eval()
    with torch.no_grad():  # biases and muP's output embedding start at zero: make them count
        for name, p in ours.named_parameters():
            if name.endswith("bias") or name == "embed_out.weight":
                p.normal_(0.0, 0.1)
    out = save_hf(ours, tmp_path / "mup")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["hidden_size"] == shape["hidden_size"]
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    back = load_hf(out).eval()
    assert back.config.parametrization == "standard"
    idx = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        expected = ours(idx)
        assert (theirs(idx).logits - expected).abs().max().item() <= 1e-4
        assert (back(idx) - expected).abs().max().item() <= 1e-4
        # The folding is not a no-op: the same weights read as a standard model differ.
        standard = GPTNeoX(dataclasses.replace(config, parametrization="standard")).eval()
        standard.load_state_dict(ours.state_dict())
        assert (standard(idx) - expected).abs().max().item() > 1e-2
