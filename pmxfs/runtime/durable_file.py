"""Files written so that a crash or a power loss leaves the old content or the new one: never a
mix, never a half-written file, never nothing.

`write_file(path, data, mode=…, replace=True)`: the bytes go to a new temporary file beside
`path` (a unique name opened with O_EXCL, so two writers never share one; `mode` whatever the
umask), which is fsynced and then renamed over `path`; then the directory is fsynced, because a
rename is only durable once its directory is. With `replace=False` the temporary file is
hard-linked to `path` instead, which fails with FileExistsError if `path` exists -- also when it
appeared after any check the caller made (on a file system without hard links: a check, then
the rename). The temporary file never outlives the call.

Every file pmxfs keeps outside SQLite goes through here: the ring seq and boot id files, the
local corosync.conf, lost+found copies, the authkey.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

# errnos of link() on file systems without hard links: fall back to a checked rename
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                            errno.EXDEV})
_NAME_ATTEMPTS = 100  # a clash of two random temporary names is retried this often at most


def write_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
               replace: bool = True) -> None:
    """Put `data` at `path` durably (module header); OSError as the system reports it."""
    target = Path(path)
    tmp = _write_temporary(target, data, mode)
    try:
        if replace:
            os.replace(tmp, target)
        else:
            _link_new(tmp, target)
        fsync_directory(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the entries of `directory` (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some file systems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _write_temporary(target: Path, data: bytes, mode: int) -> Path:
    for _ in range(_NAME_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:  # each write makes progress or raises
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp
    raise OSError(errno.EEXIST, f"cannot pick a temporary file name beside {target}")


def _link_new(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(tmp, target)
