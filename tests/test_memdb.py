"""The tree (pmxfs.core.memdb).

1. The op table: one row per rule and errno. Each row builds a small tree through `apply`, applies
   one op and checks the errno; a failing row also checks that nothing changed at all.
2. Rows, versions, queries, vmlist, locks and the lock-expiry timeline.
3. mode_of (docs/tree-rules.md) and check_tree: one row per kind of corruption.
4. A property test: random op sequences on a small colliding path alphabet, applied to MemDB and
   to a reference model written here from the rules, compared after every op.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core import conf, memdb
from pmxfs.core.entry import ROOT_INODE, Entry, EntryType, guest_config
from pmxfs.core.fsop import (
    CreateFile,
    FsOp,
    Mkdir,
    Rename,
    Rmdir,
    SetMtime,
    Truncate,
    Unlink,
    Unlock,
    UnlockRequest,
    WriteFile,
    WriteRange,
    op_paths,
)
from pmxfs.core.memdb import (
    ApplyResult,
    CorruptTree,
    MemDB,
    VmInfo,
    check_tree,
    mode_of,
    valid_path,
)

MIB = 1 << 20
T = 1000  # the mtime of every setup step
Setup = tuple[str | tuple[str, bytes], ...]
Node = tuple[str] | tuple[str, bytes]
DIR: Node = ("dir",)


def data_of(node: Node | None) -> bytes | None:
    """A file's content; None for a directory or for nothing."""
    return node[1] if node is not None and len(node) == 2 else None


def corosync(version: int, nodes: int = 2, name: str = "lab") -> bytes:
    """A valid corosync.conf with `nodes` nodes."""
    body = "".join(f"  node {{\n    name: pve{i}\n    nodeid: {i}\n    ring0_addr: 10.0.0.{i}\n"
                   "  }\n" for i in range(1, nodes + 1))
    return (f"totem {{\n  cluster_name: {name}\n  config_version: {version}\n}}\n\n"
            f"nodelist {{\n{body}}}\n\nquorum {{\n  provider: corosync_votequorum\n}}\n").encode()


def build(setup: Setup) -> MemDB:
    """A tree made by `apply` (writer 1): "dir/" items are directories, (path, data) files."""
    db = MemDB()
    for item in setup:
        if isinstance(item, str):
            op: FsOp = Mkdir(item.rstrip("/"), T)
        else:
            op = WriteFile(item[0], item[1], T, create=True)
        assert db.apply(op, 1).ok, item
    return db


def content(db: MemDB) -> dict[str, Node]:
    """path -> ("dir",) or ("file", data) for every entry but the root."""
    return {db.path_of(e.inode): DIR if e.is_dir else ("file", e.data)
            for e in db.entries() if e.inode != ROOT_INODE}


def must(db: MemDB, path: str) -> Entry:
    entry = db.lookup(path)
    assert entry is not None, path
    return entry


@dataclass(frozen=True)
class Snapshot:
    checksum: bytes
    version: int
    entries: list[Entry]
    total_bytes: int
    entry_count: int
    vmlist: dict[int, VmInfo]

    @classmethod
    def of(cls, db: MemDB) -> Snapshot:
        return cls(db.checksum(), db.version, db.entries(), db.total_bytes, db.entry_count,
                   db.vmlist())


# ---------------------------------------------------------------------------------------------
# 1. The op table

Check = Callable[[MemDB, ApplyResult], None]


def has(path: str, data: bytes | None = None) -> Check:
    """The entry exists: a directory when `data` is None, else a file holding `data`."""
    def check(db: MemDB, _: ApplyResult) -> None:
        row = db.lookup(path)
        assert row is not None, path
        assert row.is_dir if data is None else (not row.is_dir and row.data == data)
    return check


def gone(*paths: str) -> Check:
    def check(db: MemDB, _: ApplyResult) -> None:
        assert [p for p in paths if db.lookup(p) is not None] == []
    return check


def vms(expected: dict[int, tuple[str, str]]) -> Check:
    def check(db: MemDB, _: ApplyResult) -> None:
        assert {vmid: (i.node, i.kind) for vmid, i in db.vmlist().items()} == expected
    return check


def removes(*paths: str) -> Callable[[MemDB], Check]:
    """The result lists the inodes that `paths` had before the op (bound at setup time)."""
    def bind(db: MemDB) -> Check:
        inodes = tuple(sorted(row.inode for p in paths if (row := db.lookup(p)) is not None))

        def check(_: MemDB, result: ApplyResult) -> None:
            assert len(inodes) == len(paths)
            assert result.removed == inodes
        return check
    return bind


OpMaker = Callable[[MemDB], FsOp]


@dataclass(frozen=True)
class Case:
    setup: Setup
    op: FsOp | OpMaker
    errno: int
    changes: bool = True  # False: success that changes nothing
    checks: tuple[Check, ...] = ()
    bound_checks: tuple[Callable[[MemDB], Check], ...] = ()
    limits: tuple[tuple[str, int], ...] = ()


def row(rule: str, setup: Setup, op: FsOp | OpMaker, code: int, *checks: Check,
        changes: bool = True, bound: tuple[Callable[[MemDB], Check], ...] = (),
        limits: tuple[tuple[str, int], ...] = ()) -> object:
    name = errno.errorcode[code] if code else "ok"
    return pytest.param(Case(setup, op, code, changes, checks, bound, limits),
                        id=f"{rule}-{name}")


BASE: Setup = ("a/", ("a/f", b"hello"), "a/d/", ("g", b"x"), "e/")
GUESTS: Setup = ("nodes/", "nodes/n1/", "nodes/n1/qemu-server/", "nodes/n1/lxc/", "nodes/n2/",
                 "nodes/n2/qemu-server/", ("nodes/n1/qemu-server/100.conf", b"cores: 1\n"))
CONF: Setup = (("corosync.conf", corosync(3)),)
LOCKS: Setup = ("priv/", "priv/lock/", "priv/lock/x/", ("priv/lock/x/owner", b"n1"), "a/")
C100 = "nodes/n1/qemu-server/100.conf"


def lock_checksum_of(path: str) -> OpMaker:
    def make(db: MemDB) -> FsOp:
        checksum = db.lock_checksum(path)
        assert checksum is not None
        return Unlock(path, checksum)
    return make


