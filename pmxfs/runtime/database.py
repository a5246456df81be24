"""The node's durable copy of the tree: SQLite `<data dir>/config.db`, in pmxcfs's layout.

Layout. One table `tree(inode, parent, version, writer, mtime, type, name, data)`, created with
exactly pmxcfs's statement, so a pmxcfs `config.db` opens here and pmxcfs's loader accepts ours.
The global version lives in the row of inode 0, written as pmxcfs writes it: type 8 (DT_REG), name
`__version__`, parent 0, data NULL. `load` turns that row into the root `Entry` (DIR, name "") that
memdb uses, and `commit` turns it back; a root row stored as DIR "" is read as well. Empty files and
directories store NULL data, as pmxcfs does. The replica's side state (`Persist.meta`) goes to
`pmxfs_meta(key, value)`, a table pmxcfs does not know and ignores; it is created by the first
commit that carries meta (not at open, which never writes), so a pmxcfs database stays as it was
until pmxfs has state of its own to keep.

Durability. WAL mode with `synchronous=FULL`: every COMMIT fsyncs the WAL before it returns. With
the NORMAL level (what pmxcfs uses) a WAL commit is only fsynced at the next checkpoint, so it
survives a process crash but may be lost on power loss -- and the replica acknowledges a write to
the user once its batch is committed, so the commit must be on stable storage by then. The fsync
is paid once per transaction; `commit_many` puts a whole batch of deliveries in one (group commit).
A new database is built under a temporary name and hard-linked into place, so `config.db` is never
an empty or half-initialised file.

Trust. `open` refuses, with a `DatabaseError` naming the file and the problem, anything that is not
a sound pmxfs/pmxcfs database: not SQLite, `PRAGMA integrity_check` failures, a `tree` (or
`pmxfs_meta`) table with other columns, values of the wrong SQL type, unknown entry types. `load`
then runs memdb's `check_tree` on every row and refuses the tree as a whole if anything is wrong
(never half-loaded). Neither writes: the switch to WAL (a no-op for a database already in WAL mode)
and the creation of `pmxfs_meta` wait for the first commit, so a refused database is left
byte-identical. `readonly=True` opens with a `mode=ro` URI for the offline tools; SQLite may still
create the usual empty `-wal`/`-shm` companions of a WAL database, but never changes `config.db`.

A `Database` is used by one caller at a time; it may be handed to a worker thread
(`check_same_thread=False`) but is not safe for concurrent use.

SQL dumps. `dump_sql_gz` writes what `sqlite3 config.db .dump | gzip` writes (`iterdump`), from a
read-only connection of its own inside one read transaction: a consistent snapshot, taken in any
thread while the daemon commits on its own connection. `backup_before_join` puts one at
`<data dir>/backup/config-<unix time>.sql.gz` before a join replaces the tree, as `pvecm add`
does. Like `backup`, a dump goes to a temporary file, is fsynced and hard-linked to its name.

Restores. `restore_database` takes what `backup` wrote (an SQLite file) or an SQL dump (gzip),
told apart by their first bytes, never by the name. It builds the database in a scratch directory
inside the data directory, opens and loads it with `Database.open` and `load` (exactly the
daemon's checks at start), and only then puts it in place: the stale `-wal`, `-shm` and
`-journal` companions of the old `config.db` are removed first (SQLite would apply an old log to
the new file), then the new file is renamed over `config.db` and the directory fsynced. Anything
refused leaves the data directory as it was; a crash between the removal and the rename leaves the
old `config.db` without its log, and running the restore again completes it. The per-node files
beside the database (ring seq, boot id) are never touched: they must only ever grow. An SQL dump
is run with an authorizer that lets it do nothing but create and fill pmxfs's tables (no ATTACH,
no other table, no trigger), and is read whole, up to `MAX_DUMP_BYTES` of text. An SQLite source
is copied byte for byte, so a `-wal` beside it that holds changes is refused rather than missed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import secrets
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from pmxfs.core.entry import ROOT_INODE, Entry, EntryType
from pmxfs.core.errors import StoredStateError
from pmxfs.core.memdb import MAX_ENTRIES, MAX_TOTAL_BYTES, check_tree
from pmxfs.core.persist import Persist
from pmxfs.runtime.durable_file import fsync_directory

DB_NAME = "config.db"
PMXCFS_VERSION_NAME = "__version__"  # pmxcfs's name for the row that holds the global version
SHOWN_PROBLEMS = 3  # problems spelled out in the one-line message; the rest are counted
JOURNAL_SIZE_LIMIT = 16 << 20  # a large transaction (a full resync) does not leave a huge WAL
BACKUP_DIR_NAME = "backup"  # <data dir>/backup/config-<unix time>.sql.gz, as pvecm add names them
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
GZIP_MAGIC = b"\x1f\x8b"
# The most SQL text a restore reads from a dump: the tree's limits with every byte of data written
# as two hex digits, and a generous KiB per row for its numbers, name and quoting.
MAX_DUMP_BYTES = 2 * MAX_TOTAL_BYTES + MAX_ENTRIES * 1024
_RESTORE_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite files that belong to one database

# pmxcfs's statement, verbatim in meaning: "INTEGER PRIMARY KEY" makes inode the rowid.
_CREATE_TREE = (
    "CREATE TABLE tree ("
    "  inode INTEGER PRIMARY KEY NOT NULL,"
    "  parent INTEGER NOT NULL CHECK(typeof(parent)=='integer'),"
    "  version INTEGER NOT NULL CHECK(typeof(version)=='integer'),"
    "  writer INTEGER NOT NULL CHECK(typeof(writer)=='integer'),"
    "  mtime INTEGER NOT NULL CHECK(typeof(mtime)=='integer'),"
    "  type INTEGER NOT NULL CHECK(typeof(type)=='integer'),"
    "  name TEXT NOT NULL,"
    "  data BLOB)"
)
_CREATE_META = "CREATE TABLE IF NOT EXISTS pmxfs_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
_TREE_COLUMNS = (("inode", "INTEGER"), ("parent", "INTEGER"), ("version", "INTEGER"),
                 ("writer", "INTEGER"), ("mtime", "INTEGER"), ("type", "INTEGER"),
                 ("name", "TEXT"), ("data", "BLOB"))
_META_COLUMNS = (("key", "TEXT"), ("value", "BLOB"))

_BAD_TREE_TYPES = (
    "SELECT inode, typeof(parent), typeof(version), typeof(writer), typeof(mtime), typeof(type),"
    " typeof(name), typeof(data), type FROM tree WHERE typeof(parent) != 'integer'"
    " OR typeof(version) != 'integer' OR typeof(writer) != 'integer'"
    " OR typeof(mtime) != 'integer' OR typeof(type) != 'integer' OR typeof(name) != 'text'"
    " OR typeof(data) NOT IN ('blob', 'null') OR type NOT IN (4, 8) ORDER BY inode"
)
_BAD_META_TYPES = ("SELECT key, typeof(key), typeof(value) FROM pmxfs_meta"
                   " WHERE typeof(key) != 'text' OR typeof(value) != 'blob'")
_UPSERT = ("INSERT OR REPLACE INTO tree (inode, parent, version, writer, mtime, type, name, data)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_SET_VERSION = ("INSERT INTO tree (inode, parent, version, writer, mtime, type, name, data)"
                f" VALUES ({ROOT_INODE}, {ROOT_INODE}, ?, 0, 0, {int(EntryType.FILE)},"
                f" '{PMXCFS_VERSION_NAME}', NULL)"
                " ON CONFLICT (inode) DO UPDATE SET version = excluded.version")
_UPSERT_META = "INSERT OR REPLACE INTO pmxfs_meta (key, value) VALUES (?, ?)"

_Row = tuple[int, int, int, int, int, int, str, bytes | None]


class DatabaseError(StoredStateError):
    """A database that cannot be used, or a commit that did not happen.

    `str()` is the one line shown to users: the file, then the problem (the first few and a count
    when there are many). `problems` holds every problem, one line each, for `pmxfs db check`.
    """

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        assert problems
        self.path = path
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:SHOWN_PROBLEMS])
        if len(self.problems) > SHOWN_PROBLEMS:
            shown = (f"{len(self.problems)} problems: {shown}; and "
                     f"{len(self.problems) - SHOWN_PROBLEMS} more")
        super().__init__(f"{path}: {shown}")


@dataclass(frozen=True, slots=True)
class LoadedTree:
    entries: list[Entry]  # every row, root included, sorted by inode
    version: int  # the global version (0 for a database without a version row)
    meta: dict[str, bytes]


class Database:
    """An open `config.db`; see the module comment."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self._conn = conn
        self._wal = False  # switched to WAL mode (by the first commit)

    @classmethod
    def open(cls, data_dir: Path, *, readonly: bool = False) -> Database:
        """Open `data_dir/config.db`, checked; without `readonly`, create the directory and a new
        database (root row, version 0) when they are missing."""
        path = Path(data_dir) / DB_NAME
        if readonly:
            try:
                path.stat()
            except OSError as exc:
                raise DatabaseError(path, [f"cannot open: {exc.strerror or exc}"]) from None
        else:
            _create_if_missing(path)
        mode = "ro" if readonly else "rw"  # "rw" never creates: the file was made above
        try:
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DatabaseError(path, [f"cannot open: {exc}"]) from None
        try:
            conn.text_factory = bytes  # names are decoded in `load`, where bad UTF-8 is reported
            try:
                _verify(path, conn)
                if not readonly:
                    conn.execute("PRAGMA synchronous = FULL")
                    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            except sqlite3.Error as exc:
                raise DatabaseError(path, [_sqlite_problem(exc)]) from None
            return cls(path, conn, readonly)
        except BaseException:
            conn.close()
            raise

    def load(self) -> LoadedTree:
        """Every row and the meta, from one snapshot, after `check_tree` found nothing wrong."""
        try:
            with self._read_transaction():
                # checked at open; again here, so that this snapshot is known to be well typed
                problems = _type_problems(self._conn)
                if problems:
                    raise DatabaseError(self.path, problems)
                rows = self._conn.execute(
                    "SELECT inode, parent, version, writer, mtime, type, name, data FROM tree"
                    " ORDER BY inode").fetchall()
                meta_rows = (self._conn.execute("SELECT key, value FROM pmxfs_meta").fetchall()
                             if _has_table(self._conn, "pmxfs_meta") else [])
        except sqlite3.Error as exc:
            raise DatabaseError(self.path, [_sqlite_problem(exc)]) from None
        entries = [e for row in rows if (e := _entry_of(row, problems)) is not None]
        meta: dict[str, bytes] = {}
        for key, value in meta_rows:
            try:
                meta[key.decode("utf-8")] = value
            except UnicodeDecodeError:
                problems.append(f"pmxfs_meta key {key!r} is not UTF-8")
        version = next((e.version for e in entries if e.inode == ROOT_INODE), 0)
        if not problems:
            problems = check_tree(entries, version)
        if problems:
            raise DatabaseError(self.path, problems)
        return LoadedTree(entries, version, meta)

    def commit(self, batch: Persist) -> None:
        """Make `batch` durable in one transaction: all of it or, with DatabaseError, none."""
        self.commit_many((batch,))

    def commit_many(self, batches: Sequence[Persist]) -> None:
        """Make several batches durable in ONE transaction (one fsync), in order. Any exception
        rolls the transaction back; an `Exception` is raised as DatabaseError, anything else
        (KeyboardInterrupt) as itself."""
        if self.readonly:
            raise DatabaseError(self.path, ["opened read-only: cannot commit"])
        if not batches:
            return
        self._switch_to_wal()
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            if any(b.meta for b in batches):
                conn.execute(_CREATE_META)
            for batch in batches:
                if batch.replace_all:
                    conn.execute("DELETE FROM tree")
                conn.executemany("DELETE FROM tree WHERE inode = ?",
                                 [(inode,) for inode in batch.removed])
                conn.executemany(_UPSERT, [_row_of(e) for e in batch.upserts])
                conn.execute(_SET_VERSION, (batch.version,))
                if batch.meta:  # the table may not exist (a pmxcfs database)
                    conn.executemany(_UPSERT_META, batch.meta)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the error to report is `exc`
                    conn.execute("ROLLBACK")
            if isinstance(exc, Exception):
                raise DatabaseError(self.path, [f"cannot commit: {exc}"]) from exc
            raise

    def backup(self, dest: Path) -> None:
        """A consistent copy of the database at `dest` (which must not exist), made with SQLite's
        backup API while this database stays open; written to a temporary file, fsynced and then
        hard-linked to `dest`, so `dest` never holds a partial copy."""

        def copy(tmp: Path) -> None:
            _new_file(tmp)
            target = sqlite3.connect(f"{tmp.absolute().as_uri()}?mode=rw", uri=True)
            try:
                self._conn.backup(target)  # writes the pages straight into the file
            finally:
                target.close()
            _fsync_path(tmp)

        _write_new(Path(dest), copy, "backup")

    def dump_sql_gz(self, dest: Path) -> None:
        """The database as gzip'd SQL text at `dest` (which must not exist), as `sqlite3
        config.db .dump | gzip` writes it; from one read transaction of a read-only connection
        of its own (so any thread may call it while this Database commits); written to a
        temporary file, fsynced and then hard-linked to `dest` (module comment)."""
        dest = Path(dest)

        def dump(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as raw:
                self._write_sql_gz(raw, dest.name)
                raw.flush()
                os.fsync(raw.fileno())

        _write_new(dest, dump, "dump")

    def _write_sql_gz(self, raw: BinaryIO, name: str) -> None:
        conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                               isolation_level=None)
        try:
            conn.execute("BEGIN")  # one snapshot for every query iterdump makes
            packed = gzip.GzipFile(filename=name, mode="wb", fileobj=raw)
            with io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as text:
                for statement in conn.iterdump():
                    text.write(statement)
                    text.write("\n")
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _read_transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("ROLLBACK")

    def _switch_to_wal(self) -> None:
        """Switch to WAL before the first write (open and load never write); a no-op on a
        database in WAL mode already."""
        if self._wal:
            return
        try:
            (mode,) = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.Error as exc:
            raise DatabaseError(self.path, [f"cannot switch to WAL mode: {exc}"]) from None
        if mode.lower() != b"wal":
            raise DatabaseError(self.path, [f"cannot switch to WAL mode (still {mode.decode()})"])
        self._wal = True


