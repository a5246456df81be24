"""The lock that keeps one daemon (or `pmxfs db restore`) per data directory: an exclusive flock
on `<data-dir>/pmxfs.lock`, taken without waiting, with the holder's pid written into the file
so a refusal can name it. Closing the descriptor releases it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "pmxfs.lock"


class DataDirLocked(Exception):
    """Another process holds the lock; `holder` is its pid as it wrote it (or "unknown")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_data_dir(data_dir: Path) -> int:
    """The lock's descriptor; `DataDirLocked` when held, `OSError` when the file cannot be
    opened."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
