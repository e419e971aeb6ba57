"""A two-component demo corpus built from the Python installation itself, so nothing is downloaded.

- code: the standard library's `.py` files, one document per file (tests excluded);
- prose: the help topics of `pydoc_data/topics.py`, one document per topic (English prose
  about the language, with some indented examples).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator

# Test suites are large and repetitive, and `pydoc_data` is the prose component.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}


def stdlib_code_files() -> list[str]:
    """The standard library's `.py` files, sorted by path relative to the stdlib root."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
        files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def code_documents(files: list[str]) -> Iterator[dict[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            yield {"text": text, "path": os.path.relpath(path, root)}


def prose_documents() -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name], "topic": name}


def write_jsonl(path: str, records: Iterator[dict[str, str]]) -> int:
    """Write records as JSON lines (atomically); returns how many were written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(path + ".partial", path)
    return count


def write_demo_corpus(root: str) -> dict[str, str]:
    """Write `<root>/code.jsonl` and `<root>/prose.jsonl` unless present; returns their paths."""
    paths = {"code": os.path.join(root, "code.jsonl"), "prose": os.path.join(root, "prose.jsonl")}
    if not os.path.exists(paths["code"]):
        write_jsonl(paths["code"], code_documents(stdlib_code_files()))
    if not os.path.exists(paths["prose"]):
        write_jsonl(paths["prose"], prose_documents())
    return paths
