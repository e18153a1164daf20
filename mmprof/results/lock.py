"""An advisory lock on a run folder while one command writes it: a second writer is refused, by pid.

The lock is `flock` on `RUN/.lock` (which holds the writer's pid), removed on release. The kernel
drops the lock when the process ends however it ends (kill -9 included): a `.lock` left behind then
is unlocked, and never blocks a later --resume.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mmprof.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path | str) -> "RunLock":
        path = Path(folder) / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot lock run folder {folder}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"run folder {folder} is being written by another mmprof (pid {holder}); "
                                "wait for it to end") from None
            if _same_file(fd, path):     # not a file the previous holder removed as this one opened it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file, then unlock (a writer that opened it meanwhile sees it gone, retries)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
