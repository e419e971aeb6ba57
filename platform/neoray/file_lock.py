"""Exclusive locks between this user's processes, on private lock files.

A `flock` works on any file a process can open, so a lock on a folder (or on a file others can
read) can be taken by every user who can list that folder: a reader could hold it and block
every writer, without a word. The lock files here are the user's own: created 0600 (O_EXCL),
never through a symlink, and one that another user owns is refused. A process that waits for
one says, after a while, which process holds it (`/proc/locks` names the holder of a flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PRIVATE = 0o600
REPORT_AFTER_S = 10.0  # a wait this long is reported, then again at each doubling
POLL_S = 0.05


class LockFileError(PermissionError):
    """A lock file that others could hold (another user's, a symlink, not a plain file)."""


def open_lock_file(path: Path) -> int:
    """A descriptor of the private lock file `path`, created 0600 when absent. An existing one
    is used only if it is a plain file of this user (made 0600 again, with a message, if others
    could open it); a symlink is never followed."""
    # O_NONBLOCK: a FIFO put in its place must not stall the open (no effect on a plain file).
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            continue  # removed between the two opens: create it
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise LockFileError(f"{path}: the lock file is a symlink; remove it") from err
            raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise LockFileError(
            f"{path}: the lock file is not a plain file of {_user(os.geteuid())} (owner "
            f"{_user(info.st_uid)}), so another user could hold it; remove it"
        )
    if info.st_mode & 0o077:
        os.fchmod(fd, PRIVATE)
        message = f"{path}: the lock file could be opened by others; made it private (0600)"
        print(message, file=sys.stderr, flush=True)
    return fd


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def lock_holder(fd: int) -> str:
    """Who holds the flock of the open file `fd`: "pid N (user U)", from /proc/locks."""
    info = os.fstat(fd)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a waiter, or another kind of lock
        if fields[5].rsplit(":", 1)[-1] == str(info.st_ino):
            pid = int(fields[4])
            try:
                owner = _user(os.stat(f"/proc/{pid}").st_uid)
            except FileNotFoundError:  # another PID namespace (a container), or just gone
                return f"pid {pid} (not visible here)"
            return f"pid {pid} (user {owner})"
    return "a process this machine does not show (another node of a shared filesystem?)"


@contextlib.contextmanager
def exclusive(path: Path, report_after: float = REPORT_AFTER_S) -> Iterator[None]:
    """Hold the exclusive lock of lock file `path` (see `open_lock_file`) inside the block; a
    wait longer than `report_after` seconds is reported on stderr with the holder."""
    fd = open_lock_file(path)
    try:
        started = time.monotonic()
        report_at = report_after
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            if waited >= report_at:
                message = f"waiting for the lock {path} held by {lock_holder(fd)} ({waited:.0f} s)"
                print(message, file=sys.stderr, flush=True)
                report_at *= 2
            time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock
