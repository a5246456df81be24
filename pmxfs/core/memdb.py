"""The tree (memdb): rows, inodes, versions, limits, guest configs, locks and permissions.

How it works
------------
`MemDB` holds every row of the tree (`Entry`, pmxcfs's layout) in an `_Index`: inode -> row,
directory inode -> {name: child inode}, inode -> digest, the guest-config index (VMID -> inode)
and the running byte total, so a lookup costs O(depth) and statfs and `.vmlist` cost nothing.
The root row (inode 0) carries the global version.

`apply(op, writer)` runs in two steps. Planning checks everything and describes the change as a
`_Change` (the rows to write in their final state, the rows to delete) without touching the
tree; only a plan that passed every check is committed. So a failing op changes nothing, and a
successful one bumps the global version by exactly one: v := v+1, every written row gets version
v and `writer`, a new row gets inode v, and the root row gets version v (and the op's mtime when
the op carries one, as pmxcfs keeps the time of the last change there). The result lists the
written rows (root first, then by inode), the deleted inodes (ascending) and the paths to
invalidate (every written, moved or deleted path, its parent, and the root), all sorted, so
`apply` is deterministic on every member. `check(op, writer)` runs the planning step alone: the
errno `apply` would answer now, with nothing changed (one definition of the rules for a proposer
that must refuse at once what the tree would refuse).

Checks run in this order (the first failing one gives the errno):
1. every named path (source first): `valid_path`;
2. numbers: an mtime outside 0..2**63-1, a negative offset or size -> EINVAL;
3. the root itself -> EACCES (EBUSY for rmdir);
4. creating (create, write with create, mkdir, rename target) a virtual root name -> EACCES;
5. the parent walk of every path (source first), as Linux resolves both parents of a rename
   before it looks at the source: a missing component -> ENOENT, a file -> ENOTDIR;
6. the op's own rules on the target (DESIGN.md §4), then EFBIG: as in POSIX a file must exist
   (and be a file) before its size matters, so ENOENT/EISDIR come before EFBIG;
7. on the planned change: VMID EEXIST, then corosync.conf EINVAL, then ENOSPC.

Decisions where the contract is silent:
* `valid_path`: a path that is not valid UTF-8 or holds a NUL -> EINVAL; a path over 4096 bytes
  -> ENAMETOOLONG (PATH_MAX), a name over 255 bytes -> ENAMETOOLONG (NAME_MAX). The proposer
  applies the wire part of these rules before sending (`fsop.op_errno`).
* Only regular files are guest configs: a directory named `100.conf` holds no VMID (as pmxcfs).
* ENOSPC only when the op grows the total that is over the limit, so deleting and shrinking
  always work.
* WriteRange with empty data leaves the content as it is (a zero-length write), but is still a
  change (version, mtime).
* corosync.conf: a write that leaves the content as it is skips validation; content that is not
  UTF-8 is EINVAL; when the current file is missing or invalid the new one is checked on its own.
* Unlock of an existing path that is not a lock directory -> ESTALE (its checksum cannot match).
* SetMtime on a lock directory (a directory directly inside priv/lock) follows pmxcfs's
  memdb_mtime: EACCES when the new mtime is older than the lock's, or when the writer is not the
  node that holds the lock. The holder is the row's `writer`: mkdir makes it the creator, and only
  the holder's own SetMtime can write the row again (files inside do not change it), so it stays
  the holder until the lock is gone. An equal mtime is a refresh (the checksum changes).
  Contenders: `utime(lockdir, (0, 0))` is, as in pmxcfs, two ops: an UnlockRequest (it always
  succeeds on an existing lock and makes the lowest node check the expiry) and SetMtime(0), which
  this rule refuses with EACCES (a lock made at a real time is newer than 0). So the contender's
  call fails, as it does with pmxcfs, but its expiry request has been made (DESIGN.md §4).
* `.rrd` is a virtual root name, as in pmxcfs: a plain `.rrd` in the root of a database written
  before it was one is reported by check_tree, so such a database is refused at start.
* Renaming a directory to a path directly inside priv/lock is EACCES (it would become a lock
  without a mkdir); deeper inside a lock directory is an ordinary rename.
* A successful result's `paths` always holds "" (the root row changes with every op).
* `checksum()` is SHA-256 over the 16-byte `Entry.digest()` of every row in inode order, cached
  until the next change. `path_of` raises KeyError for an unknown inode; `children` of a file or
  unknown inode is []. A writer outside 0..2**64-1 is local misuse: ValueError.
* `lock_expired` also forgets every remembered path that is no longer a lock, so the local
  bookkeeping stays as small as the set of live locks.
* check_tree also reports: duplicate inodes, a type that is not an `EntryType`, numbers too large
  for the row format, an inode greater than the global version (a new row takes inode v+1, which
  must be free), and a root row that is not (parent 0, name "", version = global version).
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from pmxfs.core import conf
from pmxfs.core.entry import ROOT_INODE, Entry, EntryType, GuestConfig, guest_config
from pmxfs.core.errors import PmxfsError
from pmxfs.core.fsop import (
    MAX_MTIME,
    MAX_PATH_BYTES,
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

MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 128 << 20
MAX_ENTRIES = 262_144
MAX_NAME_BYTES = 255
LOCK_DIR = "priv/lock"
LOCK_TIMEOUT_MS = 120_000
VIRTUAL_ROOT_NAMES = frozenset({"local", "qemu-server", "lxc", "openvz",
                                ".members", ".vmlist", ".version", ".clusterlog", ".debug",
                                ".rrd"})
COROSYNC_CONF = "corosync.conf"

_MAX_U64 = 2**64 - 1


class CorruptTree(PmxfsError):
    """Rows that do not form a valid tree; the message lists every problem, one per line. The
    caller knows whose rows they were: this node's database (refused at start) or a sync
    leader's (the sync starts again)."""


