"""`pmxfs db restore DIR FILE` and the SQL dumps a join leaves (`dump_sql_gz`,
`backup_before_join`, `restore_database`).

Both kinds of FILE (an SQLite backup, a gzip'd SQL dump, ours or the sqlite3 shell's) restore to
the same entries, version and meta; a dump taken while commits go on is one snapshot; damaged,
garbage, truncated, foreign and hostile files are refused with one line each and leave DIR as it
was; stale logs of the old database are not applied to the new one, and the node's ring seq and
boot id files stay; the command refuses while another process holds the daemon's lock, holds it
itself while it runs, creates a missing DIR, and reports in one line with the right exit status.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmxfs.core.entry import Entry, EntryType
from pmxfs.core.persist import Persist
from pmxfs.runtime.database import (
    BACKUP_DIR_NAME,
    DB_NAME,
    Database,
    DatabaseError,
    LoadedTree,
    backup_before_join,
    restore_database,
)

DIR, FILE = EntryType.DIR, EntryType.FILE
MTIME = 1_714_564_800  # 2024-05-01T12:00:00Z
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pmxfs"]
DEADLINE = 30.0
META = (("history", b"\x01\x02"), ("quorate_ring_seq", b"12"))


def root(version: int) -> Entry:
    return Entry(0, 0, version, 1, MTIME, DIR, "")


def d(inode: int, parent: int, name: str) -> Entry:
    return Entry(inode, parent, inode, 1, MTIME, DIR, name)


def f(inode: int, parent: int, name: str, data: bytes) -> Entry:
    return Entry(inode, parent, inode, 2, MTIME + inode, FILE, name, data)


# names and contents that SQL text must quote: quotes, semicolons, newlines, non-ASCII, all bytes
TREE = [root(8), d(1, 0, "nodes"), d(2, 1, "pve1"), d(3, 2, "qemu-server"),
        f(4, 3, "100.conf", b"memory: 512\n"), d(5, 0, "priv"),
        f(6, 5, "it's; DROP TABLE tree; --", bytes(range(256))),
        f(7, 0, "new\nline\tand ünïcødé", b""), f(8, 0, "empty-ish", b"\x00")]
OTHER_TREE = [root(2), d(1, 0, "other"), f(2, 1, "x.conf", b"x")]


def new_db(data: Path, entries: list[Entry] = TREE,
           meta: tuple[tuple[str, bytes], ...] = META) -> LoadedTree:
    with Database.open(data) as db:
        db.commit(Persist(max(e.version for e in entries), tuple(entries), replace_all=True,
                          meta=meta))
        return db.load()


def load(data: Path) -> LoadedTree:
    with Database.open(data, readonly=True) as db:
        return db.load()


def files_of(directory: Path) -> dict[str, str]:
    """Every file in `directory` (recursively) with a hash of its content."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def a_backup(tmp_path: Path, entries: list[Entry] = TREE) -> tuple[Path, LoadedTree]:
    """What `pmxfs db backup` writes for a database holding `entries`, and its tree."""
    tree = new_db(tmp_path / "source", entries)
    dest = tmp_path / "config.db.backup"
    with Database.open(tmp_path / "source") as db:
        db.backup(dest)
    return dest, tree


def a_dump(tmp_path: Path, entries: list[Entry] = TREE) -> tuple[Path, LoadedTree]:
    """A `config-<time>.sql.gz` as a join leaves it for a database holding `entries`."""
    tree = new_db(tmp_path / "source", entries)
    with Database.open(tmp_path / "source") as db:
        return backup_before_join(tmp_path / "source", db, MTIME), tree


def a_node_dir(data: Path) -> None:
    """A node's data directory: an older database and the node's ring seq and boot id files."""
    new_db(data, OTHER_TREE, ())
    (data / "ringid_1").write_bytes(b"4242\n")
    (data / "bootid_1").write_bytes(b"1799999999999999\n")


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("make", [a_backup, a_dump], ids=["sqlite backup", "sql dump"])
def test_restore_round_trips(tmp_path: Path,
                             make: Callable[[Path], tuple[Path, LoadedTree]]) -> None:
    source, original = make(tmp_path)
    data = tmp_path / "node"
    a_node_dir(data)
    kept = {name: (data / name).read_bytes() for name in ("ringid_1", "bootid_1")}
    assert restore_database(data, source) == original
    assert sorted(os.listdir(data)) == sorted([DB_NAME, *kept])  # no scratch file left
    assert (data / DB_NAME).stat().st_mode & 0o777 == 0o600
    assert {name: (data / name).read_bytes() for name in kept} == kept  # never lowered
    assert load(data) == original


