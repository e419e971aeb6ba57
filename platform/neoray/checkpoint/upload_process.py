"""Checkpoint uploads in a process of their own.

Hashing and sending a checkpoint's shards from a thread of the training process competes with
training for the interpreter lock, not only for the cores: steps slow down while an upload runs
(PyTorch's asynchronous checkpointing found the same and moved its uploads to another process).
So the training process starts one child process per run, at low CPU priority, that hashes and
uploads the staged files it is told of and answers with their manifest entries; the training
process only waits on a pipe. The commit protocol stays in the training process
(`neoray.checkpoint.snapshot`): the child never writes a manifest.

The child is `python -m neoray.checkpoint.upload_process`; requests and answers are JSON lines on
its stdin and stdout. The first line names the storage (a `StorageConfig`, without credentials:
those come from the environment it inherits). It ends when its stdin closes, so a training
process that dies takes its uploader with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import neoray
from neoray.checkpoint.manifest import FileEntry, file_entry
from neoray.storage import StorageConfig, StorageError, join_key, open_storage

UPLOAD_NICENESS = 10  # the child yields the CPU to training


class UploadProcess:
    """A child process that uploads staged checkpoint folders to one storage, started on first
    use and again after it died. Not thread-safe: one upload at a time."""

    def __init__(self, storage_config: StorageConfig) -> None:
        self.storage_config = storage_config
        self.process: subprocess.Popen | None = None

    def upload(self, folder: Path, key: str) -> list[FileEntry]:
        """Upload every file under `folder` to `key/<its path relative to folder>`, in name
        order, and return their entries (size, sha256); raises StorageError when the upload or
        the child fails."""
        process = self._running()
        request = json.dumps({"folder": str(folder), "key": key})
        try:
            process.stdin.write(request + "\n")
            process.stdin.flush()
            answer = process.stdout.readline()
        except OSError as err:
            answer = ""
            ended = f"{type(err).__name__}: {err}"
        else:
            ended = ""
        if not answer:
            self.close()
            raise StorageError(f"the upload process ended while uploading {folder} {ended}".strip())
        reply = json.loads(answer)
        if "error" in reply:
            raise StorageError(reply["error"])
        return [FileEntry(**entry) for entry in reply["files"]]

    def start(self) -> None:
        """Start the child now (its interpreter and imports take a core for about a second:
        better before training than during its first save)."""
        self._running()

    def _running(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_environment(),
            )
            self.process.stdin.write(json.dumps(asdict(self.storage_config)) + "\n")
            self.process.stdin.flush()
        return self.process

    def close(self) -> None:
        """End the child (it finishes nothing: call between uploads)."""
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _environment() -> dict[str, str]:
    """The parent's environment, with this `neoray` importable whatever the working directory
    (a source checkout on PYTHONPATH, as in a Ray job's working_dir)."""
    env = dict(os.environ)
    here = str(Path(neoray.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def upload_folder(storage, folder: Path, key: str) -> list[FileEntry]:
    """Hash and upload every file under `folder` (the child's work)."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        entries.append(file_entry(path, name))
        storage.upload_file(path, join_key(key, name))
    return entries


def main() -> None:
    """The child: read requests from stdin until it closes, answer each on stdout."""
    with contextlib.suppress(AttributeError, OSError):  # elsewhere: normal priority
        os.setpriority(os.PRIO_PROCESS, 0, UPLOAD_NICENESS)
    answers = os.fdopen(os.dup(1), "w")  # the answers' own pipe: a library that prints
    os.dup2(2, 1)  # to stdout writes to stderr instead
    sys.stdout = sys.stderr
    storage = open_storage(StorageConfig(**json.loads(sys.stdin.readline())))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            files = upload_folder(storage, Path(request["folder"]), request["key"])
            reply: dict = {"files": [asdict(entry) for entry in files]}
        except Exception as err:  # reported to the training process, which goes on
            reply = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
