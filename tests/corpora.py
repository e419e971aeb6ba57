"""Corpora for the data tests, written to local files."""

import json

import numpy as np


def make_big_jsonl(path, lines=1500, bad_every=97):
    """Lines of varied length; every `bad_every`-th line is malformed. Returns the bad lines."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "δέλτα", "\n    indented", "x" * 30, "0123"]
    bad = []
    with open(path, "w", encoding="utf-8") as f:
        for n in range(1, lines + 1):
            if n % bad_every == 0:
                f.write('{"text": oops}\n')
                bad.append(n)
            else:
                text = " ".join(rng.choice(words, int(rng.integers(1, 60))))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return bad


def read_report(prefix):
    """The skipped records listed by a preprocessing run, one dict each."""
    with open(prefix + ".skipped.jsonl") as f:
        return [json.loads(line) for line in f]