def _sqlite_problem(exc: sqlite3.Error) -> str:
    """What an SQLite error says about the file, for a user."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    if code == sqlite3.SQLITE_NOTADB:
        return f"not an SQLite database ({exc})"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"damaged: {exc}"
    return f"cannot read: {exc}"


def _verify(path: Path, conn: sqlite3.Connection) -> None:
    """Refuse a file that is not a sound pmxfs/pmxcfs database; reads only. SQLite errors are
    the caller's to report."""
    checks = [row[0].decode("utf-8", "replace") for row in conn.execute("PRAGMA integrity_check")]
    if checks != ["ok"]:
        raise DatabaseError(path, [f"damaged: integrity check: {c}" for c in checks])
    for table, columns, creates in (("tree", _TREE_COLUMNS, True),
                                    ("pmxfs_meta", _META_COLUMNS, False)):
        exists = _has_table(conn, table)
        if not exists and creates:
            raise DatabaseError(path, ["not a pmxfs/pmxcfs database: it has no table 'tree'"])
        found = tuple((name.decode(), decl.decode().upper()) for _, name, decl, *_ in
                      conn.execute(f"PRAGMA table_info({table})"))
        if exists and found != columns:
            def show(cols: Iterable[tuple[str, str]]) -> str:
                return ", ".join(f"{n} {t}".strip() for n, t in cols)
            raise DatabaseError(path, [f"not a pmxfs/pmxcfs database: table '{table}' has "
                                       f"columns ({show(found)}), expected ({show(columns)})"])
    problems = _type_problems(conn)
    if problems:
        raise DatabaseError(path, problems)


