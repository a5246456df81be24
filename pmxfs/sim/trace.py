"""The trace of one simulated run: every line goes into a hash, so two runs of a seed can be
compared cheaply (they must agree); the lines themselves are kept only when asked (`--trace`)."""

from __future__ import annotations

import hashlib


class Trace:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.lines: list[str] = []
        self._hash = hashlib.sha256()

    def __call__(self, line: str) -> None:
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        if self.keep:
            self.lines.append(line)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()
