"""The FUSE edge: `PmxfsOperations` serves the replicated tree (memdb) as a file system.

How it works
------------
Inodes. A tree entry's FUSE inode is its memdb inode + 1, so the memdb root (0) is
`pyfuse3.ROOT_INODE` (1) and nothing needs a table. The fixed root entries -- the symlinks
`local`, `qemu-server`, `lxc`, `openvz` and the virtual files `.members .vmlist .version
.clusterlog .debug .rrd` -- have fixed inodes from 2**62, and files created on this node that are
not replicated yet ("New files" below) inodes from 2**62 + 2**32. Every request resolves its
inode through the node's current memdb (`get(inode - 1)`, `path_of`), so nothing here can
disagree with the tree. Within one tree object memdb never reuses an inode number, so an inode
the kernel still holds either names its row (perhaps renamed) or nothing: ENOENT. A sync
replaces the tree object, and the new one may give a number to another row (after diverged
histories). When the FUSE layer first sees the new object it compares every inode the kernel
holds: one whose row now has another parent, name or type is stale -- ESTALE for every request
on it -- until a lookup hands it out again with a new generation, which makes the kernel retire
the old inode (its open files then fail with EIO).

Attributes (docs/tree-rules.md). Owner root, group `gid`; permission bits from `memdb.mode_of`
(write bits dropped without quorum); directories have nlink 2 and size 0, files nlink 1 and their
real size; st_blocks counts 512-byte blocks; every time is the entry's mtime. The symlinks are
lrwxr-xr-x (lr-xr-xr-x without quorum) with relative targets as pmxcfs (`local` ->
`nodes/<node>`, `qemu-server` -> `nodes/<node>/qemu-server`, ...) and carry the root's mtime. The
virtual files are r--r----- (0440) and `.debug` rw-r----- (0640) whatever the quorum, because a
write to `.debug` is this node's own setting and never replicated; their size is that of their
current content and their time is now. `statfs` reports the real limits: 4096-byte blocks,
MAX_TOTAL_BYTES of space, MAX_ENTRIES inodes, names of 255 bytes.

Errors. Every handler is wrapped (`_contain_handlers`): an exception other than `FUSEError`
is logged with its traceback and answered EIO (pyfuse3 would let it end the session, leaving the
caller without an answer and the daemon dead); the daemon goes on.

Mutations. Each one is a single `FsOp` sent with `await node.write(op)`; a non-zero errno in the
reply is raised as `FUSEError`, so the syscall returns it (not quorate: EACCES from the node).
memdb checks everything else (names, parents, VMIDs, corosync.conf, limits). Here are only the
checks that need the kernel's view: the fixed root names cannot be removed or renamed (EACCES;
memdb already refuses to create them), RENAME_EXCHANGE is EINVAL, RENAME_NOREPLACE is EEXIST when
the target exists in this node's tree (a remote create racing with it is replaced, as memdb's
rename replaces). As with pmxcfs, which has no symlink, link or mknod handler (libfuse answers
ENOSYS, and its mknod of a regular file is an exclusive create): symlink and link are ENOSYS,
mknod of a regular file creates it (EEXIST when it exists), any other mknod is ENOSYS. The xattr
handlers, `access` (the mount needs `default_permissions`, see MOUNT_OPTIONS) and `fsyncdir` are
left to the base class: ENOSYS, which the kernel remembers and turns into EOPNOTSUPP for xattrs,
as with pmxcfs. readdir lists `.` and `..` first, as pmxcfs does.

setattr. chmod succeeds, changing nothing, exactly when pmxcfs's cfs_fuse_chmod does: the
permission bits asked for are 0600 on a private path and 0640 on any other, for files,
directories and the fixed entries alike, so tools that give a new file the mode of the one it
replaces (`sed -i`, `cp -p` within the tree) work; anything else is EPERM. chown succeeds only to
uid 0 and group `gid`. A size with a write handle resizes that handle's buffer (EFBIG beyond 1
MiB); without one it is a `Truncate`. An mtime is a `SetMtime` (memdb refuses one on a lock
directory that goes back in time or does not come from the lock's holder: EACCES). As in pmxcfs,
mtime 0 on a directory directly inside priv/lock first sends an `UnlockRequest` (a contender
asking whether the lock expired), then the `SetMtime`, which memdb refuses: the call fails with
EACCES after the request was made. Atime and ctime are not stored. The reply carries the
committed attributes.

Open files: close-to-open atomicity. FUSE sees an *open file* (one `fh`), not descriptors:
every descriptor dup'ed from it, or inherited by a forked child, shares it; the kernel sends
FLUSH at the close of each of those descriptors (the close() returns its error) and RELEASE
once, after the last (asynchronously: nobody sees its error). The rules:

* A read handle holds the content of its file at open (`_Snapshot`), so it sees one version of
  the file from open to close, also after the file was changed, unlinked or replaced by a sync.
  Every handle is opened with direct_io: its reads come here, never from the kernel's page
  cache, which is per inode and bounded by the inode's size as the kernel believes it. That
  size is not ours to keep right: when a writer opens the file with O_TRUNC the kernel sets it
  to 0 itself (atomic O_TRUNC) until it asks again, and a reader on the same node that read
  through the cache in that moment got an empty file while the tree held the old content
  (tools/faults.py found it: one read in five with a writer and a reader on one file).
* A write handle (O_WRONLY, O_RDWR or O_TRUNC) holds a private buffer: the content at open, or
  nothing with O_TRUNC. Writes change only the buffer (O_APPEND appends at its end whatever the
  offset, a write past the end fills the gap with zeros) and reads on that handle see it. Write
  handles are opened with direct_io, so their uncommitted bytes never enter the page cache that
  the readers of the same inode share.
* Writing needs quorum: without it, `open` for writing and `write` fail at once with EACCES
  (root passes the kernel's mode check, and a shell ignores the error of close). `.debug` is
  this node's own setting and always writable.
* A flush commits the buffer, whole, as one `WriteFile`, when writes changed it since the last
  commit. A flush with nothing written since then commits nothing, not even a pending O_TRUNC:
  a shell running `cmd > file` closes a duplicate of the descriptor before `cmd` writes a byte,
  and that flush must not publish an empty file. The O_TRUNC goes out with the first commit
  of written content, or at `fsync`/`release` when nothing is ever written (`: > file`). So
  readers on every node see the old content until the command's output is complete.
* An error belongs to the open file, not to the descriptor that flushed it. A write that fails
  (EFBIG: the buffer would pass 1 MiB; EACCES) or a commit that fails makes the handle's error
  sticky: every later write, flush and fsync of that open file fails with it, and nothing more is
  committed -- `cat too-big > file` leaves the old content, and a parent's close after a forked
  child's close cannot return 0 for a refused write.
* `release` commits what is still pending (its error is only logged), and an `open` of the same
  inode on this node waits for commits of it in flight, so `: > f; cat f` prints nothing.
* The commit goes to the path the inode has now (it follows renames; after a sync, the path it
  had at open).

New files: one replicated operation. open(O_CREAT) of a missing file for writing, without
O_EXCL and outside the guest configs, sends nothing: the file is *pending* -- shown on this node
only (lookup, getattr, readdir, opens by other processes), as an empty file under its own inode
(NEW_INODE_BASE up), whose entry and attributes the kernel never caches -- until the first
commit of one of its write handles creates it with its content in one `WriteFile(create=True)`
(a `CreateFile` when nothing was written: at the release, as an O_TRUNC without writes goes out,
so `cmd > new` and `cmd >> new` still show nothing until the output is complete). Other nodes
never see the file before its content. The rules:

* What the replicated create would refuse is refused at open with the same errno: the path
  rules, then quorum (EACCES), then memdb's own rules for a `CreateFile` (`MemDB.check`: parent
  missing, corosync.conf, limits...). O_EXCL creates, guest configs (a VMID is taken in the
  total order, so two nodes cannot both get it at open) and read-only creates (no commit would
  ever come) send their `CreateFile` at open as before (docs/tree-rules.md says why).
* Once the creation is replied to, the pending file's inode stands for the tree's row (every
  request on it goes to the row; reads past the page cache); the next path walk asks again and
  gets the row's own inode. The record is dropped when the kernel forgets the inode.
* A pending file shadows the tree under its name on this node (another node may make the same
  name meanwhile: the commit then replaces that file as the later write, or fails with the
  daemon's answer -- EISDIR for a directory, ENOENT when its directory went away).
* unlink of a pending file is local (nothing was replicated); its handles' commits then fail
  with ENOENT, as for any file unlinked while written. An unlink of it, or a rename onto it,
  that comes while its creation is in flight (a release publishes an empty file and the kernel
  does not wait: `: > f; rm f`) first waits for that creation and then acts on the tree, so
  it is never answered 0 and undone by the create landing after it. rename of a pending file
  first creates it (`CreateFile`, as at open before): the target's rules (replacing, VMIDs,
  corosync.conf, RENAME_NOREPLACE) belong to the total order. A truncate or utime of it by path
  is its creation, sent at once (a `WriteFile` of that size, a `CreateFile` with that mtime),
  so `touch new` is one synchronous operation. mkdir or mknod of its name is EEXIST; rmdir of
  its directory, or replacing that directory by a rename, is ENOTEMPTY.
* A failed creation (its commit refused, or no write handle left that could commit: EFBIG,
  EACCES, all closed) makes it disappear here at once; the handle's error is sticky as always.
* It follows its directory: by inode within one tree, by path through a sync.

corosync.conf is validated by memdb on every change. `cp new.conf /etc/pve/corosync.conf` onto an
existing file works (O_TRUNC, writes, close are one validated WriteFile; a refused text fails the
close with EINVAL and the old one stays). A missing corosync.conf cannot be created by `create`,
which makes an empty -- invalid -- file (EINVAL): write `corosync.conf.new` and rename it, which
memdb validates as one step, as Proxmox's tools do.

Virtual files. A read handle holds the content rendered at open (`node.virtual_file`), so a
reader that reads in pieces gets one consistent document; they are opened with direct_io, because
their content changes without any change to the tree. Opening one for writing is EACCES, except
`.debug`: its handle starts empty (O_TRUNC or not) and at the flush its buffer must be "0" or "1"
(`status.parse_debug_write`) and goes to `node.set_debug`; anything else fails the close with
EINVAL. A truncate of `.debug` without a handle is accepted and does nothing, so shells that
truncate before writing work.

Kernel caching. Tree entries are answered with entry and attribute timeouts of CACHE_SECONDS (file
content is never cached by the kernel: every handle is direct_io, see above); the fixed entries
have attribute timeout 0 (their attributes follow the quorum or their changing content) and a long
entry timeout (their name -> inode mapping never changes). Three things keep the cache right:

* Invalidation. `__init__` installs `_invalidate` as the node's invalidator. For each path it
  turns the change into kernel notices against the current tree: the inode the path names now (its
  attributes and pages) if the kernel knows it, and the directory entry (parent, name) if the
  kernel holds it for an inode that is no longer there. Entries still pointing at the right inode
  are left alone: dropping a directory's dentry makes getcwd() fail for every process inside it.
  `everything=True` (sync, quorum change) does that for every inode and every dentry the kernel
  knows -- they are tracked from lookup, readdir (readdirplus), create and mkdir until `forget` --
  and a dentry whose inode now has another parent, name or type is dropped.
* Notices are never sent from a request handler. The kernel can make `notify_inval_entry` wait
  for a request that is in flight for the same directory, and `notify_inval_inode` for pages a
  pending read holds locked; a handler that sent one inline could wait for itself. `_invalidate`
  only adds them to a pending set (each notice once, so it stays as small as what the kernel
  holds even while nothing sends); `run_invalidations` (a task next to `pyfuse3.main`) sends what
  piled up from a worker thread, while the trio loop keeps answering the requests that the kernel
  may be waiting for. `invalidations_settled` waits until everything queued so far was sent.
* Open-time check. The queue runs behind the tree, so `open` does not trust it: each tree inode
  remembers the row it last handed out attributes for. When the row is no longer the same object
  (memdb makes a new row for every change), the open first drops the kernel's attributes (from a
  worker thread, awaited), so `echo new > f; stat f` shows the new size on this node even before
  the queued notice went out (the content is read from the handle's snapshot anyway).

What the node must do: call the invalidator after every applied change with memdb's paths, with
`everything=True` after a sync (a new memdb) and after a quorum change; run `run_invalidations` in
the same trio run as `pyfuse3.main()` (it must end before `pyfuse3.close()`; cancelling it waits
for a notice in progress, which can only be waiting for a request that `pyfuse3.main` is
serving), and mount with `default_permissions` (MOUNT_OPTIONS has the full set).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import pyfuse3
import trio

from pmxfs.core.entry import Entry, guest_config
from pmxfs.core.fsop import (
    CreateFile,
    FsOp,
    Mkdir,
    Rename,
    Rmdir,
    SetMtime,
    Truncate,
    Unlink,
    UnlockRequest,
    WriteFile,
)
from pmxfs.core.memdb import (
    LOCK_DIR,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_NAME_BYTES,
    MAX_TOTAL_BYTES,
    VIRTUAL_ROOT_NAMES,
    MemDB,
    mode_of,
    valid_path,
)
from pmxfs.core.status import VIRTUAL_FILES, parse_debug_write
from pmxfs.runtime.node_api import FsNode

log = logging.getLogger(__name__)

# default_permissions: the kernel checks the modes above (there is no `access` handler);
# allow_other: www-data reads the tree, as with pmxcfs.
MOUNT_OPTIONS = frozenset({"default_permissions", "allow_other", "fsname=pmxfs", "nosuid",
                           "nodev"})

CACHE_SECONDS = 60.0
BLOCK_BYTES = 4096

SYMLINKS = ("local", "qemu-server", "lxc", "openvz")
DEBUG_FILE = ".debug"
FIXED_INODE_BASE = 2**62
FIXED_INODES = {name: FIXED_INODE_BASE + i for i, name in enumerate((*SYMLINKS, *VIRTUAL_FILES))}
_FIXED_NAMES = {inode: name for name, inode in FIXED_INODES.items()}
assert set(FIXED_INODES) == VIRTUAL_ROOT_NAMES
NEW_INODE_BASE = FIXED_INODE_BASE + 2**32  # files created here and not replicated yet

_NS = 10**9

# A notice for the kernel: (inode, None) drops the inode's attributes and pages,
# (directory inode, name) drops that directory entry.
_Notice = tuple[int, bytes | None]


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _fail(code: int) -> None:
    if code:
        raise pyfuse3.FUSEError(code)


# ---------------------------------------------------------------------------------- handles


@dataclass
class _Snapshot:
    """A file opened read-only: its content at open (a tree file's or a virtual file's) and,
    for a tree file, its inode."""

    data: bytes
    inode: int = 0


@dataclass
class _Writer:
    """A file opened for writing -- one open file, shared by every descriptor dup'ed from it or
    inherited by a child: the buffer its flushes commit (module header, "Open files")."""

    inode: int
    path: str  # at open, refreshed at each commit; used when the inode is no longer valid
    epoch: int
    data: bytearray
    append: bool
    truncation: bool  # opened with O_TRUNC, and that (empty) content is not committed yet
    dirty: bool = False  # changed by writes since the last commit
    error: int = 0  # sticky: a write or commit failed; every later flush reports it
    lock: trio.Lock = field(default_factory=trio.Lock)


_Handle = _Snapshot | _Writer


class _NewState(Enum):
    PENDING = "pending"  # shown on this node only, as an empty file
    PUBLISHED = "published"  # in the tree: its inode stands for the tree's row
    GONE = "gone"  # unlinked, or its creation failed: ENOENT


@dataclass(slots=True)
class _NewFile:
    """A file that open(O_CREAT) made on this node and that is replicated only by the first
    commit of its content (module header, "New files"). While pending, `(parent, name)` shows
    it in its directory; once published, requests on its inode go to the tree's row `row`."""

    inode: int  # its FUSE inode, from NEW_INODE_BASE
    parent: int  # the FUSE inode of its directory while pending
    name: bytes
    path: str  # its path when last resolved
    mtime: int  # its time while pending
    state: _NewState = _NewState.PENDING
    row: int = 0  # once published: the FUSE inode of its row in the tree
    # one publisher at a time, while pending (the record may outlive that: kept small)
    lock: trio.Lock | None = field(default_factory=trio.Lock)