PATH_ROWS = [
    row("path/empty-component", BASE, CreateFile("a//f2", T), errno.EACCES),
    row("path/leading-slash", BASE, Mkdir("/b", T), errno.EACCES),
    row("path/trailing-slash", BASE, Mkdir("b/", T), errno.EACCES),
    row("path/dot", BASE, CreateFile("a/.", T), errno.EACCES),
    row("path/dotdot", BASE, Unlink("a/../g"), errno.EACCES),
    row("path/name-255-bytes", BASE, CreateFile("n" * 255, T), 0, has("n" * 255, b"")),
    row("path/name-256-bytes", BASE, CreateFile("n" * 256, T), errno.ENAMETOOLONG),
    row("path/name-256-utf8-bytes", BASE, Mkdir("a/" + "é" * 128, T), errno.ENAMETOOLONG),
    row("path/over-path-max", BASE, Mkdir("/".join(["d" * 200] * 21), T), errno.ENAMETOOLONG),
    row("path/nul-byte", BASE, CreateFile("a/x\0y", T), errno.EINVAL),
    row("path/unencodable", BASE, CreateFile("a/\ud800", T), errno.EINVAL),
    row("path/parent-missing", BASE, CreateFile("x/f", T), errno.ENOENT),
    row("path/parent-is-file", BASE, CreateFile("g/f", T), errno.ENOTDIR),
    row("path/deep-parent-is-file", BASE, Mkdir("a/f/x/y", T), errno.ENOTDIR),
    row("path/missing-before-file", BASE, Mkdir("x/g/y", T), errno.ENOENT),
    row("numbers/negative-mtime", BASE, SetMtime("g", -1), errno.EINVAL),
    row("numbers/negative-offset", BASE, WriteRange("g", -1, b"x", T), errno.EINVAL),
    row("numbers/negative-size", BASE, Truncate("g", -1, T), errno.EINVAL),
]

VIRTUAL_ROWS = [
    *(row(f"virtual/mkdir-{name}", BASE, Mkdir(name, T), errno.EACCES)
      for name in sorted(memdb.VIRTUAL_ROOT_NAMES)),
    row("virtual/create", BASE, CreateFile("local", T), errno.EACCES),
    row("virtual/create-rrd", BASE, CreateFile(".rrd", T), errno.EACCES),  # pmxcfs's .rrd
    row("virtual/write-create", BASE, WriteFile(".debug", b"1\n", T, create=True), errno.EACCES),
    row("virtual/write-no-create", BASE, WriteFile(".debug", b"1\n", T), errno.ENOENT),
    row("virtual/rename-onto", BASE, Rename("g", ".vmlist", T), errno.EACCES),
    row("virtual/name-below-root", BASE, Mkdir("a/local", T), 0, has("a/local")),
]

ROOT_ROWS = [
    row("root/rmdir", BASE, Rmdir(""), errno.EBUSY),
    row("root/unlink", BASE, Unlink(""), errno.EACCES),
    row("root/mkdir", BASE, Mkdir("", T), errno.EACCES),
    row("root/create", BASE, CreateFile("", T), errno.EACCES),
    row("root/write", BASE, WriteFile("", b"x", T, create=True), errno.EACCES),
    row("root/write-range", BASE, WriteRange("", 0, b"x", T), errno.EACCES),
    row("root/truncate", BASE, Truncate("", 0, T), errno.EACCES),
    row("root/set-mtime", BASE, SetMtime("", T), errno.EACCES),
    row("root/rename-src", BASE, Rename("", "z", T), errno.EACCES),
    row("root/rename-dst", BASE, Rename("e", "", T), errno.EACCES),
    row("root/unlock-request", BASE, UnlockRequest(""), errno.EACCES),
    row("root/unlock", BASE, Unlock("", b""), errno.EACCES),
]

FILE_ROWS = [
    row("create/new", BASE, CreateFile("a/n", T), 0, has("a/n", b"")),
    row("create/exclusive-existing", BASE, CreateFile("a/f", T, exclusive=True), errno.EEXIST),
    row("create/existing-file", BASE, CreateFile("a/f", T), 0, has("a/f", b"hello"),
        changes=False),
    row("create/existing-dir", BASE, CreateFile("a/d", T), errno.EISDIR),
    row("create/exclusive-existing-dir", BASE, CreateFile("a/d", T, exclusive=True),
        errno.EEXIST),
    row("write/replaces", BASE, WriteFile("a/f", b"new", T), 0, has("a/f", b"new")),
    row("write/missing", BASE, WriteFile("a/n", b"x", T), errno.ENOENT),
    row("write/missing-create", BASE, WriteFile("a/n", b"x", T, create=True), 0,
        has("a/n", b"x")),
    row("write/dir", BASE, WriteFile("a/d", b"x", T, create=True), errno.EISDIR),
    row("write/above-1MiB", BASE, WriteFile("a/f", b"x" * (MIB + 1), T), errno.EFBIG),
    row("write/create-above-1MiB", BASE, WriteFile("a/n", b"x" * (MIB + 1), T, create=True),
        errno.EFBIG),
    row("write/exactly-1MiB", BASE, WriteFile("a/f", b"x" * MIB, T), 0,
        has("a/f", b"x" * MIB)),
    row("range/overwrite", BASE, WriteRange("a/f", 1, b"EY", T), 0, has("a/f", b"hEYlo")),
    row("range/append", BASE, WriteRange("a/f", 5, b"!", T), 0, has("a/f", b"hello!")),
    row("range/gap-zero-filled", BASE, WriteRange("a/f", 7, b"!", T), 0,
        has("a/f", b"hello\0\0!")),
    row("range/empty-data-keeps-content", BASE, WriteRange("a/f", 9, b"", T), 0,
        has("a/f", b"hello")),
    row("range/above-1MiB", BASE, WriteRange("a/f", MIB, b"x", T), errno.EFBIG),
    row("range/up-to-1MiB", BASE, WriteRange("a/f", MIB - 1, b"x", T), 0),
    row("range/missing", BASE, WriteRange("a/n", 0, b"x", T), errno.ENOENT),
    row("range/dir", BASE, WriteRange("a/d", 0, b"x", T), errno.EISDIR),
    row("truncate/cut", BASE, Truncate("a/f", 2, T), 0, has("a/f", b"he")),
    row("truncate/extend-with-zeros", BASE, Truncate("a/f", 7, T), 0, has("a/f", b"hello\0\0")),
    row("truncate/above-1MiB", BASE, Truncate("a/f", MIB + 1, T), errno.EFBIG),
    row("truncate/missing", BASE, Truncate("a/n", 0, T), errno.ENOENT),
    row("truncate/dir", BASE, Truncate("a/d", 0, T), errno.EISDIR),
    row("mkdir/new", BASE, Mkdir("a/n", T), 0, has("a/n")),
    row("mkdir/existing-dir", BASE, Mkdir("a/d", T), errno.EEXIST),
    row("mkdir/existing-file", BASE, Mkdir("a/f", T), errno.EEXIST),
    row("rmdir/empty", BASE, Rmdir("a/d"), 0, gone("a/d"), bound=(removes("a/d"),)),
    row("rmdir/missing", BASE, Rmdir("a/n"), errno.ENOENT),
    row("rmdir/file", BASE, Rmdir("a/f"), errno.ENOTDIR),
    row("rmdir/not-empty", BASE, Rmdir("a"), errno.ENOTEMPTY),
    row("unlink/file", BASE, Unlink("a/f"), 0, gone("a/f"), bound=(removes("a/f"),)),
    row("unlink/missing", BASE, Unlink("a/n"), errno.ENOENT),
    row("unlink/dir", BASE, Unlink("a/d"), errno.EISDIR),
    row("set-mtime/file", BASE, SetMtime("a/f", 77), 0, has("a/f", b"hello")),
    row("set-mtime/missing", BASE, SetMtime("a/n", 77), errno.ENOENT),
]

