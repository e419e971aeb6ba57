"""The memorization study on a real run: a tiny model trained on a mixture whose documents
recur 1, 4 and 16 times memorizes the frequent ones, never a held-out one; the sequences are
those the loader fed; the extraction decisions are those of transformers' `generate`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_workers
from hydra import compose, initialize_config_dir
from layouts import copy_checkpoint, master_weights_export
from numpy.lib.stride_tricks import sliding_window_view

from neoray.checkpoint.export import resolve_checkpoint
from neoray.checkpoint.manifest import Manifest
from neoray.config import ConfigError
from neoray.data.indexed import IndexedDatasetWriter, publish
from neoray.data.inspect import batch_samples
from neoray.data.loader import micro_batch, train_mixture
from neoray.evaluation.memorization import (
    MemorizationConfig,
    plan_study,
    run_memorization,
    study_checkpoint,
)
from neoray.storage import LocalStorage, StorageConfig
from neoray.tokenizer.load import load_tokenizer
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"
RUN = "memo"
STEPS, SAVE_EVERY = 300, 150
# Documents that occur 1, 4 and 16 times in the corpus: 64, 16 and 4 of them, so that each
# group is a third of the stream (about 8 epochs of it in the run).
GROUPS = {1: 64, 4: 16, 16: 4}
HELDOUT_DOCS = 16  # distinct documents of the test split (in no other split): 192 / 12
HELDOUT = 32  # held-out sequences checked
DOC_TOKENS = 150
PREFIX = CONTINUATION = 16  # half Pythia's: a 2-layer model memorizes these in seconds
WIDTH = PREFIX + CONTINUATION
VOCAB = 400


def write_component(prefix: Path, train_docs: list[np.ndarray], heldout_docs: list[np.ndarray]):
    """Token files whose first documents are the train split and the last the test split."""
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for doc in [*train_docs, *heldout_docs]:
        writer.add_document(np.append(doc, 0))  # <|endoftext|>
    writer.finish()
    publish(str(prefix))


def _train(rank: int, world: int, cfg) -> None:
    from neoray.training.loop import pretrain

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    pretrain(cfg)


def train_config(root: Path, store: Path, steps: int = STEPS, tp: int = 1, pp: int = 1):
    """The run's config at (tp, pp, dp=1), trained to `steps`: its data in `root`, its
    checkpoints in `store` and its run_dir next to them."""
    from neoray.training.config import pretrain_config

    data = {
        "components": {
            "repeated": {"prefix": str(root / "repeated"), "weight": 0.8},
            "unique": {"prefix": str(root / "unique"), "weight": 0.2},
        },
        "tokenizer": str(root / "tokenizer.json"),
        "split": "12,0,1",
        "seq_len": 128,
        "seed": 7,
    }
    return pretrain_config({
        "model": {"vocab_size": 512, "num_layers": 2, "hidden_size": 128, "num_heads": 4,
                  "max_seq_len": 128},
        "parallel": {"micro_batch_size": 8, "tp": tp, "pp": pp},
        "optim": {"lr": 3e-3, "min_lr": 3e-3, "weight_decay": 0.0},
        "train": {"steps": steps, "seed": 0, "eval_interval": 0, "log_interval": 0, "peak_tflops": 1.0},
        "data": data,
        "run_dir": str(store.parent / "run"),
        "run_name": RUN,
        "checkpoint": {"interval": SAVE_EVERY, "keep_last": 3},
        "storage": {"root": str(store)},
        "energy": {"enabled": False},
    })  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-layer model trained 300 steps (8 x 128 tokens) by the pretrain loop, in one worker
    process, on a 80/20 mixture: `repeated`, whose documents occur 1, 4 or 16 times, and `unique`;
    checkpoints committed at steps 150 and 300. Split 12:0:1 puts each component's last
    documents, all distinct, in the test split."""
    root = tmp_path_factory.mktemp("memorization")
    rng = np.random.default_rng(0)
    doc = lambda: rng.integers(2, VOCAB, DOC_TOKENS)  # noqa: E731
    repeated = [copy for n, docs in GROUPS.items() for _ in range(docs) for copy in [doc()] * n]
    repeated = [repeated[i] for i in rng.permutation(len(repeated))]
    write_component(root / "repeated", repeated, [doc() for _ in range(HELDOUT_DOCS)])
    write_component(root / "unique", [doc() for _ in range(120)], [doc() for _ in range(10)])
    (root / "corpus.txt").write_text("memorization " * 50 + "of training data\n" * 20)
    train_tokenizer(
        TokenizerTrainConfig(
            input=[str(root / "corpus.txt")], output=str(root / "tokenizer.json"), vocab_size=300
        ),
        show_progress=False,
    )
    run_workers(_train, 1, 1, train_config(root, root / "store"), timeout=300)
    return root


