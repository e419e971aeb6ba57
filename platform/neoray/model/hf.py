"""Hugging Face `transformers` GPTNeoX checkpoints: write them and read them, without pickle.

A neoray model and a `GPTNeoXForCausalLM` share parameter names (ours lack the `gpt_neox.`
prefix), so conversion is a rename plus a config translation. Everything is validated
before a model is built: a bad directory raises an error that names the tensor or field,
and never leaves a half-loaded model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neoray.model.gpt_neox import GPTNeoX, NeoXConfig
from neoray.model.mup import standard_weights

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
# Buffers that older GPTNeoX checkpoints stored; they are recomputed, not loaded.
_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
# The output embedding is `embed_out` on the hub and `lm_head` in some saved copies.
_LM_HEAD_ALIASES = {"lm_head.weight": "embed_out.weight"}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, inconsistent or of an unsupported kind."""


def hf_name(name: str) -> str:
    """The on-disk Hugging Face name of one of our parameters."""
    return name if name.startswith("embed_out.") else f"gpt_neox.{name}"


def from_hf_name(key: str) -> str | None:
    """Our name of a tensor stored under `key` in a Hugging Face GPTNeoX checkpoint; None
    for the buffers that older checkpoints stored and that are recomputed instead."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    return _LM_HEAD_ALIASES.get(key, key).removeprefix("gpt_neox.")


def transformers_name(name: str) -> str:
    """The name of one of our parameters in a loaded `GPTNeoXForCausalLM`.

    In memory transformers calls the output embedding `lm_head` (on disk: `embed_out`).
    """
    return hf_name(name).replace("embed_out.", "lm_head.", 1)


def to_hf_config(config: NeoXConfig, dtype: torch.dtype) -> dict:
    """The `config.json` of a GPTNeoXForCausalLM with the same shape as `config` (a standard
    one: a muP model's weights are converted first, see `neoray.model.mup.standard_weights`)."""
    if config.parametrization != "standard":
        raise ValueError("to_hf_config: fold muP into the weights first (standard_weights)")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.ffn_size,
        "hidden_act": "gelu",
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_base,
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.parallel_residual,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def from_hf_config(hf: dict) -> NeoXConfig:
    """Our config for a GPTNeoX `config.json`; unsupported variants are refused by field."""
    if hf.get("model_type") != "gpt_neox":
        raise CheckpointError(
            f"config.json: model_type is {hf.get('model_type')!r}, expected 'gpt_neox'"
        )
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "gelu"), "gelu"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
        "attention_bias": (hf.get("attention_bias", True), True),
    }
    # transformers 4 writes `rope_scaling` (with `type`), 5 writes `rope_parameters` (`rope_type`)
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_types = {rope.get("type", "default"), rope.get("rope_type", "default")} - {"default"}
    unsupported["rope type"] = (rope_types.pop() if rope_types else "default", "default")
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise CheckpointError(
                f"config.json: {field}={value!r} is not supported (only {supported!r})"
            )
    try:
        return NeoXConfig(
            vocab_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf.get("intermediate_size"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
            rotary_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
            parallel_residual=hf.get("use_parallel_residual", True),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            vocab_multiple=1,  # the checkpoint's vocab is already padded as it was trained
        )
    except KeyError as err:
        raise CheckpointError(f"config.json: required field {err.args[0]!r} is missing") from err


def to_transformers(model: GPTNeoX):
    """A `transformers.GPTNeoXForCausalLM` in memory with `model`'s shape and weights."""
    import transformers

    dtype = next(model.parameters()).dtype
    weights, config = standard_weights(model.state_dict(), model.config)
    theirs = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**to_hf_config(config, dtype))
    ).to(dtype)
    state = {transformers_name(k): v for k, v in weights.items()}
    theirs.load_state_dict(state, strict=True)
    return theirs


def save_hf(
    model: GPTNeoX,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a directory `GPTNeoXForCausalLM.from_pretrained` loads (a muP model
    as the standard GPTNeoX that computes the same logits, `neoray.model.mup.standard_weights`).

    `tokenizer` is a `tokenizer.json` path to ship alongside. The directory is assembled
    under a temporary name and renamed into place, so a crash never leaves a partial one.
    """
    out = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype
    weights, config = standard_weights(model.state_dict(), model.config)  # muP folded in
    state = {hf_name(k): v.detach().to(dtype).contiguous() for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(to_hf_config(config, dtype), indent=2))
        if tokenizer is not None:
            _write_tokenizer_files(Path(tokenizer), staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_tokenizer_files(tokenizer_json: Path, out: Path) -> None:
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    specials = {t["content"] for t in vocab.get("added_tokens", []) if t.get("special")}
    eos = "<|endoftext|>" if "<|endoftext|>" in specials else None
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": "<|padding|>" if "<|padding|>" in specials else eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).exists():
        return load_file(path / WEIGHTS_FILE)
    if (path / WEIGHTS_INDEX_FILE).exists():
        index = json.loads((path / WEIGHTS_INDEX_FILE).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / LEGACY_WEIGHTS_FILE).exists():
        return torch.load(path / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise CheckpointError(
        f"{path}: no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {LEGACY_WEIGHTS_FILE}"
    )


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GPTNeoX:
    """Read a Hugging Face GPTNeoX directory (ours or the hub's) into a `GPTNeoX`."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json not found")
    config = from_hf_config(json.loads((path / "config.json").read_text()))
    found = {hf_name(ours): v for k, v in _read_weights(path).items() if (ours := from_hf_name(k))}

    with torch.device("meta"):
        expected = {hf_name(k): v.shape for k, v in GPTNeoX(config).state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}"
        )
    for name, shape in expected.items():
        if found[name].shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(found[name].shape)}, expected {tuple(shape)}"
            )

    model = GPTNeoX(config)
    model.load_state_dict({k.removeprefix("gpt_neox."): v for k, v in found.items()})
    return model.to(dtype)
