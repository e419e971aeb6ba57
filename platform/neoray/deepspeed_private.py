"""The private parts of DeepSpeed the trainer relies on, and nowhere else.

Written against DeepSpeed 0.19.8 (pinned in pyproject.toml):

- `deepspeed.ops.__compatible_ops__`: DeepSpeed's record of which ops may load; marking its CPU
  shared-memory all-reduce unavailable keeps it from being JIT-built (see
  `neoray.training.engine.init_distributed`);
- `engine._get_ckpt_name` / `engine._get_zero_ckpt_name` and a `PipelineModule`'s
  `_local_start` / `_local_stop`: which files of a checkpoint one rank's `load_checkpoint`
  reads, so that each rank downloads only those on resume.

`check_upstream()` says, naming the missing piece and the version written against, when an
upgrade changed any of them (a test runs it).
"""

from __future__ import annotations

import inspect
import numbers
from pathlib import Path

import deepspeed
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine

WRITTEN_AGAINST = "0.19.8"


def disable_op(name: str) -> None:
    """Mark DeepSpeed op `name` unavailable: DeepSpeed then never builds or loads it."""
    deepspeed.ops.__compatible_ops__[name] = False


def rank_checkpoint_files(engine: DeepSpeedEngine, tag: str) -> set[str]:
    """Names of the model-states and optimizer-states files this rank's engine reads for
    checkpoint `tag` (its pipeline layers' files aside: see `local_layers`)."""
    return {
        Path(engine._get_ckpt_name("", tag)).name,  # mp_rank_<TT>_model_states.pt
        Path(engine._get_zero_ckpt_name("", tag)).name,  # (bf16_)zero_pp_rank_<D>_mp_rank_<TT>_...
    }


def local_layers(module: PipelineModule) -> range:
    """Indices of the pipeline's layer list that this stage holds (its `layer_<i>-` files)."""
    return range(int(module._local_start), int(module._local_stop))


def check_upstream(module: PipelineModule | None = None) -> None:
    """Raise RuntimeError naming what changed if the installed DeepSpeed lacks a private piece
    used here; with a built `module`, its stage bounds are checked too."""
    problems = []
    if not isinstance(getattr(deepspeed.ops, "__compatible_ops__", None), dict):
        problems.append("deepspeed.ops has no `__compatible_ops__` dict")
    for method in ("_get_ckpt_name", "_get_zero_ckpt_name"):
        found = getattr(DeepSpeedEngine, method, None)
        if found is None:
            problems.append(f"DeepSpeedEngine has no `{method}`")
        elif list(inspect.signature(found).parameters)[1:3] != ["checkpoints_path", "tag"]:
            problems.append(f"DeepSpeedEngine.{method} takes {inspect.signature(found)}")
    if module is not None and not all(
        isinstance(getattr(module, name, None), numbers.Integral)
        for name in ("_local_start", "_local_stop")
    ):
        problems.append("PipelineModule has no `_local_start` / `_local_stop`")
    if problems:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} differs from {WRITTEN_AGAINST}, which "
            f"neoray.deepspeed_private was written against: {'; '.join(problems)}. "
            "Install the pinned version, or adapt that module"
        )
