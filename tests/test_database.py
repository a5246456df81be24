"""`pmxfs.runtime.database` and `pmxfs db check|dump|backup`.

Commits round-trip, replace_all and group commit are all-or-nothing, damaged databases are refused
with a one-line message and left byte-identical, loading never writes, backups load back equal, a
pmxcfs database opens, and a writer SIGKILLed at random points never loses an acknowledged batch
nor leaves part of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pmxfs.core.entry import Entry, EntryType
from pmxfs.core.fsop import FsOp, Mkdir, Rename, Unlink, WriteFile
from pmxfs.core.memdb import MemDB, check_tree
from pmxfs.core.persist import Persist
from pmxfs.runtime.database import DB_NAME, Database, DatabaseError, LoadedTree

DIR, FILE = EntryType.DIR, EntryType.FILE
MTIME = 1_714_564_800  # 2024-05-01T12:00:00Z
REPO = Path(__file__).resolve().parent.parent
PMXFS = Path(sys.executable).parent / "pmxfs"
CLI = ([str(PMXFS)] if PMXFS.exists()
       else [sys.executable, "-c", "import sys; from pmxfs.cli import main; sys.exit(main())"])

PMXCFS_SCHEMA = (
    "CREATE TABLE tree (  inode INTEGER PRIMARY KEY NOT NULL,"
    "  parent INTEGER NOT NULL CHECK(typeof(parent)=='integer'),"
    "  version INTEGER NOT NULL CHECK(typeof(version)=='integer'),"
    "  writer INTEGER NOT NULL CHECK(typeof(writer)=='integer'),"
    "  mtime INTEGER NOT NULL CHECK(typeof(mtime)=='integer'),"
    "  type INTEGER NOT NULL CHECK(typeof(type)=='integer'),"
    "  name TEXT NOT NULL,  data BLOB);"
)
UNCHECKED_SCHEMA = ("CREATE TABLE tree (inode INTEGER PRIMARY KEY NOT NULL,"
                    " parent INTEGER NOT NULL, version INTEGER NOT NULL,"
                    " writer INTEGER NOT NULL, mtime INTEGER NOT NULL, type INTEGER NOT NULL,"
                    " name TEXT NOT NULL, data BLOB)")


def root(version: int, writer: int = 1) -> Entry:
    return Entry(0, 0, version, writer, MTIME, DIR, "")


def d(inode: int, parent: int, name: str, version: int | None = None) -> Entry:
    return Entry(inode, parent, inode if version is None else version, 1, MTIME, DIR, name)


def f(inode: int, parent: int, name: str, data: bytes, version: int | None = None) -> Entry:
    return Entry(inode, parent, inode if version is None else version, 2, MTIME + inode, FILE,
                 name, data)


# a small tree: each entry's inode is the version that created it, as memdb makes them
TREE = [root(7), d(1, 0, "nodes"), d(2, 1, "pve1"), d(3, 2, "qemu-server"),
        f(4, 3, "100.conf", b"memory: 512\n"), d(5, 0, "priv"),
        f(6, 5, "authkey.key", b"\x00" * 40), f(7, 0, "empty", b"")]


def fingerprint(directory: Path) -> dict[str, str]:
    """A hash of each file of the database in `directory`: config.db and a WAL that holds
    anything (SQLite may add an empty WAL; the -shm index is scratch space of the readers)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())
            if p.name == DB_NAME or (p.name == f"{DB_NAME}-wal" and p.stat().st_size)}


def new_db(data: Path, entries: list[Entry] = TREE,
           meta: tuple[tuple[str, bytes], ...] = ()) -> None:
    with Database.open(data) as db:
        db.commit(Persist(max(e.version for e in entries), tuple(entries), replace_all=True,
                          meta=meta))


