"""Problems found in a corosync.conf, and where they are.

`ConfigError` is one problem (an error, or a warning) at a line and column of a file, printed as
`FILE:LINE:COL: reason`; `ConfigSyntaxError` carries every error `parse` found. Each stage (syntax,
typed model, validation, update rules) collects its problems in a `Reporter`; `by_position` sorts
them the way they are reported, and `short` cuts the file's text that a message quotes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from pmxfs.core.errors import LocalError

Severity: TypeAlias = Literal["error", "warning"]


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a key or a section opening in the source text."""

    line: int
    col: int


@dataclass(frozen=True)
class ConfigError:
    """One problem in a config file: `FILE:LINE:COL: reason` (warnings say `warning:` first)."""

    filename: str
    line: int  # 1-based
    col: int  # 1-based
    reason: str  # what is wrong, for a human
    severity: Severity = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.filename}:{self.line}:{self.col}: {prefix}{self.reason}"


class ConfigSyntaxError(LocalError, ValueError):
    """`parse` found errors; `errors` holds every one of them (never empty)."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class Reporter:
    """Collects the errors and warnings of one file; a missing position means line 1, column 1."""

    def __init__(self, filename: str) -> None:
        self.filename = filename  # put in every problem
        self.errors: list[ConfigError] = []  # in the order reported
        self.warnings: list[ConfigError] = []  # in the order reported

    def error(self, pos: Pos | None, reason: str) -> None:
        p = pos or Pos(1, 1)
        self.errors.append(ConfigError(self.filename, p.line, p.col, reason))

    def warn(self, pos: Pos | None, reason: str) -> None:
        p = pos or Pos(1, 1)
        self.warnings.append(ConfigError(self.filename, p.line, p.col, reason, "warning"))


def short(text: str, limit: int = 40) -> str:
    """`text` as a message quotes it: at most `limit` characters, cut with `...`."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def by_position(errors: Iterable[ConfigError]) -> list[ConfigError]:
    """Problems in the order of the file."""
    return sorted(errors, key=lambda e: (e.line, e.col))
