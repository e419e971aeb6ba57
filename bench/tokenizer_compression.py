"""Compression on held-out code: tokenizers trained by neoray at 8,000 tokens vs GPT-NeoX-20B's.

The demo corpus's code (the standard library) is split in two halves by file. Two tokenizers of
8,000 tokens are trained on one half plus the prose: the NeoX-compatible default (with the 23
space-run tokens) and plain byte-level BPE (`space_runs=null`). All three, with the released
50,277-token GPT-NeoX-20B tokenizer, then count the tokens of the other half.
Goal: the NeoX-compatible 8k tokenizer needs at most 10% more tokens than the released one.

    .venv/bin/python bench/tokenizer_compression.py
"""

import os
import tempfile

from neoray.data.demo_corpus import code_documents, prose_documents, stdlib_code_files, write_jsonl
from neoray.tokenizer.load import RELEASED_20B, load_tokenizer
from neoray.tokenizer.report import count_tokens
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

VOCAB = 8000


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = stdlib_code_files()
        train_code = os.path.join(tmp, "train_code.jsonl")
        held_out = os.path.join(tmp, "held_out_code.jsonl")
        prose = os.path.join(tmp, "prose.jsonl")
        write_jsonl(train_code, code_documents(files[0::2]))
        write_jsonl(held_out, code_documents(files[1::2]))
        write_jsonl(prose, prose_documents())
        tokenizers = {"gpt-neox-20b (50,277)": load_tokenizer(RELEASED_20B)}
        for name, space_runs in [("neox-style 8k", [2, 24]), ("plain bpe 8k", None)]:
            cfg = TokenizerTrainConfig(
                input=[train_code, prose],
                output=os.path.join(tmp, f"{name}.json"),
                vocab_size=VOCAB,
                space_runs=space_runs,
            )
            tokenizers[name] = train_tokenizer(cfg, show_progress=False)

        counts = {name: count_tokens(tok, [held_out]) for name, tok in tokenizers.items()}
        first = next(iter(counts.values()))
        print(f"held-out code: {first.documents} files, {first.bytes / 1e6:.2f} MB")
        print(f"{'tokenizer':24} {'tokens':>12} {'bytes/token':>12}")
        for name, count in counts.items():
            print(f"{name:24} {count.tokens:12,} {count.bytes_per_token:12.3f}")
        released = counts["gpt-neox-20b (50,277)"].tokens
        neox, plain = counts["neox-style 8k"].tokens, counts["plain bpe 8k"].tokens
        print(f"ratio neox-style 8k / gpt-neox-20b tokens: {neox / released:.3f} (goal <= 1.10)")
        print(f"ratio plain bpe 8k / gpt-neox-20b tokens: {plain / released:.3f}")
        print(f"ratio plain bpe 8k / neox-style 8k tokens: {plain / neox:.3f}")


if __name__ == "__main__":
    main()
