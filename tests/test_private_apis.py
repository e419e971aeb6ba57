"""Third-party internals are used in one adapter module each, which checks them: an upgrade that
changes one fails here with a message naming it, not deep inside a resume or an evaluation."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from distributed import run_workers

from neoray import deepspeed_private
from neoray.evaluation import lm_eval_private

PLATFORM = Path(__file__).resolve().parents[1] / "platform" / "neoray"

# Private names of DeepSpeed and lm-eval, and the one module each may appear in.
PRIVATE = {
    r"\b_get_ckpt_name\b|\b_get_zero_ckpt_name\b|\b_local_start\b|__compatible_ops__"
    r"|\b_hp_mapping\b|\boptimizer\.optimizer\b|\bloss_scaler\b|\bcheckpoint_engine\b": (
        "deepspeed_private.py"
    ),
    r"lm_eval\.tasks\._|\b_process_results\b|\b_to_eval_results\b|\._factory\b|\._index\b"
    r"|\._all_(tasks|subtasks|groups|tags)\b": ("evaluation/lm_eval_private.py"),
}


def test_private_names_appear_only_in_their_adapter():
    for pattern, adapter in PRIVATE.items():
        users = {
            str(path.relative_to(PLATFORM))
            for path in PLATFORM.rglob("*.py")
            if re.search(pattern, path.read_text())
        }
        assert users == {adapter}, f"{pattern} used outside {adapter}: {sorted(users)}"


def test_the_pins_are_the_versions_the_adapters_were_written_against():
    assert importlib.metadata.version("deepspeed") == deepspeed_private.WRITTEN_AGAINST
    assert importlib.metadata.version("lm-eval") == lm_eval_private.WRITTEN_AGAINST


def test_lm_eval_internals_are_as_written_against(monkeypatch):
    lm_eval_private.check_upstream()
    import lm_eval.evaluator_utils

    monkeypatch.delattr(lm_eval.evaluator_utils, "_process_results")  # as an upgrade might
    with pytest.raises(RuntimeError, match=r"lm-eval .* differs from 0\.4\.13.*_process_results"):
        lm_eval_private.check_upstream()


def _check_with_a_pipeline(rank: int) -> None:
    import os

    from neoray.model import NeoXConfig
    from neoray.parallel.config import ParallelConfig
    from neoray.parallel.pipeline import build_pipeline
    from neoray.parallel.topology import place_rank
    from neoray.training.engine import init_distributed

    os.environ["LOCAL_RANK"] = str(rank)  # read by PipelineModule
    init_distributed("gloo")  # joins the group run_workers made
    config = NeoXConfig(vocab_size=64, num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16)
    module = build_pipeline(config, place_rank(ParallelConfig(micro_batch_size=1)))
    deepspeed_private.check_upstream(module)
    assert deepspeed_private.local_layers(module) == range(0, config.num_layers + 3)


def test_deepspeed_internals_are_as_written_against(monkeypatch):
    run_workers(_check_with_a_pipeline, 1, timeout=120)
    from deepspeed.runtime.engine import DeepSpeedEngine

    monkeypatch.delattr(DeepSpeedEngine, "_get_zero_ckpt_name")
    with pytest.raises(RuntimeError, match=r"DeepSpeed .* differs from 0\.19\.8.*_get_zero_ckpt"):
        deepspeed_private.check_upstream()
    monkeypatch.undo()
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    monkeypatch.delattr(DeepSpeedZeroOptimizer, "_link_all_hp_params")
    with pytest.raises(RuntimeError, match=r"differs from 0\.19\.8.*_link_all_hp_params"):
        deepspeed_private.check_upstream()
    monkeypatch.undo()
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    monkeypatch.setattr(TorchCheckpointEngine, "load", lambda self, file, device=None: None)
    with pytest.raises(RuntimeError, match=r"differs from 0\.19\.8.*TorchCheckpointEngine\.load"):
        deepspeed_private.check_upstream()
