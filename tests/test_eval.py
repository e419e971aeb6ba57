"""Evaluation fan-out: real lm-eval task configs on local data, a real local Ray, a real MLflow
server. Splitting a suite over workers must not change a single number, and must equal
`lm_eval.simple_evaluate` run directly on the exported directory with the `hf` backend."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import lm_eval
import pytest
import services
import torch
import transformers

from neoray.config import ConfigError
from neoray.data.gpt_dataset import split_documents
from neoray.evaluation import testdata
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.fanout import evaluate_suite, plan_units
from neoray.evaluation.heldout import HeldoutConfig, write_heldout_tasks
from neoray.evaluation.mirror import MissingDatasetError, fill_mirror, task_manager
from neoray.evaluation.run import ModelSource, evaluate
from neoray.evaluation.task_folders import task_folder
from neoray.evaluation.tracking import PARENT_TAG, RUN_NAME_TAG, SUITE_TAG, EvalTracker
from neoray.tracking import TrackingConfig

pytestmark = pytest.mark.slow

# An MMLU group (weighted by subject size), a loglikelihood task large enough to be cut into
# document shards, perplexity (bootstrapped stderr) and a generative five-shot task whose
# random few-shot sampler keeps it whole; at most LIMIT documents each.
TASKS = ["mmlu_other", "arithmetic_2da", "lambada_openai", "gsm8k"]
LIMIT = 250
SETTINGS = dict(limit=LIMIT, batch_size=1, bootstrap_iters=200, gen_kwargs={"max_gen_toks": 8})


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return testdata.write_all(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="module")
def model_dir(mirror, tmp_path_factory):
    # sharp output distributions: multiple-choice scores far from ties
    return testdata.write_random_model(
        tmp_path_factory.mktemp("model") / "hf", mirror, output_scale=6.0
    )


def suite(mirror, **overrides) -> EvalConfig:
    return EvalConfig(
        **{"suite": "test", "tasks": TASKS, "data_dir": str(mirror), **SETTINGS, **overrides}
    )


def test_sharding_splits_large_tasks_and_keeps_random_fewshot_tasks_whole(mirror):
    tasks = task_manager(mirror).load(TASKS)["tasks"]
    units = plan_units(tasks, suite(mirror, workers=3))
    assert len(units) == 3
    shards = [unit.docs["arithmetic_2da"] for unit in units if "arithmetic_2da" in unit.docs]
    assert len(shards) > 1 and sorted(i for s in shards for i in s) == list(range(LIMIT))
    assert [unit.docs["gsm8k"] for unit in units if "gsm8k" in unit.docs] == [None]
    assert sorted(
        name for unit in units for name in unit.docs if name.startswith("mmlu_")
    ) == sorted(name for name in tasks if name.startswith("mmlu_"))


def assert_same_evaluation(merged: dict, direct: dict) -> None:
    """Every metric, group and count, and every document's log-likelihoods, as lm-eval's own."""
    assert merged["failed"] == {}
    assert merged["results"] == direct["results"]
    assert merged.get("groups") == direct.get("groups")
    assert merged["n-samples"] == direct["n-samples"]
    assert merged["n-shot"] == direct["n-shot"]
    for task, samples in direct["samples"].items():
        ours = merged["samples"][task]
        assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in samples], task
        for a, b in zip(ours, samples, strict=True):
            assert a["filtered_resps"] == b["filtered_resps"], (task, a["doc_id"])
            assert {m: a[m] for m in a["metrics"]} == {m: b[m] for m in b["metrics"]}


def direct_evaluation(mirror, model_dir, tasks, **settings) -> dict:
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        device="cpu",
        task_manager=task_manager(mirror),
        **settings,
    )


@pytest.fixture(scope="module")
def direct(mirror, model_dir):
    return direct_evaluation(mirror, model_dir, TASKS, **SETTINGS)


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_any_worker_count_equals_lm_eval_directly(mirror, model_dir, ray_local, direct, workers):
    merged = evaluate_suite(str(model_dir), suite(mirror, workers=workers))
    assert_same_evaluation(merged, direct)
    assert set(direct["results"]) == set(TASKS) | {
        n for n in direct["results"] if n.startswith("mmlu")
    }
    # the group score is lm-eval's size-weighted mean of the subjects
    subjects = [n for n in direct["results"] if n.startswith("mmlu_") and n in direct["n-samples"]]
    sizes = {n: direct["n-samples"][n]["effective"] for n in subjects}
    weighted = sum(direct["results"][n]["acc,none"] * sizes[n] for n in subjects) / sum(
        sizes.values()
    )
    assert merged["results"]["mmlu_other"]["acc,none"] == pytest.approx(weighted, rel=1e-12)
    assert (
        merged["n-shot"]["gsm8k"] == 5
        and merged["results"]["lambada_openai"]["perplexity_stderr,none"] > 0
    )


def test_five_shot_subjects_cut_into_shards_equal_lm_eval_directly(mirror, model_dir, ray_local):
    """Three MMLU subjects, five-shot with the `first_n` sampler, on three workers: one subject
    is cut into two shards that land on the same worker (the plan below shows it)."""
    tasks = ["mmlu_abstract_algebra", "mmlu_anatomy", "mmlu_clinical_knowledge"]
    cfg = EvalConfig(
        suite="test", tasks=tasks, num_fewshot=5, workers=3, batch_size=1, data_dir=str(mirror)
    )
    units = plan_units(task_manager(mirror).load(tasks)["tasks"], cfg)
    assert {"mmlu_clinical_knowledge": [0, 1, 2, 3, 4]} in [unit.docs for unit in units]
    merged = evaluate_suite(str(model_dir), cfg)
    direct = direct_evaluation(mirror, model_dir, tasks, num_fewshot=5, batch_size=1)
    assert_same_evaluation(merged, direct)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    [port] = services.free_ports(1)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=1).status == 200
        except OSError:
            return False

    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
        f"--artifacts-destination={root / 'artifacts'}",
        "--workers=1",
    ]
    with services.running("MLflow", command, log=root / "mlflow.log", ready=ready, timeout=90):
        yield url


def test_results_land_under_the_training_run_at_the_checkpoint_step(
    mirror, model_dir, ray_local, mlflow_server
):
    tracking = TrackingConfig(uri=mlflow_server, experiment="eval-test")
    tracker = EvalTracker(tracking.uri, tracking.experiment)
    parent = tracker.client.create_run(
        tracker.experiment_id, tags={RUN_NAME_TAG: "run-a"}, run_name="run-a"
    ).info.run_id
    source = ModelSource(model_dir, "run-a", 42)
    mmlu = dict(tasks=["mmlu_humanities"], limit=2, data_dir=str(mirror), batch_size=4)
    for _ in range(2):  # the second evaluation replaces the first
        evaluate(source, EvalConfig(suite="mmlu_0shot", num_fewshot=0, **mmlu), tracking)
    results = evaluate(source, EvalConfig(suite="mmlu_5shot", num_fewshot=5, **mmlu), tracking)

    prompt = results["samples"]["mmlu_philosophy"][0]["arguments"][0][0]
    assert prompt.count("Answer:") == 6  # five answered dev questions, then the question

    runs = tracker.evaluation_runs("run-a", 42)
    assert sorted(r.data.tags[SUITE_TAG] for r in runs) == ["mmlu_0shot", "mmlu_5shot"]
    assert {r.data.tags[PARENT_TAG] for r in runs} == {parent}
    five = next(r for r in runs if r.data.tags[SUITE_TAG] == "mmlu_5shot")
    assert five.info.run_id == results["mlflow_run_id"]
    group = results["results"]["mmlu_humanities"]
    assert five.data.metrics["mmlu_humanities/acc"] == group["acc,none"]
    assert five.data.metrics["mmlu_humanities/acc_stderr"] == group["acc_stderr,none"]
    assert "mmlu_philosophy/acc" in five.data.metrics
    history = tracker.client.get_metric_history(five.info.run_id, "mmlu_humanities/acc")
    assert [m.step for m in history] == [42]
    artifacts = {a.path for a in tracker.client.list_artifacts(five.info.run_id)}
    assert artifacts == {"results.json", "samples"}

    table = tracker.log_mmlu_comparison("run-a", 42, "mmlu_0shot", "mmlu_5shot")
    assert table.splitlines()[2].startswith("| mmlu_humanities |")


def test_missing_data_and_bad_configs_fail_before_any_work(tmp_path):
    with pytest.raises(MissingDatasetError, match=r"task piqa: .* no train \(.*piqa/train.jsonl\)"):
        task_manager(tmp_path).load(["piqa"])
    with pytest.raises(ConfigError, match="eval.backend"):
        EvalConfig(suite="x", tasks=["piqa"], backend="openai")
    with pytest.raises(ConfigError, match="eval.tasks"):
        EvalConfig(suite="x", tasks=[])


def kill_first_running_unit(timeout: float = 120.0) -> int:
    """SIGKILL the first Ray worker process found running `run_unit`; its pid."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if "ray::run_unit" in " ".join(process.info["cmdline"] or []):
                os.kill(process.info["pid"], signal.SIGKILL)
                return process.info["pid"]
        time.sleep(0.05)
    raise AssertionError("no Ray worker ran run_unit")


