"""Exclusive locks: one run at a time per output_dir (rank 0 holds it for the whole run), and one
builder at a time per data cache entry (`exclusive`).

Gap filled: nothing stopped two `sftdist train` on one output_dir; the second resumed from a
checkpoint that the first one's rotation then deleted, and both wrote `final/`.

Why `flock` rather than an O_EXCL file: the kernel drops a flock when its holder dies, kill -9
included, so a crashed run can never block the next one, and no guess about whether a pid is alive
(meaningless for a pid on another host) is needed. The file's content (pid, host, start time) only
feeds the messages: a second run names the holder, and a run that finds the content of a holder
that is gone without removing it (it crashed) says that it takes that stale lock over. Across
machines the lock holds where the shared filesystem makes flock coherent (NFSv4, Lustre mounted
with `-o flock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import click

from sftdist.errors import UserError

LOCK_FILE = "sftdist.lock"


class RunLock:
    """A held output_dir lock; `release()` removes the file, and the directories the lock created if empty."""

    def __init__(self, path: Path, fd: int, created_dirs: list[Path]) -> None:
        self.path, self._fd, self._created_dirs = path, fd, created_dirs

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it: a run waiting on this inode re-checks the path and starts over.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        _remove_empty(self._created_dirs)  # a run that stopped before writing anything leaves nothing behind


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a lock created, deepest first, as far as they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


class Held(Exception):
    """The lock is held by another process; `holder` is what it wrote into the lock file."""

    def __init__(self, holder: dict) -> None:
        super().__init__(holder)
        self.holder = holder


def _lock(path: Path, blocking: bool) -> int:
    """An fd holding an exclusive flock on `path` (created if absent); `Held` if another process holds it
    and `blocking` is false."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Held(holder) from None
        try:  # the holder may have released (and unlinked) the file between our open and flock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, waiting for any other holder (the data cache's
    builders: one builds, the others then find its entry). The file stays for the next builder."""
    fd = _lock(path, blocking=True)
    try:
        yield
    finally:
        os.close(fd)


def acquire(output_dir: Path) -> RunLock:
    """Lock `output_dir` (created if absent) for this process, or raise a UserError naming the holder;
    a failure (another holder, a full disk) leaves output_dir as it was found."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: output_dir exists and is not a directory")
    created = [d for d in (output_dir, *output_dir.parents) if not d.exists()]  # deepest first
    path = output_dir / LOCK_FILE
    held = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        held = RunLock(path, _lock(path, blocking=False), created)
        stale = _holder(held._fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(held._fd, 0)
        os.pwrite(held._fd, json.dumps(me).encode("utf-8"), 0)
    except Held as e:
        _remove_empty(created)
        raise UserError(
            f"{output_dir}: another sftdist run holds this output_dir (pid {e.holder.get('pid', '?')} on "
            f"host {e.holder.get('host', '?')}, since {e.holder.get('since', '?')}); wait for it to end, "
            "or choose another output_dir"
        ) from None
    except OSError as e:
        if held is not None:
            held.release()  # removes the directories it created too
        else:
            _remove_empty(created)
        raise UserError(f"{path}: cannot lock the output_dir ({e.strerror})") from None
    if stale:
        click.echo(
            f"warning: {path}: taking over a stale lock from a run that ended without releasing it "
            f"(pid {stale.get('pid', '?')} on host {stale.get('host', '?')})",
            err=True,
        )
    return held
