"""In-loop validation: the same numbers on every layout as transformers' GPTNeoX on the same
weights and samples, per mixture component; and training is unchanged by it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_command, run_workers, torchrun_launcher
from hydra import compose, initialize_config_dir

from neoray.data.gpt_dataset import split_documents
from neoray.data.indexed import IndexedDataset
from neoray.data.mixture import build_mixture
from neoray.model import GPTNeoX
from neoray.model.hf import to_transformers
from neoray.parallel.convert import consolidate_directory

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SEQ_LEN, MICRO, GLOBAL_BATCH, EVAL_ITERS = 32, 2, 4, 3

pytestmark = pytest.mark.slow


def demo_overrides(demo_data) -> list[str]:
    return [
        "data=demo",
        f"data.root={demo_data.root}",
        f"data.seq_len={SEQ_LEN}",
        f"train.eval_iters={EVAL_ITERS}",
        "train.peak_tflops=1.0",
        "checkpoint.enabled=false",
    ]


def layout_overrides(tp: int, pp: int, dp: int) -> list[str]:
    return [
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.dp={dp}",
        f"parallel.micro_batch_size={MICRO}",
        f"parallel.grad_accum_steps={GLOBAL_BATCH // (MICRO * dp)}",
    ]


def job_config(*overrides: str):
    from neoray.training.config import pretrain_config

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return pretrain_config(compose(config_name="pretrain", overrides=list(overrides)))


def _validate(rank: int, world: int, cfg, init: Path, out: Path) -> None:
    from neoray.parallel.convert import load_full_state_dict
    from neoray.parallel.pipeline import build_pipeline
    from neoray.parallel.topology import place_rank
    from neoray.training.engine import build_engine, init_distributed
    from neoray.training.validation import Validation

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed("gloo")
    placement = place_rank(cfg.parallel)
    module = build_pipeline(cfg.model, placement, cfg.train.seed)
    full = torch.load(init, weights_only=True)
    load_full_state_dict(module, full, cfg.model, placement.tp_rank, cfg.parallel.tp)
    engine = build_engine(module, cfg.parallel, cfg.optim, cfg.train)
    validation = Validation(cfg, engine, placement)
    first, second = validation.run(), validation.run()
    out.with_suffix(f".{rank}.json").write_text(json.dumps([first, second]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights whose losses differ clearly per sample: the output layer scaled up x6."""
    cfg = job_config("model=tiny")
    torch.manual_seed(0)
    state = GPTNeoX(cfg.model).state_dict()
    state["embed_out.weight"] *= 6
    path = tmp_path_factory.mktemp("weights") / "init.pt"
    torch.save(state, path)
    return path, state


def reference_losses(cfg, state) -> tuple[dict[str, float], dict[str, int]]:
    """transformers' per-sample mean losses on the validation samples, averaged per component
    and over all; and how many samples each component has."""
    model = GPTNeoX(cfg.model)
    model.load_state_dict(state)
    theirs = to_transformers(model).eval()
    data = build_mixture(cfg.data, "validation", EVAL_ITERS * GLOBAL_BATCH)
    tokens = torch.from_numpy(np.stack([data[i] for i in range(len(data))]))
    with torch.no_grad():
        logits = theirs(tokens[:, :-1]).logits.double()
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    )
    per_sample = per_token.view(len(data), SEQ_LEN).mean(dim=1)
    sources = [data.source(i) for i in range(len(data))]
    expected = {"val/loss": per_sample.mean().item()}
    counts = {name: sources.count(name) for name in set(sources)}
    for name in counts:
        chosen = torch.tensor([s == name for s in sources])
        expected[f"val/{name}/loss"] = per_sample[chosen].mean().item()
    return expected, counts


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_every_layout_reports_transformers_losses(demo_data, weights, tmp_path, tp, pp, dp):
    init, state = weights
    cfg = job_config(*demo_overrides(demo_data), *layout_overrides(tp, pp, dp))
    world = tp * pp * dp
    run_workers(_validate, world, world, cfg, init, tmp_path / "rows", timeout=240)
    expected, counts = reference_losses(cfg, state)
    assert set(counts) == {"code", "prose"}, counts  # both components are in the set

    reports = [json.loads((tmp_path / f"rows.{r}.json").read_text()) for r in range(world)]
    first, second = reports[0]
    assert all(report == reports[0] for report in reports), "ranks disagree"
    assert first == second, "a second validation of the same weights differs"
    assert set(first) == {*expected, "val/ppl"}
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-5), key
    assert first["val/ppl"] == pytest.approx(math.exp(first["val/loss"]), rel=1e-12)
    # the mixture's value is the components' averaged with their sample counts
    total = sum(counts.values())
    mixed = sum(first[f"val/{name}/loss"] * n / total for name, n in counts.items())
    assert mixed == pytest.approx(first["val/loss"], rel=1e-12)
    # far apart enough that a mixed-up breakdown would fail the comparison above
    assert abs(first["val/code/loss"] - first["val/prose/loss"]) > 1e-2