def test_backup_before_join_names_the_dump_after_now(tmp_path: Path) -> None:
    dump, original = a_dump(tmp_path)
    backups = tmp_path / "source" / BACKUP_DIR_NAME
    assert dump == backups / f"config-{MTIME}.sql.gz"
    assert backups.stat().st_mode & 0o777 == 0o700
    assert dump.stat().st_mode & 0o777 == 0o600
    text = gzip.decompress(dump.read_bytes()).decode()
    assert text.startswith("BEGIN TRANSACTION;\n")
    assert text.endswith("COMMIT;\n")
    assert "INSERT INTO \"tree\" VALUES(6,5,6,2,1714564806,8,'it''s; DROP TABLE tree; --'," in text
    assert os.listdir(backups) == [dump.name]  # the temporary file is gone
    with Database.open(tmp_path / "source") as db, pytest.raises(DatabaseError) as info:
        backup_before_join(tmp_path / "source", db, MTIME)  # a second join in the same second
    assert str(info.value) == f"{dump}: exists; a backup never replaces a file"
    other = tmp_path / "restored"
    other.mkdir()
    assert restore_database(other, dump) == original


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 shell")
def test_a_dump_made_by_the_sqlite3_shell_restores(tmp_path: Path) -> None:
    """pvecm's backup is `sqlite3 config.db .dump | gzip`; the shell quotes text its own way
    (replace() and char() for line breaks) and starts with a PRAGMA."""
    original = new_db(tmp_path / "source")
    dump = tmp_path / "config-1.sql.gz"
    text = subprocess.run(["sqlite3", str(tmp_path / "source" / DB_NAME), ".dump"],
                          capture_output=True, check=True, timeout=60).stdout
    assert b"char(10)" in text
    dump.write_bytes(gzip.compress(text))
    (tmp_path / "node").mkdir()
    assert restore_database(tmp_path / "node", dump) == original


names = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=["Cs"]),
                min_size=1, max_size=40).filter(lambda n: n not in (".", ".."))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(names, st.binary(max_size=300), min_size=1, max_size=8))
def test_any_tree_round_trips_through_a_dump(tmp_path_factory: pytest.TempPathFactory,
                                             files: dict[str, bytes]) -> None:
    tmp_path = tmp_path_factory.mktemp("dump")
    entries = [root(len(files) + 1), d(1, 0, "files"),  # the root reserves some names
               *(f(i, 1, name, data) for i, (name, data) in enumerate(files.items(), start=2))]
    dump, original = a_dump(tmp_path, entries)
    (tmp_path / "node").mkdir()
    assert restore_database(tmp_path / "node", dump) == original


def test_a_dump_taken_while_commits_go_on_is_one_snapshot(tmp_path: Path) -> None:
    """The daemon dumps from a worker thread while its persister commits: every dump holds one
    committed state (here: the counter file and the meta, dumped after each other, always say
    the global version)."""
    data = tmp_path / "data"
    new_db(data, [root(1), f(1, 0, "counter", b"1")], (("counter", b"1"),))
    stop = threading.Event()
    committed: list[int] = []

    def writer() -> None:
        with Database.open(data) as db:
            version = 1
            while not stop.is_set():
                version += 1
                text = str(version).encode()
                db.commit(Persist(version, (root(version), Entry(
                    1, 0, version, 2, MTIME, FILE, "counter", text)), meta=(("counter", text),)))
                committed.append(version)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with Database.open(data) as daemon:
            dumps: list[Path] = []
            deadline = time.monotonic() + DEADLINE
            while len(dumps) < 20 or len(committed) < 50:
                assert time.monotonic() < deadline, (len(dumps), len(committed))
                dump = tmp_path / f"config-{len(dumps)}.sql.gz"
                worker = threading.Thread(target=daemon.dump_sql_gz, args=(dump,))
                worker.start()
                worker.join(DEADLINE)
                dumps.append(dump)
    finally:
        stop.set()
        thread.join(DEADLINE)
    versions = []
    for i, dump in enumerate(dumps):
        node = tmp_path / f"node{i}"
        node.mkdir()
        tree = restore_database(node, dump)
        counter = next(e for e in tree.entries if e.name == "counter")
        assert counter.data == tree.meta["counter"] == str(tree.version).encode()
        versions.append(tree.version)
    assert versions == sorted(versions)
    assert len(set(versions)) > 1  # the dumps saw commits go on