LIMIT_ROWS = [
    row("limits/total-bytes-write", BASE, WriteFile("a/n", b"1234", T, create=True),
        errno.ENOSPC, limits=(("MAX_TOTAL_BYTES", 9),)),
    row("limits/total-bytes-exactly", BASE, WriteFile("a/n", b"123", T, create=True), 0,
        limits=(("MAX_TOTAL_BYTES", 9),)),
    row("limits/total-bytes-range", BASE, WriteRange("g", 4, b"x", T), errno.ENOSPC,
        limits=(("MAX_TOTAL_BYTES", 9),)),
    row("limits/total-bytes-truncate", BASE, Truncate("g", 5, T), errno.ENOSPC,
        limits=(("MAX_TOTAL_BYTES", 9),)),
    row("limits/total-bytes-shrink-when-over", BASE, Truncate("a/f", 4, T), 0,
        has("a/f", b"hell"), limits=(("MAX_TOTAL_BYTES", 2),)),
    row("limits/total-bytes-unlink-when-over", BASE, Unlink("a/f"), 0,
        limits=(("MAX_TOTAL_BYTES", 2),)),
    row("limits/entries-create", BASE, CreateFile("n", T), errno.ENOSPC,
        limits=(("MAX_ENTRIES", 5),)),
    row("limits/entries-mkdir", BASE, Mkdir("n", T), errno.ENOSPC,
        limits=(("MAX_ENTRIES", 5),)),
    row("limits/entries-exactly", BASE, Mkdir("n", T), 0, limits=(("MAX_ENTRIES", 6),)),
    row("limits/entries-rename-replacing", BASE, Rename("g", "a/f", T), 0,
        limits=(("MAX_ENTRIES", 5),)),
    row("limits/file-bytes-patched", BASE, WriteFile("g", b"123", T), errno.EFBIG,
        limits=(("MAX_FILE_BYTES", 2),)),
]

RENAME_ROWS = [
    row("rename/file", BASE, Rename("a/f", "e/f", T), 0, gone("a/f"), has("e/f", b"hello")),
    row("rename/replaces-target", BASE, Rename("g", "a/f", T), 0, gone("g"), has("a/f", b"x"),
        bound=(removes("a/f"),)),
    row("rename/same-path", BASE, Rename("a/f", "a/f", T), 0, changes=False),
    row("rename/src-missing", BASE, Rename("a/n", "e/n", T), errno.ENOENT),
    row("rename/dst-parent-missing", BASE, Rename("g", "x/g", T), errno.ENOENT),
    row("rename/dst-parent-file", BASE, Rename("a/f", "g/f", T), errno.ENOTDIR),
    row("rename/empty-dir", BASE, Rename("a/d", "e/d", T), 0, has("e/d"), gone("a/d")),
    row("rename/non-empty-dir", BASE, Rename("a", "z", T), errno.ENOTEMPTY),
    row("rename/into-itself", BASE, Rename("e", "e/sub", T), errno.EINVAL),
    row("rename/dir-onto-file", BASE, Rename("e", "g", T), errno.ENOTDIR),
    row("rename/file-onto-dir", BASE, Rename("g", "e", T), errno.EISDIR),
    row("rename/dir-onto-non-empty-dir", BASE, Rename("e", "a", T), errno.ENOTEMPTY),
    row("rename/dir-onto-empty-dir", BASE, Rename("e", "a/d", T), 0, gone("e"), has("a/d"),
        bound=(removes("a/d"),)),
    row("rename/lock-dir", LOCKS[:3], Rename("priv/lock/x", "priv/x", T), errno.EACCES),
    row("rename/lock-dir-within-lock", LOCKS[:3], Rename("priv/lock/x", "priv/lock/y", T),
        errno.EACCES),
    row("rename/dir-into-lock-dir", LOCKS, Rename("a", "priv/lock/y", T), errno.EACCES),
    row("rename/file-into-lock-dir", (*LOCKS, ("f", b"1")), Rename("f", "priv/lock/y", T), 0,
        has("priv/lock/y", b"1")),
]

GUEST_ROWS = [
    row("vmid/create-other-node", GUESTS, CreateFile("nodes/n2/qemu-server/100.conf", T),
        errno.EEXIST),
    row("vmid/create-other-kind", GUESTS, CreateFile("nodes/n1/lxc/100.conf", T), errno.EEXIST),
    row("vmid/write-create-other-node", GUESTS,
        WriteFile("nodes/n2/qemu-server/100.conf", b"x", T, create=True), errno.EEXIST),
    row("vmid/rename-onto-taken", (*GUESTS, ("nodes/n2/tmp", b"x")),
        Rename("nodes/n2/tmp", "nodes/n2/qemu-server/100.conf", T), errno.EEXIST),
    row("vmid/migration-rename", GUESTS, Rename(C100, "nodes/n2/qemu-server/100.conf", T), 0,
        vms({100: ("n2", "qemu")})),
    row("vmid/kind-change-rename", GUESTS, Rename(C100, "nodes/n1/lxc/100.conf", T), 0,
        vms({100: ("n1", "lxc")})),
    row("vmid/rename-new-vmid", GUESTS, Rename(C100, "nodes/n1/qemu-server/101.conf", T), 0,
        vms({101: ("n1", "qemu")})),
    row("vmid/rename-away-from-config-path", GUESTS, Rename(C100, "nodes/n1/old", T), 0,
        vms({})),
    row("vmid/replace-own-config", (*GUESTS, ("nodes/n1/tmp", b"new")),
        Rename("nodes/n1/tmp", C100, T), 0, has(C100, b"new"), vms({100: ("n1", "qemu")})),
    row("vmid/write-existing-config", GUESTS, WriteFile(C100, b"cores: 2\n", T), 0,
        vms({100: ("n1", "qemu")})),
    row("vmid/create-new-vmid", GUESTS, CreateFile("nodes/n2/qemu-server/101.conf", T), 0,
        vms({100: ("n1", "qemu"), 101: ("n2", "qemu")})),
    row("vmid/directory-is-not-a-config", GUESTS, Mkdir("nodes/n2/qemu-server/100.conf", T), 0,
        vms({100: ("n1", "qemu")})),
    row("vmid/unlink-config", GUESTS, Unlink(C100), 0, vms({})),
]

