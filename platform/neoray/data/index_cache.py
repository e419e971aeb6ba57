"""Index arrays cached as `.npy` files: built once by one process, memory-mapped by all.

A training start needs index arrays sized to the whole run (hundreds of millions of entries at
the GPT-NeoX-20B run's size). They are a function of the data and the config alone, so they are
built once and kept next to the data (or in `data.cache_dir`) under a name that carries a digest
of everything they were built from. Every process maps them read-only; no process holds a whole
array in memory.

- One builder per entry: the builder holds the exclusive lock of the entry's private lock
  file (`.neoray-index-<digest of the entry's names>.lock` in the cache folder, see
  neoray.file_lock: a lock on the folder itself could be held by any user who can read it);
  processes that arrive meanwhile wait on it, saying who builds after a while, and then find
  the files. Different entries (the components of a mixture) are built at the same time, by
  threads of one process or by several processes.
- Bounded memory: builds running at once in one process share a `MemoryBudget`.
- Atomic publication: each array is written under a `.partial.npy` name, chunk by chunk
  (`NpyWriter`, so memory stays bounded), checked, then renamed. A set of arrays counts as
  cached only when every one of its final names exists, so a crash mid-build leaves nothing
  that looks complete; the next builder deletes the leftovers and starts again. A build that
  fails with an error removes its partial files itself.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from neoray.file_lock import exclusive

log = logging.getLogger(__name__)

PARTIAL = ".partial.npy"
LOCK_PREFIX = ".neoray-index-"


def lock_file(paths: dict[str, str]) -> Path:
    """The private lock file of the entry `paths` (name -> final path, all in one folder):
    named after a digest of the final names, so every process finds the same one."""
    names = "\n".join(sorted(os.path.basename(p) for p in paths.values()))
    digest = hashlib.sha256(names.encode()).hexdigest()[:16]
    return Path(os.path.dirname(next(iter(paths.values()))), f"{LOCK_PREFIX}{digest}.lock")


class MemoryBudget:
    """Bytes that the index builds of one process may hold at once: a build reserves its
    estimate before it starts and waits while the builds running hold too much of the budget
    (a build always starts when none runs, whatever its estimate)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._held == 0 or self._held + nbytes <= self.limit)
            self._held += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._held -= nbytes
                self._changed.notify_all()


class NpyWriter:
    """Writes a `.npy` file of known shape and dtype in pieces, straight to disk (written pages
    go to the page cache, not to this process's memory as a writable memmap's would)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self._expected = int(np.prod(self.shape, dtype=np.int64))
        self._written = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}  # fmt: skip
        np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, values: np.ndarray) -> None:
        """Append `values` (C order, converted to the file's dtype) after what is written."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self._written + values.size > self._expected:
            raise ValueError(f"{self.path}: more than the {self._expected} values of its shape")
        self._file.write(memoryview(values.reshape(-1)).cast("B"))
        self._written += values.size

    def close(self) -> None:
        """Close the file; it must hold exactly the values its header promises."""
        self._file.close()
        if self._written != self._expected:
            raise ValueError(f"{self.path}: {self._written} of {self._expected} values written")


def _load(paths: dict[str, str]) -> dict[str, np.ndarray]:
    return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}


def load_or_build(
    paths: dict[str, str], build: Callable[[dict[str, str]], None], what: str
) -> dict[str, np.ndarray]:
    """The arrays at `paths` (name -> final `.npy` path, all in one folder), memory-mapped.

    When any is missing, `build(partials)` is called under the entry's lock to write every
    array to its partial path (name -> path); each is then checked to be a readable `.npy`
    and renamed to its final name. `what` names the arrays in the log line a build leaves.
    """
    if all(os.path.exists(p) for p in paths.values()):
        return _load(paths)
    folder = os.path.dirname(next(iter(paths.values())))
    os.makedirs(folder, exist_ok=True)
    with exclusive(lock_file(paths)):
        if all(os.path.exists(p) for p in paths.values()):
            return _load(paths)  # another process built them while this one waited
        for path in paths.values():  # a crashed build's leftovers
            for stale in glob.glob(glob.escape(path) + ".*" + PARTIAL):
                os.remove(stale)
        partials = {name: f"{path}.{os.getpid()}{PARTIAL}" for name, path in paths.items()}
        started = time.perf_counter()
        try:
            build(partials)
            for partial in partials.values():
                np.load(partial, mmap_mode="r")  # header and length agree, or this raises
        except BaseException:  # a failed build leaves nothing behind (a crash: the next one)
            for partial in partials.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
            raise
        for name, path in paths.items():
            os.replace(partials[name], path)
        log.info("built %s in %.1f s", what, time.perf_counter() - started)
    return _load(paths)