def job_config(run: Path, tmp_path: Path, *overrides: str, checkpoint: str = RUN):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            config_name="memorization",
            overrides=[
                f"checkpoint={checkpoint}",
                f"storage.root={run / 'store'}",
                f"cache_dir={tmp_path / 'exports'}",
                f"output_dir={tmp_path / 'out'}",
                f"prefix_tokens={PREFIX}",
                f"continuation_tokens={CONTINUATION}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def study(run, tmp_path_factory, ray_local):
    """The job run on the checkpoints at steps 150 and 300, 600 training and 84 held-out
    sequences each, logged to MLflow; the summary of step 300."""
    out = tmp_path_factory.mktemp("study")
    for step in (SAVE_EVERY, STEPS):
        summary = run_memorization(
            job_config(run, out, f"step={step}", "samples=600", f"heldout_samples={HELDOUT}")
        )
    return summary, out


def records(out: Path, step: int) -> list[dict]:
    path = out / "out" / RUN / f"step_{step:08d}" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_memorization_grows_with_times_seen_and_held_out_sequences_are_not_extracted(study):
    summary, out = study
    rows = records(out, STEPS)
    train = [r for r in rows if r["split"] == "train"]
    # Sequences within one document: those of the once-only documents are seen about 6 times
    # by step 300, of the 4-times ones about 26, of the 16-times ones about 100.
    single = [r for r in train if r["documents"] == 1]
    low = [r for r in single if r["times_seen"] < 16]
    mid = [r for r in single if 16 <= r["times_seen"] < 64]
    high = [r for r in single if r["times_seen"] >= 64]
    assert min(len(low), len(mid), len(high)) >= 50
    rate = lambda rs: float(np.mean([r["extracted"] for r in rs]))  # noqa: E731
    assert rate(high) > rate(mid) >= rate(low)
    assert rate(high) >= 0.8 and rate(low) <= 0.1
    # The reported table, over every sequence, says the same from its first span to its last.
    spans = [row for row in summary["by_times_seen"] if row["component"] == "all"]
    assert spans[-1]["low"] >= 64 and spans[-1]["rate"] >= 0.8 > 0.2 >= spans[0]["rate"]
    heldout = [r for r in rows if r["split"] == "test"]
    assert len(heldout) == HELDOUT and all(r["times_seen"] == 0 for r in heldout)
    assert summary["heldout"]["extracted"] == 0
    assert max(r["match_fraction"] for r in heldout) < 0.5
    # The per-component tables cover both components; the plots and records are written.
    assert {row["component"] for row in summary["by_times_seen"]} == {"all", "repeated", "unique"}
    folder = out / "out" / RUN / f"step_{STEPS:08d}"
    for name in ("rate_vs_times_seen.png", "rate_vs_steps_since.png", "memorization.md"):
        assert (folder / name).stat().st_size > 0


def test_results_land_in_mlflow_under_the_training_run(study, mlflow_tracking_uri):
    from neoray.evaluation.tracking import STEP_TAG, SUITE_TAG, EvalTracker

    summary, _ = study
    tracker = EvalTracker(mlflow_tracking_uri, "neoray")
    runs = tracker.evaluation_runs(RUN, STEPS, "memorization")
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    child = runs[0]
    assert child.data.tags[SUITE_TAG] == "memorization" and child.data.tags[STEP_TAG] == str(STEPS)
    assert child.data.metrics["rate"] == pytest.approx(summary["rate"])
    assert child.data.metrics["heldout/rate"] == 0.0
    assert "repeated/rate" in child.data.metrics and "unique/rate" in child.data.metrics
    artifacts = {a.path for a in tracker.client.list_artifacts(child.info.run_id)}
    assert {"records.jsonl", "summary.json", "rate_vs_times_seen.png"} <= artifacts
    parent = tracker.training_run_id(RUN)
    history = tracker.client.get_metric_history(parent, "eval/memorization/rate")
    assert sorted(m.step for m in history) == [SAVE_EVERY, STEPS]
    eval_artifacts = {a.path for a in tracker.client.list_artifacts(parent, "eval")}
    assert "eval/memorization_across_checkpoints.png" in eval_artifacts


def test_rebuilt_sequences_are_those_the_loader_fed_and_counted_exactly(run, study):
    """Each record's tokens are those `inspect_batch` shows for its step, and its times seen
    and first step match a brute-force pass over every trained batch."""
    _, out = study
    found = resolve_checkpoint(str(run / "store" / RUN / "checkpoints" / f"step_{STEPS:08d}"))
    plan = plan_study(found.manifest, MemorizationConfig(checkpoint=RUN, samples=600))
    mixture = train_mixture(plan.data, plan.schedule)
    tokenizer = load_tokenizer(plan.data.tokenizer)
    g = plan.schedule.global_batch_size
    train = [r for r in records(out, STEPS) if r["split"] == "train"]
    for row in train[::10]:
        shown = batch_samples(mixture, tokenizer, plan.schedule, row["step"])
        sample = shown[row["position"] - row["step"] * g]
        assert sample.index == row["position"] and sample.component == row["component"]
        assert sample.tokens[:WIDTH].tolist() == row["prefix"] + row["continuation"]
    # Brute force: every window of every trained sample (offsets 0..97 of its 129 tokens).
    windows = {}
    for step in range(STEPS):
        batch = micro_batch(mixture, plan.schedule, step, 0, 0).numpy()
        for sample in batch:
            for window in sliding_window_view(sample, WIDTH):
                windows.setdefault(window.tobytes(), []).append(step)
    for row in train:
        key = np.array(row["prefix"] + row["continuation"], dtype=np.int64).tobytes()
        assert row["times_seen"] == len(windows[key])
        assert row["first_seen_step"] == min(windows[key]) <= row["step"]


def test_extraction_decisions_equal_transformers_greedy_generate(study):
    import transformers

    _, out = study
    [hf_dir] = (out / "exports" / RUN / f"step_{STEPS:08d}").iterdir()
    model = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir).eval()
    rows = records(out, STEPS)
    prompts = torch.tensor([r["prefix"] for r in rows])
    with torch.no_grad():
        generated = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=CONTINUATION,
            min_new_tokens=CONTINUATION,
            do_sample=False,
            pad_token_id=1,
            eos_token_id=None,
        )[:, PREFIX:]
    theirs = [g == r["continuation"] for g, r in zip(generated.tolist(), rows, strict=True)]
    assert [r["extracted"] for r in rows] == theirs
    assert sum(theirs) >= 100  # the decisions compared include many extractions
    assert [r["generated"] for r in rows] == generated.tolist()


