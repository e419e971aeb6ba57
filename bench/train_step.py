"""Training-step throughput: the trainer's model against transformers' GPTNeoXForCausalLM.

One step is forward + backward + AdamW step, fp32 on CPU, on the same weights, threads,
optimizer and batch. Ours is the module the DeepSpeed engine trains: this process's stage of
the pipeline (`build_pipeline` at tp = pp = dp = 1, the model's own layers) and its loss (the
output layer fused with the cross-entropy). `--plain` times the single-process `GPTNeoX`
instead (generation, export and evaluation use it; the figure before the trainer ran the same
layers). Hugging Face's loss comes from `labels=` (logits, then its own shifted cross-entropy).

    .venv/bin/python bench/train_step.py --preset pythia_70m --batch 4 --seq 512
"""

from __future__ import annotations

import argparse
import os

import torch
from common import compare, one_process_group
from torch import nn
from transformers import GPTNeoXForCausalLM

from neoray.model import GPTNeoX
from neoray.model.hf import to_transformers
from neoray.model.presets import load_preset
from neoray.parallel.config import ParallelConfig
from neoray.parallel.convert import load_full_state_dict
from neoray.parallel.pipeline import build_pipeline
from neoray.parallel.topology import place_rank

GOAL = 1.10


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """The GPT-NeoX-20B optimizer settings (the values matter little; equal on both sides)."""
    return torch.optim.AdamW(
        model.parameters(), lr=0.97e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01
    )


def trainer_module(plain: GPTNeoX) -> tuple[nn.Module, object]:
    """The pipeline module the engine trains (one stage, no tensor parallelism), holding the
    plain model's weights, and its loss function."""
    one_process_group(29517)
    module = build_pipeline(plain.config, place_rank(ParallelConfig()))
    load_full_state_dict(module, plain.state_dict(), plain.config, tp_rank=0, tp=1)
    return module, module.loss_fn


def check_same_loss(loss_of, hf: GPTNeoXForCausalLM, tokens: torch.Tensor) -> None:
    """Fail early if the two models do not compute the same loss on the same batch.

    Hugging Face drops the last position (it has no next token in `labels`); ignore it in ours.
    """
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        ours_loss = loss_of(tokens, targets).item()
        hf_loss = hf(input_ids=tokens, labels=tokens).loss.item()
    if abs(ours_loss - hf_loss) > 1e-4:
        raise RuntimeError(
            f"the models disagree: loss {ours_loss:.6f} (ours) vs {hf_loss:.6f} (hf)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_70m", help="model preset in conf/model/")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--plain", action="store_true", help="time GPTNeoX, not the trainer's")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = GPTNeoX(load_preset(args.preset)).train()
    hf = to_transformers(plain).train()
    if args.plain:
        ours, loss_of = plain, plain
    else:
        ours, loss_fn = trainer_module(plain)
        ours.train()

        def loss_of(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return loss_fn(ours(idx), targets)

    inputs = torch.randint(0, plain.config.vocab_size, (args.batch, args.seq + 1))
    idx, targets = inputs[:, :-1], inputs[:, 1:]
    check_same_loss(loss_of, hf, idx)

    ours_opt, hf_opt = adamw(ours), adamw(hf)

    def ours_step() -> None:
        ours_opt.zero_grad(set_to_none=True)
        loss_of(idx, targets).backward()
        ours_opt.step()

    def hf_step() -> None:
        hf_opt.zero_grad(set_to_none=True)
        hf(input_ids=idx, labels=idx).loss.backward()
        hf_opt.step()

    path = "GPTNeoX (plain)" if args.plain else "the trainer's pipeline module"
    print(
        f"train step of {path}, {args.preset} "
        f"({plain.config.num_parameters() / 1e6:.1f} M parameters), "
        f"batch {args.batch} x {args.seq}, fp32, {args.threads} threads, "
        f"{args.rounds} rounds after {args.warmup} warmup"
    )
    compare(
        "ours",
        ours_step,
        "hf",
        hf_step,
        rounds=args.rounds,
        warmup=args.warmup,
        units_per_call=args.batch * args.seq,
        goal=GOAL,
    )


if __name__ == "__main__":
    main()