COROSYNC_ROWS = [
    row("corosync/create-empty", (), CreateFile("corosync.conf", T), errno.EINVAL),
    row("corosync/first-config", (), WriteFile("corosync.conf", corosync(1), T, create=True), 0),
    row("corosync/first-config-invalid", (),
        WriteFile("corosync.conf", b"totem {\n", T, create=True), errno.EINVAL),
    row("corosync/bad-syntax", CONF, WriteFile("corosync.conf", b"totem {\n  x\n", T),
        errno.EINVAL),
    row("corosync/not-utf8", CONF, WriteFile("corosync.conf", b"\xff" + corosync(4), T),
        errno.EINVAL),
    row("corosync/version-not-greater", CONF, WriteFile("corosync.conf", corosync(3, 3), T),
        errno.EINVAL),
    row("corosync/version-lower", CONF, WriteFile("corosync.conf", corosync(2, 3), T),
        errno.EINVAL),
    row("corosync/other-cluster-name", CONF,
        WriteFile("corosync.conf", corosync(4, name="other"), T), errno.EINVAL),
    row("corosync/good-update", CONF, WriteFile("corosync.conf", corosync(4, 3), T), 0,
        has("corosync.conf", corosync(4, 3))),
    row("corosync/same-content", CONF, WriteFile("corosync.conf", corosync(3), T), 0),
    row("corosync/write-range", CONF, WriteRange("corosync.conf", 0, b"#", T), errno.EINVAL),
    row("corosync/truncate", CONF, Truncate("corosync.conf", 10, T), errno.EINVAL),
    row("corosync/rename-invalid-onto", (*CONF, ("new", b"garbage {")),
        Rename("new", "corosync.conf", T), errno.EINVAL),
    row("corosync/rename-stale-onto", (*CONF, ("new", corosync(2, 3))),
        Rename("new", "corosync.conf", T), errno.EINVAL),
    row("corosync/rename-good-onto", (*CONF, ("new", corosync(4, 3))),
        Rename("new", "corosync.conf", T), 0, has("corosync.conf", corosync(4, 3))),
    row("corosync/rename-away", CONF, Rename("corosync.conf", "old.conf", T), 0),
    row("corosync/unlink", CONF, Unlink("corosync.conf"), 0, gone("corosync.conf")),
    row("corosync/set-mtime", CONF, SetMtime("corosync.conf", 5), 0),
    row("corosync/not-at-root", (*CONF, "a/"), WriteFile("a/corosync.conf", b"x", T, True), 0),
]

LOCK_ROWS = [
    row("lock/mkdir-held", LOCKS, Mkdir("priv/lock/x", T), errno.EEXIST),
    row("lock/mkdir-free", LOCKS, Mkdir("priv/lock/y", T), 0, has("priv/lock/y")),
    row("lock/unlock-matching", LOCKS, lock_checksum_of("priv/lock/x"), 0,
        gone("priv/lock/x", "priv/lock/x/owner"),
        bound=(removes("priv/lock/x", "priv/lock/x/owner"),)),
    row("lock/unlock-stale", LOCKS, Unlock("priv/lock/x", b"\0" * 32), errno.ESTALE),
    row("lock/unlock-missing", LOCKS, Unlock("priv/lock/y", b"\0" * 32), errno.ENOENT),
    row("lock/unlock-not-a-lock", LOCKS, Unlock("priv/lock/x/owner", b"\0" * 32), errno.ESTALE),
    row("lock/unlock-request", LOCKS, UnlockRequest("priv/lock/x"), 0, changes=False),
    row("lock/unlock-request-missing", LOCKS, UnlockRequest("priv/lock/y"), errno.ENOENT),
    row("lock/rmdir-held-with-content", LOCKS, Rmdir("priv/lock/x"), errno.ENOTEMPTY),
    # pmxcfs's memdb_mtime: only the holder (the writer of the lock's row, 1 here; the op's is 2)
    # may move a lock's mtime, and never backwards; utime(0, 0) is always refused.
    row("lock/set-mtime-not-the-holder", LOCKS, SetMtime("priv/lock/x", T + 5), errno.EACCES),
    row("lock/set-mtime-zero", LOCKS, SetMtime("priv/lock/x", 0), errno.EACCES),
    row("lock/set-mtime-file-inside", LOCKS, SetMtime("priv/lock/x/owner", 0), 0),
    row("lock/set-mtime-lock-parent", LOCKS, SetMtime("priv/lock", 0), 0),
]


@pytest.mark.parametrize("case", [*PATH_ROWS, *VIRTUAL_ROWS, *ROOT_ROWS, *FILE_ROWS,
                                  *LIMIT_ROWS, *RENAME_ROWS, *GUEST_ROWS, *COROSYNC_ROWS,
                                  *LOCK_ROWS])
