"""`pmxfs db check|dump|backup|restore`: offline tools for a node's database, `DIR/config.db`.

`check`, `dump` and `backup` open the database read-only (a `mode=ro` SQLite URI: `config.db` is
never changed, also when the daemon is running or the database is damaged) and go through the same
checks as the daemon at start (`pmxfs.runtime.database`: SQLite integrity, the pmxcfs table
layout, value types, then memdb's `check_tree`), so "check says ok" means "the daemon will load
it".

* `check DIR`: exit 0 and `DIR/config.db: ok, N entries, version V` (N without the root);
  exit 1 and every problem on stderr, one per line, `DIR/config.db: problem`.
* `dump DIR`: the tree, one line per entry (format in DUMP_FORMAT); a damaged database is refused
  as by `check`.
* `backup DIR FILE`: a consistent copy (SQLite's backup API, safe while the daemon runs), written
  to a temporary file and linked to FILE, which must not exist; prints `DIR/config.db: copied to
  FILE, N entries, version V`. Only a sound database is copied: a damaged one is refused as by
  `check`, so a backup always loads.
* `restore DIR FILE`: the way back, for a re-installed node (back up, wipe, restore, start: the
  node rejoins as itself). FILE is what `backup` wrote or a `config-*.sql.gz` SQL dump such as
  a join leaves in `DIR/backup/`. The daemon must not run meanwhile: the restore takes the
  daemon's own lock, an exclusive flock on `DIR/pmxfs.lock`, without waiting, and holds it to
  the end, so no daemon starts on DIR during a restore either (the lock file stays, as the
  daemon leaves it: removing it could let two daemons lock two different files). DIR is created
  (mode 0700) when missing. `restore_database` checks a copy of FILE as the daemon does at start
  before it replaces `config.db`; a refused FILE leaves the database as it was. The ring seq and
  boot id files in DIR stay: they must never go back. Prints `DIR/config.db: restored from FILE,
  N entries, version V`.

Any failure exits 1 with one line per problem and no traceback; usage mistakes exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from pmxfs.core.entry import ROOT_INODE, Entry
from pmxfs.core.errors import LocalError
from pmxfs.runtime.data_dir_lock import DataDirLocked, lock_data_dir
from pmxfs.runtime.database import (
    DB_NAME,
    Database,
    DatabaseError,
    LoadedTree,
    restore_database,
)
from pmxfs.runtime.durable_file import fsync_directory

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
    """Fill in `pmxfs db` (see `pmxfs.cli`), with its `check`, `dump`, `backup` and `restore`
    subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    db.description = """\
Offline tools for a node's database, DIR/config.db, where DIR is the daemon's --data-dir
(/var/lib/pmxfs unless it was given another). They check the database as the daemon does at
start. check, dump and backup open it read-only, so they are safe while the daemon runs; restore
replaces it, and refuses while a daemon uses DIR."""
    db.epilog = """\
examples:
  pmxfs db check /var/lib/pmxfs
  pmxfs db dump /var/lib/pmxfs | grep qemu-server
  pmxfs db backup /var/lib/pmxfs /root/config.db.backup
  pmxfs db restore /var/lib/pmxfs /root/config.db.backup   # with the daemon stopped"""
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
    restore = commands.add_parser(
        "restore", help="replace DIR/config.db by a backup (with the daemon stopped)",
        description="""\
Replace DIR/config.db by the database in FILE: what `pmxfs db backup` wrote, or an SQL dump
(gzip) such as the DIR/backup/config-TIME.sql.gz a join leaves. FILE is checked as the daemon
checks its database at start before anything changes: a damaged or foreign FILE is refused and
DIR/config.db stays as it was. The daemon must be stopped: the restore refuses while one uses
DIR, and no daemon can start on DIR until it is done. DIR is created when missing (its parent
must exist). The node's other files in DIR (ring seq, boot id) are kept as they are.

Re-installing a node: `pmxfs db backup` before, restore after the re-install, then start the
daemon: the node rejoins the cluster as itself.""",
        epilog="examples:\n"
               "  systemctl stop pmxfs\n"
               "  pmxfs db restore /var/lib/pmxfs /root/config.db.backup\n"
               "  pmxfs db restore /var/lib/pmxfs /var/lib/pmxfs/backup/config-1714564800.sql.gz",
        formatter_class=raw)
    restore.add_argument("dir", metavar="DIR", help="the data directory whose config.db to "
                                                    "replace")
    restore.add_argument("file", metavar="FILE",
                         help="an SQLite database (from `db backup`) or a gzip'd SQL dump")
    restore.set_defaults(handler=run_restore)


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


def run_restore(args: argparse.Namespace) -> int:
    """Handler of `pmxfs db restore`; returns the exit status."""
    data_dir, source = Path(args.dir), Path(args.file)
    try:
        _make_data_dir(data_dir)
        lock_fd = _lock_data_dir(data_dir)
    except LocalError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1
    try:
        tree = restore_database(data_dir, source)
    except DatabaseError as exc:
        return _report(exc)
    finally:
        os.close(lock_fd)
    count = sum(1 for e in tree.entries if e.inode != ROOT_INODE)
    print(f"{data_dir / DB_NAME}: restored from {source}, {count} entries, version {tree.version}")
    return 0


def _make_data_dir(data_dir: Path) -> None:
    """Create `data_dir` (mode 0700; not its parent) unless it exists."""
    try:
        data_dir.mkdir(mode=0o700)
        fsync_directory(data_dir.parent)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LocalError(f"cannot create {data_dir}: {exc.strerror or exc}") from None


def _lock_data_dir(data_dir: Path) -> int:
    """The daemon's lock on `data_dir`, taken without waiting (LocalError naming the daemon when
    one holds it); closing the returned descriptor releases it."""
    try:
        return lock_data_dir(data_dir)
    except DataDirLocked as busy:
        raise LocalError(f"a pmxfs daemon (pid {busy.holder}) is using {data_dir}: stop it "
                         "first") from None
    except OSError as exc:
        raise LocalError(f"cannot use data directory {data_dir}: {exc.strerror or exc}") from None



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