@contextlib.contextmanager
def raw(data: Path) -> Iterator[sqlite3.Connection]:
    """Plain SQLite on DIR/config.db, as another program (or pmxcfs) would use it."""
    conn = sqlite3.connect(data / DB_NAME, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def rows_of(entries: list[Entry]) -> list[tuple[object, ...]]:
    return [(e.inode, e.parent, e.version, e.writer, e.mtime, int(e.type), e.name,
             e.data or None) for e in entries]


def load(data: Path) -> LoadedTree:
    with Database.open(data) as db:
        return db.load()


# ------------------------------------------------------------------------- open, commit, load

def test_a_new_database_holds_the_root_at_version_0(tmp_path: Path) -> None:
    data = tmp_path / "var" / "lib" / "pmxfs"
    tree = load(data)
    assert tree == LoadedTree([Entry(0, 0, 0, 0, 0, DIR, "")], 0, {})
    assert sorted(os.listdir(data)) == [DB_NAME]
    assert (data / DB_NAME).stat().st_mode & 0o777 == 0o600
    with raw(data) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_commits_are_fully_synchronous(tmp_path: Path) -> None:
    """Acknowledgements rest on every COMMIT having fsynced the WAL: synchronous=FULL (2), on
    the connection the database commits with (the setting is per connection)."""
    with Database.open(tmp_path / "data") as db:
        assert db._conn.execute("PRAGMA synchronous").fetchone() == (2,)
        assert db._conn.execute("PRAGMA journal_mode").fetchone() == (b"wal",)  # text as bytes


def test_commits_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Database.open(data) as db:
        db.commit(Persist(7, tuple(TREE), meta=(("history", b"\x01\x02"),)))
        assert db.load() == LoadedTree(TREE, 7, {"history": b"\x01\x02"})
        changed = f(4, 3, "100.conf", b"memory: 1024\n", version=8)
        db.commit(Persist(8, (root(8, writer=3), changed), removed=(6,),
                          meta=(("history", b"\x03"), ("applied", b"x"))))
    expected = [root(8, writer=3), *TREE[1:4], changed, TREE[5], TREE[7]]
    assert load(data) == LoadedTree(expected, 8, {"history": b"\x03", "applied": b"x"})
    with raw(data) as conn:  # the version row as pmxcfs writes it; NULL data when empty
        assert conn.execute("SELECT * FROM tree WHERE inode IN (0, 5, 7) ORDER BY inode"
                            ).fetchall() == [(0, 0, 8, 3, MTIME, 8, "__version__", None),
                                             (5, 0, 5, 1, MTIME, 4, "priv", None),
                                             (7, 0, 7, 2, MTIME + 7, 8, "empty", None)]


def test_memdb_results_persist_and_reload_to_the_same_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tree = MemDB()
    ops: list[FsOp] = [
        Mkdir("nodes", MTIME), Mkdir("nodes/pve1", MTIME), Mkdir("nodes/pve1/qemu-server", 1),
        WriteFile("nodes/pve1/qemu-server/100.conf", b"cores: 2\n", MTIME, create=True),
        WriteFile("a", b"x" * 3000, MTIME + 1, create=True), Rename("a", "b", MTIME + 2),
        WriteFile("c", b"", MTIME, create=True), Unlink("c")]
    with Database.open(data) as db:
        for op in ops:
            result = tree.apply(op, writer=2)
            assert result.ok, op
            db.commit(Persist(result.version, result.upserts, result.removed))
    loaded = load(data)
    assert loaded.entries == tree.entries()
    assert MemDB(loaded.entries, loaded.version).checksum() == tree.checksum()
    with Database.open(data) as db:  # a resync writes the whole tree
        db.commit(Persist(tree.version, tuple(tree.entries()), replace_all=True))
        assert db.load().entries == tree.entries()


def test_a_batch_without_the_root_row_still_sets_the_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    with Database.open(data) as db:
        db.commit(Persist(9, (f(9, 0, "new", b"n"),)))
        tree = db.load()
    assert tree.version == 9
    assert tree.entries[0] == root(9)  # writer and mtime of the root row are kept


def test_replace_all_deletes_every_row_not_in_the_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data, meta=(("keep", b"1"),))
    other = [root(20, writer=2), d(11, 0, "nodes", 11), f(20, 11, "x", b"y")]
    with Database.open(data) as db:
        db.commit(Persist(20, tuple(other), replace_all=True))
        assert db.load() == LoadedTree(other, 20, {"keep": b"1"})


