"""The package's layering: subpackages import each other in one direction only, and library
code leaves process-wide state (working directory, global RNG, Ray) to the few named places
that own it."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[1] / "platform" / "neoray"


def imports_between_parts() -> dict[str, set[str]]:
    """For each top-level part of neoray (subpackage or module), the other parts it imports,
    at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in PLATFORM.rglob("*.py"):
        relative = path.relative_to(PLATFORM)
        part = relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("neoray.") and name.split(".")[1] != part:
                    graph.setdefault(part, set()).add(name.split(".")[1])
    return graph


def test_no_two_parts_import_each_other():
    graph = imports_between_parts()
    assert "corpus" in graph["tokenizer"] and "tokenizer" in graph["data"]  # the scan works
    cycles = [
        (a, b)
        for a, b in itertools.combinations(sorted(graph), 2)
        if b in graph.get(a, ()) and a in graph.get(b, ())
    ]
    assert not cycles, f"parts that import each other: {cycles}"


# Process-wide effects and the one module each may happen in.
OWNERS = {
    r"\bos\.chdir\(": {"cluster/ray_train.py"},  # enter_job_directory, for worker entry points
    r"\bray\.init\(": {"cluster/ray_start.py"},  # start_or_join
    r"\btorch\.manual_seed\(": {"evaluation/testdata.py"},  # inside torch.random.fork_rng
}


def test_process_wide_effects_happen_only_where_owned():
    for pattern, owners in OWNERS.items():
        found = {
            str(path.relative_to(PLATFORM))
            for path in PLATFORM.rglob("*.py")
            if re.search(pattern, path.read_text())
        }
        assert found <= owners, f"{pattern} outside {sorted(owners)}: {sorted(found - owners)}"
