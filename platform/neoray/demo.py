"""The end-to-end demo behind `make demo`: the platform's main path on one machine.

Nothing is downloaded. The demo corpus (standard-library code and pydoc's help topics) is
written, a NeoX-style tokenizer is trained on it and both components are tokenized into
`.bin/.idx` files; the pretrain job then trains a small GPT-NeoX on their mixture with Ray
Train workers on a local Ray (the same job a cluster runs), checkpointing to `./runs` and
logging to MLflow, and validating on held-out data in the loop (overall and per component) at
each checkpoint. Every committed checkpoint is exported to Hugging Face format; the last export
is reloaded by `transformers` and continues a prompt. Then the
scheduled evaluation evaluates every checkpoint on zero- and five-shot MMLU and on the
perplexity of the run's own held-out documents (a task folder of the run's validation
documents, `neoray.evaluation.heldout`: where MMLU stays at chance, it shows the model
improving) with lm-eval workers, recorded in the run's evaluation ledger and logged next to
the training run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neoray.cluster.ray_train import ClusterConfig, connect
from neoray.config import ConfigError, dataclass_from_config, redact_text
from neoray.console import MetricsFollower, log_to_file
from neoray.data.prepare import prepare_data
from neoray.model import GPTNeoX
from neoray.model.generate import SamplingConfig, generate
from neoray.model.hf import load_hf
from neoray.report.page import write_report
from neoray.tokenizer.load import load_tokenizer
from neoray.tracking import TrackingConfig
from neoray.training.config import PretrainConfig, pretrain_config
from neoray.training.job import run_pretrain


@dataclass
class DemoConfig:
    prompt: str = "def "
    new_tokens: int = 48
    mmlu_limit: int = 2  # questions per MMLU subject in the scheduled evaluation (local data)
    heldout_documents: int = 8  # validation documents per component in the perplexity task
    heldout_tokens: int = 512  # each cut to its first this many tokens

    def __post_init__(self) -> None:
        for name in ("new_tokens", "mmlu_limit", "heldout_documents", "heldout_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"demo.{name} must be positive, got {getattr(self, name)}")


def run_demo(cfg: Any) -> dict:
    """Run the demo from its Hydra config (conf/demo.yaml); return and write the summary.

    The terminal gets the demo's steps, training progress and results; everything else (Ray,
    DeepSpeed, lm-eval) goes to `<run_dir>/demo.log`.
    """
    demo = dataclass_from_config(DemoConfig, cfg.demo, "demo")
    config = pretrain_config(cfg)  # every section is checked before any work starts
    cluster = dataclass_from_config(ClusterConfig, cfg.cluster, "cluster")
    log_path = Path(config.run_dir) / "demo.log"
    with log_to_file(log_path) as say:
        say(f"neoray demo: the platform's main path on this machine (full log: {log_path})")
        try:
            say(
                "[1/5] data: the demo corpus (standard-library code, pydoc topics), an "
                f"{config.model.vocab_size:,}-token NeoX-style tokenizer, .bin/.idx files"
            )
            prepare_data(config.data)
            # One local Ray for the training workers and the evaluation workers.
            started_ray = connect(cluster, config.parallel.world_size)
            try:
                return _train_and_evaluate(cfg, config, demo, say)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        except Exception as err:
            say(f"failed: {type(err).__name__}: {err}\n  the whole story: {log_path}")
            raise


def _train_and_evaluate(
    cfg: Any, config: PretrainConfig, demo: DemoConfig, say: Callable[[str], None]
) -> dict:
    out = Path(config.run_dir)
    say(
        f"[2/5] pretraining a {config.model.num_parameters() / 1e6:.1f} M-parameter GPT-NeoX "
        f"for {config.train.steps} steps: {config.parallel.world_size} Ray Train worker(s) on a "
        f"local Ray, DeepSpeed ZeRO-1, a checkpoint every {config.checkpoint.interval} steps"
    )
    follower = MetricsFollower(out / "metrics.jsonl", progress(config), say)
    follower.start()
    try:
        run_pretrain(cfg)
    finally:
        follower.stop()

    exports = export_checkpoints(config)
    say(f"[3/5] {len(exports)} committed checkpoints exported to Hugging Face format")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = [row for row in rows if "val/loss" in row]
    validation_losses = {row["step"] + 1: row["val/loss"] for row in validated}
    last_step, hf_dir = max(exports.items())
    say("[4/5] the last export reloaded by transformers and asked to continue a prompt")
    model = load_hf(hf_dir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    gap = max_logit_gap_with_transformers(model, hf_dir, tokenizer.encode(demo.prompt * 4))
    continuation = generate(
        model,
        [tokenizer.encode(demo.prompt)],
        SamplingConfig(max_new_tokens=demo.new_tokens, eos_token_id=tokenizer.eod_id),
    )[0]
    plot_losses(rows, out / "loss.png")
    say(
        "[5/5] scheduled evaluation: a watcher takes every committed checkpoint, newest first, "
        f"through zero- and five-shot MMLU ({demo.mmlu_limit} question(s) per subject; the "
        f"{config.model.max_seq_len}-token context holds five shots) and the perplexity of "
        f"{demo.heldout_documents} held-out documents per component, by lm-eval workers on Ray"
    )
    mmlu = evaluate_checkpoints(config, demo, cfg.tracking, say)
    plot_mmlu(mmlu, out / "mmlu.png")
    plot_heldout(mmlu["heldout"], out / "heldout.png")
    ledger, comparison = mmlu["table"], mmlu["comparison"]

    summary = {
        "parameters": config.model.num_parameters(),
        "steps": last_step,
        "train_loss_first": rows[0]["loss"],
        "train_loss_last": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
        "validation_losses": validation_losses,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
        "hf_export": str(hf_dir),
        "max_abs_logit_gap_vs_transformers": gap,
        "prompt": demo.prompt,
        "continuation": tokenizer.decode(continuation),
        "mmlu": comparison,
        "mmlu_by_step": {suite: mmlu[suite] for suite in ("mmlu_0shot", "mmlu_5shot")},
        "heldout_by_step": mmlu["heldout"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    losses = " -> ".join(f"{loss:.3f} (step {step})" for step, loss in validation_losses.items())
    say("")
    say(f"validation loss (in the training loop): {losses}")
    say(f"exported to {hf_dir}; transformers reloads it, max |logit gap| = {gap:.2e}")
    say(f"greedy continuation of {demo.prompt!r}: {demo.prompt + summary['continuation']!r}")
    say(f"the evaluation ledger by checkpoint (runs/{config.run_name}/evals/):")
    say(ledger)
    say(f"step {last_step}, MMLU zero- vs five-shot:\n{comparison}")
    table = heldout_table(mmlu["heldout"])
    say(f"held-out documents by checkpoint (lm-eval's perplexity metrics):\n{table}")
    plots = ", ".join(str(out / name) for name in ("loss.png", "mmlu.png", "heldout.png"))
    say(f"plots: {plots}; summary: {out / 'summary.json'}")
    say(
        "browse the run, its checkpoints and evaluations in MLflow:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {redact_text(cfg.tracking.uri)} --host 127.0.0.1 --port 5000"
        "\n  then open http://127.0.0.1:5000 (experiment 'neoray')"
    )
    tracking = dataclass_from_config(TrackingConfig, cfg.tracking, "tracking")
    report = write_report(config.run_name, out, tracking, out / "report.html")
    say(f"the run report (all of the above on one page, also in MLflow): {report}")
    return summary


def progress(config: PretrainConfig) -> Callable[[dict], str | None]:
    """The progress line of every `train.log_interval`-th step (and the last), indented."""
    from neoray.training.loop import progress_line

    steps, interval = config.train.steps, config.train.log_interval or config.train.steps

    def describe(row: dict) -> str | None:
        done = row["step"] + 1
        if done % interval and done != steps:
            return None
        return "  " + progress_line(row, steps)

    return describe


def export_checkpoints(config: PretrainConfig) -> dict[int, Path]:
    """Every committed checkpoint of the run, exported to Hugging Face format (fp32), by step."""
    from neoray.checkpoint import committed_checkpoints
    from neoray.checkpoint.export import export_committed
    from neoray.storage import open_storage

    storage = open_storage(config.storage)
    manifests = committed_checkpoints(storage, config.run_name)
    if not manifests:
        raise RuntimeError(f"run {config.run_name!r} committed no checkpoint in {storage}")
    cache = Path(config.run_dir) / "exports"
    return {m.step: export_committed(storage, m, cache, "fp32").hf_dir for m in manifests}


@torch.no_grad()
def max_logit_gap_with_transformers(model: GPTNeoX, hf_dir: Path, tokens: list[int]) -> float:
    """Largest |logit difference| between `model` and transformers' load of its export."""
    import transformers

    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.tensor([tokens[: model.config.max_seq_len]])
    return (model.eval()(idx) - theirs(idx).logits).abs().max().item()