@pytest.fixture(scope="module")
def model_parallel_run(run, tmp_path_factory) -> Path:
    """The run continued from its step-300 checkpoint for one step at tp=2 x pp=2 (four worker
    processes, the checkpoint resharded as it is loaded): a model-parallel run on the same
    token files, its checkpoint committed at step 301. Its store is a copy holding step 300
    alone (the other tests read the run's own)."""
    root = tmp_path_factory.mktemp("memorization_tp2_pp2")
    saved = run / "store" / RUN / "checkpoints" / f"step_{STEPS:08d}"
    manifest = Manifest.from_json((saved / "manifest.json").read_text())
    copy_checkpoint(saved, manifest, LocalStorage(root / "store"))
    cfg = train_config(run, root / "store", steps=STEPS + 1, tp=2, pp=2)
    run_workers(_train, 4, 4, cfg, timeout=300)
    return root


def test_a_model_parallel_checkpoint_gives_the_study_of_its_weights_at_tp_1(
    model_parallel_run, tmp_path, ray_local
):
    """The job on that tp=2 x pp=2 checkpoint (its export joins four model-parallel ranks'
    layer files) writes the records that the same weights give at tp=1: read another way (the
    optimizer's fp32 master weights, `layouts.master_weights_export`) and studied with that
    export instead."""
    step, settings = STEPS + 1, {"samples": 200, "heldout_samples": HELDOUT}
    overrides = [f"{key}={value}" for key, value in settings.items()]
    run_memorization(
        job_config(
            model_parallel_run, tmp_path, f"step={step}", "tracking.enabled=false", *overrides
        )
    )
    found = resolve_checkpoint(RUN, step, StorageConfig(root=str(model_parallel_run / "store")))
    assert found.manifest.topology == {"tp": 2, "pp": 2, "dp": 1}
    folder = model_parallel_run / "store" / RUN / "checkpoints" / f"step_{step:08d}"
    tp1 = tmp_path / "tp1"
    cfg = MemorizationConfig(
        checkpoint=RUN,
        prefix_tokens=PREFIX,
        continuation_tokens=CONTINUATION,
        output_dir=str(tp1 / "out"),
        **settings,
    )
    study_checkpoint(found, cfg, master_weights_export(folder, found.manifest, tp1 / "hf"))
    rows = records(tmp_path, step)
    assert rows == records(tp1, step)
    assert len(rows) == 200 + HELDOUT and sum(r["extracted"] for r in rows) >= 50