def _type_problems(conn: sqlite3.Connection) -> list[str]:
    """Values of the wrong SQL type (or an unknown entry type), one line per row."""
    problems = []
    for inode, *types, entry_type in conn.execute(_BAD_TREE_TYPES):
        wrong = [f"{column} is {kind.decode()}" for column, kind, allowed in zip(
            ("parent", "version", "writer", "mtime", "type", "name", "data"), types,
            ((b"integer",),) * 5 + ((b"text",), (b"blob", b"null")), strict=True)
            if kind not in allowed]
        if not wrong:
            wrong = [f"unknown type {entry_type} (expected 4 for a directory or 8 for a file)"]
        problems.append(f"inode {inode}: " + ", ".join(wrong))
    if _has_table(conn, "pmxfs_meta"):
        problems += [f"pmxfs_meta key {_shown(key)}: key is {tk.decode()}, value is "
                     f"{tv.decode()} (expected text and blob)"
                     for key, tk, tv in conn.execute(_BAD_META_TYPES)]
    return problems


def _shown(value: object) -> str:
    """A value read with text_factory=bytes, as a user reads it."""
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "backslashreplace"))
    return repr(value)


def _entry_of(row: tuple[int, int, int, int, int, int, bytes, bytes | None],
              problems: list[str]) -> Entry | None:
    inode, parent, version, writer, mtime, entry_type, raw_name, data = row
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"inode {inode}: name {raw_name!r} is not UTF-8")
        return None
    if inode == ROOT_INODE and entry_type == EntryType.FILE and name == PMXCFS_VERSION_NAME:
        entry_type, name = EntryType.DIR, ""
    return Entry(inode, parent, version, writer, mtime, EntryType(entry_type), name, data or b"")