@dataclass(frozen=True)
class ApplyResult:
    """What `MemDB.apply` did: nothing (errno set) or one change of the global version."""

    errno: int  # 0 on success
    version: int  # the global version afterwards
    upserts: tuple[Entry, ...]  # rows written: the root first, then by inode
    removed: tuple[int, ...]  # inodes deleted, ascending
    paths: tuple[str, ...]  # paths to invalidate (see the module header), sorted

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True)
class VmInfo:
    """One guest of `.vmlist`: where its config is and the config row's version."""

    node: str
    kind: str  # "qemu", "lxc" or "openvz"
    version: int


# ---------------------------------------------------------------------------------------------
# Paths and permissions


def _utf8(text: str) -> bytes | None:
    """The UTF-8 bytes of a name; None when it is not valid UTF-8 (FUSE hands undecodable bytes
    over as surrogate escapes, which no member could send on: fsop's wire rule)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _name_errno(name: str) -> int:
    """0 when `name` may name an entry, else the errno a path holding it gets."""
    if name in ("", ".", ".."):
        return errno.EACCES
    raw = _utf8(name)
    if raw is None or b"\0" in raw or b"/" in raw:
        return errno.EINVAL
    return errno.ENAMETOOLONG if len(raw) > MAX_NAME_BYTES else 0


def valid_path(path: str) -> int:
    """0 when `path` is a well-formed path ("" is the root), else its errno."""
    if path == "":
        return 0
    raw = _utf8(path)
    if raw is None or b"\0" in raw:
        return errno.EINVAL
    if len(raw) > MAX_PATH_BYTES:
        return errno.ENAMETOOLONG
    for name in path.split("/"):
        code = _name_errno(name)
        if code:
            return code
    return 0


def _parent_path(path: str) -> str:
    return path.rpartition("/")[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _is_private(path: str) -> bool:
    parts = path.split("/")
    return parts[0] == "priv" or (len(parts) >= 3 and parts[0] == "nodes" and parts[2] == "priv")


_MODES = {(False, True): 0o755, (False, False): 0o640, (True, True): 0o700, (True, False): 0o600}


def mode_of(path: str, is_dir: bool, quorate: bool) -> int:
    """Permission bits of the entry at `path` (DESIGN.md §4): no write bits without quorum."""
    mode = _MODES[_is_private(path), is_dir]
    return mode if quorate else mode & ~0o222


def _is_lock(path: str, row: Entry) -> bool:
    return row.is_dir and _parent_path(path) == LOCK_DIR


def _lock_checksum(row: Entry) -> bytes:
    return hashlib.sha256(struct.pack(">QQQq", row.inode, row.version, row.writer,
                                      row.mtime)).digest()


# ---------------------------------------------------------------------------------------------
# The index


@dataclass
class _Index:
    """Every row plus what makes queries cheap; `put` and `drop` keep it all consistent."""

    rows: dict[int, Entry]  # inode -> row, the root included
    kids: dict[int, dict[str, int]]  # directory inode -> name -> child inode
    digests: dict[int, bytes]  # inode -> `Entry.digest()`
    vms: dict[int, int]  # VMID -> inode of its config file
    guests: dict[int, GuestConfig]  # config file inode -> what its path configures
    total_bytes: int  # file content bytes, summed

    @classmethod
    def build(cls, rows: Iterable[Entry]) -> _Index:
        """The index of rows that passed `check_tree` (root included)."""
        ordered = sorted(rows, key=lambda row: row.inode)
        index = cls({row.inode: row for row in ordered},
                    {row.inode: {} for row in ordered if row.is_dir},
                    {row.inode: row.digest() for row in ordered}, {}, {},
                    sum(len(row.data) for row in ordered))
        for row in ordered[1:]:
            index.kids[row.parent][row.name] = row.inode
        for row in ordered[1:]:
            index._add_guest(index.path_of(row.inode), row)
        return index

    def path_of(self, inode: int) -> str:
        names: list[str] = []
        while inode != ROOT_INODE:
            row = self.rows[inode]
            names.append(row.name)
            inode = row.parent
        return "/".join(reversed(names))

    def put(self, path: str, row: Entry) -> None:
        """Insert or replace a (non-root) row that will live at `path`."""
        old = self.rows.get(row.inode)
        if old is not None:
            self._forget(old)
        elif row.is_dir:
            self.kids[row.inode] = {}
        self.rows[row.inode] = row
        self.kids[row.parent][row.name] = row.inode
        self.digests[row.inode] = row.digest()
        self.total_bytes += len(row.data)
        self._add_guest(path, row)

    def drop(self, inode: int) -> None:
        """Delete a row whose children were dropped before it."""
        row = self.rows.pop(inode)
        self._forget(row)
        del self.digests[inode]
        self.kids.pop(inode, None)

    def set_root(self, row: Entry) -> None:
        self.rows[ROOT_INODE] = row
        self.digests[ROOT_INODE] = row.digest()

    def _forget(self, row: Entry) -> None:
        """Take `row` out of its parent's listing and the totals (it keeps its own listing)."""
        del self.kids[row.parent][row.name]
        self.total_bytes -= len(row.data)
        guest = self.guests.pop(row.inode, None)
        if guest is not None:
            del self.vms[guest.vmid]

    def _add_guest(self, path: str, row: Entry) -> None:
        guest = None if row.is_dir else guest_config(path)
        if guest is not None:
            self.guests[row.inode] = guest
            self.vms[guest.vmid] = row.inode


