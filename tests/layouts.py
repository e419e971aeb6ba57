"""The tiny model trained at a (tp, pp, dp) layout under torchrun, and what it saved read back:
the runs that the resume tests (same layout, another layout) compare.

Every layout trains the same 8 sequences a step (micro batches of 2, gradient accumulation
4 / dp), saves every step and keeps the last five checkpoints, and decays its learning rate over
STEPS steps, so that a run of any layout resumed at RESUMED_AT from any layout's checkpoint
continues the same schedule and data order as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from distributed import run_command, torchrun_launcher

from neoray.checkpoint.manifest import Manifest, checkpoint_key, download
from neoray.checkpoint.reshard import full_states, read_saved_ranks
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.convert import consolidate
from neoray.storage import LocalStorage, Storage, join_key

ROOT = Path(__file__).resolve().parents[1]
RUN = "layout"
STEPS, RESUMED_AT = 10, 6
Layout = tuple[int, int, int]
# The tiny model's pretraining as the tests run it: short sequences, micro batches of 2, and a
# set peak (no FLOPS probe at start).
TINY = [
    "model=tiny",
    "data.seq_len=32",
    "parallel.micro_batch_size=2",
    "train.peak_tflops=1.0",
]


def name(layout: Layout) -> str:
    return "tp{}_pp{}_dp{}".format(*layout)


def overrides(layout: Layout) -> list[str]:
    """The model, data and batch layout of every layout's run, and its learning-rate warmup:
    what a run at `layout` needs to train as `launch` does (besides train.steps, the schedule's
    length)."""
    tp, pp, dp = layout
    return [
        *TINY,
        f"parallel.grad_accum_steps={4 // dp}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.dp={dp}",
        "optim.warmup=0.2",
    ]


def launch(
    layout: Layout,
    run_dir: Path,
    storage: list[str],
    env: dict[str, str] | None = None,
    check: bool = True,
) -> str | subprocess.CompletedProcess:
    """Train run RUN at `layout` to step STEPS under torchrun, its checkpoints in `storage`
    (overrides: `storage.root=...`, or `storage=s3 storage.bucket=...` with `env`). Returns the
    output; with check=False, the completed process of a one-process launch (a layout refused
    before the launch size is checked)."""
    tp, pp, dp = layout
    args = [
        "jobs/pretrain.py",
        "launcher=torchrun",
        *overrides(layout),
        f"train.steps={STEPS}",
        "checkpoint.interval=1",
        "checkpoint.keep_last=5",
        "tracking.enabled=false",
        f"run_name={RUN}",
        f"run_dir={run_dir}",
        *storage,
    ]
    command = torchrun_launcher(tp * pp * dp if check else 1) + args
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    if check:
        return run_command(command, timeout=300, cwd=ROOT, env=env)
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def metrics(run_dir: Path) -> dict[int, dict]:
    """The rows of `run_dir/metrics.jsonl` by step."""
    text = (run_dir / "metrics.jsonl").read_text()
    return {row["step"]: row for row in map(json.loads, text.splitlines())}


@dataclass(frozen=True)
class TrainedRun:
    """A run trained by `launch`, its checkpoints in a local folder."""

    run_dir: Path
    store: Path  # storage.root

    @property
    def storage(self) -> LocalStorage:
        return LocalStorage(self.store)

    def folder(self, step: int) -> Path:
        return self.store / checkpoint_key(RUN, step)


def copy_checkpoint(folder: Path, manifest: Manifest, storage: Storage) -> None:
    """Publish the checkpoint in `folder` to `storage` as training does: its files, then its
    manifest (what a crash right after that checkpoint's commit leaves behind)."""
    prefix = checkpoint_key(manifest.run_name, manifest.step)
    for entry in manifest.files:
        storage.upload_file(folder / entry.path, join_key(prefix, entry.path))
    storage.put_bytes(join_key(prefix, "manifest.json"), manifest.to_json().encode())


def local_copy(storage: Storage, manifest: Manifest, dest: Path) -> Path:
    """The checkpoint of `manifest` in a local folder (downloaded, verified, when in S3)."""
    if isinstance(storage, LocalStorage):
        return storage.root / checkpoint_key(manifest.run_name, manifest.step)
    return download(storage, manifest, dest)


def training_state(folder: Path, manifest: Manifest) -> tuple[dict, dict]:
    """{fp32 | exp_avg | exp_avg_sq: {plain name: full tensor}} of a checkpoint, and its
    weights as DeepSpeed's per-layer files hold them, joined across tensor ranks."""
    config = NeoXConfig(**manifest.model)
    names = {n for r in read_saved_ranks(folder, manifest) for g in r.shapes for n in g}
    full, _, _ = full_states(folder, manifest, names, config)
    layers = {}
    for path in folder.glob("layer_*-model_*-model_states.pt"):
        index, tp_rank = (int(v) for v in re.findall(r"\d+", path.name)[:2])
        state = torch.load(path, weights_only=True)
        layers[tp_rank, index] = {f"{index}.{key}": value for key, value in state.items()}
    return full, consolidate(layers, config)


def master_weights_export(
    folder: Path, manifest: Manifest, out: Path, tokenizer: Path | None = None
) -> Path:
    """The fp32 master weights of the checkpoint in `folder` as one Hugging Face directory at
    tp = pp = 1 (`out`): the same weights as its export, read another way (joined from the
    optimizer partitions by `neoray.checkpoint.reshard`, not from the layer files that the
    export consolidates), so that a result through the export of a model-parallel checkpoint
    can be checked against the same weights evaluated at tp = 1."""
    from neoray.model.gpt_neox import GPTNeoX
    from neoray.model.hf import save_hf

    full, _ = training_state(folder, manifest)
    model = GPTNeoX(NeoXConfig(**manifest.model))
    model.load_state_dict(full["fp32"])
    return save_hf(model, out, tokenizer, torch.float32)
