"""Locks on private lock files: another local user who can read the storage or the index cache
cannot hold the lock that conditional writes and index builds take, and a process that waits
for a lock says who holds it."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from neoray.data.index_cache import load_or_build, lock_file
from neoray.file_lock import LockFileError, exclusive, open_lock_file
from neoray.storage import LOCK_FILE, LocalStorage

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every local user can read (tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="neoray-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def held_elsewhere(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def hold_as_nobody(*paths: Path) -> list[subprocess.Popen]:
    """`nobody` holding a flock on each path (a folder it can read), until killed."""
    holders = [subprocess.Popen(["flock", str(p), "sleep", "60"], user=NOBODY) for p in paths]
    deadline = time.monotonic() + 10
    while not all(held_elsewhere(p) for p in paths):
        assert time.monotonic() < deadline, "nobody never took its locks"
        time.sleep(0.05)
    return holders


def finishes(action: Callable[[], object], within: float = 10) -> bool:
    done = threading.Thread(target=action, daemon=True)
    done.start()
    done.join(within)
    return not done.is_alive()


def test_a_reader_holding_the_folders_cannot_block_writes_or_index_builds(shared):
    storage = LocalStorage(shared / "runs")
    assert storage.put_if("run/lease.json", b"first", None)  # makes the folders, 0755
    index = shared / "cache"
    index.mkdir()
    holders = hold_as_nobody(shared / "runs", shared / "runs" / "run", index)
    try:
        version = storage.read_versioned("run/lease.json")[1]
        assert finishes(lambda: storage.put_if("run/lease.json", b"second", version))
        assert storage.get_bytes("run/lease.json") == b"second"
        paths = {"order": str(index / "order.npy")}
        built = finishes(lambda: load_or_build(paths, lambda p: np.save(p["order"], [1]), "x"))
        assert built and np.load(paths["order"]).tolist() == [1]
        for lock in (shared / "runs" / LOCK_FILE, lock_file(paths)):
            assert lock.stat().st_mode & 0o777 == 0o600
            tried = subprocess.run(
                ["flock", "-n", str(lock), "true"], user=NOBODY, capture_output=True, text=True
            )
            assert tried.returncode != 0 and "Permission denied" in tried.stderr
        assert storage.list("") == ["run/lease.json"]  # the lock file is no key
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_waiter_says_which_process_holds_the_lock(tmp_path, capfd):
    lock = tmp_path / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from neoray.file_lock import exclusive\n"
            "with exclusive(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(1.5)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        waiting = time.monotonic()
        with exclusive(lock, report_after=0.3):
            assert time.monotonic() - waiting > 1  # the lock came only when the holder let go
    finally:
        holder.kill()
        holder.wait()
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert f"waiting for the lock {lock} held by pid {holder.pid} (user {user})" in (
        capfd.readouterr().err
    )


def test_only_a_private_lock_file_of_this_user_is_used(tmp_path, capfd):
    os.close(open_lock_file(tmp_path / "new"))
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600
    readable = tmp_path / "readable"
    readable.touch(mode=0o644)
    os.close(open_lock_file(readable))
    assert readable.stat().st_mode & 0o777 == 0o600
    assert "could be opened by others; made it private (0600)" in capfd.readouterr().err
    theirs = tmp_path / "theirs"
    theirs.touch(mode=0o600)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(LockFileError, match=r"not a plain file of root \(owner nobody\)"):
        open_lock_file(theirs)
    (tmp_path / "link").symlink_to(tmp_path / "new")
    with pytest.raises(LockFileError, match="is a symlink"):
        open_lock_file(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(LockFileError, match="not a plain file"):
        open_lock_file(tmp_path / "fifo")