# ---------------------------------------------------------------------------------------------
# Planning


class _Target(NamedTuple):
    """Where a path points: its parent directory, its last name and the row there, if any."""

    parent: int
    name: str
    entry: Entry | None


@dataclass(frozen=True)
class _Change:
    """What an op will do: rows to write (final path, final row) and rows to delete (path, row;
    parents before children). Empty means success without any change."""

    writes: tuple[tuple[str, Entry], ...] = ()
    removes: tuple[tuple[str, Entry], ...] = ()
    moved_from: tuple[str, ...] = ()  # a rename's source: invalidated, though no row is there

    @property
    def empty(self) -> bool:
        return not self.writes and not self.removes


_NO_CHANGE = _Change()


def _op_mtime(op: FsOp) -> int | None:
    if isinstance(op, CreateFile | WriteFile | WriteRange | Truncate | Mkdir | Rename | SetMtime):
        return op.mtime
    return None


def _bad_numbers(op: FsOp) -> bool:
    mtime = _op_mtime(op)
    if mtime is not None and not 0 <= mtime <= MAX_MTIME:
        return True
    if isinstance(op, WriteRange):
        return op.offset < 0
    return isinstance(op, Truncate) and op.size < 0


def _created_path(op: FsOp) -> str | None:
    """The path at which `op` may create an entry."""
    if isinstance(op, CreateFile | Mkdir) or (isinstance(op, WriteFile) and op.create):
        return op.path
    return op.dst if isinstance(op, Rename) else None


def _argument_errno(op: FsOp) -> int:
    """Checks 1-4 of the module header: everything that does not look at the tree."""
    paths = op_paths(op)
    for path in paths:
        code = valid_path(path)
        if code:
            return code
    if _bad_numbers(op):
        return errno.EINVAL
    if "" in paths:
        return errno.EBUSY if isinstance(op, Rmdir) else errno.EACCES
    return errno.EACCES if _created_path(op) in VIRTUAL_ROOT_NAMES else 0


