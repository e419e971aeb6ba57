"""The private parts of DeepSpeed the trainer relies on, and nowhere else.

Written against DeepSpeed 0.19.8 (pinned in pyproject.toml):

- `deepspeed.ops.__compatible_ops__`: DeepSpeed's record of which ops may load; marking its CPU
  shared-memory all-reduce unavailable keeps it from being JIT-built (see
  `neoray.training.engine.init_distributed`);
- `engine._get_ckpt_name` / `engine._get_zero_ckpt_name` and a `PipelineModule`'s
  `_local_start` / `_local_stop`: which files of a checkpoint one rank's `load_checkpoint`
  reads, so that each rank downloads only those on resume;
- `engine.checkpoint_engine.load(path, map_location)`, through which every file of a
  `load_checkpoint` is read: replaced while resuming so that it unpickles nothing but tensors
  and the classes below (`loads_without_pickle`);
- for resuming (at the same or another layout, `neoray.checkpoint.reshard`): the classes pickled
  into the checkpoint files, the torch optimizer a ZeRO-1 or bf16 optimizer wraps (`.optimizer`, one flat
  fp32 partition per parameter group) and each parameter's link to its slice of the partition
  (`_hp_mapping`: its group, its fragment's address in the parameter and in the partition).

`check_upstream()` says, naming the missing piece and the version written against, when an
upgrade changed any of them (a test runs it).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
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
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    reader = list(inspect.signature(TorchCheckpointEngine.load).parameters)[1:3]
    if reader != ["path", "map_location"]:
        problems.append(f"TorchCheckpointEngine.load takes {reader}, not (path, map_location)")
    if module is not None and not all(
        isinstance(getattr(module, name, None), numbers.Integral)
        for name in ("_local_start", "_local_stop")
    ):
        problems.append("PipelineModule has no `_local_start` / `_local_stop`")
    problems += _missing_reshard_pieces()
    if problems:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} differs from {WRITTEN_AGAINST}, which "
            f"neoray.deepspeed_private was written against: {'; '.join(problems)}. "
            "Install the pinned version, or adapt that module"
        )


def checkpoint_globals():
    """The classes DeepSpeed pickles into its checkpoint files besides tensors, allowed for
    `torch.load(weights_only=True)` (which refuses any other code to run while loading)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return torch.serialization.safe_globals(
        [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    )


@contextmanager
def loads_without_pickle(engine: DeepSpeedEngine) -> Iterator[None]:
    """Within it, `engine.load_checkpoint` reads every file with `torch.load(weights_only=True)`
    and the classes of `checkpoint_globals` only: DeepSpeed's own reader unpickles anything, so
    whoever could write a checkpoint file (a bucket writer) could otherwise run code on every
    rank that resumes from it."""
    import torch

    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with checkpoint_globals():
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load  # the instance's attribute shadows its class's method
    try:
        yield
    finally:
        del checkpoint_engine.load


def optimizer_partitions(engine: DeepSpeedEngine, step) -> list:
    """The flat fp32 partitions that the engine's (ZeRO-1 or bf16) optimizer steps, one per
    parameter group, with Adam's state created at `step` (it is created lazily, at the first
    step, and a resumed engine has not stepped yet)."""
    import torch

    base = engine.optimizer.optimizer  # the torch optimizer DeepSpeed wraps
    partitions = []
    for group in base.param_groups:
        (flat,) = group["params"]
        state = base.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = step.clone()
        partitions.append((flat, state))
    return partitions


def restore_optimizer_settings(engine: DeepSpeedEngine, saved: dict) -> None:
    """The saved optimizer's per-group settings (learning rate, betas, weight decay) and, where
    it has one, its loss scaler (fp16), from a ZeRO partition file's `optimizer_state_dict`."""
    base = engine.optimizer.optimizer
    groups = saved["base_optimizer_state"]["param_groups"]
    for group, saved_group in zip(base.param_groups, groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if saved.get("loss_scaler") is not None and hasattr(engine.optimizer, "loss_scaler"):
        engine.optimizer.loss_scaler = saved["loss_scaler"]


def write_partition_fragment(param, partitions: list, key: str | None, value) -> None:
    """Write the part of `param`'s full (this tensor rank's) `value` that this rank's partition
    holds: the fp32 master weights (`key` None) or Adam state `key`. DeepSpeed links each
    parameter to its slice of the partition (`_hp_mapping`; None when the partition holds none
    of it)."""
    mapping = param._hp_mapping
    if mapping is None:
        return
    flat, state = partitions[mapping.param_group_index]
    target = flat if key is None else state[key]
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    target.data.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))


def _missing_reshard_pieces() -> list[str]:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils.tensor_fragment import tensor_fragment

    problems = []
    try:
        checkpoint_globals()
    except ImportError as err:
        problems.append(f"a class pickled into checkpoints moved ({err})")
    fields = set(getattr(tensor_fragment, "__dataclass_fields__", {}))
    wanted = {"lp_fragment_address", "hp_fragment_address", "param_group_index"}
    if not wanted <= fields:
        problems.append(f"tensor_fragment lacks {sorted(wanted - fields)}")
    if "_link_all_hp_params" not in vars(DeepSpeedZeroOptimizer):
        problems.append("DeepSpeedZeroOptimizer no longer links parameters (`_link_all_hp_params`)")
    return problems