def evaluate_checkpoints(
    config: PretrainConfig, demo: DemoConfig, tracking: Any, say: Callable[[str], None]
) -> dict[str, Any]:
    """The scheduled evaluation of the run (what `jobs/eval_watch.py` does beside a cluster
    run) on zero- and five-shot MMLU and on the held-out perplexity suite, until every
    committed checkpoint is evaluated: on the real MMLU dev questions that ship with lm-eval,
    and on the task folder of the run's validation documents, both read from an evaluation
    mirror as an air-gapped cluster reads them. Returns {suite: {step: mmlu/acc}}, `heldout`:
    {task: {step: {metric: value}}}, the ledger table and the last step's zero- vs five-shot
    table."""
    from neoray.evaluation import testdata
    from neoray.evaluation.heldout import HeldoutConfig, write_heldout_tasks
    from neoray.evaluation.ledger import Ledger
    from neoray.evaluation.mirror import fill_mirror
    from neoray.evaluation.report import ledger_table, mmlu_comparison
    from neoray.evaluation.run import checkpoint_watcher, load_suite
    from neoray.evaluation.schedule import ScheduleConfig
    from neoray.storage import open_storage

    data_dir = Path(config.run_dir) / "eval_data"
    testdata.write_mmlu(data_dir)
    heldout = str(Path(config.run_dir) / "eval_tasks" / "heldout")
    write_heldout_tasks(
        config.data, HeldoutConfig(heldout, "heldout", demo.heldout_documents, demo.heldout_tokens)
    )
    fill_mirror([], data_dir, [heldout])
    settings = {"limit": demo.mmlu_limit, "data_dir": str(data_dir)}
    suites = [load_suite(name, settings) for name in ("mmlu_0shot", "mmlu_5shot")]
    # every held-out document, in windows of the sequence length the model was trained on
    window = {"max_length": config.data.seq_len}
    suites.append(
        load_suite(
            "heldout", {"data_dir": str(data_dir), "task_dirs": [heldout], "model_args": window}
        )
    )

    def report(line: str) -> None:  # what was queued and what came out, not every step
        if line.startswith(("the ledger", "queued", "finished", "failed", "skipped")):
            say(f"  {line}")

    storage = open_storage(config.storage)
    watcher = checkpoint_watcher(
        storage,
        config.run_name,
        suites,
        ScheduleConfig(until_finished=True, poll_seconds=1.0),
        dataclass_from_config(TrackingConfig, tracking, "tracking"),
        cache_dir=Path(config.run_dir) / "exports",
        dtype="fp32",
        say=report,
    )
    watcher.run()
    entries = Ledger(storage, config.run_name).entries()
    table = ledger_table(entries, [suite.suite for suite in suites])
    if any(entry.state != "done" for entry in entries):
        raise RuntimeError(f"scheduled evaluation did not complete:\n{table}")
    metrics = {(e.suite, e.step): e.metrics for e in entries}
    last = max(e.step for e in entries)
    by_task: dict[str, dict[int, dict[str, float]]] = {}
    for entry in (e for e in entries if e.suite == "heldout"):
        for name, value in entry.metrics.items():
            task, metric = name.split("/", 1)
            by_task.setdefault(task, {}).setdefault(entry.step, {})[metric] = value
    return {
        **{
            suite: {e.step: e.metrics["mmlu/acc"] for e in entries if e.suite == suite}
            for suite in ("mmlu_0shot", "mmlu_5shot")
        },
        "heldout": by_task,
        "table": table,
        "comparison": mmlu_comparison(metrics["mmlu_0shot", last], metrics["mmlu_5shot", last]),
    }