def _splice(data: bytes, offset: int, chunk: bytes) -> bytes:
    """`data` with `chunk` written at `offset`; a gap before it reads as zeros."""
    if not chunk:
        return data
    padded = data.ljust(offset, b"\0")
    return padded[:offset] + chunk + padded[offset + len(chunk):]


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _current_config(data: bytes | None) -> conf.ClusterConfig | None:
    text = None if data is None else _text(data)
    return None if text is None else conf.check(text).config


def _conf_errno(new: bytes, old: Entry | None) -> int:
    """EINVAL unless `new` may replace `old` (the current corosync.conf row, if any)."""
    old_data = None if old is None or old.is_dir else old.data
    if new == old_data:
        return 0
    text = _text(new)
    if text is None:
        return errno.EINVAL
    return 0 if conf.check(text, current=_current_config(old_data)).ok else errno.EINVAL


def _touched_paths(change: _Change) -> tuple[str, ...]:
    paths = {path for path, _ in change.writes + change.removes} | set(change.moved_from)
    return tuple(sorted(paths | {_parent_path(p) for p in paths} | {""}))


# ---------------------------------------------------------------------------------------------
# The tree


def _root_row(version: int) -> Entry:
    return Entry(ROOT_INODE, ROOT_INODE, version, 0, 0, EntryType.DIR, "")


def _with_root(entries: Iterable[Entry], version: int) -> list[Entry]:
    rows = list(entries)
    if all(row.inode != ROOT_INODE for row in rows):
        rows.append(_root_row(version))
    return rows


def _checked_index(entries: Iterable[Entry], version: int) -> _Index:
    """The index of a valid tree; CorruptTree listing every problem otherwise."""
    rows = _with_root(entries, version)
    problems = check_tree(rows, version)
    if problems:
        raise CorruptTree(f"corrupt tree ({len(problems)} problems):\n" + "\n".join(problems))
    return _Index.build(rows)