@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_worker_is_retried_and_the_others_are_kept(mirror, model_dir, ray_local, retries):
    cfg = suite(mirror, tasks=["arithmetic_2da", "arithmetic_2ds"], workers=2, max_retries=retries)
    merged: dict = {}
    run = threading.Thread(target=lambda: merged.update(evaluate_suite(str(model_dir), cfg)))
    run.start()
    kill_first_running_unit()
    run.join()
    if retries:
        assert merged["failed"] == {}
        undisturbed = evaluate_suite(str(model_dir), cfg)
        assert merged["results"] == undisturbed["results"]
    else:
        [lost] = merged["failed"]
        [kept] = {"arithmetic_2da", "arithmetic_2ds"} - {lost}
        assert set(merged["results"]) == {kept}
        assert merged["n-samples"][kept]["effective"] == LIMIT


def test_an_s3_mirror_is_fetched_once_per_content_into_the_nodes_cache(
    s3_bucket, tmp_path, monkeypatch
):
    from neoray.evaluation.mirror import publish_split, split_path
    from neoray.storage import s3_client

    monkeypatch.setenv("NEORAY_EVAL_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "mirror"
    testdata.write_arithmetic(local, count=30)
    remote = f"s3://{s3_bucket}/eval-mirror"
    path = split_path(local, "arithmetic_2da", "validation")
    assert publish_split(path, remote, "arithmetic_2da", "validation") == (
        f"{remote}/arithmetic_2da/validation.jsonl"
    )
    downloads = []
    s3_client().meta.events.register(
        "before-call.s3.GetObject", lambda **_: downloads.append(1), unique_id="count-gets"
    )

    def docs(data_dir) -> list[dict]:
        [task] = task_manager(data_dir).load(["arithmetic_2da"])["tasks"].values()
        return list(task.eval_docs)

    assert docs(remote) == docs(local) and len(downloads) == 1
    assert docs(remote) == docs(local) and len(downloads) == 1, "the cached copy serves"
    testdata.write_arithmetic(local, count=20, seed=1)  # the mirror is refreshed: fetched anew
    publish_split(path, remote, "arithmetic_2da", "validation")
    assert docs(remote) == docs(local) and len(downloads) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one file per content, no leftovers
    with pytest.raises(MissingDatasetError, match=f"{remote}/arithmetic_2ds/validation.jsonl"):
        task_manager(remote).load(["arithmetic_2ds"])


# A suite's own task folder: a perplexity task (loglikelihood_rolling) and a multiple-choice
# task, both reading data files relative to their YAML, named together by their tag.
CUSTOM_PPL = """task: mine_ppl
tag: [mine]
dataset_path: json
dataset_kwargs: {data_files: {test: data/texts.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""
CUSTOM_CHOICE = """task: mine_choice
tag: [mine]
dataset_path: json
dataset_kwargs: {data_files: {validation: data/choices.jsonl}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: which is true of {{thing}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
"""


@pytest.fixture(scope="module")
def custom_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks") / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "mine_ppl.yaml").write_text(CUSTOM_PPL)
    (folder / "mine_choice.yaml").write_text(CUSTOM_CHOICE)
    texts = [f"Everyone knows that {thing} {fact}." for thing, fact, _ in testdata._FACTS]
    rows = [{"text": f"{text} {other}"} for text in texts for other in texts[:6]]
    (folder / "data" / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = [
        {"thing": thing, "choices": [false, true] if i % 2 else [true, false], "label": i % 2}
        for i, (thing, true, false) in enumerate(testdata._FACTS * 4)
    ]
    (folder / "data" / "choices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choices))
    return folder


@pytest.fixture(scope="module")
def custom_direct(custom_tasks, model_dir):
    """lm-eval on its own: its TaskManager's `include_path`, run in the folder, where its
    relative data files are found."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(custom_tasks)
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=["mine"],
            device="cpu",
            task_manager=lm_eval.tasks.TaskManager(include_path=str(custom_tasks)),
            batch_size=1,
            bootstrap_iters=200,
        )


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_suites_own_tasks_equal_lm_eval_directly(
    custom_tasks, model_dir, ray_local, custom_direct, workers
):
    cfg = EvalConfig(
        suite="mine",
        tasks=["mine"],
        task_dirs=[str(custom_tasks)],
        workers=workers,
        batch_size=1,
        bootstrap_iters=200,
    )
    if workers == 3:  # the perplexity task is cut into document shards on two workers
        units = plan_units(task_manager(None, cfg.task_dirs).load(["mine"])["tasks"], cfg)
        assert sum("mine_ppl" in unit.docs for unit in units) == 2
    merged = evaluate_suite(str(model_dir), cfg)
    assert_same_evaluation(merged, custom_direct)
    assert set(merged["results"]) == {"mine_ppl", "mine_choice"}
    assert merged["n-samples"]["mine_ppl"]["effective"] == 48
    assert merged["results"]["mine_ppl"]["word_perplexity,none"] > 1


def test_a_task_folder_is_mirrored_by_content_locally_and_in_s3(
    custom_tasks, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("NEORAY_EVAL_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "renamed"  # the same content under another name finds the same data
    shutil.copytree(custom_tasks, copy)
    folder = task_folder(str(copy))
    expected = {
        name: list(task.eval_docs)
        for name, task in task_manager(None, [str(custom_tasks)]).load(["mine"])["tasks"].items()
    }
    for mirror in (str(tmp_path / "mirror"), f"s3://{s3_bucket}/eval-mirror"):
        written = fill_mirror([], mirror, [str(custom_tasks)])
        entry = f"{mirror}/task_dirs/{folder.key}"
        assert sorted(written) == sorted(
            [f"{entry}/data/mine_ppl/test.jsonl", f"{entry}/data/mine_choice/validation.jsonl"]
            + [f"{entry}/files/{f}" for f in ("data/choices.jsonl", "data/texts.jsonl")]
            + [f"{entry}/files/{f}" for f in ("mine_choice.yaml", "mine_ppl.yaml")]
        )
        loaded = task_manager(mirror, [str(copy)]).load(["mine"])["tasks"]
        assert {name: list(task.eval_docs) for name, task in loaded.items()} == expected
    (copy / "data" / "texts.jsonl").write_text('{"text": "edited after mirroring"}\n')
    with pytest.raises(MissingDatasetError, match=f"{copy} as it is now, digest (?!{folder.key})"):
        task_manager(mirror, [str(copy)]).load(["mine_ppl"])
    with pytest.raises(ConfigError, match="eval.task_dirs: no folder 'nowhere'"):
        EvalConfig(suite="x", tasks=["mine"], task_dirs=["nowhere"])


def test_heldout_tasks_score_the_validation_documents_as_transformers_does(
    demo_data, model_dir, ray_local, tmp_path
):
    """The run's own held-out documents: the first of each component's validation split (as
    preprocessing read them from the raw files), scored by the fan-out as transformers scores
    them (one rolling window per document, from the tokenizer's begin-of-text token)."""
    cfg = HeldoutConfig(output=str(tmp_path / "heldout"), documents=3, max_tokens=48)
    assert write_heldout_tasks(demo_data, cfg) == ["heldout_code", "heldout_prose"]
    texts = {}
    for component in ("code", "prose"):
        raw_file = Path(demo_data.components[component].input[0])
        raw = [json.loads(line)["text"] for line in raw_file.read_text().splitlines()]
        first = split_documents(len(raw), demo_data.split)[1].start
        data = tmp_path / "heldout" / "data" / f"{component}.jsonl"
        rows = [json.loads(line)["text"] for line in data.read_text().splitlines()]
        assert len(rows) == 3 and all(rows)
        assert all(raw[first + i].startswith(row) for i, row in enumerate(rows))
        texts[f"heldout_{component}"] = rows
    suite = EvalConfig(
        suite="heldout",
        tasks=["heldout"],
        task_dirs=[cfg.output],
        workers=2,
        batch_size=1,
        bootstrap_iters=0,
    )
    results = evaluate_suite(str(model_dir), suite)["results"]
    model = transformers.GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    for task, rows in texts.items():
        loglikelihood, size = 0.0, 0
        for text in rows:
            ids = tokenizer(text)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([[tokenizer.bos_token_id, *ids]])).logits[0, :-1]
            loglikelihood += logits.log_softmax(-1)[torch.arange(len(ids)), ids].sum().item()
            size += len(text.encode())
        bits = -loglikelihood / size / math.log(2)
        assert results[task]["bits_per_byte,none"] == pytest.approx(bits, rel=1e-5)
