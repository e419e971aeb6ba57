"""`make demo`'s job, run for real through its Hydra entry point: local Ray, local storage,
MLflow in a SQLite file, lm-eval workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import transformers

from neoray.evaluation.ledger import Ledger
from neoray.storage import StorageConfig, open_storage
from neoray.tokenizer.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def series_pixels(png: Path) -> list[int]:
    """Pixels of each of matplotlib's first series colors (C0, C1, ...) in the image: a drawn
    curve has hundreds, a legend sample alone a few dozen."""
    import matplotlib.image
    import numpy as np
    from matplotlib import colors, pyplot

    image = matplotlib.image.imread(png)[..., :3]
    series = pyplot.rcParams["axes.prop_cycle"].by_key()["color"][:6]  # C7 is grey, as axes
    return [
        int((np.abs(image - colors.to_rgb(color)).max(axis=-1) < 0.03).sum()) for color in series
    ]


CURVE_PIXELS = 150


def run_job(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "demo.py"),
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    out, data, tracking = tmp_path / "demo", tmp_path / "data", f"sqlite:///{tmp_path}/mlruns.db"
    result = run_job(
        tmp_path,
        "train.steps=60",
        "checkpoint.interval=20",
        "parallel.micro_batch_size=8",
        "demo.new_tokens=8",
        "demo.mmlu_limit=1",
        "train.log_interval=10",
        f"run_dir={out}",
        f"storage.root={tmp_path / 'storage'}",
        f"data.root={data}",
        f"tracking.uri={tracking}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    validation = {int(step): loss for step, loss in summary["validation_losses"].items()}
    assert sorted(validation) == [20, 40, 60]  # one score per committed checkpoint
    assert validation[60] < validation[20] - 0.2
    assert summary["max_abs_logit_gap_vs_transformers"] <= 1e-4
    assert (data / "code.idx").exists() and (data / "prose.idx").exists()
    # train, validation overall, code and prose: four curves drawn
    assert sum(n >= CURVE_PIXELS for n in series_pixels(out / "loss.png")) == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 60
    # The export carries the tokenizer: transformers' own loader tokenizes as ours does.
    theirs = transformers.AutoTokenizer.from_pretrained(summary["hf_export"])
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert theirs(text)["input_ids"] == load_tokenizer(str(data / "tokenizer.json")).encode(text)
    assert "greedy continuation" in result.stdout
    # The terminal gets the steps, one progress line per 10 steps and the results; Ray,
    # DeepSpeed and lm-eval speak into the log.
    lines = result.stdout.splitlines()
    assert len(lines) < 60 and result.stderr.strip() == "", result.stdout + result.stderr
    assert [line for line in lines if line.startswith("[")][-1].startswith("[5/5]")
    assert [line.split("/")[0].strip() for line in lines if "/60  loss" in line] == [
        f"step {n}" for n in range(10, 61, 10)
    ]
    assert lines[-1].endswith(str(out / "report.html")) and (out / "report.html").exists()
    log = (out / "demo.log").read_text()
    assert "RayTrainWorker" in log and "DeepSpeed" in log and lines[-1] in log
    assert "| mmlu | " in result.stdout and "| mmlu |" in summary["mmlu"]
    # MLflow: the training run with its loss curve and checkpoints, the evaluations under it.
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs(
        [client.get_experiment_by_name("neoray").experiment_id],
        "tags.`neoray.run_name` = 'demo'",
    )
    training = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(training) == 1
    assert len(client.get_metric_history(training[0].info.run_id, "loss")) == 60
    assert {f"checkpoint.step_{s:08d}" for s in (20, 40, 60)} <= training[0].data.tags.keys()
    evaluations = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == training[0].info.run_id
    ]
    # Scheduled evaluation: every checkpoint on both MMLU suites and the held-out perplexity
    # suite, once, in the ledger and in MLflow; the training run carries each suite's metrics
    # across steps for the UI's chart.
    suites = ("heldout", "mmlu_0shot", "mmlu_5shot")
    assert sorted(
        (int(r.data.tags["neoray.eval.step"]), r.data.tags["neoray.eval.suite"])
        for r in evaluations
    ) == [(step, suite) for step in (20, 40, 60) for suite in suites]
    entries = Ledger(open_storage(StorageConfig(root=str(tmp_path / "storage"))), "demo").entries()
    assert [(e.step, e.suite, e.state, e.attempts) for e in entries] == [
        (step, suite, "done", 1) for step in (20, 40, 60) for suite in suites
    ]
    for suite in ("mmlu_0shot", "mmlu_5shot"):
        history = client.get_metric_history(training[0].info.run_id, f"eval/{suite}/mmlu/acc")
        by_step = {m.step: m.value for m in history}
        assert by_step == {e.step: e.metrics["mmlu/acc"] for e in entries if e.suite == suite}
        assert summary["mmlu_by_step"][suite] == {str(k): v for k, v in by_step.items()}
    # zero- and five-shot: two series (one curve may hide the other when the scores are equal)
    zero_shot, five_shot, *others = series_pixels(out / "mmlu.png")
    assert max(zero_shot, five_shot) >= CURVE_PIXELS and min(zero_shot, five_shot) > 0
    assert all(n < CURVE_PIXELS for n in others)
    assert "queued 9 evaluation(s), newest first: step 60 mmlu_0shot" in result.stdout
    # The held-out documents (the first validation documents of each component, read from the
    # evaluation mirror): their perplexity falls from checkpoint to checkpoint, as printed.
    heldout = {
        task: {int(step): values for step, values in by_step.items()}
        for task, by_step in summary["heldout_by_step"].items()
    }
    assert sorted(heldout) == ["heldout_code", "heldout_prose"]
    for task, by_step in heldout.items():
        assert sorted(by_step) == [20, 40, 60]
        for metric in ("word_perplexity", "bits_per_byte"):
            values = [by_step[step][metric] for step in (20, 40, 60)]
            assert values[0] > values[1] > values[2], (task, metric, values)
        history = client.get_metric_history(
            training[0].info.run_id, f"eval/heldout/{task}/word_perplexity"
        )
        assert {m.step: m.value for m in history} == {
            step: values["word_perplexity"] for step, values in by_step.items()
        }
    table = result.stdout.split("held-out documents by checkpoint")[1].splitlines()
    header = "step code bits/byte code word ppl prose bits/byte prose word ppl"
    assert " ".join(table[1].split()) == header
    for line, step in zip(table[2:5], (20, 40, 60), strict=True):
        assert line.split() == [str(step)] + [
            f"{heldout[task][step][metric]:{digits}}"
            for task in ("heldout_code", "heldout_prose")
            for metric, digits in (("bits_per_byte", ".4f"), ("word_perplexity", ".2f"))
        ]
    assert (out / "eval_data" / "task_dirs").is_dir()  # the task folder, mirrored
    # code and prose: two falling curves
    assert sum(n >= CURVE_PIXELS for n in series_pixels(out / "heldout.png")) == 2


def test_demo_rejects_bad_config_before_any_work(tmp_path):
    never = tmp_path / "never"
    where = (f"run_dir={never}", f"data.root={never}", f"storage.root={never}")
    result = run_job(tmp_path, "train.steps=0", *where)
    assert result.returncode != 0 and "train.steps must be at least 1" in result.stderr
    result = run_job(tmp_path, "data.seq_len=4096", *where)
    assert result.returncode != 0 and "exceeds model.max_seq_len=2048" in result.stderr
    result = run_job(tmp_path, "+demo.stpes=5", *where)
    assert result.returncode != 0 and "unknown field(s) stpes" in result.stderr
    assert not never.exists()
