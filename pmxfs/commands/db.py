"""`pmxfs db check|dump|backup`: offline tools for a node's database, `DIR/config.db`.

They open the database read-only (a `mode=ro` SQLite URI: `config.db` is never changed, also when
the daemon is running or the database is damaged) and go through the same checks as the daemon at
start (`pmxfs.runtime.database`: SQLite integrity, the pmxcfs table layout, value types, then
memdb's `check_tree`), so "check says ok" means "the daemon will load it".

* `check DIR`: exit 0 and `DIR/config.db: ok, N entries, version V` (N without the root);
  exit 1 and every problem on stderr, one per line, `DIR/config.db: problem`.
* `dump DIR`: the tree, one line per entry (format in DUMP_FORMAT); a damaged database is refused
  as by `check`.
* `backup DIR FILE`: a consistent copy (SQLite's backup API, safe while the daemon runs), written
  to a temporary file and linked to FILE, which must not exist; prints `DIR/config.db: copied to
  FILE, N entries, version V`. Only a sound database is copied: a damaged one is refused as by
  `check`, so a backup always loads.

Any failure exits 1 with one line per problem and no traceback; usage mistakes exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from pmxfs.core.entry import ROOT_INODE, Entry
from pmxfs.runtime.database import Database, DatabaseError, LoadedTree

DUMP_FORMAT = """\
output format (stable; fields separated by one TAB):
  # path<TAB>type<TAB>size<TAB>version<TAB>writer<TAB>mtime      (this header line first)
  /<TAB>dir<TAB>0<TAB>12<TAB>1<TAB>2024-05-01T12:00:00Z
  /nodes/pve1/qemu-server/100.conf<TAB>file<TAB>523<TAB>9<TAB>2<TAB>2024-05-01T11:58:03Z
path: absolute within the tree ("/" is the root), entries sorted by path component;
  a backslash in a name is written as \\\\, a tab, newline or other unprintable character
  as \\t, \\n, \\xNN, \\uNNNN.
type: dir or file. size: bytes of content (0 for a directory). version: the global version
  of the change that last wrote the entry (for "/": the tree's version). writer: node id of
  that change. mtime: UTC, ISO 8601 (seconds since the epoch when out of that range)."""


def configure(db: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs db` (see `pmxfs.cli`), with its `check`, `dump` and `backup`
    subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    db.description = """\
Offline tools for a node's database, DIR/config.db, where DIR is the daemon's --data-dir
(/var/lib/pmxfs unless it was given another). The database is opened read-only, so they are
safe while the daemon runs, and they check it as the daemon does at start."""
    db.epilog = """\
examples:
  pmxfs db check /var/lib/pmxfs
  pmxfs db dump /var/lib/pmxfs | grep qemu-server
  pmxfs db backup /var/lib/pmxfs /root/config.db.backup"""
    db.formatter_class = raw
    commands = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    check = commands.add_parser(
        "check", help="check DIR/config.db as the daemon does at start",
        description="""\
Check DIR/config.db as the daemon does at start: SQLite integrity, the table layout, value
types, and the tree (names, parents, VMIDs, limits). Exit 0 and a one-line summary when it is
sound (the daemon will load it); exit 1 and every problem on stderr, one per line, otherwise.""",
        epilog="examples:\n  pmxfs db check /var/lib/pmxfs", formatter_class=raw)
    check.add_argument("dir", metavar="DIR", help="the data directory holding config.db")
    check.set_defaults(handler=run_check)
    dump = commands.add_parser(
        "dump", help="print the tree stored in DIR/config.db, one line per entry",
        description="Print the tree stored in DIR/config.db, one line per entry.\nA damaged "
                    "database is refused, with its problems, as by `pmxfs db check`.",
        epilog=f"{DUMP_FORMAT}\n\nexamples:\n  pmxfs db dump /var/lib/pmxfs\n"
               "  pmxfs db dump /var/lib/pmxfs | cut -f1,4   # path and version of each entry",
        formatter_class=raw)
    dump.add_argument("dir", metavar="DIR", help="the data directory holding config.db")
    dump.set_defaults(handler=run_dump)
    backup = commands.add_parser(
        "backup", help="copy DIR/config.db to FILE (safe while the daemon runs)",
        description="""\
Copy DIR/config.db to FILE with SQLite's backup API: a consistent copy, also while the daemon
runs. FILE must not exist; it appears complete or not at all. A damaged database is refused as
by `pmxfs db check`, so a backup always loads.""",
        epilog="examples:\n  pmxfs db backup /var/lib/pmxfs /root/config.db.$(date +%F)",
        formatter_class=raw)
    backup.add_argument("dir", metavar="DIR", help="the data directory holding config.db")
    backup.add_argument("file", metavar="FILE", help="where to write the copy (must not exist)")
    backup.set_defaults(handler=run_backup)


def _report(exc: DatabaseError) -> int:
    for problem in exc.problems:
        print(f"{exc.path}: {problem}", file=sys.stderr)
    return 1


def run_check(args: argparse.Namespace) -> int:
    """Handler of `pmxfs db check`; returns the exit status."""
    try:
        with Database.open(Path(args.dir), readonly=True) as db:
            tree = db.load()
    except DatabaseError as exc:
        return _report(exc)
    count = sum(1 for e in tree.entries if e.inode != ROOT_INODE)
    print(f"{db.path}: ok, {count} entries, version {tree.version}")
    return 0


def run_dump(args: argparse.Namespace) -> int:
    """Handler of `pmxfs db dump`; returns the exit status."""
    try:
        with Database.open(Path(args.dir), readonly=True) as db:
            tree = db.load()
    except DatabaseError as exc:
        return _report(exc)
    for line in dump_lines(tree):
        print(line)
    return 0


def run_backup(args: argparse.Namespace) -> int:
    """Handler of `pmxfs db backup`; returns the exit status."""
    try:
        with Database.open(Path(args.dir), readonly=True) as db:
            tree = db.load()
            db.backup(Path(args.file))
    except DatabaseError as exc:
        return _report(exc)
    count = sum(1 for e in tree.entries if e.inode != ROOT_INODE)
    print(f"{db.path}: copied to {args.file}, {count} entries, version {tree.version}")
    return 0


def dump_lines(tree: LoadedTree) -> list[str]:
    """The lines of `pmxfs db dump` for a checked tree (header first)."""
    by_inode = {e.inode: e for e in tree.entries}
    paths: dict[int, tuple[str, ...]] = {ROOT_INODE: ()}

    def parts(entry: Entry) -> tuple[str, ...]:
        # check_tree guarantees that every entry reaches the root, without a cycle
        chain: list[Entry] = []
        up = entry
        while up.inode not in paths:
            chain.append(up)
            up = by_inode[up.parent]
        for e in reversed(chain):
            paths[e.inode] = (*paths[e.parent], e.name)
        return paths[entry.inode]

    lines = ["# path\ttype\tsize\tversion\twriter\tmtime"]
    for e in sorted(tree.entries, key=parts):
        shown = "/" + "/".join(_escape(name) for name in paths[e.inode])
        lines.append(f"{shown}\t{'dir' if e.is_dir else 'file'}\t{len(e.data)}\t{e.version}\t"
                     f"{e.writer}\t{_time(e.mtime)}")
    return lines


def _escape(name: str) -> str:
    """A name on one line: backslash and unprintable characters (tab, newline, ...) escaped."""
    return "".join("\\\\" if c == "\\" else c if c.isprintable()
                   else c.encode("unicode_escape").decode("ascii") for c in name)


def _time(mtime: int) -> str:
    try:
        return datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(mtime)
