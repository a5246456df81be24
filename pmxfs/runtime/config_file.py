"""A corosync.conf read from disk: the bytes checked for being text (UTF-8, no NUL, at most
1 MiB, as a file in the tree), then `pmxfs.core.conf.check` -- the code path the file system
uses for writes to /etc/pve/corosync.conf -- and its problems reported one per line,
`FILE:LINE:COL: reason`. `pmxfs config check`, `pmxfs debug cpg` and the daemon read their
config this way, so each reports a bad file exactly like the others.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pmxfs.core import conf
from pmxfs.core.errors import LocalError

MAX_CONFIG_BYTES = 1024 * 1024  # a file in the tree is at most 1 MiB


class ConfigUnreadable(LocalError):
    """The file cannot be read at all."""


def _decode(data: bytes, filename: str) -> tuple[str | None, conf.ConfigError | None]:
    """Text of a file, or the one error that says why it is not text."""

    def where(offset: int) -> tuple[int, int]:
        line = data.count(b"\n", 0, offset) + 1
        col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        return line, col

    if len(data) > MAX_CONFIG_BYTES:
        return None, conf.ConfigError(filename, 1, 1, f"file is too large ({len(data)} bytes; "
                                                      f"at most {MAX_CONFIG_BYTES})")
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = where(nul)
        return None, conf.ConfigError(filename, line, col, "binary data (NUL byte): not a text "
                                                           "file")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line, col = where(exc.start)
        return None, conf.ConfigError(filename, line, col, f"not UTF-8 text (byte "
                                                           f"0x{data[exc.start]:02x})")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None


def load(path: str, current: conf.ClusterConfig | None) -> conf.CheckResult:
    text, error = _decode(_read(path), path)
    if text is None:
        assert error is not None
        return conf.CheckResult(None, (error,), ())
    return conf.check(text, path, current)


def report(problems: tuple[conf.ConfigError, ...]) -> None:
    for problem in sorted(problems, key=lambda p: (p.filename, p.line, p.col)):
        print(problem, file=sys.stderr)


def load_checked(path: str) -> conf.ClusterConfig | None:
    """Read and check the corosync.conf a command runs from, reporting problems exactly as
    `pmxfs config check` does (warnings included); None when it cannot be used."""
    try:
        result = load(path, None)
    except ConfigUnreadable as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return None
    report(result.errors + result.warnings)
    return result.config
