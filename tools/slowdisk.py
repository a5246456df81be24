"""A pass-through FUSE file system whose fsync can stall: a real slow disk under a daemon's data
directory, for the liveness tests of issue 12 and for trying things by hand.

    python tools/slowdisk.py BACKING MOUNT [--stall 5] [--stalls 1] [--gap 1] [--fsync-delay 0]

Every request on MOUNT is done on the same path under BACKING (a plain directory), so SQLite in
WAL mode works on it: open/create/read/write/truncate/unlink/rename/link/mkdir/readdir and the
shared mmap of the `-shm` file (the kernel keeps the pages; `keep_cache` because nothing else
writes BACKING), with POSIX and flock locks left to the kernel (no lock handlers). Only
`fsync`, `fdatasync` and a directory's fsync are slowed:
* `--fsync-delay S`: each of them waits S seconds before the real fsync (a disk that is always
  slow);
* SIGUSR1: the disk stalls for `--stall` seconds from now -- every fsync issued before the stall
  ends is held until it ends (a disk that freezes, as a busy hypervisor's does) -- and does so
  `--stalls` times, `--gap` seconds apart.
Writes themselves are never delayed: they land in the page cache, as on a real disk.

It prints JSON lines on stdout, flushed: `{"event": "mounted"}` once MOUNT answers,
`{"event": "stall", "seconds": S}` when a stall begins, `{"event": "calm", "last": B}` when it
ends (B: it was the last of the series), `{"event": "fsync", "held_s": T,
"path": P}` for each fsync that was slowed, and on SIGUSR2 `{"event": "counters", ...}` (fsyncs,
how many were held, total seconds held). SIGTERM or SIGINT unmounts and exits 0.

Inodes: each path seen gets a number of its own, kept with every path linked to it (hard links,
renames, a whole directory's subtree on its rename); an unlinked inode stays known for the file
handles still open on it. Numbers are never reused: this runs for the length of one test.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio

ATTR_TIMEOUT_S = 1.0
ROOT = pyfuse3.ROOT_INODE


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@contextlib.contextmanager
def fuse_errors() -> Iterator[None]:
    """An OSError of the backing file system becomes the same errno for the caller."""
    try:
        yield
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


class Inodes:
    """Our inode numbers and the backing paths linked to each (see the module header)."""

    def __init__(self, root: bytes) -> None:
        self._paths: dict[int, set[bytes]] = {ROOT: {root}}
        self._inode: dict[bytes, int] = {root: ROOT}
        self._next = ROOT + 1

    def path(self, inode: int) -> bytes | None:
        paths = self._paths.get(inode)
        return min(paths) if paths else None

    def existing_path(self, inode: int) -> bytes:
        path = self.path(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self.existing_path(parent), name)

    def of(self, path: bytes) -> int:
        inode = self._inode.get(path)
        if inode is None:
            inode = self._next
            self._next += 1
            self._inode[path] = inode
            self._paths[inode] = {path}
        return inode

    def link(self, inode: int, path: bytes) -> None:
        self.unlink(path)
        self._inode[path] = inode
        self._paths.setdefault(inode, set()).add(path)

    def unlink(self, path: bytes) -> None:
        inode = self._inode.pop(path, None)
        if inode is not None:
            self._paths[inode].discard(path)

    def move(self, old: bytes, new: bytes) -> None:
        """`old` (and, for a directory, everything below it) is now at `new`."""
        self.unlink(new)
        below = [p for p in self._inode if p == old or p.startswith(old + b"/")]
        for path in below:
            inode = self._inode[path]
            self.unlink(path)
            self.link(inode, new + path[len(old):])


class Disk:
    """When an fsync may go ahead, and what was held. A stall series is one task: STALLS times,
    an event is cleared (fsyncs wait on it) for STALL seconds and then set, with GAP seconds of
    a normal disk between two stalls. A SIGUSR1 during a series is ignored."""

    def __init__(self, stall_s: float, stalls: int, gap_s: float, delay_s: float) -> None:
        self.stall_s = stall_s
        self.stalls = stalls
        self.gap_s = gap_s
        self.delay_s = delay_s
        self._calm = trio.Event()
        self._calm.set()
        self._series = False
        self.fsyncs = 0
        self.held = 0
        self.held_s = 0.0

    def stall(self, nursery: trio.Nursery) -> None:
        if not self._series:
            self._series = True
            nursery.start_soon(self._stall_series)

    async def _stall_series(self) -> None:
        for k in range(self.stalls):
            if k:
                await trio.sleep(self.gap_s)
            self._calm = trio.Event()
            emit("stall", seconds=self.stall_s)
            await trio.sleep(self.stall_s)
            self._calm.set()
            emit("calm", last=k == self.stalls - 1)
        self._series = False

    async def before_fsync(self, path: bytes | None) -> None:
        start = time.monotonic()
        self.fsyncs += 1
        if self.delay_s > 0:
            await trio.sleep(self.delay_s)
        await self._calm.wait()
        held = time.monotonic() - start
        if held > 0.001:
            self.held += 1
            self.held_s += held
            name = os.fsdecode(path) if path is not None else None
            emit("fsync", held_s=round(held, 3), path=name)

    def counters(self) -> None:
        emit("counters", fsyncs=self.fsyncs, held=self.held, held_s=round(self.held_s, 3))


class SlowDisk(pyfuse3.Operations):
    """Pass-through to the backing directory; fsyncs go through `Disk`."""

    def __init__(self, backing: bytes, disk: Disk) -> None:
        super().__init__()
        self._inodes = Inodes(backing)
        self._disk = disk
        self._open: dict[int, int] = {}  # backing fd -> our inode
        self._dirs: dict[int, int] = {}  # directory handle -> inode
        self._next_dir = 1

    # -- attributes

    def _attrs(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT_S
        attrs.attr_timeout = ATTR_TIMEOUT_S
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _stat(self, inode: int) -> pyfuse3.EntryAttributes:
        path = self._inodes.path(inode)
        with fuse_errors():
            if path is not None:
                return self._attrs(inode, os.lstat(path))
            for fd, owner in self._open.items():
                if owner == inode:
                    return self._attrs(inode, os.fstat(fd))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        with fuse_errors():
            st = os.lstat(path)
        return self._attrs(self._inodes.of(path), st)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._inodes.child(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._stat(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._inodes.path(inode)
        target: int | bytes | None = fh if fh is not None else path
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        with fuse_errors():
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(target, attr.st_mode & 0o7777)
            if fields.update_uid or fields.update_gid:
                os.chown(target, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.stat(target)
                os.utime(target, ns=(
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._stat(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with fuse_errors():
            st = os.statvfs(self._inodes.existing_path(ROOT))
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(st, name))
        return data

    # -- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        handle = self._next_dir
        self._next_dir += 1
        self._dirs[handle] = inode
        return handle

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._inodes.existing_path(self._dirs[fh])
        with fuse_errors():
            names = sorted(os.listdir(directory))
        for index, name in enumerate(names[start_id:], start_id):
            try:
                attrs = self._entry(os.path.join(directory, name))
            except pyfuse3.FUSEError:
                continue  # removed since the listing
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        path = self._inodes.existing_path(self._dirs[fh])
        await self._disk.before_fsync(path)
        with fuse_errors():
            await trio.to_thread.run_sync(_fsync_path, path)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._inodes.child(parent_inode, name)
        with fuse_errors():
            os.mkdir(path, mode & ~ctx.umask)
        return self._entry(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._inodes.child(parent_inode, name)
        with fuse_errors():
            os.rmdir(path)
        self._inodes.unlink(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._inodes.child(parent_inode, name)
        with fuse_errors():
            os.unlink(path)
        self._inodes.unlink(path)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._inodes.child(parent_inode_old, name_old)
        new = self._inodes.child(parent_inode_new, name_new)
        with fuse_errors():
            if flags & pyfuse3.RENAME_NOREPLACE and _exists(new):
                raise pyfuse3.FUSEError(errno.EEXIST)
            os.rename(old, new)
        self._inodes.move(old, new)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        new = self._inodes.child(new_parent_inode, new_name)
        with fuse_errors():
            os.link(self._inodes.existing_path(inode), new)
        self._inodes.link(inode, new)
        return self._stat(inode)

    # -- files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._inodes.existing_path(inode)
        with fuse_errors():
            fd = os.open(path, _backing_flags(flags))
        self._open[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._inodes.child(parent_inode, name)
        with fuse_errors():
            fd = os.open(path, _backing_flags(flags) | os.O_CREAT, mode & ~ctx.umask)
        attrs = self._entry(path)
        self._open[fd] = attrs.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with fuse_errors():
            return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with fuse_errors():
            return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        return None  # every write already reached the backing file

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)
        with fuse_errors():
            os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._disk.before_fsync(self._inodes.path(self._open.get(fh, 0)))
        sync = os.fdatasync if datasync else os.fsync
        with fuse_errors():
            await trio.to_thread.run_sync(sync, fh)


def _backing_flags(flags: int) -> int:
    """Open flags for the backing file: the kernel has done creation and truncation checks, and
    an O_APPEND backing descriptor would ignore the offsets it sends with each write."""
    return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)


def _exists(path: bytes) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_path(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def serve(disk: Disk) -> None:
    """Serve until SIGTERM/SIGINT; SIGUSR1 starts a stall, SIGUSR2 prints the counters."""
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            emit("mounted")
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    disk.stall(nursery)
                elif signum == signal.SIGUSR2:
                    disk.counters()
                else:
                    break
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backing", type=Path, help="the directory that holds the files")
    parser.add_argument("mount", type=Path, help="where to mount the slow view of it")
    parser.add_argument("--stall", type=float, default=5.0,
                        help="seconds a stall lasts (SIGUSR1 starts them; default 5)")
    parser.add_argument("--stalls", type=int, default=1,
                        help="stalls in a row after one SIGUSR1 (default 1)")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds of a normal disk between two stalls (default 1)")
    parser.add_argument("--fsync-delay", type=float, default=0.0,
                        help="seconds every fsync waits (default 0)")
    args = parser.parse_args(argv)
    if not args.backing.is_dir():
        parser.error(f"{args.backing} is not a directory")
    os.umask(0)  # the caller's umask comes with each request
    disk = Disk(args.stall, args.stalls, args.gap, args.fsync_delay)
    ops = SlowDisk(os.fsencode(args.backing.resolve()), disk)
    options = set(pyfuse3.default_options) | {"fsname=slowdisk"}
    pyfuse3.init(ops, str(args.mount), options)
    try:
        trio.run(serve, disk)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