def test_group_commit_applies_batches_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    batches = [Persist(8, (root(8), f(8, 0, "a", b"1"))),
               Persist(9, (root(9), f(8, 0, "a", b"2", version=9))),
               Persist(10, (root(10),), removed=(7,), meta=(("m", b"10"),))]
    with Database.open(data) as db:
        db.commit_many(batches)
        tree = db.load()
    assert tree == LoadedTree([root(10), *TREE[1:7], f(8, 0, "a", b"2", version=9)], 10,
                              {"m": b"10"})


def test_a_failing_batch_rolls_back_the_whole_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    before = load(data)
    too_big = Entry(9, 0, 9, 1, 1 << 64, FILE, "b")  # not an SQLite integer
    with Database.open(data) as db:
        with pytest.raises(DatabaseError) as info:
            db.commit_many([Persist(8, (root(8), f(8, 0, "a", b"1")), meta=(("m", b"1"),)),
                            Persist(9, (root(9), too_big))])
        assert str(info.value) == (f"{data / DB_NAME}: cannot commit: Python int too large to "
                                   "convert to SQLite INTEGER")
        assert db.load() == before  # nothing of the first batch either, and no meta table
        db.commit(Persist(8, (root(8), f(8, 0, "a", b"1"))))  # still usable
        assert db.load().version == 8
    with raw(data) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'pmxfs_meta'"
                            ).fetchall() == []


def test_a_read_only_database_refuses_commits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    with Database.open(data, readonly=True) as db, pytest.raises(DatabaseError) as info:
        db.commit(Persist(8, (root(8),)))
    assert str(info.value) == f"{data / DB_NAME}: opened read-only: cannot commit"


def test_read_only_open_of_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError) as info:
        Database.open(tmp_path / "none", readonly=True)
    assert str(info.value) == (f"{tmp_path / 'none' / DB_NAME}: cannot open: No such file or "
                               "directory")
    assert not (tmp_path / "none").exists()


def test_load_never_writes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    with Database.open(data) as writer:
        writer.commit(Persist(8, (root(8), f(8, 0, "a", b"in the WAL only"))))
        files = fingerprint(data)  # config.db and the WAL that holds the last commit
        for readonly in (False, True):
            with Database.open(data, readonly=readonly) as db:
                assert db.load() == db.load()
                assert db.load().version == 8
        assert fingerprint(data) == files


def test_backup_is_an_equal_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data, meta=(("k", b"v"),))
    with Database.open(data) as db:
        db.commit(Persist(8, (root(8), f(8, 0, "a", b"not checkpointed yet"))))
        (tmp_path / "copy").mkdir()
        db.backup(tmp_path / "copy" / DB_NAME)
        expected = db.load()
        (tmp_path / "taken").write_bytes(b"precious")
        with pytest.raises(DatabaseError) as info:
            db.backup(tmp_path / "taken")
        assert str(info.value) == f"{tmp_path / 'taken'}: exists; a backup never replaces a file"
        with pytest.raises(DatabaseError) as info:
            db.backup(tmp_path / "no-dir" / "x.db")
        assert str(info.value) == (f"{tmp_path / 'no-dir' / 'x.db'}: cannot write the backup: "
                                   "No such file or directory")
    assert (tmp_path / "taken").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path / "copy")) == [DB_NAME]
    assert load(tmp_path / "copy") == expected


# ---------------------------------------------------------------------------- pmxcfs databases

