"""The end-to-end demo behind `make demo`: data, tokenizer, training, export, generation.

Everything comes from the Python installation itself, so nothing is downloaded: the demo
corpus (standard-library code and pydoc's help topics) is written, a NeoX-style tokenizer is
trained on it, both components are tokenized into `.bin/.idx` files, a small GPT-NeoX trains
on their weighted mixture in the replayable order the data pipeline defines, and the model is
exported in Hugging Face format, reloaded by `transformers` and asked to continue a prompt.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from neoray.config import ConfigError
from neoray.data.config import DataConfig
from neoray.data.loader import BatchSchedule, micro_batch, train_mixture
from neoray.data.mixture import BlendedDataset, build_mixture
from neoray.data.prepare import prepare_data
from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.generate import SamplingConfig, generate
from neoray.model.hf import save_hf
from neoray.tokenizer.load import load_tokenizer


@dataclass
class DemoConfig:
    lr: float = 3e-3
    seed: int = 0  # model initialisation; the data order has its own seed (data.seed)
    validation_batches: int = 4
    validation_interval: int = 50  # steps between validation losses
    prompt: str = "def "
    new_tokens: int = 48
    out_dir: str = "runs/demo"
    mmlu_limit: int = 2  # questions per MMLU subject in the closing evaluation (local data)

    def __post_init__(self) -> None:
        for name in ("validation_batches", "validation_interval", "new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"demo.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"demo.lr must be positive, got {self.lr}")


def check_shapes(model: NeoXConfig, data: DataConfig, schedule: BatchSchedule) -> None:
    """Refuse combinations that would fail later, before any file is written."""
    if data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({data.seq_len}) exceeds model.max_seq_len ({model.max_seq_len}): "
            "lower one or raise the other"
        )
    if schedule.data_parallel_size != 1 or schedule.grad_accum_steps != 1:
        raise ConfigError(
            "the demo trains in one process: set batch.data_parallel_size and batch.grad_accum_steps to 1"
        )


def run_demo(
    model_config: NeoXConfig, data: DataConfig, schedule: BatchSchedule, cfg: DemoConfig
) -> dict:
    """Run the demo; return (and write to `<out_dir>/summary.json`) what it measured."""
    check_shapes(model_config, data, schedule)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    prepare_data(data)
    tokenizer = load_tokenizer(data.tokenizer)
    model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    train = train_mixture(data, schedule)
    validation = build_mixture(
        data, "validation", cfg.validation_batches * schedule.micro_batch_size
    )

    torch.manual_seed(cfg.seed)
    model = GPTNeoX(model_config)
    print(
        f"model: {model_config.num_parameters() / 1e6:.2f} M parameters, "
        f"{model_config.num_layers} layers, hidden {model_config.hidden_size}, "
        f"vocab {tokenizer.vocab_size} (padded to {model_config.padded_vocab_size})"
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01
    )
    losses, validation_losses = [], {}
    start = time.perf_counter()
    progress = tqdm(range(schedule.train_steps), desc="train", unit="step")
    for step in progress:
        if step % cfg.validation_interval == 0:
            validation_losses[step] = validation_loss(model, validation, schedule.micro_batch_size)
        tokens = micro_batch(train, schedule, step, micro_step=0, rank=0)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.perf_counter() - start
    validation_losses[len(losses)] = validation_loss(model, validation, schedule.micro_batch_size)
    val_before, val_after = validation_losses[0], validation_losses[len(losses)]

    hf_dir = save_hf(model, out / "hf", tokenizer=data.tokenizer)
    gap = max_logit_gap_with_transformers(model, hf_dir, tokenizer.encode(cfg.prompt * 4))
    continuation = generate(
        model,
        [tokenizer.encode(cfg.prompt)],
        SamplingConfig(max_new_tokens=cfg.new_tokens, eos_token_id=tokenizer.eod_id),
    )[0]
    plot_losses(losses, validation_losses, out / "loss.png")

    summary = {
        "parameters": model_config.num_parameters(),
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "validation_loss_before": val_before,
        "validation_loss_after": val_after,
        "validation_losses": validation_losses,
        "tokens_per_s": schedule.train_samples * data.seq_len / elapsed,  # validation included
        "hf_export": str(hf_dir),
        "max_abs_logit_gap_vs_transformers": gap,
        "prompt": cfg.prompt,
        "continuation": tokenizer.decode(continuation),
    }
    print(
        f"validation loss {val_before:.3f} -> {val_after:.3f} "
        f"({summary['tokens_per_s']:,.0f} tokens/s on this machine)"
    )
    print(f"exported to {hf_dir}; transformers reloads it, max |logit gap| = {gap:.2e}")
    print(f"greedy continuation of {cfg.prompt!r}: {cfg.prompt + summary['continuation']!r}")
    print(f"loss curve: {out / 'loss.png'}")
    summary["mmlu"] = evaluate_mmlu(hf_dir, out, cfg.mmlu_limit)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def validation_loss(model: GPTNeoX, dataset: BlendedDataset, micro_batch_size: int) -> float:
    """Mean loss over the validation mixture, in batches of `micro_batch_size` samples."""
    was_training = model.training
    model.eval()
    losses = []
    for first in range(0, len(dataset), micro_batch_size):
        rows = range(first, min(first + micro_batch_size, len(dataset)))
        batch = torch.from_numpy(np.stack([dataset[i] for i in rows]))
        losses.append(model(batch[:, :-1], batch[:, 1:]).item())
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def max_logit_gap_with_transformers(model: GPTNeoX, hf_dir: Path, tokens: list[int]) -> float:
    """Largest |logit difference| between `model` and transformers' load of its export."""
    import transformers

    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.tensor([tokens[: model.config.max_seq_len]])
    was_training = model.training
    model.eval()
    gap = (model(idx) - theirs(idx).logits).abs().max().item()
    model.train(was_training)
    return gap


def evaluate_mmlu(hf_dir: Path, out: Path, limit: int) -> str:
    """Zero- vs five-shot MMLU of the export with lm-eval on a local Ray, on the real MMLU dev
    questions that ship with lm-eval (neoray.evaluation.testdata); prints the table."""
    from neoray.evaluation import testdata
    from neoray.evaluation.run import ModelSource, mmlu_zero_vs_five_shot

    data_dir = out / "eval_data"
    testdata.write_mmlu(data_dir)
    table = mmlu_zero_vs_five_shot(ModelSource(hf_dir, None, 0), data_dir, limit=limit)
    print(f"MMLU (lm-eval, {limit} question(s) per subject, local data):\n{table}")
    return table


def plot_losses(losses: list[float], validation: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="train")
    ax.plot(list(validation), list(validation.values()), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="demo: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