def _manifest_dir(run: Path, tmp_path: Path, change) -> Path:
    """A local step directory holding the step-300 manifest as `change` edits it."""
    source = run / "store" / RUN / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json"
    manifest = json.loads(source.read_text())
    change(manifest)
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    "change, overrides, expected",
    [
        (lambda m: m["config"].update({"data.synthetic": True}), [], r"synthetic data"),
        (
            lambda m: m["data_fingerprint"].update(repeated="0" * 64),
            [],
            r"data\.components\.repeated: .*repeated\.bin/\.idx changed since",
        ),
        (
            lambda m: m["config"].update({"data.components.unique.prefix": "/nonexistent/u"}),
            [],
            r"data\.components\.unique: the token files the run trained on are gone",
        ),
        (lambda m: m.update(data_fingerprint={}), [], r"records no data fingerprint"),
        (lambda m: None, ["samples=2401"], r"samples=2401: .* trained on 2400 sequences"),
        (lambda m: None, ["continuation_tokens=200"], r"exceeds the run's samples"),
    ],
)
def test_bad_input_is_refused_before_any_weights_are_read(
    run, tmp_path, change, overrides, expected
):
    folder = _manifest_dir(run, tmp_path, change)
    cfg = job_config(run, tmp_path, *overrides, checkpoint=str(folder))
    with pytest.raises(ConfigError, match=expected):
        run_memorization(cfg)
    assert not (tmp_path / "exports").exists() and not (tmp_path / "out").exists()


def test_scheduled_evaluation_runs_the_memorization_suite(run, tmp_path, ray_local):
    """`suites=[memorization]`: the watcher studies every committed checkpoint once, records
    the rate in its ledger and logs the study under the training run."""
    from neoray.evaluation.ledger import Ledger
    from neoray.evaluation.run import run_eval_watch
    from neoray.storage import StorageConfig, open_storage

    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "memorization.yaml").write_text(
        f"suite: memorization\nsamples: 100\nprefix_tokens: {PREFIX}\n"
        f"continuation_tokens: {CONTINUATION}\noutput_dir: {tmp_path / 'out'}\n"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "eval_watch",
            overrides=[
                f"run_name={RUN}",
                "suites=[memorization]",
                f"suite_dir={tmp_path / 'suites'}",
                f"storage.root={run / 'store'}",
                f"cache_dir={tmp_path / 'exports'}",
                "tracking.experiment=watch",
                "schedule.poll_seconds=0.1",
                "schedule.until_finished=true",
            ],
        )
    run_eval_watch(cfg)
    storage = open_storage(StorageConfig(root=str(run / "store")))
    entries = {e.step: e for e in Ledger(storage, RUN).entries()}
    assert sorted(entries) == [SAVE_EVERY, STEPS]
    assert all(e.state == "done" and e.suite == "memorization" for e in entries.values())
    summary = json.loads(
        (tmp_path / "out" / RUN / f"step_{STEPS:08d}" / "summary.json").read_text()
    )
    assert entries[STEPS].metrics["memorization/rate"] == summary["rate"] > 0
    assert entries[STEPS].mlflow_run_id