def pmxcfs_db(data: Path, root_row: tuple[object, ...], *, wal: bool = True) -> None:
    data.mkdir()
    with raw(data) as conn:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(PMXCFS_SCHEMA)
        conn.executemany("INSERT INTO tree VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [root_row, *rows_of(TREE[1:])])


@pytest.mark.parametrize("root_row", [(0, 0, 7, 1, MTIME, 8, "__version__", None),
                                      (0, 0, 7, 1, MTIME, 4, "", None)],
                         ids=["pmxcfs version row", "directory root row"])
def test_a_pmxcfs_database_opens(tmp_path: Path, root_row: tuple[object, ...]) -> None:
    data = tmp_path / "data"
    pmxcfs_db(data, root_row)
    files = fingerprint(data)
    assert load(data) == LoadedTree(TREE, 7, {})
    assert fingerprint(data) == files  # no pmxfs_meta table until pmxfs commits meta
    with Database.open(data) as db:
        db.commit(Persist(8, (root(8),), meta=(("k", b"v"),)))
        assert db.load() == LoadedTree([root(8), *TREE[1:]], 8, {"k": b"v"})


def test_a_rollback_journal_database_switches_to_wal_at_the_first_commit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pmxcfs_db(data, (0, 0, 7, 1, MTIME, 8, "__version__", None), wal=False)
    files = fingerprint(data)
    with Database.open(data) as db:
        db.load()
        assert fingerprint(data) == files
        db.commit(Persist(8, (root(8),)))
    with raw(data) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ---------------------------------------------------------------------------- damaged databases

def _with_rows(*rows: tuple[object, ...]) -> Callable[[Path], None]:
    """TREE plus `rows`, at global version 99 (so that their inodes are not above it)."""
    def make(data: Path) -> None:
        new_db(data)
        with raw(data) as conn:
            conn.executemany("INSERT INTO tree VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("UPDATE tree SET version = 99 WHERE inode = 0")
    return make


def _with_sql(*statements: str) -> Callable[[Path], None]:
    def make(data: Path) -> None:
        new_db(data)
        with raw(data) as conn:
            for sql in statements:
                conn.execute(sql)
    return make


def _bytes(content: bytes) -> Callable[[Path], None]:
    def make(data: Path) -> None:
        data.mkdir()
        (data / DB_NAME).write_bytes(content)
    return make


def _unchecked_table(data: Path) -> None:
    data.mkdir()
    with raw(data) as conn:
        conn.execute(UNCHECKED_SCHEMA)
        conn.executemany("INSERT INTO tree VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [*rows_of(TREE[:7]), (7, "p", "seven", 1, MTIME, 8, "x", b"")])


def _other_schema(data: Path) -> None:
    data.mkdir()
    with raw(data) as conn:
        conn.execute("CREATE TABLE tree (inode INTEGER PRIMARY KEY, path TEXT, data BLOB)")


def _damaged_page(data: Path) -> None:
    new_db(data, [root(100), *(f(i, 0, f"file{i}", bytes(300)) for i in range(1, 100))])
    with open(data / DB_NAME, "r+b") as db:  # an interior b-tree page of `tree`, overwritten
        db.seek(4096 + 8)
        db.write(b"\xff" * 64)


# (id, how to make DIR/config.db, what the message says after "DIR/config.db: ", or None when the
# problems are the ones check_tree reports for the stored rows)
DAMAGED: list[tuple[str, Callable[[Path], None], str | None]] = [
    ("duplicate names", _with_rows((8, 0, 7, 1, MTIME, 4, "nodes", None)), None),
    ("missing parent", _with_rows((8, 99, 7, 1, MTIME, 8, "orphan", b"x")), None),
    ("parent is a file", _with_rows((8, 4, 7, 1, MTIME, 8, "under-a-file", b"x")), None),
    ("duplicate VMIDs", _with_rows((8, 2, 7, 1, MTIME, 4, "lxc", None),
                                   (9, 8, 7, 1, MTIME, 8, "100.conf", b"x")), None),
    ("version above the global version", _with_rows((9, 0, 100, 1, MTIME, 8, "x", None)), None),
    ("name stored as a blob", _with_rows((9, 0, 7, 1, MTIME, 8, b"x", None)),
     "inode 9: name is blob"),
    ("data stored as text", _with_rows((9, 0, 7, 1, MTIME, 8, "x", "text"), ),
     "inode 9: data is text"),
    ("integers stored as text", _unchecked_table, "inode 7: parent is text, version is text"),
    ("unknown entry type", _with_rows((9, 0, 7, 1, MTIME, 10, "x", None)),
     "inode 9: unknown type 10 (expected 4 for a directory or 8 for a file)"),
    ("name is not UTF-8",
     _with_sql("INSERT INTO tree VALUES (9, 0, 7, 1, 0, 8, CAST(x'66ff' AS TEXT), NULL)"),
     "inode 9: name b'f\\xff' is not UTF-8"),
    ("meta value of the wrong type",
     _with_sql("CREATE TABLE pmxfs_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
               "INSERT INTO pmxfs_meta VALUES ('k', 5)"),
     "pmxfs_meta key 'k': key is text, value is integer (expected text and blob)"),
    ("not a database file", _bytes(b"pmxfs data\n" * 100),
     "not an SQLite database (file is not a database)"),
    ("garbage bytes", _bytes(random.Random(7).randbytes(8192)),
     "not an SQLite database (file is not a database)"),
    ("empty file", _bytes(b""), "not a pmxfs/pmxcfs database: it has no table 'tree'"),
    ("wrong schema", _other_schema,
     "not a pmxfs/pmxcfs database: table 'tree' has columns (inode INTEGER, path TEXT, "
     "data BLOB), expected (inode INTEGER, parent INTEGER, version INTEGER, writer INTEGER, "
     "mtime INTEGER, type INTEGER, name TEXT, data BLOB)"),
    ("damaged page", _damaged_page, "damaged: database disk image is malformed"),
]


def stored_problems(data: Path) -> list[str]:
    """What check_tree says about the rows as stored (the root row read as the root)."""
    with raw(data) as conn:
        rows = conn.execute("SELECT * FROM tree ORDER BY inode").fetchall()
    entries = [Entry(i, p, v, w, m, DIR, "") if i == 0 else
               Entry(i, p, v, w, m, EntryType(t), n, b or b"") for i, p, v, w, m, t, n, b in rows]
    return check_tree(entries, entries[0].version)


@pytest.mark.parametrize(("make", "message"), [case[1:] for case in DAMAGED],
                         ids=[case[0] for case in DAMAGED])
def test_a_damaged_database_is_refused_and_left_alone(
        tmp_path: Path, make: Callable[[Path], None], message: str | None) -> None:
    data = tmp_path / "data"
    make(data)
    expected = stored_problems(data) if message is None else None
    files = fingerprint(data)
    for readonly in (False, True):
        with pytest.raises(DatabaseError) as info, Database.open(data, readonly=readonly) as db:
            db.load()
        line = str(info.value)
        assert "\n" not in line
        assert line.startswith(f"{data / DB_NAME}: ")
        if expected is not None:
            assert expected, "the case should be a damaged tree"
            assert list(info.value.problems) == expected
            assert expected[0] in line
        else:
            assert message is not None
            assert message in line
        assert fingerprint(data) == files


def test_many_problems_make_one_line_with_a_count(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _with_rows(*((i, 0, 7, 1, MTIME, 9, f"x{i}", None) for i in range(10, 16)))(data)
    with pytest.raises(DatabaseError) as info:
        Database.open(data)
    shown = "; ".join(f"inode {i}: unknown type 9 (expected 4 for a directory or 8 for a file)"
                      for i in (10, 11, 12))
    assert str(info.value) == f"{data / DB_NAME}: 6 problems: {shown}; and 3 more"
    assert len(info.value.problems) == 6


# ---------------------------------------------------------------------------- the command line

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_cli_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    with Database.open(data) as daemon:  # running: the last commit is in the WAL only
        daemon.commit(Persist(8, (root(8), f(8, 0, "new", b"x"))))
        files = fingerprint(data)
        proc = cli("db", "check", str(data))
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            0, f"{data}/config.db: ok, 8 entries, version 8\n", "")
        assert fingerprint(data) == files


def test_cli_check_lists_every_problem(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _with_rows((8, 0, 7, 1, MTIME, 4, "nodes", None), (9, 99, 7, 1, MTIME, 8, "orphan", b"x"))(data)
    before = (data / DB_NAME).read_bytes()
    proc = cli("db", "check", str(data))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"{data}/config.db: {p}" for p in stored_problems(data)]
    assert len(proc.stderr.splitlines()) >= 2
    assert (data / DB_NAME).read_bytes() == before


@pytest.mark.parametrize(("command", "setup", "stderr"), [
    (("check",), None, "{db}: cannot open: No such file or directory\n"),
    (("dump",), _bytes(b"\x00" * 100), "{db}: not an SQLite database (file is not a database)\n"),
    (("backup",), _other_schema, "{db}: not a pmxfs/pmxcfs database: table 'tree' has columns "
     "(inode INTEGER, path TEXT, data BLOB), expected (inode INTEGER, parent INTEGER, version "
     "INTEGER, writer INTEGER, mtime INTEGER, type INTEGER, name TEXT, data BLOB)\n"),
], ids=["check missing", "dump garbage", "backup wrong schema"])
def test_cli_errors_are_one_line(tmp_path: Path, command: tuple[str, ...],
                                 setup: Callable[[Path], None] | None, stderr: str) -> None:
    data = tmp_path / "data"
    if setup is not None:
        setup(data)
    extra = [str(tmp_path / "copy.db")] if command == ("backup",) else []
    proc = cli("db", *command, str(data), *extra)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == stderr.format(db=data / DB_NAME)
    assert not (tmp_path / "copy.db").exists()


def test_cli_dump(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data, [*TREE[:7], f(7, 5, "tab\tand\\back", b"12345")])
    proc = cli("db", "dump", str(data))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        "# path\ttype\tsize\tversion\twriter\tmtime",
        "/\tdir\t0\t7\t1\t2024-05-01T12:00:00Z",
        "/nodes\tdir\t0\t1\t1\t2024-05-01T12:00:00Z",
        "/nodes/pve1\tdir\t0\t2\t1\t2024-05-01T12:00:00Z",
        "/nodes/pve1/qemu-server\tdir\t0\t3\t1\t2024-05-01T12:00:00Z",
        "/nodes/pve1/qemu-server/100.conf\tfile\t12\t4\t2\t2024-05-01T12:00:04Z",
        "/priv\tdir\t0\t5\t1\t2024-05-01T12:00:00Z",
        "/priv/authkey.key\tfile\t40\t6\t2\t2024-05-01T12:00:06Z",
        "/priv/tab\\tand\\\\back\tfile\t5\t7\t2\t2024-05-01T12:00:07Z",
    ]
    help_text = cli("db", "dump", "--help").stdout
    assert "path<TAB>type<TAB>size<TAB>version<TAB>writer<TAB>mtime" in help_text


def test_cli_backup(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_db(data)
    (tmp_path / "copy").mkdir()
    dest = tmp_path / "copy" / DB_NAME
    proc = cli("db", "backup", str(data), str(dest))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"{data}/config.db: copied to {dest}, 7 entries, version 7\n"
    assert load(tmp_path / "copy") == load(data)
    before = dest.read_bytes()
    proc = cli("db", "backup", str(data), str(dest))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"{dest}: exists; a backup never replaces a file\n"
    assert dest.read_bytes() == before


def test_cli_needs_a_db_subcommand() -> None:
    proc = cli("db")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- crash safety

ROWS_PER_BATCH = 5
ROW_BYTES = 2000
KILLS = 20
MAX_ACKS_BEFORE_KILL = 40
ACK_DEADLINE = 30.0

# Batch n has the global version 10n+9 and writes rows 10n .. 10n+4 (kept), 10n+9 (scratch,
# removed by batch n+1), the counter file (inode 1) set to n, and meta "last" = n.
CHILD = f"""
import sys
from pathlib import Path
from pmxfs.core.entry import Entry, EntryType
from pmxfs.core.persist import Persist
from pmxfs.runtime.database import Database

db = Database.open(Path(sys.argv[1]))
n = max(0, (db.load().version - 9) // 10)
while True:
    n += 1
    v = 10 * n + 9
    rows = [Entry(10 * n + k, 0, v, 1, n, EntryType.FILE, f"b{{n}}-{{k}}",
                  bytes([n % 251, k]) * {ROW_BYTES // 2}) for k in range({ROWS_PER_BATCH})]
    rows.append(Entry(v, 0, v, 1, n, EntryType.FILE, f"scratch{{n}}", b"s"))
    rows.append(Entry(1, 0, v, 1, n, EntryType.FILE, "counter", str(n).encode()))
    rows.append(Entry(0, 0, v, 1, n, EntryType.DIR, ""))
    db.commit(Persist(v, tuple(rows), removed=(v - 10,), meta=(("last", str(n).encode()),)))
    print(f"acked {{n}}", flush=True)
"""


def expected_state(batches: int) -> LoadedTree:
    """The database after batches 1..`batches`, exactly."""
    if not batches:
        return LoadedTree([Entry(0, 0, 0, 0, 0, DIR, "")], 0, {})
    version = 10 * batches + 9
    entries = [Entry(0, 0, version, 1, batches, DIR, ""),
               Entry(1, 0, version, 1, batches, FILE, "counter", str(batches).encode())]
    for n in range(1, batches + 1):
        entries += [Entry(10 * n + k, 0, 10 * n + 9, 1, n, FILE, f"b{n}-{k}",
                          bytes([n % 251, k]) * (ROW_BYTES // 2)) for k in range(ROWS_PER_BATCH)]
    entries.append(Entry(version, 0, version, 1, batches, FILE, f"scratch{batches}", b"s"))
    return LoadedTree(entries, version, {"last": str(batches).encode()})


class Child:
    """The writer process; reads its "acked N" lines with a deadline."""

    def __init__(self, script: Path, data: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), str(data)],
                                         stdout=subprocess.PIPE, stderr=err, bufsize=0, cwd=REPO)
        self.buffer = b""
        self.acked = 0

    def _take_lines(self, chunk: bytes) -> int:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            word, number = line.split()
            assert word == b"acked", line
            assert int(number) == self.acked + 1 or self.acked == 0, (line, self.acked)
            self.acked = int(number)
        return len(lines)

    def wait_for_acks(self, count: int) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ACK_DEADLINE
        seen = 0
        while seen < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no ack within {ACK_DEADLINE} s"
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"the writer exited: {self.log.read_text()}"
                seen += self._take_lines(chunk)

    def kill(self) -> None:
        """SIGKILL (by PID), reap, and count the acks it printed before dying."""
        assert self.proc.stdout is not None
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._take_lines(self.proc.stdout.read() or b"")
        self.proc.stdout.close()


def test_sigkilled_writer_never_loses_an_acked_batch_nor_leaves_part_of_one(
        tmp_path: Path) -> None:
    seed = int(os.environ.get("PMXFS_KILL_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"replay with PMXFS_KILL_SEED={seed}")
    rng = random.Random(seed)
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    data = tmp_path / "data"
    acked = 0
    for kill in range(KILLS):
        child = Child(script, data, tmp_path / "writer.log")
        try:
            child.wait_for_acks(rng.randint(0, MAX_ACKS_BEFORE_KILL))
        finally:
            child.kill()
        acked = max(acked, child.acked)
        with Database.open(data) as db:
            tree = db.load()
        batches = max(0, (tree.version - 9) // 10)
        where = f"seed {seed}, kill {kill}: {batches} batches stored, {acked} acked"
        assert batches >= acked, where
        assert tree == expected_state(batches), where
    assert acked > 0
