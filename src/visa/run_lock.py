"""One writer per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock``.

``visa score`` and ``visa select`` hold it for as long as they write into a run folder, so a second
command on the same ``--out`` (by mistake, or a scheduler starting a job twice) can neither delete
the first one's files in flight nor interleave its outputs with them: it is refused at once with one
line naming the holder, or, with ``wait=True``, waits until the first one is done. The lock belongs to
the open file, so the kernel releases it when the holder exits, however it exits (SIGKILL included):
a stale lock file never blocks a rerun. A command removes the file as it lets go (a killed one leaves
it, empty of meaning, for the next command to reuse). Worker processes (local or Ray) write under their driver's
lock and never take it themselves.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from visa.run_folder import LOCK


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's exclusive lock (creating the folder if needed)."""

    def __init__(self, run_dir: Path, *, wait: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.run_dir} is in use by another visa process{holder}; wait for it to finish or "
                    "rerun with --wait to queue behind it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file as it let go: lock the new one
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            # remove the file while still holding it, so the folder keeps no trace of a finished
            # command; a waiter that locked the removed file sees that and locks a new one
            (self.run_dir / LOCK).unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """`` (pid N since T)`` from what the holder wrote into the lock file, or nothing."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {int(info['pid'])} since {str(info['since'])[:19]})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