def pretrain(run_dir: Path, *overrides: str) -> list[dict]:
    args = torchrun_launcher(2)
    args += ["jobs/pretrain.py", "launcher=torchrun", f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    output = run_command(args, timeout=300, cwd=ROOT, env=env)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], output


def test_validation_leaves_training_unchanged(demo_data, tmp_path):
    """Two pipeline stages, 6 steps: with validation every 2 steps the losses, gradient norms
    and final weights are bit for bit those of the run without; validation rows carry the
    losses per component and the epochs of each component trained on so far."""
    common = [
        *demo_overrides(demo_data),
        *layout_overrides(1, 2, 1),
        "train.steps=6",
        "train.save_final=true",
        "optim.lr=3e-3",
    ]
    on, output = pretrain(tmp_path / "on", *common, "train.eval_interval=2")
    off, _ = pretrain(tmp_path / "off", *common, "train.eval_interval=0")
    for key in ("loss", "grad_norm", "lr"):
        assert [row[key] for row in on] == [row[key] for row in off], key
    weights_on = consolidate_directory(tmp_path / "on" / "final", job_config().model)
    weights_off = consolidate_directory(tmp_path / "off" / "final", job_config().model)
    for name, value in weights_off.items():
        assert torch.equal(weights_on[name], value), name

    assert not any(key.startswith(("val/", "epochs/")) for row in off for key in row)
    validated = [row for row in on if "val/loss" in row]
    assert [row["step"] for row in validated] == [1, 3, 5]
    assert all(f"val loss {row['val/loss']:.4f}" in output for row in validated)
    losses = [row["val/loss"] for row in validated]
    assert losses[-1] < losses[0]  # lr 3e-3 on a repetitive corpus: it learns

    cfg = job_config(*common)
    data = build_mixture(cfg.data, "validation", EVAL_ITERS * GLOBAL_BATCH)
    counts = {name: int(np.sum(data.dataset_index == d)) for d, name in enumerate(data.names)}
    train = build_mixture(cfg.data, "train", 6 * GLOBAL_BATCH)
    for row in validated:
        mixed = sum(row[f"val/{c}/loss"] * n for c, n in counts.items()) / sum(counts.values())
        assert mixed == pytest.approx(row["val/loss"], rel=1e-12)
        samples = (row["step"] + 1) * GLOBAL_BATCH
        for d, (name, component) in enumerate(cfg.data.components.items()):
            index = IndexedDataset(component.prefix)
            documents = split_documents(len(index), cfg.data.split)[0]
            tokens = int(index.sizes[documents.start : documents.stop].sum())
            taken = sum(train.source(i) == name for i in range(samples))
            assert train.names[d] == name
            assert row[f"epochs/{name}"] == pytest.approx(taken * SEQ_LEN / tokens, rel=1e-12)


def test_an_empty_validation_split_is_refused_before_training(demo_data):
    from neoray.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.eval_interval: no component has documents"):
        job_config(*demo_overrides(demo_data), "data.split='1000,0,0'")
    job_config(*demo_overrides(demo_data), "data.split='1000,0,0'", "train.eval_interval=0")