class MemDB:
    """The replicated tree; see the module header."""

    def __init__(self, entries: Iterable[Entry] = (), version: int = 0) -> None:
        self._index = _checked_index(entries, version)
        self._checksum: bytes | None = None  # `checksum()`, until the next change
        self._locks: dict[str, tuple[bytes, int]] = {}  # lock path -> (checksum, first seen ms)

    # -- queries ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._index.rows[ROOT_INODE].version

    @property
    def total_bytes(self) -> int:
        return self._index.total_bytes

    @property
    def entry_count(self) -> int:
        return len(self._index.rows) - 1

    def lookup(self, path: str) -> Entry | None:
        if path == "":
            return self._index.rows[ROOT_INODE]
        target = self._locate(path)
        return None if isinstance(target, int) else target.entry

    def get(self, inode: int) -> Entry | None:
        return self._index.rows.get(inode)

    def path_of(self, inode: int) -> str:
        return self._index.path_of(inode)

    def child(self, inode: int, name: str) -> Entry | None:
        """The row named `name` in directory `inode`, in O(1); None when there is none."""
        child = self._index.kids.get(inode, {}).get(name)
        return None if child is None else self._index.rows[child]

    def children(self, inode: int) -> list[Entry]:
        listing = self._index.kids.get(inode, {})
        return [self._index.rows[listing[name]] for name in sorted(listing)]

    def entries(self) -> list[Entry]:
        return [self._index.rows[inode] for inode in sorted(self._index.rows)]

    def digests(self) -> dict[int, bytes]:
        return {inode: self._index.digests[inode] for inode in sorted(self._index.digests)}

    def checksum(self) -> bytes:
        if self._checksum is None:
            h = hashlib.sha256()
            for inode in sorted(self._index.digests):
                h.update(self._index.digests[inode])
            self._checksum = h.digest()
        return self._checksum

    def vmlist(self) -> dict[int, VmInfo]:
        index = self._index
        return {vmid: VmInfo(index.guests[inode].node, index.guests[inode].kind,
                             index.rows[inode].version)
                for vmid, inode in sorted(index.vms.items())}

    def lock_checksum(self, path: str) -> bytes | None:
        row = self.lookup(path)
        return None if row is None or not _is_lock(path, row) else _lock_checksum(row)

    def lock_expired(self, path: str, now_ms: int) -> bool:
        """True once the lock at `path` was seen with the same checksum for LOCK_TIMEOUT_MS."""
        for known in [p for p in self._locks if p != path and self.lock_checksum(p) is None]:
            del self._locks[known]
        checksum = self.lock_checksum(path)
        if checksum is None:
            self._locks.pop(path, None)
            return False
        seen = self._locks.get(path)
        if seen is None or seen[0] != checksum:
            self._locks[path] = (checksum, now_ms)
            return False
        return now_ms - seen[1] >= LOCK_TIMEOUT_MS

    # -- changes ------------------------------------------------------------------------------

    def replace_all(self, entries: Iterable[Entry], version: int) -> None:
        """Sync: the whole tree becomes `entries`, or nothing changes (CorruptTree)."""
        self._index = _checked_index(entries, version)
        self._checksum = None

    def check(self, op: FsOp, writer: int) -> int:
        """The errno `apply(op, writer)` would answer now (0: it would succeed), changing
        nothing: the same rules, for a proposer that must refuse at once what the tree refuses
        (the FUSE layer's open of a file it creates only at close)."""
        change = self._planned(op, writer)
        return change if isinstance(change, int) else 0

    def apply(self, op: FsOp, writer: int) -> ApplyResult:
        change = self._planned(op, writer)
        version = self.version + 1
        if isinstance(change, int) or change.empty:
            code = change if isinstance(change, int) else 0
            return ApplyResult(code, self.version, (), (), ())
        return self._commit(change, version, writer, _op_mtime(op))

    def _planned(self, op: FsOp, writer: int) -> _Change | int:
        if not 0 <= writer <= _MAX_U64:
            raise ValueError(f"writer {writer} is not a node id")
        return self._plan(op, self.version + 1, writer)

    def _plan(self, op: FsOp, v: int, writer: int) -> _Change | int:
        code = _argument_errno(op)
        if code:
            return code
        for path in op_paths(op):
            located = self._locate(path)
            if isinstance(located, int):
                return located
        change = self._plan_op(op, v, writer)
        if isinstance(change, int):
            return change
        for check in (self._vmid_errno, self._corosync_errno, self._space_errno):
            code = check(change)
            if code:
                return code
        return change

    def _plan_op(self, op: FsOp, v: int, writer: int) -> _Change | int:
        match op:
            case CreateFile():
                return self._create(op, v, writer)
            case WriteFile():
                return self._write(op, v, writer)
            case WriteRange():
                return self._write_range(op, v, writer)
            case Truncate():
                return self._truncate(op, v, writer)
            case Mkdir():
                return self._mkdir(op, v, writer)
            case Rmdir():
                return self._rmdir(op)
            case Unlink():
                return self._unlink(op)
            case Rename():
                return self._rename(op, v, writer)
            case SetMtime():
                return self._set_mtime(op, v, writer)
            case UnlockRequest():
                return self._unlock_request(op)
            case Unlock():
                return self._unlock(op)

    def _commit(self, change: _Change, v: int, writer: int, mtime: int | None) -> ApplyResult:
        index = self._index
        for _, row in reversed(change.removes):
            index.drop(row.inode)
        for path, row in change.writes:
            index.put(path, row)
        root = index.rows[ROOT_INODE]
        index.set_root(replace(root, version=v, writer=writer,
                               mtime=root.mtime if mtime is None else mtime))
        self._checksum = None
        written = sorted((row for _, row in change.writes), key=lambda row: row.inode)
        return ApplyResult(0, v, (index.rows[ROOT_INODE], *written),
                           tuple(sorted(row.inode for _, row in change.removes)),
                           _touched_paths(change))

    # -- resolving paths ----------------------------------------------------------------------

    def _locate(self, path: str) -> _Target | int:
        """The target of a valid non-root path, or ENOENT/ENOTDIR from walking its parents."""
        *dirs, name = path.split("/")
        parent = ROOT_INODE
        for part in dirs:
            inode = self._index.kids[parent].get(part)
            if inode is None:
                return errno.ENOENT
            if not self._index.rows[inode].is_dir:
                return errno.ENOTDIR
            parent = inode
        inode = self._index.kids[parent].get(name)
        return _Target(parent, name, None if inode is None else self._index.rows[inode])

    def _target(self, path: str) -> _Target:
        """The target of a path whose parent walk `_plan` has already checked."""
        target = self._locate(path)
        assert not isinstance(target, int)
        return target

    def _existing(self, path: str) -> Entry | int:
        entry = self._target(path).entry
        return errno.ENOENT if entry is None else entry

    def _existing_file(self, path: str) -> Entry | int:
        entry = self._existing(path)
        if isinstance(entry, Entry) and entry.is_dir:
            return errno.EISDIR
        return entry

    def _subtree(self, path: str, row: Entry) -> list[tuple[str, Entry]]:
        """`row` and everything below it, parents before children (no recursion: a path of
        4096 bytes can be 2048 levels deep)."""
        out: list[tuple[str, Entry]] = []
        todo = [(path, row)]
        while todo:
            path, row = todo.pop()
            out.append((path, row))
            todo += [(_join(path, child.name), child)
                     for child in reversed(self.children(row.inode))]
        return out

    # -- the ops ------------------------------------------------------------------------------

    @staticmethod
    def _created(path: str, target: _Target, kind: EntryType, v: int, writer: int, mtime: int,
                 data: bytes = b"") -> _Change:
        row = Entry(v, target.parent, v, writer, mtime, kind, target.name, data)
        return _Change(writes=((path, row),))

    @staticmethod
    def _rewritten(path: str, row: Entry, v: int, writer: int, mtime: int,
                   data: bytes) -> _Change:
        return _Change(writes=((path, replace(row, version=v, writer=writer, mtime=mtime,
                                              data=data)),))

    def _create(self, op: CreateFile, v: int, writer: int) -> _Change | int:
        target = self._target(op.path)
        if target.entry is None:
            return self._created(op.path, target, EntryType.FILE, v, writer, op.mtime)
        if op.exclusive:
            return errno.EEXIST
        return errno.EISDIR if target.entry.is_dir else _NO_CHANGE

    def _write(self, op: WriteFile, v: int, writer: int) -> _Change | int:
        target = self._target(op.path)
        if target.entry is None and not op.create:
            return errno.ENOENT
        if target.entry is not None and target.entry.is_dir:
            return errno.EISDIR
        if len(op.data) > MAX_FILE_BYTES:
            return errno.EFBIG
        if target.entry is None:
            return self._created(op.path, target, EntryType.FILE, v, writer, op.mtime, op.data)
        return self._rewritten(op.path, target.entry, v, writer, op.mtime, op.data)

    def _write_range(self, op: WriteRange, v: int, writer: int) -> _Change | int:
        entry = self._existing_file(op.path)
        if isinstance(entry, int):
            return entry
        if op.offset + len(op.data) > MAX_FILE_BYTES:
            return errno.EFBIG
        return self._rewritten(op.path, entry, v, writer, op.mtime,
                               _splice(entry.data, op.offset, op.data))

    def _truncate(self, op: Truncate, v: int, writer: int) -> _Change | int:
        entry = self._existing_file(op.path)
        if isinstance(entry, int):
            return entry
        if op.size > MAX_FILE_BYTES:
            return errno.EFBIG
        return self._rewritten(op.path, entry, v, writer, op.mtime,
                               entry.data[:op.size].ljust(op.size, b"\0"))

    def _mkdir(self, op: Mkdir, v: int, writer: int) -> _Change | int:
        target = self._target(op.path)
        if target.entry is not None:
            return errno.EEXIST
        return self._created(op.path, target, EntryType.DIR, v, writer, op.mtime)

    def _rmdir(self, op: Rmdir) -> _Change | int:
        entry = self._existing(op.path)
        if isinstance(entry, int):
            return entry
        if not entry.is_dir:
            return errno.ENOTDIR
        if self._index.kids[entry.inode]:
            return errno.ENOTEMPTY
        return _Change(removes=((op.path, entry),))

    def _unlink(self, op: Unlink) -> _Change | int:
        entry = self._existing_file(op.path)
        if isinstance(entry, int):
            return entry
        return _Change(removes=((op.path, entry),))

    def _set_mtime(self, op: SetMtime, v: int, writer: int) -> _Change | int:
        entry = self._existing(op.path)
        if isinstance(entry, int):
            return entry
        if _is_lock(op.path, entry) and (op.mtime < entry.mtime or writer != entry.writer):
            return errno.EACCES
        return self._rewritten(op.path, entry, v, writer, op.mtime, entry.data)

    def _unlock_request(self, op: UnlockRequest) -> _Change | int:
        entry = self._existing(op.path)
        return entry if isinstance(entry, int) else _NO_CHANGE

    def _unlock(self, op: Unlock) -> _Change | int:
        entry = self._existing(op.path)
        if isinstance(entry, int):
            return entry
        if self.lock_checksum(op.path) != op.checksum:
            return errno.ESTALE
        return _Change(removes=tuple(self._subtree(op.path, entry)))

    def _rename(self, op: Rename, v: int, writer: int) -> _Change | int:
        source = self._existing(op.src)
        if isinstance(source, int):
            return source
        if op.src == op.dst:
            return _NO_CHANGE
        code = self._rename_errno(op, source)
        if code:
            return code
        dst = self._target(op.dst)
        moved = replace(source, parent=dst.parent, name=dst.name, version=v, writer=writer,
                        mtime=op.mtime)
        replaced = () if dst.entry is None else ((op.dst, dst.entry),)
        return _Change(writes=((op.dst, moved),), removes=replaced, moved_from=(op.src,))

    def _rename_errno(self, op: Rename, source: Entry) -> int:
        """The rename rules of DESIGN.md §4 for an existing source and a different target."""
        if source.is_dir and LOCK_DIR in (_parent_path(op.src), _parent_path(op.dst)):
            return errno.EACCES
        if source.is_dir and self._index.kids[source.inode]:
            return errno.ENOTEMPTY
        if op.dst.startswith(op.src + "/"):
            return errno.EINVAL
        target = self._target(op.dst).entry
        if target is None:
            return 0
        if source.is_dir != target.is_dir:
            return errno.ENOTDIR if source.is_dir else errno.EISDIR
        return errno.ENOTEMPTY if target.is_dir and self._index.kids[target.inode] else 0

    # -- checks on a planned change -----------------------------------------------------------

    def _vmid_errno(self, change: _Change) -> int:
        """EEXIST when a written config file would hold a VMID that another row keeps."""
        leaving = {row.inode for _, row in change.removes}
        for path, row in change.writes:
            guest = None if row.is_dir else guest_config(path)
            holder = None if guest is None else self._index.vms.get(guest.vmid)
            if holder is not None and holder != row.inode and holder not in leaving:
                return errno.EEXIST
        return 0

    def _corosync_errno(self, change: _Change) -> int:
        for path, row in change.writes:
            if path == COROSYNC_CONF and not row.is_dir:
                return _conf_errno(row.data, self.lookup(COROSYNC_CONF))
        return 0

    def _space_errno(self, change: _Change) -> int:
        grow_bytes = -sum(len(row.data) for _, row in change.removes)
        grow_entries = -len(change.removes)
        for _, row in change.writes:
            old = self._index.rows.get(row.inode)
            grow_bytes += len(row.data) - (0 if old is None else len(old.data))
            grow_entries += old is None
        if grow_bytes > 0 and self.total_bytes + grow_bytes > MAX_TOTAL_BYTES:
            return errno.ENOSPC
        if grow_entries > 0 and self.entry_count + grow_entries > MAX_ENTRIES:
            return errno.ENOSPC
        return 0


