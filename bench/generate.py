"""Greedy generation throughput with a KV cache: ours against transformers' `generate`.

Same weights, same prompts, same threads, fp32 on CPU; both sides must produce the same
tokens (checked before timing). Batches of 1 and 8 prompts, 128 new tokens each.

    .venv/bin/python bench/generate.py --preset pythia_70m --new-tokens 128 --batches 1 8
"""

from __future__ import annotations

import argparse
import os

import torch
from common import compare, decoding_pair

from neoray.model.generate import SamplingConfig, generate

GOAL = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_70m", help="model preset in conf/model/")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ours, theirs = decoding_pair(args.preset)
    config = ours.config
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    ratios = {}
    for batch in args.batches:
        prompts = torch.randint(2, config.vocab_size, (batch, args.prompt_len))

        def ours_generate(prompts=prompts) -> list[list[int]]:
            return generate(ours, prompts.tolist(), sampling)

        @torch.no_grad()
        def hf_generate(prompts=prompts) -> list[list[int]]:
            out = theirs.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            return out[:, args.prompt_len :].tolist()

        if ours_generate() != hf_generate():
            raise RuntimeError(f"batch {batch}: the two sides generated different tokens")
        print(
            f"\ngreedy generation, {args.preset}, batch {batch}, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, fp32, {args.threads} threads"
        )
        ratios[batch] = compare(
            "ours",
            ours_generate,
            "hf",
            hf_generate,
            rounds=args.rounds,
            warmup=args.warmup,
            units_per_call=batch * args.new_tokens,
            goal=GOAL,
        )
    print("\nsummary: " + ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items()))


if __name__ == "__main__":
    main()
