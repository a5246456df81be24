"""corosync.conf syntax: text -> raw tree (`RawSection`/`RawEntry`) with source positions.

`lex` reads the text line by line: `name {` opens a section, `}` on a line of its own closes it,
`key: value` is an entry (the value is everything after the first colon, trimmed), and a line
whose first non-blank character is `#` is a comment (as in corosync, `#` later on a line is part
of the value). A line that fits none of these is reported and skipped, so one pass reports every
error it can; an unclosed section is reported at the line that opened it.

The raw tree is what the file literally says; the typed model keeps the content pmxfs does not
use in this form too, so that it is rendered back as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias

from pmxfs.core.conf.errors import Pos, Reporter, short


@dataclass(frozen=True)
class RawEntry:
    """A `key: value` line kept as text."""

    key: str
    value: str
    pos: Pos | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RawSection:
    """A `name { ... }` block kept as text."""

    name: str
    items: tuple[RawEntry | RawSection, ...] = ()
    pos: Pos | None = field(default=None, compare=False)


RawItem: TypeAlias = "RawEntry | RawSection"


def item_name(item: RawItem) -> str:
    """The key of an entry, the name of a section."""
    return item.key if isinstance(item, RawEntry) else item.name


_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_CTRL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _Open:
    """A section whose closing brace has not been read yet."""

    def __init__(self, name: str, pos: Pos, valid: bool) -> None:
        self.name = name
        self.pos = pos  # where it opened, for an "unclosed" error
        self.valid = valid  # False: a bad name was reported; the section is read but dropped
        self.items: list[RawItem] = []  # what it holds so far


def lex(text: str, rep: Reporter) -> list[RawItem]:
    """The raw tree of `text` (see the module comment); each problem goes to `rep`."""
    root: list[RawItem] = []
    stack: list[_Open] = []

    def close() -> None:
        top = stack.pop()
        if top.valid:
            target = stack[-1].items if stack else root
            target.append(RawSection(top.name, tuple(top.items), top.pos))

    lines = text.split("\n")
    for lineno, raw_line in enumerate(lines, 1):
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        stripped = line.strip()
        if not stripped:
            continue
        col = len(line) - len(line.lstrip()) + 1
        bad = _CTRL_RE.search(line)
        if bad is not None:
            rep.error(Pos(lineno, bad.start() + 1),
                      f"control character U+{ord(bad.group()):04X} is not allowed")
            continue
        if stripped.startswith("#"):
            continue
        pos = Pos(lineno, col)
        target = stack[-1].items if stack else root
        if stripped == "}":
            if not stack:
                rep.error(pos, "unknown section end")
            else:
                close()
        elif stripped.endswith("{") and "}" not in stripped and stripped.count("{") == 1:
            name = stripped[:-1].rstrip()
            valid = bool(_NAME_RE.match(name))
            if not name:
                rep.error(pos, "section name missing before '{'")
            elif not valid:
                rep.error(pos, f"invalid section name '{short(name)}'")
            stack.append(_Open(name, pos, valid))
        elif "{" in stripped or "}" in stripped:
            rep.error(pos, "'{' and '}' must end or stand on a line of their own "
                           "(one 'key: value' per line)")
        elif ":" in stripped:
            key, _, value = stripped.partition(":")
            key = key.rstrip()
            value = value.strip()
            if not key:
                rep.error(pos, "missing key name before ':'")
            elif not _NAME_RE.match(key):
                rep.error(pos, f"invalid key name '{short(key)}'")
            elif not value:
                rep.error(pos, f"missing value for '{key}'")
            else:
                target.append(RawEntry(key, value, pos))
        else:
            rep.error(pos, f"expected 'key: value', 'name {{' or '}}', got '{short(stripped)}'")
    while stack:
        top = stack[-1]
        rep.error(top.pos, f"missing closing brace for section '{top.name}'")
        close()
    return root