HELDOUT_COLUMNS = {"bits_per_byte": ("bits/byte", ".4f"), "word_perplexity": ("word ppl", ".2f")}


@contextmanager
def figure(path: Path, title: str, ylabel: str) -> Iterator[Any]:
    """The axes of a small figure (x: training step) that is written to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        yield ax
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_mmlu(mmlu: dict[str, Any], path: Path) -> None:
    """MMLU accuracy (zero- and five-shot) at each checkpoint, with chance at 25%."""
    with figure(path, "demo: MMLU across checkpoints", "accuracy") as ax:
        for suite, label in (("mmlu_0shot", "zero-shot"), ("mmlu_5shot", "five-shot")):
            steps = sorted(mmlu[suite])
            ax.plot(steps, [mmlu[suite][step] for step in steps], "o-", label=label)
        ax.axhline(0.25, color="grey", linestyle=":", label="chance")


def heldout_table(heldout: dict[str, dict[int, dict[str, float]]]) -> str:
    """Bits per byte and word perplexity of each held-out task at each checkpoint."""
    tasks = sorted(heldout)
    steps = sorted({step for task in tasks for step in heldout[task]})
    columns = [(task, metric) for task in tasks for metric in HELDOUT_COLUMNS]
    header = [f"{task.removeprefix('heldout_')} {HELDOUT_COLUMNS[m][0]}" for task, m in columns]
    lines = [f"{'step':>10} " + " ".join(f"{name:>20}" for name in header)]
    for step in steps:
        cells = [
            f"{heldout[task][step][metric]:>20{HELDOUT_COLUMNS[metric][1]}}"
            for task, metric in columns
        ]
        lines.append(f"{step:>10} " + " ".join(cells))
    return "\n".join(lines)


def plot_heldout(heldout: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    """Bits per byte of the held-out documents of each component at each checkpoint."""
    with figure(path, "demo: held-out documents across checkpoints", "bits per byte") as ax:
        for task in sorted(heldout):
            steps = sorted(heldout[task])
            values = [heldout[task][step]["bits_per_byte"] for step in steps]
            ax.plot(steps, values, "o-", label=task.removeprefix("heldout_"))


def plot_losses(rows: list[dict], path: Path) -> None:
    """Training loss per step and the in-loop validation loss, overall and per component."""
    validated = [row for row in rows if "val/loss" in row]
    components = {key for row in validated for key in row if key.endswith("/loss")}
    keys = ["val/loss", *sorted(components - {"val/loss"})]
    with figure(path, "demo: loss", "cross-entropy (nats/token)") as ax:
        ax.plot([r["step"] + 1 for r in rows], [r["loss"] for r in rows], label="train")
        for key in keys:
            label = "validation" if key == "val/loss" else f"validation: {key.split('/')[1]}"
            steps = [row["step"] + 1 for row in validated]
            ax.plot(steps, [row[key] for row in validated], "o-", label=label)