# ------------------------------------------------------------------------------- refusals

def _write(content: bytes) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / "file"
        path.write_bytes(content)
        return path
    return make


def _gzipped(text: str) -> Callable[[Path], Path]:
    return _write(gzip.compress(text.encode()))


def _truncated_backup(tmp_path: Path) -> Path:
    source, _ = a_backup(tmp_path, [root(99), *(f(i, 0, f"f{i}", bytes(900))
                                                for i in range(1, 99))])
    content = source.read_bytes()
    source.write_bytes(content[:len(content) // 2])
    return source


def _damaged_backup(tmp_path: Path) -> Path:
    source, _ = a_backup(tmp_path, [root(99), *(f(i, 0, f"f{i}", bytes(300))
                                                for i in range(1, 99))])
    with open(source, "r+b") as file:  # an interior b-tree page of `tree`, overwritten
        file.seek(4096 + 8)
        file.write(b"\xff" * 64)
    return source


def _foreign_database(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE tree (inode INTEGER PRIMARY KEY, path TEXT, data BLOB)")
    return path


def _orphan_in_backup(tmp_path: Path) -> Path:
    source, _ = a_backup(tmp_path)
    with contextlib.closing(sqlite3.connect(source, isolation_level=None)) as conn:
        conn.execute(f"INSERT INTO tree VALUES (9, 99, 8, 1, {MTIME}, 8, 'orphan', NULL)")
    return source


def _backup_with_a_live_log(tmp_path: Path) -> Path:
    source, _ = a_backup(tmp_path)
    Path(f"{source}-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(28))
    return source


def _truncated_dump(tmp_path: Path) -> Path:
    dump, _ = a_dump(tmp_path)
    content = dump.read_bytes()
    dump.write_bytes(content[:len(content) - 20])
    return dump


def _dump_cut_short(tmp_path: Path) -> Path:
    """A dump whose text stops before its COMMIT, gzip'd whole (so gzip cannot tell)."""
    dump, _ = a_dump(tmp_path)
    text = gzip.decompress(dump.read_bytes()).decode()
    dump.write_bytes(gzip.compress(text.removesuffix("COMMIT;\n").encode()))
    return dump


def _dump_with(statement: str) -> Callable[[Path], Path]:
    """Our own dump with `statement` run just before its COMMIT."""
    def make(tmp_path: Path) -> Path:
        dump, _ = a_dump(tmp_path)
        text = gzip.decompress(dump.read_bytes()).decode()
        assert text.endswith("COMMIT;\n")
        dump.write_bytes(gzip.compress(f"{text[:-8]}{statement}\nCOMMIT;\n".encode()))
        return dump
    return make


TREE_COLUMNS = ("(inode INTEGER, parent INTEGER, version INTEGER, writer INTEGER, mtime INTEGER, "
                "type INTEGER, name TEXT, data BLOB)")
NOT_A_DUMP = ("not a pmxfs/pmxcfs SQL dump: it does more than create and fill the tables tree "
              "and pmxfs_meta ")
EVIL = "evil.db"  # relative to the test's working directory, tmp_path

# (id, how to make FILE, what its one-line problem starts with)
REFUSED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing file", lambda tmp_path: tmp_path / "missing",
     "cannot open: No such file or directory"),
    ("empty file", _write(b""), "neither an SQLite database nor a gzip'd SQL dump"),
    ("garbage", _write(b"pmxfs data\n" * 100), "neither an SQLite database nor a gzip'd SQL dump"),
    ("truncated backup", _truncated_backup, "damaged: "),
    ("damaged backup", _damaged_backup, "damaged: "),
    ("foreign database", _foreign_database,
     "not a pmxfs/pmxcfs database: table 'tree' has columns (inode INTEGER, path TEXT, data "
     f"BLOB), expected {TREE_COLUMNS}"),
    ("unsound tree", _orphan_in_backup, "inode 9 (path unknown): parent inode 99 is missing"),
    ("backup with a live log", _backup_with_a_live_log, "its write-ahead log "),
    ("truncated gzip", _truncated_dump, "not a readable gzip file: "),
    ("gzip of garbage", _write(gzip.compress(b"\xff\xfe" * 100)),
     "not an SQL dump: byte 0 of its text is not UTF-8"),
    ("gzip of a text", _gzipped("these are not the SQL statements you are looking for"),
     "cannot run the SQL dump: "),
    ("dump cut short", _dump_cut_short, "the SQL dump ends inside a transaction (cut short?)"),
    ("dump without tree", _gzipped("BEGIN TRANSACTION;\nCOMMIT;\n"),
     "not a pmxfs/pmxcfs database: it has no table 'tree'"),
    ("attach", _dump_with(f"ATTACH DATABASE '{EVIL}' AS evil; CREATE TABLE evil.x (a);"),
     f"{NOT_A_DUMP}(ATTACH '{EVIL}')"),
    ("trigger", _dump_with("CREATE TRIGGER t AFTER INSERT ON tree BEGIN DELETE FROM tree; END;"),
     f"{NOT_A_DUMP}(CREATE TRIGGER 't' 'tree')"),
    ("other table", _dump_with("CREATE TABLE extra (a);"), f"{NOT_A_DUMP}(CREATE TABLE 'extra')"),
    ("delete", _dump_with("DELETE FROM tree WHERE inode = 4;"), f"{NOT_A_DUMP}(DELETE 'tree')"),
    ("pragma", _dump_with("PRAGMA writable_schema = ON;"),
     f"{NOT_A_DUMP}(PRAGMA 'writable_schema' 'ON')"),
    ("function", _dump_with("INSERT INTO pmxfs_meta VALUES ('k', randomblob(9));"),
     f"{NOT_A_DUMP}(FUNCTION 'randomblob')"),
    ("bad row", _dump_with(f"INSERT INTO tree VALUES (9, 0, 8, 1, {MTIME}, 8, 'x', 'text');"),
     "inode 9: data is text"),
]


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("make", "problem"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_a_bad_file_is_refused_and_dir_left_alone(in_tmp_path: Path,
                                                  make: Callable[[Path], Path],
                                                  problem: str) -> None:
    source = make(in_tmp_path)
    data = in_tmp_path / "node"
    a_node_dir(data)
    before = files_of(data)
    with pytest.raises(DatabaseError) as info:
        restore_database(data, source)
    assert info.value.path == source
    assert len(info.value.problems) >= 1
    assert info.value.problems[0].startswith(problem), info.value.problems
    assert "\n" not in str(info.value)
    assert files_of(data) == before
    assert sorted(os.listdir(data)) == sorted(before)  # no scratch directory left
    assert not (in_tmp_path / EVIL).exists()
    assert load(data).entries == OTHER_TREE


def test_the_old_databases_logs_are_not_applied_to_the_new_one(tmp_path: Path) -> None:
    """A daemon that died leaves config.db-wal (and -shm) holding commits of the old database;
    SQLite would replay them onto whatever file is called config.db."""
    source, original = a_backup(tmp_path)
    data = tmp_path / "node"
    a_node_dir(data)
    with Database.open(data) as db:  # commits that stay in the log while the database is open
        for version in range(3, 20):
            db.commit(Persist(version, (root(version), f(2, 1, "x.conf", b"y" * version))))
        logs = {suffix: Path(f"{data / DB_NAME}{suffix}").read_bytes()
                for suffix in ("-wal", "-shm")}
    assert len(logs["-wal"]) > 0
    for suffix, content in logs.items():  # as a SIGKILLed daemon leaves them
        Path(f"{data / DB_NAME}{suffix}").write_bytes(content)
    Path(f"{data / DB_NAME}-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
    restore_database(data, source)
    assert sorted(os.listdir(data)) == ["bootid_1", DB_NAME, "ringid_1"]
    assert load(data) == original


# ---------------------------------------------------------------------------- the command line

def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=cwd)


def test_cli_restore(tmp_path: Path) -> None:
    source, original = a_dump(tmp_path)
    data = tmp_path / "node"
    a_node_dir(data)
    proc = cli("db", "restore", str(data), str(source))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (f"{data}/config.db: restored from {source}, 8 entries, "
                           "version 8\n")
    assert load(data) == original
    assert lock_is_free(data / "pmxfs.lock")  # released on exit: the daemon may start


def test_cli_restore_into_a_missing_dir(tmp_path: Path) -> None:
    source, original = a_backup(tmp_path)
    data = tmp_path / "reinstalled" / "pmxfs"
    proc = cli("db", "restore", str(data), str(source))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"pmxfs: cannot create {data}: No such file or directory\n"
    assert not data.parent.exists()
    data.parent.mkdir()
    proc = cli("db", "restore", str(data), str(source))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"{data}/config.db: restored from {source}, 8 entries, version 8\n"
    assert data.stat().st_mode & 0o777 == 0o700
    assert load(data) == original


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "node"
    a_node_dir(data)
    before = (data / DB_NAME).read_bytes()
    garbage = _write(b"\x00" * 100)(tmp_path)
    proc = cli("db", "restore", str(data), str(garbage))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"{garbage}: neither an SQLite database nor a gzip'd SQL dump\n"
    proc = cli("db", "restore", str(data), str(_orphan_in_backup(tmp_path)))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert len(proc.stderr.splitlines()) >= 1
    assert all(line.startswith(f"{tmp_path}/config.db.backup: inode 9 (path unknown): ")
               for line in proc.stderr.splitlines())
    assert (data / DB_NAME).read_bytes() == before
    proc = cli("db", "restore", str(data))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (data / DB_NAME).read_bytes() == before


def test_cli_restore_help() -> None:
    proc = cli("db", "restore", "--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "pmxfs db restore /var/lib/pmxfs /root/config.db.backup" in proc.stdout
    assert "restore" in cli("db", "--help").stdout


# ------------------------------------------------------------------------------- the lock

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the daemon's lock on tmp_path/node, as a running daemon does."""
    data = tmp_path / "node"
    a_node_dir(data)
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(data / "pmxfs.lock")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "locked\n"
            yield proc
        finally:
            proc.kill()
            proc.wait(DEADLINE)


def test_cli_refuses_while_a_daemon_holds_the_lock(tmp_path: Path,
                                                   lock_holder: subprocess.Popen[str]) -> None:
    source, original = a_backup(tmp_path)
    data = tmp_path / "node"
    before = files_of(data)
    proc = cli("db", "restore", str(data), str(source))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"pmxfs: a pmxfs daemon (pid {lock_holder.pid}) is using {data}: "
                           "stop it first\n")
    assert files_of(data) == before
    lock_holder.kill()
    lock_holder.wait(DEADLINE)
    proc = cli("db", "restore", str(data), str(source))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert load(data) == original


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_the_restore_holds_the_lock_while_it_runs(tmp_path: Path) -> None:
    """A FIFO as FILE keeps the restore waiting inside: meanwhile no daemon could lock DIR."""
    data = tmp_path / "node"
    a_node_dir(data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    lock = data / "pmxfs.lock"
    with subprocess.Popen([*CLI, "db", "restore", str(data), str(fifo)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + DEADLINE
            while not (lock.exists() and lock.read_text() == f"{proc.pid}\n"):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the restore never took the lock"
                time.sleep(0.01)
            assert not lock_is_free(lock)
            with open(fifo, "wb") as writer:  # lets the restore go on, with garbage
                writer.write(b"not a database at all")
            out, err = proc.communicate(timeout=DEADLINE)
        finally:
            proc.kill()
            proc.wait(DEADLINE)
    assert (proc.returncode, out) == (1, "")
    assert err == f"{fifo}: neither an SQLite database nor a gzip'd SQL dump\n"
    assert lock_is_free(lock)
    assert load(data).entries == OTHER_TREE
