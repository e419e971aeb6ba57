"""Memorization checks per second: our batched greedy decoding with the KV cache against
transformers' `generate`, on the same prompts with the same batch size.

A check is Pythia's: greedily continue a 32-token prefix by 32 tokens and compare with the
training sequence's next 32. Same weights (a randomly initialised pythia_70m: no hub download
here), same threads, fp32 on CPU; both sides must generate the same tokens (checked before
timing). The prompts are random token sequences, so nothing is extracted and every check
decodes all 32 tokens.

    .venv/bin/python bench/memorization_throughput.py --preset pythia_70m --sequences 64 --batch 32
"""

from __future__ import annotations

import argparse
import os

import torch
from common import compare, decoding_pair

from neoray.evaluation.memorization import greedy_continuations

GOAL = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_70m", help="model preset in conf/model/")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ours, theirs = decoding_pair(args.preset)
    config = ours.config
    sequences = torch.randint(
        2, config.vocab_size, (args.sequences, args.prefix + args.continuation)
    )
    prefixes, truth = sequences[:, : args.prefix], sequences[:, args.prefix :].tolist()

    def ours_check() -> list[bool]:
        tokens = greedy_continuations(ours, prefixes.tolist(), args.continuation, args.batch)
        return [a == b for a, b in zip(tokens, truth, strict=True)]

    @torch.no_grad()
    def hf_continuations() -> list[list[int]]:
        out = []
        for batch in prefixes.split(args.batch):
            generated = theirs.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=args.continuation,
                min_new_tokens=args.continuation,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            out += generated[:, args.prefix :].tolist()
        return out

    def hf_check() -> list[bool]:
        return [a == b for a, b in zip(hf_continuations(), truth, strict=True)]

    mine = greedy_continuations(ours, prefixes.tolist(), args.continuation, args.batch)
    if mine != hf_continuations():
        raise RuntimeError("the two sides generated different tokens")
    print(
        f"memorization checks, {args.preset}, {args.sequences} sequences in batches of "
        f"{args.batch}, {args.prefix}-token prefix + {args.continuation} greedy tokens, fp32, "
        f"{args.threads} threads"
    )
    compare(
        "ours",
        ours_check,
        "hf",
        hf_check,
        rounds=args.rounds,
        warmup=args.warmup,
        units_per_call=args.sequences,
        unit="sequences/s",
        goal=GOAL,
    )


if __name__ == "__main__":
    main()
