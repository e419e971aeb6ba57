"""The end-to-end demo behind `make demo`: build, train briefly, export, reload, generate.

It uses only what ships with Python: the text is the interpreter's own documentation
(`pydoc_data/topics.py`), read as bytes, so the demo needs no download and no tokenizer.
The exported directory is loaded back by `transformers` to show the two models agree.
"""

from __future__ import annotations

import json
import pydoc_data.topics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from neoray.config import ConfigError
from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.generate import SamplingConfig, generate
from neoray.model.hf import save_hf


@dataclass
class DemoConfig:
    steps: int = 60
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    prompt: str = "The return statement "
    new_tokens: int = 48
    out_dir: str = "runs/demo"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"demo.{name} must be positive, got {getattr(self, name)}")


def demo_text() -> bytes:
    """The prose of Python's own help topics, as UTF-8 bytes."""
    return "\n\n".join(pydoc_data.topics.topics.values()).encode("utf-8")


def random_windows(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Inputs and next-token targets from `batch` random windows of `data`."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def run_demo(model_config: NeoXConfig, cfg: DemoConfig) -> dict:
    """Run the demo; return (and write to `<out_dir>/summary.json`) what it measured."""
    if model_config.vocab_size < 256:
        raise ConfigError("model.vocab_size must be >= 256: the demo trains on raw bytes")
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"demo.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({model_config.max_seq_len})"
        )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.frombuffer(bytearray(demo_text()), dtype=torch.uint8).long()

    model = GPTNeoX(model_config)
    params = model_config.num_parameters()
    print(
        f"model: {params / 1e6:.2f} M parameters, {model_config.num_layers} layers, "
        f"hidden {model_config.hidden_size}, {model_config.num_heads} heads"
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    losses = []
    start = time.perf_counter()
    progress = tqdm(range(cfg.steps), desc="train", unit="step")
    for _ in progress:
        inputs, targets = random_windows(data, cfg.batch_size, cfg.seq_len, gen)
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.perf_counter() - start
    tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / elapsed

    hf_dir = save_hf(model, out / "hf")
    agreement = max_logit_gap_with_transformers(model, hf_dir, data[: cfg.seq_len][None])
    continuation = generate(
        model, [list(cfg.prompt.encode())], SamplingConfig(max_new_tokens=cfg.new_tokens)
    )[0]
    text = bytes(t for t in continuation if t < 256).decode("utf-8", errors="replace")
    plot_losses(losses, out / "loss.png")

    summary = {
        "parameters": params,
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "tokens_per_s": tokens_per_s,
        "hf_export": str(hf_dir),
        "max_abs_logit_gap_vs_transformers": agreement,
        "prompt": cfg.prompt,
        "continuation": text,
        "config": {"model": asdict(model_config), "demo": asdict(cfg)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} at {tokens_per_s:,.0f} tokens/s"
    )
    print(f"exported to {hf_dir}; transformers reloads it, max |logit gap| = {agreement:.2e}")
    print(f"greedy continuation of {cfg.prompt!r}: {text!r}")
    print(f"loss curve: {out / 'loss.png'}")
    return summary


@torch.no_grad()
def max_logit_gap_with_transformers(model: GPTNeoX, hf_dir: Path, idx: torch.Tensor) -> float:
    """Largest |logit difference| between `model` and transformers' load of its export."""
    import transformers

    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir).eval()
    model.eval()
    gap = (model(idx) - theirs(idx).logits).abs().max().item()
    model.train()
    return gap


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
