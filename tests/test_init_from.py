"""`train.init_from`: a run starts from a Hugging Face GPTNeoX directory (local or S3, one file
or sharded) or from another run's checkpoint, at any layout, each rank reading only its part.

The runs' first losses are checked against `transformers` on the very batch the run trains
first (its own data order, `neoray.training.data.training_batches`); the loader's bytes per rank
against the share of the model a rank holds; refusals against the fields that differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from distributed import run_command, torchrun_launcher
from layouts import ROOT, TINY, metrics, overrides
from safetensors.torch import load_file
from test_pretrain_job import compose_pretrain

from neoray.checkpoint.export import consolidate_checkpoint
from neoray.checkpoint.init_from import load_stage, open_source
from neoray.checkpoint.manifest import latest_checkpoint
from neoray.config import ConfigError
from neoray.model.gpt_neox import GPTNeoX, NeoXConfig
from neoray.model.hf import from_hf_name, to_transformers
from neoray.parallel.convert import split_dim, to_pipeline_name
from neoray.storage import StorageConfig
from neoray.training.config import pretrain_config
from neoray.training.data import training_batches

# The tiny preset's shape, as transformers spells it.
TINY_HF = dict(
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=128,
    use_parallel_residual=True,
    tie_word_embeddings=False,
)


def save_transformers_model(path: Path, seed: int, max_shard_size: str | None = None, **shape):
    """A GPTNeoXForCausalLM of `shape` (default: the tiny preset's) saved by transformers with
    safetensors. Every tensor is perturbed off its initial value (layernorms of ones and zero
    biases would hide a tensor read from the wrong place)."""
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**(shape or TINY_HF)))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **extra)
    return model.eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny model as transformers saved it, in one file and in shards."""
    root = tmp_path_factory.mktemp("released")
    model = save_transformers_model(root / "single", seed=5)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    return root, model


def run_overrides(layout, run_dir: Path, init_from: str, *extra: str) -> list[str]:
    return [
        *overrides(layout),
        "train.steps=1",
        "train.eval_interval=0",
        "checkpoint.enabled=false",
        "tracking.enabled=false",
        "run_name=continued",
        f"run_dir={run_dir}",
        f"train.init_from={init_from}",
        *extra,
    ]


def first_loss(layout, run_dir: Path, init_from: str, *extra: str, env=None) -> float:
    """Train one step at `layout` from `init_from` under torchrun; its loss."""
    tp, pp, dp = layout
    args = ["jobs/pretrain.py", "launcher=torchrun", *run_overrides(layout, run_dir, init_from)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    output = run_command(
        torchrun_launcher(tp * pp * dp) + args + list(extra), timeout=300, cwd=ROOT, env=env
    )
    assert output.count(f"train.init_from={init_from!r}: read") == tp * pp * dp, output[-3000:]
    print(*(line for line in output.splitlines() if "train.init_from=" in line), sep="\n")
    return metrics(run_dir)[0]["loss"]


def transformers_loss(model, layout, run_dir: Path, init_from: str, *extra: str) -> float:
    """`model`'s loss on the batch that the run of `layout` trains at step 0."""
    cfg = pretrain_config(compose_pretrain(*run_overrides(layout, run_dir, init_from), *extra))
    batches = training_batches(cfg, dp_rank=0)
    losses = []
    with torch.no_grad():
        for _ in range(cfg.parallel.grad_accum_steps):
            inputs, targets = next(batches)
            logits = model(input_ids=inputs).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_released_weights_continue_at_one_process(released, tmp_path):
    root, model = released
    source = str(root / "single")
    loss = first_loss((1, 1, 1), tmp_path / "run", source)
    expected = transformers_loss(model, (1, 1, 1), tmp_path / "run", source)
    print(f"first loss {loss:.7f}, transformers {expected:.7f}")
    assert abs(loss - expected) < 1e-5, (loss, expected)


@pytest.mark.slow
def test_sharded_released_weights_from_s3_continue_at_2x2(released, tmp_path, s3_bucket, s3_server):
    """Each rank downloads only the shards that hold its stage's tensors."""
    from neoray.storage import S3Storage

    root, model = released
    bucket = S3Storage(StorageConfig(kind="s3", bucket=s3_bucket))
    for path in sorted((root / "sharded").iterdir()):
        bucket.upload_file(path, f"released/tiny/{path.name}")
    source = f"s3://{s3_bucket}/released/tiny"
    loss = first_loss((2, 2, 1), tmp_path / "run", source, env=s3_server.env())
    expected = transformers_loss(model, (2, 2, 1), tmp_path / "run", source)
    print(f"first loss {loss:.7f}, transformers {expected:.7f}")
    assert abs(loss - expected) < 1e-5, (loss, expected)


@pytest.mark.slow
def test_another_runs_checkpoint_continues_at_another_layout(reference_runs, tmp_path):
    """The (2, 2, 1) run's latest checkpoint, its tensor slices joined, starts a one-process
    run: the first loss is that of transformers with the weights the export reads."""
    saved = reference_runs((2, 2, 1))
    manifest = latest_checkpoint(saved.storage, "layout")
    config = NeoXConfig(**manifest.model)
    model = GPTNeoX(config)
    model.load_state_dict(consolidate_checkpoint(saved.folder(manifest.step), config))
    theirs = to_transformers(model).eval()
    store = f"storage.root={saved.store}"
    loss = first_loss((1, 1, 1), tmp_path / "run", "run:layout", store)
    expected = transformers_loss(theirs, (1, 1, 1), tmp_path / "run", "run:layout", store)
    print(f"first loss {loss:.7f}, transformers {expected:.7f}")
    assert abs(loss - expected) < 1e-5, (loss, expected)
    message = refusal(f"train.init_from=run:layout@{manifest.step}", store, "model.num_layers=3")
    assert "its checkpoint's model has model.num_layers=2 where model.num_layers=3" in message


# The loader alone, at the ranks of a (tp=2, pp=2) layout, on a model large enough that a
# rank's share and the whole model are far apart.
LARGER = dict(
    TINY_HF,
    vocab_size=2048,
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    intermediate_size=1024,
)


def stage_targets(config: NeoXConfig, tp: int, tp_rank: int, pp_rank: int, pp: int) -> dict:
    """Empty tensors of the shapes that rank (tp_rank, pp_rank) holds, by pipeline name: the
    embedding and the first layers on the first stage, the other layers, the final norm and
    the output layer on the last."""
    with torch.device("meta"):
        full = GPTNeoX(config).state_dict()
    per_stage = config.num_layers // pp
    targets = {}
    for plain, tensor in full.items():
        position = int(to_pipeline_name(plain, config).split(".", 1)[0])
        stage = min(max(position - 1, 0) // per_stage, pp - 1)
        if stage != pp_rank:
            continue
        shape = list(tensor.shape)
        if (dim := split_dim(plain)) is not None:
            shape[dim] //= tp
        targets[to_pipeline_name(plain, config)] = torch.empty(shape)
    return targets


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """The LARGER model saved by transformers in shards, and its tensors by our names."""
    path = tmp_path_factory.mktemp("larger") / "hf"
    save_transformers_model(path, seed=6, max_shard_size="2MB", **LARGER)
    full = {}
    for file in path.glob("*.safetensors"):
        full.update({from_hf_name(k): v for k, v in load_file(file).items()})
    return path, full


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_rank_reads_its_share_and_at_most_one_tensor_more(larger, where, request, tmp_path):
    """Safetensors memory-mapped on disk, or read by byte ranges from S3."""
    path, full = larger
    source_uri = str(path)
    if where == "s3":
        from neoray.storage import S3Storage

        bucket = request.getfixturevalue("s3_bucket")
        store = S3Storage(StorageConfig(kind="s3", bucket=bucket))
        for file in sorted(path.iterdir()):
            store.upload_file(file, f"larger/{file.name}")
        source_uri = f"s3://{bucket}/larger"
    model_bytes = sum(t.nbytes for t in full.values())
    layer_bytes = sum(t.nbytes for name, t in full.items() if name.startswith("layers.0."))
    config = open_source(source_uri, StorageConfig()).config
    total = 0
    for pp_rank in range(2):
        for tp_rank in range(2):
            targets = stage_targets(config, 2, tp_rank, pp_rank, 2)
            source = open_source(source_uri, StorageConfig())
            report = load_stage(source, targets, config, tp_rank, 2, tmp_path)
            share = sum(t.nbytes for t in targets.values())
            print(f"{where} tp{tp_rank} pp{pp_rank}: {report.summary()}; share {share:,} B")
            assert report.model_bytes == model_bytes
            assert report.materialised_bytes == share  # each element of its share, once
            assert report.peak_bytes <= layer_bytes  # besides its share: one tensor at a time
            assert share < 0.3 * model_bytes
            assert len(report.files) < len(list(path.glob("*.safetensors")))
            for plain, tensor in full.items():
                if (name := to_pipeline_name(plain, config)) not in targets:
                    continue
                dim = split_dim(plain)
                want = tensor if dim is None else tensor.chunk(2, dim)[tp_rank]
                assert torch.equal(targets[name], want), name
            total += report.materialised_bytes
    assert not list(tmp_path.iterdir())  # nothing downloaded: S3 files are read by ranges
    replicated = sum(t.nbytes for n, t in full.items() if split_dim(n) is None)
    assert total == model_bytes + replicated  # the replicated tensors read by both tp ranks


def test_a_single_pickle_free_bin_is_read_by_slice(tmp_path, released):
    """A `pytorch_model.bin` (a torch.save zip) is memory-mapped with weights_only=True."""
    root, _ = released
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/config.json").write_text((root / "single/config.json").read_text())
    state = {k: v for k, v in load_file(root / "single/model.safetensors").items()}
    torch.save(state, tmp_path / "bin/pytorch_model.bin")
    source = open_source(str(tmp_path / "bin"), StorageConfig())
    targets = stage_targets(source.config, 2, 1, 0, 1)
    load_stage(source, targets, source.config, 1, 2, tmp_path)
    qkv = state["gpt_neox.layers.1.attention.query_key_value.weight"]
    torch.testing.assert_close(targets["2.attention.query_key_value.weight"], qkv.chunk(2)[1])


def refusal(*extra: str) -> str:
    with pytest.raises(ConfigError) as err:
        pretrain_config(compose_pretrain(*TINY, *extra))
    return str(err.value)


def test_a_source_of_another_shape_is_refused_by_field(tmp_path, released):
    other = dict(TINY_HF, vocab_size=2048, num_hidden_layers=3, rotary_pct=0.5)
    save_transformers_model(tmp_path / "other", seed=1, **other)
    message = refusal(f"train.init_from={tmp_path / 'other'}")
    for part in (
        "vocab_size=2048 where model.padded_vocab_size=1024: set model.vocab_size=2048",
        "num_hidden_layers=3 where model.num_layers=2: set model.num_layers=3",
        "rotary_pct=0.5 where model.rotary_pct=0.25: set model.rotary_pct=0.5",
    ):
        assert part in message, message
    root, _ = released
    pretrain_config(compose_pretrain(*TINY, f"train.init_from={root / 'sharded'}"))  # accepted


def test_sources_that_cannot_be_read_are_refused_before_launch(tmp_path):
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles/config.json").write_text(json.dumps({"model_type": "gpt_neox", **TINY_HF}))
    (tmp_path / "pickles/pytorch_model.bin.index.json").write_text("{}")
    assert "is not read: save it again with safetensors" in refusal(
        f"train.init_from={tmp_path / 'pickles'}"
    )
    assert "no such file or directory" in refusal(f"train.init_from={tmp_path / 'nothing'}")
    assert "run 'absent' has no committed checkpoint" in refusal(
        "train.init_from=run:absent", f"storage.root={tmp_path}"
    )


def test_a_state_dict_of_another_shape_is_refused_before_any_weight_is_copied(tmp_path, released):
    """A plain state dict says nothing of its model: each tensor's shape is checked, all of
    them before the first copy."""
    root, _ = released
    state = {from_hf_name(k): v for k, v in load_file(root / "single/model.safetensors").items()}
    state["layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(128, 64)
    torch.save(state, tmp_path / "init.pt")
    source = open_source(str(tmp_path / "init.pt"), StorageConfig())
    config = open_source(str(root / "single"), StorageConfig()).config
    targets = {k: torch.full_like(v, 7.0) for k, v in stage_targets(config, 1, 0, 0, 1).items()}
    with pytest.raises(
        ConfigError, match=r"layers.1.mlp.dense_h_to_4h.weight has shape \(128, 64\)"
    ):
        load_stage(source, targets, config, 0, 1, tmp_path)
    assert all(bool((t == 7.0).all()) for t in targets.values())