def test_apply_rule(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    db = build(case.setup)
    for name, value in case.limits:
        monkeypatch.setattr(memdb, name, value)
    op = case.op if not callable(case.op) else case.op(db)
    checks = (*case.checks, *(bind(db) for bind in case.bound_checks))
    before = Snapshot.of(db)
    assert db.check(op, writer=2) == case.errno, "check() answers what apply() will"
    assert Snapshot.of(db) == before
    result = db.apply(op, writer=2)
    assert result.errno == case.errno, errno.errorcode.get(result.errno, result.errno)
    if case.errno or not case.changes:
        assert Snapshot.of(db) == before
        assert result == ApplyResult(case.errno, before.version, (), (), ())
    else:
        assert result.ok
        assert result.version == db.version == before.version + 1
        assert result.upserts[0] == db.lookup("")
        monkeypatch.undo()  # a tree over patched limits is still a valid tree
        assert check_tree(db.entries(), db.version) == []
    for check in checks:
        check(db, result)


# ---------------------------------------------------------------------------------------------
# 2. Rows, versions and queries


def test_new_entry_inode_is_the_version_that_created_it() -> None:
    db = MemDB()
    assert db.apply(Mkdir("a", 10), writer=1).version == 1
    assert db.apply(Mkdir("b", 11), writer=1).ok
    result = db.apply(CreateFile("a/f", 12), writer=2)
    assert [(p, must(db, p).inode) for p in ("a", "b", "a/f")] == [("a", 1), ("b", 2), ("a/f", 3)]
    assert result.upserts == (db.lookup(""), db.lookup("a/f"))


def test_versions_writers_and_root_row() -> None:
    db = build(BASE)  # 5 ops by writer 1
    a_before = db.lookup("a")
    result = db.apply(WriteFile("a/f", b"new", 77), writer=3)
    f, root = db.lookup("a/f"), db.lookup("")
    assert f is not None
    assert root is not None
    assert (f.version, f.writer, f.mtime, f.inode) == (6, 3, 77, 2)
    assert db.lookup("a") == a_before  # parents are not modified
    assert (root.version, root.writer, root.mtime) == (db.version, 3, 77) == (6, 3, 77)
    assert result.upserts == (root, f)
    assert result.removed == ()
    assert result.paths == ("", "a", "a/f")
    assert db.apply(Unlink("g"), writer=4).upserts[0].mtime == 77  # no mtime in the op: kept


def test_rename_result_lists_both_places_and_the_replaced_inode() -> None:
    db = build(BASE)
    moved, replaced = db.lookup("a/f"), db.lookup("g")
    assert moved is not None
    assert replaced is not None
    result = db.apply(Rename("a/f", "g", 50), writer=2)
    after = db.lookup("g")
    assert after == replace(moved, parent=ROOT_INODE, name="g", version=6, writer=2, mtime=50)
    assert result.removed == (replaced.inode,)
    assert result.paths == ("", "a", "a/f", "g")
    assert db.get(replaced.inode) is None


def test_queries() -> None:
    db = build(BASE)
    a = db.lookup("a")
    assert a is not None
    assert db.get(a.inode) == a
    assert [e.name for e in db.children(a.inode)] == ["d", "f"]
    assert [e.name for e in db.children(ROOT_INODE)] == ["a", "e", "g"]
    assert db.children(must(db, "g").inode) == []
    assert db.children(999) == []
    assert db.child(a.inode, "d") == db.lookup("a/d")
    assert [db.child(a.inode, "x"), db.child(must(db, "a/f").inode, "x"), db.child(999, "d")] \
        == [None] * 3
    assert db.path_of(must(db, "a/d").inode) == "a/d"
    assert db.path_of(ROOT_INODE) == ""
    with pytest.raises(KeyError):
        db.path_of(999)
    assert [db.lookup(p) for p in ("a//f", "/a", "a/", "x", "a/f/x")] == [None] * 5
    assert [e.inode for e in db.entries()] == [0, 1, 2, 3, 4, 5]
    assert db.digests() == {e.inode: e.digest() for e in db.entries()}
    assert db.checksum() == hashlib.sha256(b"".join(db.digests().values())).digest()
    assert (db.total_bytes, db.entry_count) == (6, 5)


def test_empty_and_rootless_construction() -> None:
    assert MemDB().entries() == [Entry(0, 0, 0, 0, 0, EntryType.DIR, "")]
    db = MemDB([Entry(3, 0, 2, 1, 9, EntryType.FILE, "f", b"abc")], version=5)
    assert db.version == 5
    assert db.lookup("f") is not None
    assert db.total_bytes == 3
    assert db.apply(Mkdir("d", 1), writer=1).upserts[1].inode == 6


def test_vmlist_reports_node_kind_and_entry_version() -> None:
    db = build((*GUESTS, "nodes/n2/lxc/", "nodes/n2/openvz/",
                ("nodes/n2/lxc/200.conf", b""), ("nodes/n2/openvz/300.conf", b"")))
    assert db.apply(WriteFile(C100, b"cores: 4\n", T), writer=1).ok
    assert db.vmlist() == {100: VmInfo("n1", "qemu", db.version),
                           200: VmInfo("n2", "lxc", must(db, "nodes/n2/lxc/200.conf").version),
                           300: VmInfo("n2", "openvz", db.version - 1)}
    assert list(db.vmlist()) == [100, 200, 300]


def test_checksum_follows_changes_and_equal_histories_agree() -> None:
    one, two = build(BASE), build(BASE)
    assert one.checksum() == two.checksum()
    assert len(one.checksum()) == 32
    before = one.checksum()
    assert one.apply(SetMtime("g", 5), writer=1).ok
    assert one.checksum() != before
    assert one.checksum() == hashlib.sha256(b"".join(one.digests().values())).digest()


def test_writer_must_be_a_node_id() -> None:
    with pytest.raises(ValueError, match="is not a node id"):
        MemDB().apply(Mkdir("a", 1), writer=-1)
    with pytest.raises(ValueError, match="is not a node id"):
        MemDB().check(Mkdir("a", 1), writer=2**64)


def test_valid_path() -> None:
    assert [valid_path(p) for p in ("", "a", "a/b", "a b/ü")] == [0] * 4
    assert valid_path("a/./b") == errno.EACCES
    assert valid_path("x" * 256) == errno.ENAMETOOLONG


# ---------------------------------------------------------------------------------------------
# Locks


def test_lock_checksum_is_for_lock_directories_only() -> None:
    db = build((*LOCKS, "priv/lock/x/sub/"))
    assert db.lock_checksum("priv/lock/x") is not None
    assert len(db.lock_checksum("priv/lock/x") or b"") == 32
    for path in ("priv/lock", "priv/lock/x/owner", "priv/lock/x/sub", "priv/lock/y", "a",
                 "priv/lock/", ""):
        assert db.lock_checksum(path) is None, path


def test_lock_checksum_changes_on_refresh_only() -> None:
    db = build(LOCKS)
    first = db.lock_checksum("priv/lock/x")
    assert db.apply(Mkdir("a/other", T), writer=1).ok
    assert db.lock_checksum("priv/lock/x") == first
    lock = must(db, "priv/lock/x")
    assert db.apply(SetMtime("priv/lock/x", lock.mtime), writer=lock.writer).ok
    assert db.lock_checksum("priv/lock/x") not in (None, first)


def test_only_the_holder_refreshes_a_lock_and_never_backwards() -> None:
    db = build(LOCKS)  # priv/lock/x made by writer 1 at T
    lock = "priv/lock/x"
    assert db.apply(SetMtime(lock, T - 1), writer=1).errno == errno.EACCES
    assert db.apply(SetMtime(lock, 0), writer=1).errno == errno.EACCES
    assert db.apply(SetMtime(lock, T), writer=1).ok  # the same mtime: a refresh
    assert db.apply(SetMtime(lock, T + 60), writer=1).ok
    assert (must(db, lock).writer, must(db, lock).mtime) == (1, T + 60)
    assert db.apply(SetMtime(lock, T + 120), writer=3).errno == errno.EACCES
    assert db.apply(Mkdir("priv/lock/y", T), writer=3).ok
    assert db.apply(SetMtime("priv/lock/y", T + 1), writer=1).errno == errno.EACCES
    assert db.apply(SetMtime("priv/lock/y", T + 1), writer=3).ok
    assert db.apply(SetMtime("a", 0), writer=3).ok  # any other directory: anyone, any time


def test_lock_expired_timeline() -> None:
    db = build(LOCKS)
    lock = "priv/lock/x"
    t0 = 5_000_000
    assert db.lock_expired(lock, t0) is False  # first sight
    assert db.lock_expired(lock, t0 + memdb.LOCK_TIMEOUT_MS - 1) is False
    assert db.lock_expired(lock, t0 + memdb.LOCK_TIMEOUT_MS) is True
    assert db.apply(SetMtime(lock, T + 1), writer=1).ok  # the holder refreshes it
    t1 = t0 + memdb.LOCK_TIMEOUT_MS + 10
    assert db.lock_expired(lock, t1) is False
    assert db.lock_expired(lock, t1 + memdb.LOCK_TIMEOUT_MS - 1) is False
    assert db.lock_expired(lock, t1 + memdb.LOCK_TIMEOUT_MS) is True
    unlock = Unlock(lock, db.lock_checksum(lock) or b"")
    assert db.apply(unlock, writer=1).ok
    assert db.lock_expired(lock, t1 + 10 * memdb.LOCK_TIMEOUT_MS) is False
    assert db.apply(Mkdir(lock, T), writer=1).ok  # a new lock of the same name starts afresh
    assert db.lock_expired(lock, t1 + 10 * memdb.LOCK_TIMEOUT_MS) is False
    assert db.lock_expired("a", t0) is False


def test_unlock_removes_a_lock_of_any_depth() -> None:
    db = build(LOCKS[:3])
    path = "priv/lock/x"
    for _ in range(1100):
        path += "/d"
        assert db.apply(Mkdir(path, T), writer=1).ok
    result = db.apply(Unlock("priv/lock/x", db.lock_checksum("priv/lock/x") or b""), writer=1)
    assert len(result.removed) == 1101
    assert db.entry_count == 2


# ---------------------------------------------------------------------------------------------
# 3. mode_of and check_tree


@pytest.mark.parametrize(("path", "is_dir", "quorate", "mode"), [
    ("", True, True, 0o755), ("", True, False, 0o555),
    ("a", True, True, 0o755), ("a/f", False, True, 0o640), ("a/f", False, False, 0o440),
    ("priv", True, True, 0o700), ("priv", True, False, 0o500),
    ("priv/lock/x", True, True, 0o700), ("priv/authkey.key", False, True, 0o600),
    ("priv/authkey.key", False, False, 0o400),
    ("nodes/n1/priv", True, True, 0o700), ("nodes/n1/priv/key", False, False, 0o400),
    ("nodes/n1/pve-ssl.pem", False, True, 0o640), ("nodes/n1/private", False, True, 0o640),
    ("a/priv/x", False, True, 0o640), ("nodes/priv", True, True, 0o755),
])
def test_mode_of(path: str, is_dir: bool, quorate: bool, mode: int) -> None:
    assert oct(mode_of(path, is_dir, quorate)) == oct(mode)


def d(inode: int, parent: int, name: str, *, version: int = 1, data: bytes = b"") -> Entry:
    return Entry(inode, parent, version, 1, 0, EntryType.DIR, name, data)


def f(inode: int, parent: int, name: str, data: bytes = b"", *, version: int = 1,
      mtime: int = 0) -> Entry:
    return Entry(inode, parent, version, 1, mtime, EntryType.FILE, name, data)


NODES = [d(1, 0, "nodes"), d(2, 1, "n1"), d(3, 1, "n2"), d(4, 2, "qemu-server"),
         d(5, 3, "lxc")]


@pytest.mark.parametrize(("rows", "version", "limits", "needle"), [
    pytest.param([Entry(0, 0, 9, 0, 0, EntryType.FILE, "")], 9, (), "inode 0 (the root): is "
                 "not a directory", id="root-not-a-directory"),
    pytest.param([d(0, 0, "x", version=9)], 9, (), "parent 0 and an empty name",
                 id="root-name"),
    pytest.param([d(0, 0, "", version=4)], 9, (), "version 4 is not the global version 9",
                 id="root-version"),
    pytest.param([f(1, 7, "a")], 9, (), "inode 1 (path unknown): parent inode 7 is missing",
                 id="missing-parent"),
    pytest.param([f(1, 0, "a"), f(2, 1, "b")], 9, (), "inode 2 (path unknown): parent inode 1 "
                 "is not a directory", id="parent-is-file"),
    pytest.param([d(1, 0, "a"), f(2, 0, "a")], 9, (), "inodes 1, 2: the same name 'a'",
                 id="duplicate-name"),
    pytest.param([f(1, 0, "..")], 9, (), "inode 1 (..): invalid name '..'", id="name-dotdot"),
    pytest.param([f(1, 0, "")], 9, (), "invalid name ''", id="name-empty"),
    pytest.param([f(1, 0, "a/b")], 9, (), "invalid name 'a/b'", id="name-slash"),
    pytest.param([f(1, 0, "n" * 256)], 9, (), "ENAMETOOLONG", id="name-too-long"),
    pytest.param([d(1, 0, ".members")], 9, (), "'.members' is reserved", id="name-virtual"),
    pytest.param([d(1, 2, "a"), d(2, 1, "b")], 9, (), "inode 1 (path unknown): in a parent "
                 "cycle", id="cycle"),
    pytest.param([d(1, 1, "a")], 9, (), "in a parent cycle", id="self-parent"),
    pytest.param([d(1, 0, "a"), d(2, 3, "b"), d(3, 2, "c"), d(4, 3, "e")], 9, (),
                 "inode 4 (path unknown): in a parent cycle", id="below-a-cycle"),
    pytest.param([d(1, 0, "a", data=b"x")], 9, (), "inode 1 (a): directory with 1 bytes",
                 id="dir-with-data"),
    pytest.param([f(1, 0, "big", b"x" * (MIB + 1))], 9, (), "inode 1 (big): file of 1048577 "
                 "bytes", id="file-too-large"),
    pytest.param([f(1, 0, "a", version=10)], 9, (), "inode 1 (a): version 10 is greater than "
                 "the global version 9", id="row-version-above-global"),
    pytest.param([f(10, 0, "a")], 9, (), "inode 10 (a): inode is greater than the global "
                 "version 9", id="inode-above-global"),
    pytest.param([*NODES, f(6, 4, "100.conf"), f(7, 5, "100.conf")], 9, (),
                 "VMID 100 is configured more than once: inode 6 (nodes/n1/qemu-server/100.conf)"
                 ", inode 7 (nodes/n2/lxc/100.conf)", id="duplicate-vmid"),
    pytest.param([f(1, 0, "a", mtime=-5)], 9, (), "inode 1 (a): negative mtime -5",
                 id="negative-number"),
    pytest.param([], -1, (), "negative global version -1", id="negative-global-version"),
    pytest.param([f(1, 0, "a"), f(1, 0, "b")], 9, (), "inode 1: more than one row",
                 id="duplicate-inode"),
    pytest.param([Entry(1, 0, 1, 1, 0, 5, "a")], 9, (), "type 5 is neither",  # type: ignore[arg-type]
                 id="unknown-type"),
    pytest.param([f(1, 0, "a", b"12"), f(2, 0, "b", b"34")], 9, (("MAX_TOTAL_BYTES", 3),),
                 "total file size 4 bytes is above the limit of 3", id="total-bytes"),
    pytest.param([f(1, 0, "a"), f(2, 0, "b")], 9, (("MAX_ENTRIES", 1),),
                 "2 entries are above the limit of 1", id="entry-count"),
])
def test_check_tree_reports(rows: list[Entry], version: int, limits: tuple[tuple[str, int], ...],
                            needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in limits:
        monkeypatch.setattr(memdb, name, value)
    problems = check_tree(rows, version)
    assert [p for p in problems if needle in p], problems
    with pytest.raises(CorruptTree, match="corrupt tree") as raised:
        MemDB(rows, version)
    assert needle in str(raised.value)


def test_check_tree_accepts_what_apply_builds() -> None:
    db = build((*BASE, *GUESTS, *LOCKS[:4], *CONF))
    assert check_tree(db.entries(), db.version) == []
    assert check_tree(db.entries()[1:], db.version) == []  # the root row is optional


def test_replace_all_is_all_or_nothing() -> None:
    db = build(BASE)
    before = Snapshot.of(db)
    bad = [*db.entries(), f(99, 42, "orphan")]
    with pytest.raises(CorruptTree, match="parent inode 42 is missing"):
        db.replace_all(bad, db.version + 100)
    assert Snapshot.of(db) == before
    other = build((*GUESTS, *CONF))
    db.replace_all(other.entries(), other.version)
    assert Snapshot.of(db) == Snapshot.of(other)
    assert content(db) == content(other)
    result = db.apply(Mkdir("z", T), writer=1)
    assert result.version == other.version + 1
    assert must(db, "z").inode == result.version


# ---------------------------------------------------------------------------------------------
# 4. Property test against a reference model

FILE_LIMIT, TOTAL_LIMIT, ENTRY_LIMIT = 512, 700, 20
LOCK_PARENT = "priv/lock"
VIRTUAL = {"local", "qemu-server", "lxc", "openvz", ".members", ".vmlist", ".version",
           ".clusterlog", ".debug", ".rrd"}
class Model:
    """The rules of the spec over a plain dict path -> ("dir",) | ("file", data)."""

    def __init__(self) -> None:
        self.tree: dict[str, Node] = {}
        self.locks: dict[str, tuple[int, int]] = {}  # lock directory -> (holder, mtime)

    def apply(self, op: FsOp, lock_is_current: bool, writer: int) -> tuple[int, bool]:
        """(errno, changed) for `op`; the tree changes only on (0, True)."""
        early = self.early_errno(op)
        if early:
            return early, False
        outcome = self.outcome(op, lock_is_current, writer)
        if isinstance(outcome, int):
            return outcome, False
        if outcome is None:
            return 0, False
        late = self.vmid_errno(outcome) or self.conf_errno(outcome) or self.space_errno(outcome)
        if late:
            return late, False
        self.tree = outcome
        self.note_locks(op, writer)
        return 0, True

    def note_locks(self, op: FsOp, writer: int) -> None:
        """A lock directory is held by the writer that made it, at the mtime it last set."""
        if isinstance(op, Mkdir | SetMtime) and op.path.rpartition("/")[0] == LOCK_PARENT \
                and self.tree.get(op.path) == DIR:
            self.locks[op.path] = (writer, op.mtime)
        self.locks = {p: held for p, held in self.locks.items() if self.tree.get(p) == DIR}

    def early_errno(self, op: FsOp) -> int:
        paths = op_paths(op)
        for path in paths:
            if path == "":
                continue
            if "\0" in path:
                return errno.EINVAL
            for name in path.split("/"):
                if name in ("", ".", ".."):
                    return errno.EACCES
                if len(name.encode()) > 255:
                    return errno.ENAMETOOLONG
        if getattr(op, "mtime", 0) < 0 or getattr(op, "offset", 0) < 0 or \
                getattr(op, "size", 0) < 0:
            return errno.EINVAL
        if "" in paths:
            return errno.EBUSY if isinstance(op, Rmdir) else errno.EACCES
        creates = isinstance(op, CreateFile | Mkdir) or (isinstance(op, WriteFile) and op.create)
        if (creates and paths[0] in VIRTUAL) or (isinstance(op, Rename) and op.dst in VIRTUAL):
            return errno.EACCES
        for path in paths:
            parts = path.split("/")
            for i in range(1, len(parts)):
                above = self.tree.get("/".join(parts[:i]))
                if above is None:
                    return errno.ENOENT
                if above[0] == "file":
                    return errno.ENOTDIR
        return 0

    def below(self, path: str) -> list[str]:
        return [p for p in self.tree if p.startswith(path + "/")]

    def with_(self, path: str, node: Node) -> dict[str, Node]:
        return {**self.tree, path: node}

    def without(self, *paths: str) -> dict[str, Node]:
        return {p: n for p, n in self.tree.items() if p not in paths}

    def outcome(self, op: FsOp, lock_is_current: bool,
                writer: int) -> dict[str, Node] | int | None:
        """The new tree, an errno, or None for success without a change."""
        path = op_paths(op)[0]
        node = self.tree.get(path)
        is_dir = node == DIR
        old = data_of(node) or b""
        match op:
            case CreateFile():
                if node is None:
                    return self.with_(path, ("file", b""))
                return errno.EEXIST if op.exclusive else errno.EISDIR if is_dir else None
            case WriteFile():
                if node is None and not op.create:
                    return errno.ENOENT
                if is_dir:
                    return errno.EISDIR
                return errno.EFBIG if len(op.data) > FILE_LIMIT else \
                    self.with_(path, ("file", op.data))
            case WriteRange() | Truncate():
                if node is None:
                    return errno.ENOENT
                if is_dir:
                    return errno.EISDIR
                return self.resized(path, old, op)
            case Mkdir():
                return errno.EEXIST if node is not None else self.with_(path, DIR)
            case Rmdir():
                if node is None:
                    return errno.ENOENT
                if not is_dir:
                    return errno.ENOTDIR
                return errno.ENOTEMPTY if self.below(path) else self.without(path)
            case Unlink():
                if node is None:
                    return errno.ENOENT
                return errno.EISDIR if is_dir else self.without(path)
            case SetMtime():
                if node is None:
                    return errno.ENOENT
                holder, mtime = self.locks.get(path, (writer, op.mtime))
                return errno.EACCES if holder != writer or op.mtime < mtime else dict(self.tree)
            case UnlockRequest():
                return errno.ENOENT if node is None else None
            case Unlock():
                if node is None:
                    return errno.ENOENT
                if not (lock_is_current and is_dir and path.rpartition("/")[0] == LOCK_PARENT):
                    return errno.ESTALE
                return self.without(path, *self.below(path))
            case Rename():
                return self.renamed(op)

    def resized(self, path: str, old: bytes, op: WriteRange | Truncate) -> dict[str, Node] | int:
        if isinstance(op, Truncate):
            if op.size > FILE_LIMIT:
                return errno.EFBIG
            data = old[:op.size] + b"\0" * max(0, op.size - len(old))
        else:
            if op.offset + len(op.data) > FILE_LIMIT:
                return errno.EFBIG
            data = old
            if op.data:
                padded = old + b"\0" * max(0, op.offset - len(old))
                data = padded[:op.offset] + op.data + padded[op.offset + len(op.data):]
        return self.with_(path, ("file", data))

    def renamed(self, op: Rename) -> dict[str, Node] | int | None:
        src, dst = self.tree.get(op.src), self.tree.get(op.dst)
        if src is None:
            return errno.ENOENT
        if op.src == op.dst:
            return None
        src_dir = src[0] == "dir"
        if src_dir and LOCK_PARENT in (op.src.rpartition("/")[0], op.dst.rpartition("/")[0]):
            return errno.EACCES
        if src_dir and self.below(op.src):
            return errno.ENOTEMPTY
        if op.dst.startswith(op.src + "/"):
            return errno.EINVAL
        if dst is not None and src_dir and dst[0] == "file":
            return errno.ENOTDIR
        if dst is not None and not src_dir and dst[0] == "dir":
            return errno.EISDIR
        if dst is not None and self.below(op.dst):
            return errno.ENOTEMPTY
        return {**self.without(op.src), op.dst: src}

    @staticmethod
    def vmid_errno(new: dict[str, Node]) -> int:
        seen: set[int] = set()
        for path, node in new.items():
            guest = guest_config(path) if node[0] == "file" else None
            if guest is not None:
                if guest.vmid in seen:
                    return errno.EEXIST
                seen.add(guest.vmid)
        return 0

    def conf_errno(self, new: dict[str, Node]) -> int:
        old, now = self.tree.get("corosync.conf"), new.get("corosync.conf")
        new_data, old_data = data_of(now), data_of(old)
        if new_data is None or now == old:
            return 0
        current = None if old_data is None else conf.check(old_data.decode()).config
        try:
            text = new_data.decode("utf-8")
        except UnicodeDecodeError:
            return errno.EINVAL
        return 0 if conf.check(text, current=current).ok else errno.EINVAL

    def space_errno(self, new: dict[str, Node]) -> int:
        def size(tree: dict[str, Node]) -> int:
            return sum(len(data_of(n) or b"") for n in tree.values())
        if size(new) > max(TOTAL_LIMIT, size(self.tree)):
            return errno.ENOSPC
        return errno.ENOSPC if len(new) > max(ENTRY_LIMIT, len(self.tree)) else 0


SEED: Setup = ("nodes/", "nodes/n1/", "nodes/n2/", "nodes/n1/qemu-server/",
               "nodes/n2/qemu-server/", "nodes/n1/lxc/", ("nodes/n1/qemu-server/100.conf", b"x"),
               "priv/", "priv/lock/", "priv/lock/a/", ("priv/lock/a/b", b"1"),
               ("corosync.conf", corosync(1)), "a/", "a/a/", ("a/b", b"hello"), "b/", ("b/a", b""))
SIMPLE = ["/".join(p) for n in (1, 2, 3) for p in itertools.product("ab", repeat=n)]
SPECIAL = ["nodes/n1/qemu-server/100.conf", "nodes/n2/qemu-server/100.conf",
           "nodes/n1/lxc/100.conf", "nodes/n1/qemu-server/101.conf", "nodes/n1/qemu-server/a",
           "nodes/n2/qemu-server", "nodes/n3", "priv/lock/a", "priv/lock/b", "priv/lock/a/b",
           "priv/lock", "corosync.conf"]
INVALID = ["", ".members", "a//b", "a/..", "l" * 256]
PATHS = st.sampled_from(2 * (SIMPLE + SPECIAL) + INVALID)
LOCK_PATHS = st.sampled_from(["priv/lock/a", "priv/lock/b", "priv/lock/a/b"]) | PATHS
MOVE_PATHS = st.sampled_from(["a", "a/a", "a/b", "b", "b/a", "b/b", "corosync.conf",
                              "nodes/n1/qemu-server/100.conf", "nodes/n2/qemu-server/100.conf",
                              "nodes/n1/lxc/100.conf", "priv/lock/a", "priv/lock/b"]) | PATHS
DATA = st.sampled_from([b"", b"x", b"hello", b"z" * 300, b"w" * (FILE_LIMIT + 1), corosync(1),
                        corosync(2), corosync(2, 3), b"bad {", b"\xff"])
MTIMES = st.integers(-1, 9)
OFFSETS = st.sampled_from([0, 2, 7, 500])
SIZES = st.sampled_from([0, 3, 10, FILE_LIMIT + 88])
OPS = st.one_of(
    st.builds(CreateFile, PATHS, MTIMES, st.booleans()),
    st.builds(WriteFile, PATHS, DATA, MTIMES, st.booleans()),
    st.builds(WriteRange, PATHS, OFFSETS, DATA, MTIMES),
    st.builds(Truncate, PATHS, SIZES, MTIMES),
    st.builds(Mkdir, PATHS, MTIMES),
    st.builds(Rmdir, PATHS),
    st.builds(Unlink, PATHS),
    st.builds(Rename, MOVE_PATHS, MOVE_PATHS, MTIMES),
    st.builds(WriteFile, MOVE_PATHS, DATA, MTIMES, st.booleans()),
    st.builds(SetMtime, PATHS, MTIMES),
    st.builds(SetMtime, LOCK_PATHS, MTIMES),
    st.builds(UnlockRequest, LOCK_PATHS),
    st.builds(Unlock, LOCK_PATHS, st.just(b"")),
)
STEPS = st.lists(st.tuples(OPS, st.booleans(), st.integers(1, 3)), min_size=10,
                 max_size=50)


def small_limits() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("MAX_FILE_BYTES", FILE_LIMIT), ("MAX_TOTAL_BYTES", TOTAL_LIMIT),
                            ("MAX_ENTRIES", ENTRY_LIMIT)):
            patch.setattr(memdb, name, value)
        yield


def check_step(db: MemDB, model: Model, before: Snapshot, result: ApplyResult, code: int,
               changed: bool, writer: int) -> None:
    assert result.errno == code
    assert content(db) == model.tree
    if not changed:
        assert Snapshot.of(db) == before
        return
    assert db.version == result.version == before.version + 1
    old = {e.inode for e in before.entries}
    for entry in result.upserts:
        assert (entry.version, entry.writer) == (db.version, writer)
        assert entry.inode in old or entry.inode == db.version
    assert check_tree(db.entries(), db.version) == []
    files = [e for e in db.entries() if e.type is EntryType.FILE]
    assert db.total_bytes == sum(len(e.data) for e in files)
    assert db.entry_count == len(db.entries()) - 1
    guests = {g.vmid: (g.node, g.kind) for e in files if (g := guest_config(db.path_of(e.inode)))}
    assert {vmid: (i.node, i.kind) for vmid, i in db.vmlist().items()} == guests


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_matches_reference_model(steps: list[tuple[FsOp, bool, int]]) -> None:
    for _ in small_limits():
        db, model = build(SEED), Model()
        model.tree = content(db)
        model.locks = {"priv/lock/a": (1, T)}
        for op, current, writer in steps:
            if isinstance(op, Unlock) and current:
                op = Unlock(op.path, db.lock_checksum(op.path) or b"-")
            before = Snapshot.of(db)
            checked = db.check(op, writer)
            result = db.apply(op, writer)
            assert checked == result.errno
            code, changed = model.apply(op, current, writer)
            check_step(db, model, before, result, code, changed, writer)
        rebuilt = MemDB(db.entries(), db.version)
        assert Snapshot.of(rebuilt) == Snapshot.of(db)
