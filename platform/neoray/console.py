"""A job's own lines on the terminal, everything else in a log file.

A training run on Ray prints a great deal besides its results: Ray's start-up and worker
lines, DeepSpeed's stage dumps, lm-eval's warnings, progress bars of the data steps. A person
running the job wants its steps, its progress and its results; the rest belongs in a log they
can open when something goes wrong. `log_to_file` moves file descriptors 1 and 2 (and so every
thread, C library and child process that writes to them) to the log and hands back a function
that writes to the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[Callable[[str], None]]:
    """Send stdout and stderr of this process and its children to `path` (appended) for the
    duration; yield `say(line)`, which prints to the terminal that was there before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        lock = threading.Lock()

        def say(line: str) -> None:
            with lock:
                terminal.write(line + "\n")
            print(line, flush=True)  # the log has the whole story, these lines included

        try:
            yield say
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class MetricsFollower(threading.Thread):
    """Prints a line for each new step a run appends to its metrics.jsonl, read as it grows
    (`describe(row)` says what, or None to stay quiet): the training workers' own prints land
    in the log, not on the terminal. Steps already in the file when it starts are old news."""

    def __init__(
        self, path: Path, describe: Callable[[dict], str | None], say: Callable[[str], None]
    ) -> None:
        super().__init__(daemon=True)
        self.path, self.describe, self.say = path, describe, say
        self._last_step = max((row["step"] for row in self._rows()), default=-1)
        self._stop_event = threading.Event()

    def _rows(self) -> list[dict]:
        """The complete rows in the file now (a resumed run rewrites it, so read it whole)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().split("\n")[:-1]  # the last piece may be half-written
        return [json.loads(line) for line in lines if line]

    def run(self) -> None:
        while True:
            stopping = self._stop_event.is_set()  # read what is there once more, then end
            for row in self._rows():
                if row["step"] > self._last_step:
                    self._last_step = row["step"]
                    if (text := self.describe(row)) is not None:
                        self.say(text)
            if stopping:
                return
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
