"""Setting environment variables for a block of code only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def temporary_environment(**values: str) -> Iterator[None]:
    """`values` in this process's environment inside the block (processes started there
    inherit them, libraries that read them there see them), then the previous environment."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