# ---------------------------------------------------------------------------------------------
# check_tree


class _Rows:
    """Rows under inspection, with the paths of those reachable from the root."""

    def __init__(self, rows: dict[int, Entry]) -> None:
        self.rows = rows  # inode -> row
        self.paths = self._reachable()  # inode -> path, for rows reachable from the root

    def _reachable(self) -> dict[int, str]:
        below: dict[int, list[Entry]] = defaultdict(list)
        for row in self.rows.values():
            if row.inode != ROOT_INODE:
                below[row.parent].append(row)
        paths = {ROOT_INODE: ""}
        todo = [ROOT_INODE]
        while todo:
            inode = todo.pop()
            if self.rows[inode].type is not EntryType.DIR:
                continue
            for child in sorted(below[inode], key=lambda row: row.inode):
                if child.inode not in paths:
                    paths[child.inode] = _join(paths[inode], child.name)
                    todo.append(child.inode)
        return paths

    def label(self, inode: int) -> str:
        if inode == ROOT_INODE:
            return "inode 0 (the root)"
        path = self.paths.get(inode)
        return f"inode {inode} ({'path unknown' if path is None else path})"

    def in_cycle(self, inode: int) -> bool:
        seen = set()
        while inode in self.rows and inode != ROOT_INODE:
            if inode in seen:
                return True
            seen.add(inode)
            inode = self.rows[inode].parent
        return False


