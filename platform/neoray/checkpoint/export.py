"""Slim export: a committed training checkpoint of any (tp, pp) layout -> one Hugging Face dir.

A checkpoint step directory holds what DeepSpeed's `PipelineEngine.save_checkpoint` wrote:
one `layer_<LL>-model_<TT>-model_states.pt` per pipeline layer LL and tensor-parallel rank TT
(that layer's state dict, names without the layer prefix), optimizer states (not needed
here) and `manifest.json` with the model config. The layer files are read without pickle
(`weights_only`), joined into the full `GPTNeoX` state dict by `neoray.parallel.convert`
and written by `neoray.model.hf.save_hf` (`config.json`, `model.safetensors` in the chosen
dtype, the tokenizer) under a temporary name, then renamed: the "slim checkpoint" of the
GPT-NeoX-20B paper, which `transformers` and lm-eval load directly.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from neoray.config import ConfigError
from neoray.model.gpt_neox import GPTNeoX, NeoXConfig
from neoray.model.hf import save_hf
from neoray.parallel.convert import consolidate

MANIFEST = "manifest.json"
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportConfig:
    """conf/export.yaml: which checkpoint, in which dtype, with which tokenizer, to where."""

    checkpoint: str  # a step directory (local or s3://...), or <run_name> with step=
    step: str | None = None  # with a run name: a step number or "latest"
    output: str | None = None  # a local directory; None: the local cache (cache_dir)
    dtype: str = "fp16"
    tokenizer: str | None = None  # tokenizer.json or a name; None: the run's data.tokenizer
    cache_dir: str = "runs/exports"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"export.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")


def layer_files(step_dir: Path) -> dict[tuple[int, int], Path]:
    """(pipeline layer, tensor-parallel rank) -> its model-states file in `step_dir`."""
    found = {}
    for path in step_dir.iterdir():
        if match := LAYER_FILE.fullmatch(path.name):
            found[int(match[1]), int(match[2])] = path
    if not found:
        raise FileNotFoundError(
            f"{step_dir}: no DeepSpeed layer files (layer_<LL>-model_<TT>-model_states.pt)"
        )
    return found


def read_model_config(step_dir: Path) -> NeoXConfig:
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{step_dir}: no {MANIFEST}; it is not a committed checkpoint")
    return NeoXConfig(**json.loads(manifest.read_text())["model"])


def consolidate_checkpoint(step_dir: str | Path, config: NeoXConfig) -> dict[str, torch.Tensor]:
    """The full `GPTNeoX` state dict of a DeepSpeed pipeline checkpoint directory."""
    by_rank: dict[tuple[int, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for (layer, tp_rank), path in sorted(layer_files(Path(step_dir)).items()):
        state = torch.load(path, map_location="cpu", weights_only=True)
        by_rank[tp_rank, 0].update({f"{layer}.{name}": value for name, value in state.items()})
    full = consolidate(by_rank, config)
    with torch.device("meta"):
        expected = GPTNeoX(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{step_dir}: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")
    return full


def tokenizer_file(spec: str) -> Path:
    """A `tokenizer.json` path for a path or the name of a tokenizer neoray ships."""
    from neoray.tokenizer.load import RELEASED_20B, released_20b_path

    path = Path(released_20b_path() if spec == RELEASED_20B else spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: {path} is not a tokenizer.json file")
    return path


def export_directory(
    step_dir: str | Path, out_dir: str | Path, dtype: str = "fp16", tokenizer: str | None = None
) -> Path:
    """Write the Hugging Face directory of the local checkpoint `step_dir` to `out_dir`.

    Without `tokenizer`, the run's `data.tokenizer` (from the manifest's config) is shipped.
    """
    step_dir = Path(step_dir)
    config = read_model_config(step_dir)
    if tokenizer is None:
        run_config = json.loads((step_dir / MANIFEST).read_text()).get("config", {})
        tokenizer = run_config.get("data.tokenizer")
    full = consolidate_checkpoint(step_dir, config)
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.load_state_dict(full, assign=True)
    return save_hf(
        model,
        out_dir,
        tokenizer=tokenizer_file(tokenizer) if tokenizer else None,
        dtype=DTYPES[dtype],
    )


@dataclass
class Export:
    """A slim export on local disk and the run and step it was taken from."""

    hf_dir: Path
    run_name: str
    step: int


def export_cached(step_dir: str | Path, cache_dir: str | Path, dtype: str = "fp16") -> Export:
    """The export of checkpoint `step_dir`, written once under
    `<cache_dir>/<run_name>/step_<step>/hf_<dtype>` and reused by later calls."""
    step_dir = Path(step_dir)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    run_name = manifest.get("run_name") or step_dir.parent.parent.name
    step = int(manifest["step"])
    out = Path(cache_dir) / run_name / f"step_{step:08d}" / f"hf_{dtype}"
    if not (out / "config.json").is_file():
        export_directory(step_dir, out, dtype=dtype)
    return Export(out, run_name, step)


def run_export(cfg: ExportConfig) -> Path:
    """`jobs/export.py`: export the checkpoint into `cfg.output` (or the cache)."""
    step_dir = Path(cfg.checkpoint)
    if not (step_dir / MANIFEST).is_file():
        raise ConfigError(
            f"checkpoint={cfg.checkpoint!r}: not a committed checkpoint directory (no {MANIFEST})"
        )
    if cfg.output is None:
        return export_cached(step_dir, cfg.cache_dir, cfg.dtype).hf_dir
    return export_directory(step_dir, cfg.output, cfg.dtype, cfg.tokenizer)
