"""Preprocessing throughput, end to end, against the bare `tokenizers` encode_batch.

neoray's side is the whole job: read the demo corpus's .jsonl files, validate every record,
tokenize, append <|endoftext|>, write .bin/.idx and publish them. The peer is handed the same
documents already in memory as Python strings and only calls `Tokenizer.encode_batch` on them.
Both use the released GPT-NeoX-20B tokenizer and every core of this machine. Goal: >= 0.80x.

neoray encodes with `encode_batch_fast` (ids without character offsets), so a second comparison
against the bare `encode_batch_fast` shows what reading, validating and writing cost on their own.

    .venv/bin/python bench/preprocess_throughput.py
"""

import json
import os
import tempfile

from common import compare

from neoray.data.demo_corpus import write_demo_corpus
from neoray.data.preprocess import PreprocessConfig, preprocess
from neoray.tokenizer.load import RELEASED_20B, load_tokenizer


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = list(write_demo_corpus(os.path.join(tmp, "raw")).values())
        texts = []
        for path in inputs:
            with open(path, encoding="utf-8") as f:
                texts.extend(json.loads(line)["text"] for line in f)
        backend = load_tokenizer(RELEASED_20B).backend
        tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
        megabytes = sum(os.path.getsize(p) for p in inputs) / 1e6
        print(f"demo corpus: {len(texts):,} documents, {megabytes:.1f} MB, {tokens:,} tokens, "
              f"{os.cpu_count()} cores")  # fmt: skip
        cfg = PreprocessConfig(inputs, RELEASED_20B, os.path.join(tmp, "out", "demo"))

        def neoray() -> None:
            preprocess(cfg, show_progress=False)

        def bare() -> None:
            backend.encode_batch(texts, add_special_tokens=False)

        def bare_fast() -> None:
            backend.encode_batch_fast(texts, add_special_tokens=False)

        compare("neoray", neoray, "encode", bare, rounds=3, warmup=1,
                units_per_call=tokens, goal=0.80)  # fmt: skip
        compare("neoray", neoray, "encode_fast", bare_fast, rounds=3, warmup=0,
                units_per_call=tokens)  # fmt: skip


if __name__ == "__main__":
    main()