def _by_inode(entries: Iterable[Entry]) -> tuple[dict[int, Entry], list[str]]:
    rows: dict[int, Entry] = {}
    problems = []
    for row in entries:
        if row.inode in rows:
            problems.append(f"inode {row.inode}: more than one row has this inode")
        else:
            rows[row.inode] = row
    return rows, problems


def _number_problems(row: Entry) -> list[str]:
    out = []
    for name, value, top in (("inode", row.inode, _MAX_U64), ("parent", row.parent, _MAX_U64),
                             ("version", row.version, _MAX_U64), ("writer", row.writer, _MAX_U64),
                             ("mtime", row.mtime, MAX_MTIME)):
        if value < 0:
            out.append(f"negative {name} {value}")
        elif value > top:
            out.append(f"{name} {value} is too large")
    return out


def _root_problems(root: Entry, version: int) -> list[str]:
    out = []
    if root.type is not EntryType.DIR:
        out.append("is not a directory")
    if root.parent != ROOT_INODE or root.name != "":
        out.append(f"must have parent 0 and an empty name, has {root.parent} and {root.name!r}")
    if root.version != version:
        out.append(f"version {root.version} is not the global version {version}")
    return out


def _link_problems(row: Entry, rows: dict[int, Entry]) -> list[str]:
    parent = rows.get(row.parent)
    if parent is None:
        return [f"parent inode {row.parent} is missing"]
    if parent.type is not EntryType.DIR:
        return [f"parent inode {row.parent} is not a directory"]
    code = _name_errno(row.name)
    if code:
        return [f"invalid name {row.name!r} ({errno.errorcode[code]})"]
    if row.parent == ROOT_INODE and row.name in VIRTUAL_ROOT_NAMES:
        return [f"name {row.name!r} is reserved for a virtual root entry"]
    return []