@dataclass
class _Dir:
    """An open directory: its names, fixed at the first readdir so offsets stay valid."""

    inode: int
    names: list[bytes] | None = None


@dataclass
class _Known:
    """What the kernel holds for one inode: its lookup count, the dentries it was handed out
    under, whether it was a directory, the row of its cached attributes, and the attributes
    last handed out (reused while the row and the quorum are the same)."""

    count: int = 0
    links: set[tuple[int, bytes]] = field(default_factory=set)
    is_dir: bool = False
    attr_row: Entry | None = None
    # (row, quorate, the attributes made for them): what `_attrs` hands out again
    attrs: tuple[Entry, bool, pyfuse3.EntryAttributes] | None = None


_Ops = TypeVar("_Ops", bound=type[pyfuse3.Operations])


def _contained(name: str,
               handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def contained(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("FUSE %s failed; answered EIO", name)
            if name == "forget":  # has no answer
                return None
            raise pyfuse3.FUSEError(errno.EIO) from None
    return contained


def _contain_handlers(cls: _Ops) -> _Ops:
    """Wrap every pyfuse3 request handler of `cls` in `_contained` (module header, Errors)."""
    for name, member in list(vars(cls).items()):
        if hasattr(pyfuse3.Operations, name) and inspect.iscoroutinefunction(member):
            setattr(cls, name, _contained(name, member))
    return cls


@_contain_handlers
class PmxfsOperations(pyfuse3.Operations):
    """`pyfuse3.Operations` over an `FsNode`; see the module header."""

    def __init__(self, node: FsNode, *, gid: int) -> None:
        super().__init__()
        self._node = node
        self._gid = gid
        self._db = node.memdb
        self._epoch = 0  # counts replacements of the tree object (syncs)
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._known: dict[int, _Known] = {}
        self._stale: set[int] = set()
        self._generations: dict[int, int] = {}  # inodes reused by a sync; absent: 0
        self._dentries: dict[tuple[int, bytes], int] = {}
        self._pending: dict[_Notice, None] = {}  # notices not sent yet, in order, once each
        self._wake = trio.Event()
        self._queued = 0  # invalidator calls that queued notices
        self._sent = 0  # of those, how many have been sent
        self._progress = trio.Event()
        self._committing: dict[int, int] = {}  # inode -> commits of it in flight
        self._commit_done = trio.Event()  # set (and replaced) whenever one of them ends
        self._new_files: dict[int, _NewFile] = {}  # FUSE inode -> a file created here
        self._new_names: dict[tuple[int, bytes], int] = {}  # (dir, name) -> a pending one
        self._next_new = NEW_INODE_BASE
        node.set_invalidator(self._invalidate)

    # -- the tree -----------------------------------------------------------------------------

    def _tree(self) -> MemDB:
        db = self._node.memdb
        if db is not self._db:
            self._mark_reused(self._db, db)
            self._move_new_files(self._db, db)
            for known in self._known.values():
                known.attrs = None  # a path may differ in the new tree
            self._db = db
            self._epoch += 1
        return db

    def _mark_reused(self, old: MemDB, new: MemDB) -> None:
        """A sync replaced the tree: an inode the kernel holds whose number now names a row
        with another parent, name or type is stale (ESTALE) until a lookup hands the number out
        again with a new generation, which makes the kernel retire its old inode."""
        for inode in self._known:
            before = old.get(inode - 1) if inode < FIXED_INODE_BASE else None
            after = new.get(inode - 1) if before is not None else None
            if after is not None and before is not None and (
                    (before.parent, before.name, before.is_dir)
                    != (after.parent, after.name, after.is_dir)):
                self._stale.add(inode)
                self._generations[inode] = self._generations.get(inode, 0) + 1

    def _move_new_files(self, old: MemDB, new: MemDB) -> None:
        """A sync replaced the tree: find each new file's directory (pending) or row
        (published) again by the path it had in the old tree; one that is not there is gone."""
        names: dict[tuple[int, bytes], int] = {}
        for created in self._new_files.values():
            if created.state is _NewState.GONE:
                continue
            was = old.get((created.parent if created.state is _NewState.PENDING
                           else created.row) - 1)
            if was is not None:
                created.path = (_join(old.path_of(was.inode), _decode(created.name))
                                if created.state is _NewState.PENDING else old.path_of(was.inode))
            if created.state is _NewState.PENDING:
                now = new.lookup(created.path.rpartition("/")[0])
                if now is not None and now.is_dir:
                    created.parent = now.inode + 1
                    names[created.parent, created.name] = created.inode
                    continue
            else:
                now = new.lookup(created.path)
                if now is not None and not now.is_dir:
                    created.row = now.inode + 1
                    continue
            created.state, created.lock = _NewState.GONE, None
        self._new_names = names

    def _row(self, inode: int) -> Entry:
        """The tree row of a FUSE inode (not a fixed one); ENOENT when there is none."""
        entry = self._tree().get(inode - 1) if inode < FIXED_INODE_BASE else None
        if inode in self._stale:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _dir_row(self, inode: int) -> Entry:
        """The row of a directory inode (a fixed entry or a new file is ENOTDIR)."""
        if inode in _FIXED_NAMES or inode in self._new_files:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entry = self._row(inode)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return entry

    def _dir_path(self, inode: int) -> str:
        return self._tree().path_of(self._dir_row(inode).inode)

    def _child_path(self, parent: int, name: bytes) -> str:
        return _join(self._dir_path(parent), _decode(name))

    def _changeable(self, parent: int, name: bytes) -> str:
        """The path of an entry to remove or rename: never one of the fixed root entries."""
        path = self._child_path(parent, name)
        if path in VIRTUAL_ROOT_NAMES:
            raise pyfuse3.FUSEError(errno.EACCES)
        return path

    async def _send(self, op: FsOp) -> None:
        _fail((await self._node.write(op)).errno)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- attributes ---------------------------------------------------------------------------

    def _attrs(self, entry: Entry, base: str | None = None) -> pyfuse3.EntryAttributes:
        """A tree row's attributes, which the kernel may cache (module header); `base` is the
        path of the row's directory when the caller knows it. Made once per row and quorum for
        an inode the kernel holds: a row is a new object after every change to it, and only an
        empty directory can be renamed, so its path, which decides the mode, cannot change
        under a row that stays (a sync forgets them all)."""
        known = self._known.get(entry.inode + 1)
        quorate = self._node.quorate()
        if known is not None:
            known.attr_row = entry
            made = known.attrs
            if made is not None and made[0] is entry and made[1] is quorate:
                return made[2]
        attrs = self._row_attrs(entry, entry.inode + 1,
                                None if base is None else _join(base, entry.name))
        attrs.entry_timeout = attrs.attr_timeout = CACHE_SECONDS
        if known is not None:
            known.attrs = (entry, quorate, attrs)
        return attrs

    def _row_attrs(self, entry: Entry, inode: int,
                   path: str | None = None) -> pyfuse3.EntryAttributes:
        """A tree row's attributes under FUSE inode `inode`, not to be cached."""
        if path is None:
            path = self._tree().path_of(entry.inode)
        size = 0 if entry.is_dir else len(entry.data)
        kind = stat.S_IFDIR if entry.is_dir else stat.S_IFREG
        attrs = self._base_attrs(inode, size, entry.mtime)
        attrs.st_mode = kind | mode_of(path, entry.is_dir, self._node.quorate())
        attrs.st_nlink = 2 if entry.is_dir else 1
        return attrs

    def _fixed_attrs(self, name: str) -> pyfuse3.EntryAttributes:
        if name in SYMLINKS:
            target = self._link_target(name)
            root = self._row(pyfuse3.ROOT_INODE)
            attrs = self._base_attrs(FIXED_INODES[name], len(target), root.mtime)
            attrs.st_mode = stat.S_IFLNK | (0o755 if self._node.quorate() else 0o555)
        else:
            size = len(self._node.virtual_file(name))
            attrs = self._base_attrs(FIXED_INODES[name], size, self._node.wall_seconds())
            attrs.st_mode = stat.S_IFREG | (0o640 if name == DEBUG_FILE else 0o440)
        attrs.st_nlink = 1
        attrs.entry_timeout = CACHE_SECONDS
        attrs.attr_timeout = 0
        return attrs

    def _base_attrs(self, inode: int, size: int, mtime: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = self._generations.get(inode, 0)
        attrs.st_uid = 0
        attrs.st_gid = self._gid
        attrs.st_size = size
        attrs.st_blksize = BLOCK_BYTES
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime * _NS
        attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    def _inode_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        name = _FIXED_NAMES.get(inode)
        if name is not None:
            return self._fixed_attrs(name)
        created = self._new_files.get(inode)
        return self._new_attrs(created) if created is not None else self._attrs(self._row(inode))

    def _link_target(self, name: str) -> bytes:
        node = _encode(self._node.node_name)
        return b"nodes/" + node if name == "local" else b"nodes/" + node + b"/" + _encode(name)

    # -- what the kernel knows ----------------------------------------------------------------

    def _remember(self, parent: int, name: bytes | None, attrs: pyfuse3.EntryAttributes) -> None:
        """The kernel took one more reference to attrs.st_ino, under (parent, name) if given."""
        inode = attrs.st_ino
        self._stale.discard(inode)
        known = self._known.get(inode)
        if known is None:
            known = self._known[inode] = _Known()
        known.count += 1
        known.is_dir = stat.S_ISDIR(attrs.st_mode)
        if inode < FIXED_INODE_BASE:
            known.attr_row = self._tree().get(inode - 1)
        if name is not None:
            self._link(parent, name, inode)

    def _link(self, parent: int, name: bytes, inode: int) -> None:
        key = (parent, name)
        old = self._dentries.get(key)
        if old is not None and old != inode and old in self._known:
            self._known[old].links.discard(key)
        self._dentries[key] = inode
        known = self._known.get(inode)
        if known is not None:
            known.links.add(key)

    def _unlink(self, parent: int, name: bytes) -> None:
        inode = self._dentries.pop((parent, name), None)
        if inode is not None and inode in self._known:
            self._known[inode].links.discard((parent, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            known = self._known.get(inode)
            if known is None:
                continue
            known.count -= count
            if known.count <= 0:
                del self._known[inode]
                self._stale.discard(inode)
                for key in known.links:
                    if self._dentries.get(key) == inode:
                        del self._dentries[key]
                self._settle_new(inode)

    # -- invalidation -------------------------------------------------------------------------

    def _invalidate(self, paths: tuple[str, ...], everything: bool) -> None:
        """The node's invalidator: queue the kernel notices for a change (module header)."""
        tree = self._tree()
        notices: list[_Notice] = []
        if everything:
            stale = [key for key, inode in self._dentries.items()
                     if not self._link_holds(tree, key, inode)]
            for key in stale:
                self._unlink(*key)
            notices += stale
            notices += [(inode, None) for inode in self._known if inode < FIXED_INODE_BASE]
            notices.append((pyfuse3.ROOT_INODE, None))
        for path in paths:
            notices += self._path_notices(tree, path)
        if notices:
            self._pending.update(dict.fromkeys(notices))
            self._queued += 1
            self._wake.set()

    def _link_holds(self, tree: MemDB, key: tuple[int, bytes], inode: int) -> bool:
        """Whether the kernel's dentry (parent, name) -> inode is still right in `tree`."""
        if inode >= FIXED_INODE_BASE:
            return True
        entry = tree.get(inode - 1)
        known = self._known.get(inode)
        return (entry is not None and known is not None and entry.parent + 1 == key[0]
                and _encode(entry.name) == key[1] and entry.is_dir == known.is_dir)

    def _path_notices(self, tree: MemDB, path: str) -> list[_Notice]:
        entry = tree.lookup(path)
        inode = None if entry is None else entry.inode + 1
        notices: list[_Notice] = []
        if inode is not None and (inode in self._known or inode == pyfuse3.ROOT_INODE):
            notices.append((inode, None))
        if path:
            parent_path, _, name = path.rpartition("/")
            parent = tree.lookup(parent_path)
            if parent is not None and parent.is_dir:
                key = (parent.inode + 1, _encode(name))
                held = self._dentries.get(key)
                # a new file's dentry is never cached: the next path walk asks again anyway
                if held is not None and held != inode and held not in self._new_files:
                    notices.append(key)
                    self._unlink(*key)
        return notices

    async def run_invalidations(self) -> None:
        """Send the queued notices to the kernel, all that piled up at once, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            notices, self._pending = list(self._pending), {}
            queued = self._queued
            await trio.to_thread.run_sync(_notify_kernel, notices)
            self._sent = queued
            self._progress.set()
            self._progress = trio.Event()

    async def invalidations_settled(self) -> None:
        """Return once every notice queued before this call has been sent to the kernel."""
        target = self._queued
        while self._sent < target:
            await self._progress.wait()

    async def _refresh_attrs(self, inode: int) -> None:
        """Make the kernel ask for the inode's attributes again (from a worker thread: the
        request being served may hold what an inline notice would wait for)."""
        await trio.to_thread.run_sync(_notify_kernel, [(inode, None)], True)

    # -- lookup, attributes, directories ------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        dot = self._dot_attrs(parent_inode, name)
        if dot is not None:
            self._remember(parent_inode, None, dot)
            return dot
        attrs = self._child_attrs(parent_inode, name)
        self._remember(parent_inode, name, attrs)
        return attrs

    def _dot_attrs(self, inode: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The attributes of what `.` or `..` in directory `inode` names; None for other names."""
        if name == b".":
            return self._inode_attrs(inode)
        if name == b"..":
            return self._inode_attrs(self._dir_row(inode).parent + 1)
        return None

    def _child_attrs(self, parent: int, name: bytes,
                     base: str | None = None) -> pyfuse3.EntryAttributes:
        """What `name` in directory `parent` (at path `base`, when the caller knows it) is on
        this node: a pending new file first (it shadows the tree until published), then the
        fixed root entries, then the tree."""
        created = self._new_at(parent, name)
        if created is not None:
            return self._new_attrs(created)
        text = _decode(name)
        if parent == pyfuse3.ROOT_INODE and text in FIXED_INODES:
            return self._fixed_attrs(text)
        if base is None:
            self._dir_row(parent)
        entry = self._tree().child(parent - 1, text)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(entry, base)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._inode_attrs(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        name = _FIXED_NAMES.get(inode)
        if name not in SYMLINKS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._link_target(name)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir_row(inode)
        fh = self._new_fh()
        self._dirs[fh] = _Dir(inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or handle.names is None:
            handle.names = self._names(handle.inode)
        try:
            base = self._dir_path(handle.inode)
        except pyfuse3.FUSEError:
            return  # gone since the listing was taken: nothing more to list
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            try:
                dot = self._dot_attrs(handle.inode, name)
                attrs = self._child_attrs(handle.inode, name, base) if dot is None else dot
            except pyfuse3.FUSEError:
                continue  # gone since the listing was taken
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return
            if dot is None:  # the kernel takes no reference for `.` and `..`
                self._remember(handle.inode, name, attrs)

    def _names(self, inode: int) -> list[bytes]:
        """`.`, `..`, then the directory's entries by name."""
        self._dir_row(inode)
        names = {_encode(child.name) for child in self._tree().children(inode - 1)}
        if inode == pyfuse3.ROOT_INODE:
            names.update(_encode(name) for name in FIXED_INODES)
        names.update(name for parent, name in self._new_names if parent == inode)
        return [b".", b"..", *sorted(names)]

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        tree = self._tree()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_BYTES
        data.f_blocks = MAX_TOTAL_BYTES // BLOCK_BYTES
        data.f_bfree = data.f_bavail = max(0, MAX_TOTAL_BYTES - tree.total_bytes) // BLOCK_BYTES
        data.f_files = MAX_ENTRIES
        data.f_ffree = data.f_favail = max(0, MAX_ENTRIES - tree.entry_count)
        data.f_namemax = MAX_NAME_BYTES
        return data

    # -- changes to the tree ------------------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child_path(parent_inode, name)
        self._refuse_new_name(parent_inode, name)
        await self._send(Mkdir(path, self._node.wall_seconds()))
        attrs = self._child_attrs(parent_inode, name)
        self._remember(parent_inode, name, attrs)
        return attrs

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._changeable(parent_inode, name)
        self._refuse_holding_new(path)
        await self._send(Rmdir(path))
        self._unlink(parent_inode, name)

    def _refuse_holding_new(self, path: str) -> None:
        """ENOTEMPTY for removing or replacing a directory that holds a pending new file
        (the tree does not know it is there)."""
        entry = self._tree().lookup(path)
        if entry is not None and entry.is_dir and self._holds_new(entry.inode + 1):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._changeable(parent_inode, name)
        created = await self._settled_new_at(parent_inode, name)
        if created is None:
            await self._send(Unlink(path))
        else:  # never replicated: nothing to send
            self._check_quorate()
            self._new_gone(created)
        self._unlink(parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src = self._changeable(parent_inode_old, name_old)
        dst = self._changeable(parent_inode_new, name_new)
        replaced = await self._settled_new_at(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_NOREPLACE and (self._tree().lookup(dst) is not None
                                                 or replaced is not None):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self._refuse_holding_new(dst)
        moved = self._dentries.get((parent_inode_old, name_old))  # the invalidator may drop it
        created = self._new_at(parent_inode_old, name_old)
        if created is not None:  # the target's rules are the tree's: create it first
            self._check_quorate()
            await self._publish(created, lambda path: CreateFile(path, created.mtime))
        await self._send(Rename(src, dst, self._node.wall_seconds()))
        if replaced is not None and replaced is not created:
            self._new_gone(replaced)
        self._unlink(parent_inode_old, name_old)
        self._unlink(parent_inode_new, name_new)
        if moved is not None:
            self._link(parent_inode_new, name_new, moved)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.ENOSYS)
        path = self._child_path(parent_inode, name)
        self._refuse_new_name(parent_inode, name)
        await self._send(CreateFile(path, self._node.wall_seconds(), exclusive=True))
        attrs = self._child_attrs(parent_inode, name)
        self._remember(parent_inode, name, attrs)
        return attrs

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        name = _FIXED_NAMES.get(inode)
        if name is not None:
            return self._setattr_fixed(name, attr, fields, fh)
        created = self._new_files.get(inode)
        if created is not None and await self._setattr_pending(created, attr, fields, fh):
            return self._new_attrs(created)
        entry = self._row(inode) if created is None else self._new_row(created)
        path = self._tree().path_of(entry.inode)
        self._check_owner_and_mode(path, attr, fields)
        if fields.update_size:
            if entry.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            handle = None if fh is None else self._handles.get(fh)
            if isinstance(handle, _Writer):
                self._resize(handle, attr.st_size)
            else:
                await self._send(Truncate(path, attr.st_size, self._node.wall_seconds()))
        if fields.update_mtime and not fields.update_size:  # a size change sets its own mtime
            mtime = attr.st_mtime_ns // _NS
            parent = path.rpartition("/")[0]
            if mtime == 0 and entry.is_dir and parent == LOCK_DIR:
                await self._send(UnlockRequest(path))
            await self._send(SetMtime(path, mtime))
        return self._attrs(self._row(inode)) if created is None else self._new_attrs(created)

    async def _setattr_pending(self, created: _NewFile, attr: pyfuse3.EntryAttributes,
                               fields: pyfuse3.SetattrFields, fh: int | None) -> bool:
        """setattr of a pending new file. A size with its write handle resizes the buffer; a
        truncate or utime by path is the file's creation, sent at once (a WriteFile of that
        size, a CreateFile with that mtime). False when it was published meanwhile: then the
        caller treats it as the tree's row."""
        self._check_owner_and_mode(self._new_path(created), attr, fields)
        handle = None if fh is None else self._handles.get(fh)
        if fields.update_size and isinstance(handle, _Writer):
            self._resize(handle, attr.st_size)
            return True
        if not (fields.update_size or fields.update_mtime):
            return True
        if fields.update_size and attr.st_size > MAX_FILE_BYTES:
            raise pyfuse3.FUSEError(errno.EFBIG)
        self._check_quorate()
        if fields.update_size:
            data, now = bytes(attr.st_size), self._node.wall_seconds()
            return await self._publish(created, lambda path: WriteFile(path, data, now,
                                                                       create=True))
        mtime = attr.st_mtime_ns // _NS
        return await self._publish(created, lambda path: CreateFile(path, mtime))

    def _setattr_fixed(self, name: str, attr: pyfuse3.EntryAttributes,
                       fields: pyfuse3.SetattrFields, fh: int | None) -> pyfuse3.EntryAttributes:
        current = self._fixed_attrs(name)
        self._check_owner_and_mode(name, attr, fields)
        # Only .debug can be truncated (ftruncate also asks for an mtime: the size carries it).
        if ((fields.update_size and name != DEBUG_FILE)
                or (fields.update_mtime and not fields.update_size)):
            raise pyfuse3.FUSEError(errno.EACCES)
        handle = None if fh is None else self._handles.get(fh)
        if fields.update_size and isinstance(handle, _Writer):
            self._resize(handle, attr.st_size)
        return current

    def _check_owner_and_mode(self, path: str, attr: pyfuse3.EntryAttributes,
                              fields: pyfuse3.SetattrFields) -> None:
        """pmxcfs's chmod and chown: only the mode of a file at `path` (0600 private, 0640 other;
        directories too), only root and group `gid`."""
        if fields.update_mode and stat.S_IMODE(attr.st_mode) != mode_of(path, False, True):
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_uid and attr.st_uid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_gid and attr.st_gid != self._gid:
            raise pyfuse3.FUSEError(errno.EPERM)

    @staticmethod
    def _resize(handle: _Writer, size: int) -> None:
        if size > MAX_FILE_BYTES:
            raise pyfuse3.FUSEError(errno.EFBIG)
        if size < len(handle.data):
            del handle.data[size:]
        else:
            handle.data.extend(bytes(size - len(handle.data)))
        handle.dirty = True

    # -- files created here (module header, "New files") --------------------------------------

    def _new_at(self, parent: int, name: bytes) -> _NewFile | None:
        """The pending new file named `name` in directory `parent`, if there is one."""
        inode = self._new_names.get((parent, name))
        return None if inode is None else self._new_files[inode]

    async def _settled_new_at(self, parent: int, name: bytes) -> _NewFile | None:
        """`_new_at` once no publication of that file is under way. A release publishes an
        empty new file and the kernel does not wait for it (`: > f; rm f`): a removal or
        replacement that took the file for unpublished while its create is in flight would
        send nothing, and the create would then land -- a removal answered 0 and undone."""
        created = self._new_at(parent, name)
        while created is not None and created.lock is not None and created.lock.locked():
            async with created.lock:
                pass
            created = self._new_at(parent, name)
        return created

    def _holds_new(self, directory: int) -> bool:
        return any(parent == directory for parent, _ in self._new_names)

    def _refuse_new_name(self, parent: int, name: bytes) -> None:
        """EEXIST for making an entry where a pending new file is."""
        if (parent, name) in self._new_names:
            raise pyfuse3.FUSEError(errno.EEXIST)

    def _new_path(self, created: _NewFile) -> str:
        """Where a pending file is now (it follows a rename of its directory); ENOENT when its
        directory is gone."""
        parent = self._tree().get(created.parent - 1)
        if parent is None or not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOENT)
        created.path = _join(self._tree().path_of(parent.inode), _decode(created.name))
        return created.path

    def _new_row(self, created: _NewFile) -> Entry:
        """The tree row a published new file became; ENOENT when it is gone."""
        entry = (self._tree().get(created.row - 1)
                 if created.state is _NewState.PUBLISHED else None)
        if entry is None or entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOENT)
        created.path = self._tree().path_of(entry.inode)
        return entry

    def _new_attrs(self, created: _NewFile) -> pyfuse3.EntryAttributes:
        """Its attributes under its own inode, never cached: each path walk asks again, so the
        kernel moves to the tree's inode as soon as the file is published."""
        if created.state is not _NewState.PENDING:
            return self._row_attrs(self._new_row(created), created.inode)
        path = self._new_path(created)
        attrs = self._base_attrs(created.inode, 0, created.mtime)
        attrs.st_mode = stat.S_IFREG | mode_of(path, False, self._node.quorate())
        attrs.st_nlink = 1
        return attrs

    def _defers(self, path: str, flags: int) -> bool:
        """Whether a create of the missing `path` waits for the first commit (module header):
        not with O_EXCL, not for a guest config, not without a write handle."""
        return (_writes(flags) and not flags & os.O_EXCL and guest_config(path) is None
                and self._tree().lookup(path) is None)

    def _create_new(self, parent: int, name: bytes, path: str,
                    flags: int) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A pending new file and its write handle. Refused at once as the replicated create
        would be: the path rules, then quorum, then memdb's own rules for the create."""
        mtime = self._node.wall_seconds()
        _fail(valid_path(path))
        self._check_quorate()
        _fail(self._tree().check(CreateFile(path, mtime), 0))  # no writer rule for a create
        created = _NewFile(self._next_new, parent, name, path, mtime)
        self._next_new += 1
        self._new_files[created.inode] = created
        self._new_names[parent, name] = created.inode
        attrs = self._new_attrs(created)
        self._remember(parent, name, attrs)
        return self._open_pending(created, flags), attrs

    async def _open_new(self, created: _NewFile, flags: int) -> pyfuse3.FileInfo:
        """Open a new file by its own inode: pending, an empty file (a writer's commit
        publishes it); published, the tree's row (past the page cache: the kernel's pages of
        that row belong to the row's own inode)."""
        await self._commits_settled(created.inode)
        if _writes(flags):
            self._check_quorate()
        if created.state is not _NewState.PENDING:
            entry = self._new_row(created)
            if _writes(flags):
                return self._open_writer(entry, flags, truncates=True)
            fh = self._new_fh()
            self._handles[fh] = _Snapshot(entry.data, created.inode)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        return self._open_pending(created, flags)

    def _open_pending(self, created: _NewFile, flags: int) -> pyfuse3.FileInfo:
        """A handle of a pending file: a writer starts empty, a reader reads nothing."""
        fh = self._new_fh()
        if _writes(flags):
            self._handles[fh] = _Writer(created.inode, created.path, self._epoch, bytearray(),
                                        append=bool(flags & os.O_APPEND),
                                        truncation=bool(flags & os.O_TRUNC))
        else:
            self._handles[fh] = _Snapshot(b"", created.inode)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def _publish(self, created: _NewFile, make: Callable[[str], FsOp]) -> bool:
        """Send `make(path)`, the one operation that creates a pending file in the tree, and
        make its inode stand for the row. False when it was no longer pending (then nothing
        was sent). A refused creation makes the file gone here too."""
        lock = created.lock
        if lock is None:
            return False
        async with lock:
            if created.state is not _NewState.PENDING:
                return False
            try:
                path = self._new_path(created)
                await self._send(make(path))
            except pyfuse3.FUSEError:
                self._new_gone(created)
                raise
            entry = self._tree().lookup(path)
            if entry is None or entry.is_dir:  # changed again before the reply came
                self._new_gone(created)
                return True
            created.state, created.row, created.lock = _NewState.PUBLISHED, entry.inode + 1, None
            self._new_names.pop((created.parent, created.name), None)
            return True

    def _new_gone(self, created: _NewFile) -> None:
        if self._new_names.get((created.parent, created.name)) == created.inode:
            del self._new_names[created.parent, created.name]
        created.state, created.lock = _NewState.GONE, None

    def _settle_new(self, inode: int) -> None:
        """After a handle of `inode` closed or failed: a pending file that no handle can
        publish any more is gone; a record nobody refers to any more is dropped."""
        created = self._new_files.get(inode)
        if created is None:
            return
        users = [h for h in self._handles.values() if h.inode == inode]
        if created.state is _NewState.PENDING and not self._committing.get(inode) and not any(
                isinstance(h, _Writer) and not h.error for h in users):
            self._new_gone(created)
        if (created.state is not _NewState.PENDING and not users and inode not in self._known
                and not self._committing.get(inode)):
            del self._new_files[inode]

    # -- open files ---------------------------------------------------------------------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        path = self._child_path(parent_inode, name)
        created = self._new_at(parent_inode, name)
        if created is not None:  # the kernel had not seen the name yet: an open of it
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            info = await self._open_new(created, flags)
            attrs = self._new_attrs(created)
            self._remember(parent_inode, name, attrs)
            return info, attrs
        if self._defers(path, flags):
            return self._create_new(parent_inode, name, path, flags)
        existed = self._tree().lookup(path) is not None
        await self._send(CreateFile(path, self._node.wall_seconds(),
                                    exclusive=bool(flags & os.O_EXCL)))
        attrs = self._child_attrs(parent_inode, name)
        self._remember(parent_inode, name, attrs)
        entry = self._row(attrs.st_ino)
        if not _writes(flags):
            return self._open_reader(entry), attrs
        return self._open_writer(entry, flags, truncates=existed), attrs

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        name = _FIXED_NAMES.get(inode)
        if name is not None:
            return self._open_fixed(name, flags)
        created = self._new_files.get(inode)
        if created is not None:
            return await self._open_new(created, flags)
        if self._committing:
            await self._commits_settled(inode)
        entry = self._row(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if _writes(flags):
            self._check_quorate()
            return self._open_writer(entry, flags, truncates=True)
        known = self._known.get(inode)
        if known is None or known.attr_row is not entry:
            await self._refresh_attrs(inode)
            entry = self._row(inode)
            if entry.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
        return self._open_reader(entry)

    def _check_quorate(self) -> None:
        """Writing needs quorum; root passes the kernel's mode check, so it is made here, at
        open and at every write, where a shell sees it (a close's error goes unseen)."""
        if not self._node.quorate():
            raise pyfuse3.FUSEError(errno.EACCES)

    async def _commits_settled(self, inode: int) -> None:
        """Wait until no commit of `inode` is in flight, so an open sees what an earlier close
        (or a release, which the kernel does not wait for: `: > f; cat f`) committed."""
        while self._committing.get(inode):
            await self._commit_done.wait()

    def _open_fixed(self, name: str, flags: int) -> pyfuse3.FileInfo:
        if name in SYMLINKS:
            raise pyfuse3.FUSEError(errno.ELOOP)
        fh = self._new_fh()
        if not _writes(flags):
            self._handles[fh] = _Snapshot(self._node.virtual_file(name))
        elif name == DEBUG_FILE:
            self._handles[fh] = _Writer(FIXED_INODES[name], name, self._epoch, bytearray(),
                                        append=False, truncation=False)
        else:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _open_reader(self, entry: Entry) -> pyfuse3.FileInfo:
        """A read handle of `entry`'s version, past the page cache (module header)."""
        inode = entry.inode + 1
        fh = self._new_fh()
        self._handles[fh] = _Snapshot(entry.data, inode)
        known = self._known.get(inode)
        if known is not None:
            known.attr_row = entry
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _open_writer(self, entry: Entry, flags: int, *, truncates: bool) -> pyfuse3.FileInfo:
        truncate = bool(flags & os.O_TRUNC)
        fh = self._new_fh()
        self._handles[fh] = _Writer(
            entry.inode + 1, self._tree().path_of(entry.inode), self._epoch,
            bytearray() if truncate else bytearray(entry.data),
            append=bool(flags & os.O_APPEND), truncation=truncate and truncates)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if isinstance(handle, _Snapshot):
            return handle.data[off:off + size]
        if isinstance(handle, _Writer):
            return bytes(handle.data[off:off + size])
        raise pyfuse3.FUSEError(errno.EBADF)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if not isinstance(handle, _Writer):
            raise pyfuse3.FUSEError(errno.EBADF)
        _fail(handle.error)
        start = len(handle.data) if handle.append else off
        end = start + len(buf)
        if end > MAX_FILE_BYTES:
            handle.error = errno.EFBIG
        elif handle.inode != FIXED_INODES[DEBUG_FILE] and not self._node.quorate():
            handle.error = errno.EACCES
        if handle.error:
            self._settle_new(handle.inode)
            raise pyfuse3.FUSEError(handle.error)
        if start > len(handle.data):
            handle.data.extend(bytes(start - len(handle.data)))
        handle.data[start:end] = buf
        handle.dirty = True
        return len(buf)

    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, _Writer):
            await self._commit(handle, final=False)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, _Writer):
            await self._commit(handle, final=True)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _Writer) and not handle.error:
            try:
                await self._commit(handle, final=True)
            except pyfuse3.FUSEError as exc:
                log.warning("the content written to %s at its last close is lost: %s",
                            handle.path, os.strerror(exc.errno))
        if handle is not None:
            self._settle_new(handle.inode)

    async def _commit(self, handle: _Writer, *, final: bool) -> None:
        """Send what the open file holds when its writes changed it since the last commit, or,
        when `final` (release, fsync), when only its O_TRUNC or its creation is pending (module
        header). The commit counts as in flight from the first instant, before any checkpoint:
        an open that the kernel queued behind a release must find it (`_commits_settled`)."""
        self._committing[handle.inode] = self._committing.get(handle.inode, 0) + 1
        try:
            async with handle.lock:
                _fail(handle.error)
                created = self._new_files.get(handle.inode)
                written = handle.dirty or (final and handle.truncation)
                if not (written or (final and created is not None
                                    and created.state is _NewState.PENDING)):
                    return
                handle.dirty = handle.truncation = False
                try:
                    await self._send_content(handle, bytes(handle.data), written=written)
                except pyfuse3.FUSEError as exc:
                    handle.error = exc.errno
                    raise
        finally:
            self._committing[handle.inode] -= 1
            if not self._committing[handle.inode]:
                del self._committing[handle.inode]
            self._settle_new(handle.inode)
            self._commit_done.set()
            self._commit_done = trio.Event()

    async def _send_content(self, handle: _Writer, data: bytes, *, written: bool) -> None:
        """Commit `data`; not `written` (only the creation of a new file is pending): create
        the file without replacing one that another node made meanwhile."""
        if handle.inode == FIXED_INODES[DEBUG_FILE]:
            enabled = parse_debug_write(data)
            if enabled is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            self._node.set_debug(enabled)
            return
        mtime = self._node.wall_seconds()
        created = self._new_files.get(handle.inode)
        if created is not None and (
                await self._publish(created, lambda path: WriteFile(path, data, mtime,
                                                                    create=True)
                                    if written else CreateFile(path, mtime))
                or not written):
            return
        await self._send(WriteFile(self._writer_path(handle), data, mtime, create=False))

    def _writer_path(self, handle: _Writer) -> str:
        """Where a write handle's buffer goes: the inode's path now (it follows a rename); after
        a sync, the path it had (the inode number may name another file now)."""
        created = self._new_files.get(handle.inode)
        if created is not None:
            self._new_row(created)
            handle.path = created.path
            return handle.path
        tree = self._tree()
        if handle.epoch == self._epoch:
            entry = tree.get(handle.inode - 1)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            handle.path = tree.path_of(entry.inode)
        return handle.path


def _writes(flags: int) -> bool:
    """Whether an open with `flags` gets a write handle (O_TRUNC truncates even read-only)."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _notify_kernel(notices: Sequence[_Notice], attr_only: bool = False) -> None:
    """Send notices to the kernel (in a worker thread: the calls may block, module header).
    ENOENT means the kernel did not hold the inode or entry: nothing to drop."""
    for target, name in notices:
        try:
            if name is None:
                pyfuse3.invalidate_inode(target, attr_only)
            else:
                pyfuse3.invalidate_entry(target, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot invalidate the kernel's cache of inode %d%s: %s", target,
                            "" if name is None else f" entry {name!r}", exc)