def _row_of(entry: Entry) -> _Row:
    if entry.inode == ROOT_INODE:
        assert entry.is_dir, entry
        assert entry.name == "", entry
        assert not entry.data, entry
        return (ROOT_INODE, entry.parent, entry.version, entry.writer, entry.mtime,
                int(EntryType.FILE), PMXCFS_VERSION_NAME, None)
    return (entry.inode, entry.parent, entry.version, entry.writer, entry.mtime,
            int(entry.type), entry.name, entry.data or None)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def _create_if_missing(path: Path) -> None:
    """A new database (tree table, root row at version 0) at `path` unless one is there."""
    if os.path.lexists(path):
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(path, [f"cannot create {exc.filename or path.parent}: "
                                   f"{exc.strerror or exc}"]) from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    try:
        _new_file(tmp)
        conn = sqlite3.connect(f"{tmp.absolute().as_uri()}?mode=rw", uri=True,
                               isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN")
            conn.execute(_CREATE_TREE)
            conn.execute(_SET_VERSION, (0,))
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints: the whole database is in the file
        _fsync_path(tmp)
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            os.link(tmp, path)
        _fsync_path(path.parent)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DatabaseError(path, [f"cannot create: {reason}"]) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _write_new(dest: Path, write: Callable[[Path], None], what: str) -> None:
    """`write` a temporary file beside `dest`, then hard-link it to `dest`, which must not
    exist: `dest` never holds a partial file, and an existing one is never replaced."""
    if os.path.lexists(dest):
        raise DatabaseError(dest, ["exists; a backup never replaces a file"])
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            write(tmp)
            os.link(tmp, dest)
            _fsync_path(dest.parent)
        except FileExistsError:
            raise DatabaseError(dest, ["exists; a backup never replaces a file"]) from None
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise DatabaseError(dest, [f"cannot write the {what}: {reason}"]) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_before_join(data_dir: Path, database: Database, now: int) -> Path:
    """`pvecm add`'s copy of the joining node's database: an SQL dump of `database` at
    `<data_dir>/backup/config-<now>.sql.gz` (`now` in seconds since the epoch), the directory
    created with mode 0700 when missing; returns the path of the dump."""
    directory = Path(data_dir) / BACKUP_DIR_NAME
    try:
        directory.mkdir(mode=0o700)
        fsync_directory(directory.parent)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseError(directory, [f"cannot create: {exc.strerror or exc}"]) from None
    dest = directory / f"config-{now}.sql.gz"
    database.dump_sql_gz(dest)
    return dest


def restore_database(data_dir: Path, source: Path) -> LoadedTree:
    """Replace `data_dir/config.db` by the database in `source` (what `Database.backup` or
    `dump_sql_gz` wrote), once a copy of it passed every check of the daemon's start; returns
    its tree. Refused (DatabaseError, `data_dir` unchanged) when it does not (module comment).
    The caller makes sure no daemon uses `data_dir` meanwhile."""
    data_dir, source = Path(data_dir), Path(source)
    is_dump = _is_sql_dump(source)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    except OSError as exc:
        raise DatabaseError(data_dir / DB_NAME, [f"cannot restore: {exc.strerror or exc}"]
                            ) from None
    try:
        staged = staging / DB_NAME
        try:
            if is_dump:
                _build_from_dump(source, staged)
            else:
                _copy_database(source, staged)
            _fsync_path(staged)
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise DatabaseError(source, [f"cannot copy into {data_dir}: {reason}"]) from None
        try:
            with Database.open(staging) as checked:
                tree = checked.load()
        except DatabaseError as exc:
            raise DatabaseError(source, exc.problems) from None
        try:
            _put_in_place(staged, data_dir / DB_NAME)
        except OSError as exc:
            raise DatabaseError(data_dir / DB_NAME, [f"cannot replace: {exc.strerror or exc}"]
                                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def _is_sql_dump(source: Path) -> bool:
    """True for a gzip file (an SQL dump), False for an SQLite database; refuses the rest."""
    try:
        with open(source, "rb") as file:
            head = file.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise DatabaseError(source, [f"cannot open: {exc.strerror or exc}"]) from None
    if head == SQLITE_MAGIC:
        return False
    if head.startswith(GZIP_MAGIC):
        return True
    raise DatabaseError(source, ["neither an SQLite database nor a gzip'd SQL dump"])


def _copy_database(source: Path, staged: Path) -> None:
    wal = source.with_name(f"{source.name}-wal")
    with contextlib.suppress(FileNotFoundError):
        if wal.stat().st_size:
            raise DatabaseError(source, [f"its write-ahead log {wal} holds changes that a copy "
                                         "would miss: copy it with `pmxfs db backup` first"])
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as copy, open(source, "rb") as original:
        shutil.copyfileobj(original, copy)


def _build_from_dump(source: Path, staged: Path) -> None:
    """Run the SQL text of `source` into a new database at `staged`, allowed to do nothing but
    create and fill pmxfs's tables."""
    text = _read_dump(source)
    _new_file(staged)
    conn = sqlite3.connect(f"{staged.absolute().as_uri()}?mode=rw", uri=True,
                           isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a scratch file: fsynced once, at the end
        refused: list[str] = []
        conn.set_authorizer(functools.partial(_authorize_dump, refused))
        try:
            conn.executescript(text)
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a NUL character in the text
            problem = refused[0] if refused else f"cannot run the SQL dump: {exc}"
            raise DatabaseError(source, [problem]) from None
        if conn.in_transaction:
            raise DatabaseError(source, ["the SQL dump ends inside a transaction (cut short?)"])
    finally:
        conn.close()


def _read_dump(source: Path) -> str:
    try:
        with gzip.open(source, "rb") as packed:
            raw = packed.read(MAX_DUMP_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatabaseError(source, [f"not a readable gzip file: {exc}"]) from None
    if len(raw) > MAX_DUMP_BYTES:
        raise DatabaseError(source, [f"more than {MAX_DUMP_BYTES >> 20} MiB of SQL text: larger "
                                     "than the dump of any pmxfs database"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatabaseError(source, [f"not an SQL dump: byte {exc.start} of its text is not "
                                     "UTF-8"]) from None


_DUMP_TABLES = frozenset({"tree", "pmxfs_meta"})
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema"})  # CREATE TABLE writes there
# typeof: the CHECKs of pmxcfs's table; replace, char, unistr: how the sqlite3 shell quotes text
_DUMP_FUNCTIONS = frozenset({"typeof", "replace", "char", "unistr"})
_AUTHORIZER_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "ALTER_TABLE", "ANALYZE", "ATTACH", "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX",
    "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER", "CREATE_TEMP_VIEW", "CREATE_TRIGGER",
    "CREATE_VIEW", "CREATE_VTABLE", "DELETE", "DETACH", "DROP_INDEX", "DROP_TABLE",
    "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER",
    "DROP_VIEW", "DROP_VTABLE", "FUNCTION", "INSERT", "PRAGMA", "READ", "RECURSIVE", "REINDEX",
    "SAVEPOINT", "SELECT", "TRANSACTION", "UPDATE")}


def _authorize_dump(refused: list[str], action: int, arg1: str | None, arg2: str | None,
                    db_name: str | None, _trigger: str | None) -> int:
    """SQLite's authorizer for a dump being run: what `iterdump` and the sqlite3 shell's
    `.dump` write for pmxfs's tables, and nothing else; the first refusal is noted."""
    allowed = db_name in (None, "main") and (
        action == sqlite3.SQLITE_TRANSACTION
        or (action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() == "foreign_keys")
        or (action == sqlite3.SQLITE_CREATE_TABLE and arg1 in _DUMP_TABLES)
        or (action == sqlite3.SQLITE_CREATE_INDEX and arg2 in _DUMP_TABLES
            and (arg1 or "").startswith("sqlite_autoindex_"))  # a TEXT PRIMARY KEY's index
        or (action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_READ)
            and (arg1 in _DUMP_TABLES or arg1 in _SCHEMA_TABLES))
        or (action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES)
        or (action == sqlite3.SQLITE_FUNCTION and arg2 in _DUMP_FUNCTIONS))
    if allowed:
        return sqlite3.SQLITE_OK
    if not refused:
        what = " ".join([_AUTHORIZER_ACTIONS.get(action, f"SQLite action {action}"),
                         *(repr(arg) for arg in (arg1, arg2) if arg is not None)])
        refused.append("not a pmxfs/pmxcfs SQL dump: it does more than create and fill the "
                       f"tables tree and pmxfs_meta ({what})")
    return sqlite3.SQLITE_DENY


def _put_in_place(staged: Path, target: Path) -> None:
    """Rename `staged` over `target` once no log of the old database is left beside it."""
    for suffix in _RESTORE_COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{target}{suffix}")
    fsync_directory(target.parent)  # the old logs are gone for good before the new file appears
    os.replace(staged, target)
    fsync_directory(target.parent)