def _row_problems(row: Entry, rows: _Rows, version: int) -> list[str]:
    out = _number_problems(row)
    if row.inode == ROOT_INODE:
        out += _root_problems(row, version)
    else:
        out += _link_problems(row, rows.rows)
        if row.version > version:
            out.append(f"version {row.version} is greater than the global version {version}")
        if row.inode > version:
            out.append(f"inode is greater than the global version {version}")
    if not isinstance(row.type, EntryType):
        out.append(f"type {row.type!r} is neither a directory (4) nor a file (8)")
    elif row.is_dir and row.data:
        out.append(f"directory with {len(row.data)} bytes of data")
    elif len(row.data) > MAX_FILE_BYTES:
        out.append(f"file of {len(row.data)} bytes, above the limit of {MAX_FILE_BYTES}")
    return [f"{rows.label(row.inode)}: {problem}" for problem in out]


def _clash_problems(rows: _Rows) -> list[str]:
    named: dict[tuple[int, str], list[int]] = defaultdict(list)
    for inode in sorted(rows.rows):
        row = rows.rows[inode]
        if inode != ROOT_INODE:
            named[row.parent, row.name].append(inode)
    return [f"inodes {', '.join(map(str, inodes))}: the same name {name!r} in "
            f"{rows.label(parent)}"
            for (parent, name), inodes in named.items() if len(inodes) > 1]


def _reach_problems(rows: _Rows) -> list[str]:
    out = []
    for inode in sorted(rows.rows):
        parent = rows.rows.get(rows.rows[inode].parent)
        if inode in rows.paths or parent is None or parent.type is not EntryType.DIR:
            continue
        why = "in a parent cycle" if rows.in_cycle(inode) else "below a row that is"
        out.append(f"{rows.label(inode)}: {why} not reachable from the root")
    return out


def _vmid_problems(rows: _Rows) -> list[str]:
    holders: dict[int, list[int]] = defaultdict(list)
    for inode, path in sorted(rows.paths.items()):
        guest = guest_config(path) if rows.rows[inode].type is EntryType.FILE else None
        if guest is not None:
            holders[guest.vmid].append(inode)
    return [f"VMID {vmid} is configured more than once: "
            + ", ".join(rows.label(inode) for inode in inodes)
            for vmid, inodes in sorted(holders.items()) if len(inodes) > 1]


def _limit_problems(rows: dict[int, Entry]) -> list[str]:
    out = []
    total = sum(len(row.data) for row in rows.values())
    if total > MAX_TOTAL_BYTES:
        out.append(f"total file size {total} bytes is above the limit of {MAX_TOTAL_BYTES}")
    if len(rows) - 1 > MAX_ENTRIES:
        out.append(f"{len(rows) - 1} entries are above the limit of {MAX_ENTRIES}")
    return out


def check_tree(entries: Iterable[Entry], version: int) -> list[str]:
    """Every problem that keeps `entries` (with global `version`) from being a valid tree,
    one readable line each naming the inode and path where known; [] when the tree is valid.
    A missing root row is fine (MemDB creates it)."""
    found, problems = _by_inode(_with_root(entries, version))
    rows = _Rows(found)
    if version < 0:
        problems.append(f"negative global version {version}")
    for inode in sorted(found):
        problems += _row_problems(found[inode], rows, version)
    return (problems + _clash_problems(rows) + _reach_problems(rows) + _vmid_problems(rows)
            + _limit_problems(found))
