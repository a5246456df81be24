"""The FUSE layer (pmxfs/runtime/fuse_ops.py) on a real mount, driven with os calls and shell tools.

`FakeNode` owns a real `MemDB` and applies every operation at once (EACCES while not quorate), calls
the invalidator like the real node does, and records the operations, so a test can check both what
the file system shows and what it sent. Each test mounts `PmxfsOperations` on its own temporary
directory; `pyfuse3.main()` and `run_invalidations` run under trio in a background thread. Whatever
touches the fake or the operations from the test goes through that thread's trio token
(`Mount.call`, `Mount.settle`).

Every wait is bounded: the mount must be up within a deadline, subprocesses have timeouts, and a
watchdog aborts the FUSE connection (the /dev/fuse descriptor is replaced by /dev/null, so blocked
calls fail instead of hanging) if a test takes too long. The fixture unmounts and joins the thread
whatever happens. The tests skip with a reason without root or /dev/fuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyfuse3
import pytest
import trio

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
from pmxfs.core.memdb import MAX_ENTRIES, MAX_FILE_BYTES, MAX_TOTAL_BYTES, MemDB
from pmxfs.core.replica import Reply
from pmxfs.core.status import render_debug
from pmxfs.runtime.fuse_ops import FIXED_INODE_BASE, MOUNT_OPTIONS, PmxfsOperations
from pmxfs.runtime.node_api import Invalidator

pytestmark = [pytest.mark.fuse, pytest.mark.root]

T = TypeVar("T")

GID = 33  # www-data on Debian
NOW = 1_700_000_000
MOUNT_TIMEOUT_S = 10.0
TEST_DEADLINE_S = 120.0
MIB = 1 << 20


def corosync_conf(version: int, name: str = "lab") -> bytes:
    return f"""\
nodelist {{
  node {{
    name: node1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 10.0.0.1
  }}
}}

quorum {{
  provider: corosync_votequorum
}}

totem {{
  cluster_name: {name}
  config_version: {version}
  interface {{
    linknumber: 0
  }}
  ip_version: ipv4-6
  link_mode: passive
  secauth: on
  version: 2
}}
""".encode()


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mounts with allow_other need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None and shutil.which("umount") is None:
        return "neither fusermount3 nor umount is installed"
    return None


# ------------------------------------------------------------------------------- the fake node


@dataclass
class FakeNode:
    """An FsNode that applies every operation to its own MemDB at once."""

    node_name: str = "node1"
    memdb: MemDB = field(default_factory=MemDB)
    is_quorate: bool = True
    debug: bool = False
    ops: list[FsOp] = field(default_factory=list)
    virtual: dict[str, bytes] = field(default_factory=lambda: {
        ".members": b'{"nodename": "node1", "version": 1}\n',
        ".vmlist": b'{"version": 1, "ids": {}}\n',
        ".version": b'{"starttime": 1}\n',
        ".clusterlog": b'{"data": []}\n',
        ".rrd": b"",
    })
    invalidator: Invalidator | None = None
    write_delay_s: float = 0.0  # a slow cluster: each write is decided this long after it is sent

    def quorate(self) -> bool:
        return self.is_quorate

    async def write(self, op: FsOp) -> Reply:
        self.ops.append(op)
        await trio.sleep(self.write_delay_s)
        if not self.is_quorate:
            return Reply(0, errno.EACCES)
        result = self.memdb.apply(op, 1)
        if result.ok and self.invalidator is not None:
            self.invalidator(result.paths, False)
        return Reply(0, result.errno)

    def virtual_file(self, name: str) -> bytes:
        return render_debug(self.debug) if name == ".debug" else self.virtual[name]

    def set_debug(self, enabled: bool) -> None:
        self.debug = enabled

    def wall_seconds(self) -> int:
        return NOW

    def set_invalidator(self, invalidator: Invalidator) -> None:
        self.invalidator = invalidator

    def remote(self, op: FsOp) -> tuple[str, ...]:
        """Apply an operation of another node (writer 2) without calling the invalidator;
        the paths memdb says it touched."""
        result = self.memdb.apply(op, 2)
        assert result.ok, (op, result.errno)
        return result.paths


def initial_tree() -> MemDB:
    db = MemDB()
    for path in ("nodes", "nodes/node1", "nodes/node1/qemu-server", "nodes/node1/lxc",
                 "nodes/node1/openvz", "nodes/node1/priv", "priv", "priv/lock"):
        assert db.apply(Mkdir(path, NOW - 100), 1).ok
    assert db.apply(WriteFile("corosync.conf", corosync_conf(3), NOW - 100, create=True), 1).ok
    return db


# ----------------------------------------------------------------------------------- the mount


@dataclass
class Mount:
    root: Path
    node: FakeNode
    ops: PmxfsOperations
    token: trio.lowlevel.TrioToken

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the trio thread that serves the mount."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def settle(self) -> None:
        """Wait until the kernel got every invalidation queued so far."""
        trio.from_thread.run(self.ops.invalidations_settled, trio_token=self.token)

    def op_count(self) -> int:
        return self.call(lambda: len(self.node.ops))

    def ops_since(self, start: int) -> list[FsOp]:
        return self.call(lambda: self.node.ops[start:])

    def remote(self, op: FsOp, *, tell_kernel: bool = True) -> None:
        """Apply `op` as if it came from another node; with tell_kernel, the node's invalidator
        runs for it (as the real node does) and we wait until the kernel got the notices."""
        paths = self.call(lambda: self.node.remote(op))
        if tell_kernel:
            self.invalidate(paths)

    def invalidate(self, paths: tuple[str, ...], everything: bool = False) -> None:
        def run() -> None:
            assert self.node.invalidator is not None
            self.node.invalidator(paths, everything)
        self.call(run)
        self.settle()

    def set_quorate(self, quorate: bool) -> None:
        def run() -> None:
            self.node.is_quorate = quorate
        self.call(run)
        self.invalidate((), everything=True)


def _serve(node: FakeNode, mountpoint: Path, up: threading.Event,
           box: dict[str, object]) -> None:
    """The FUSE thread: mount, run pyfuse3.main() and the invalidation task, clean up."""
    try:
        ops = PmxfsOperations(node, gid=GID)
        pyfuse3.init(ops, str(mountpoint), set(MOUNT_OPTIONS))
    except BaseException as exc:
        box["error"] = exc
        up.set()
        return

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        box["ops"] = ops
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.run_invalidations)
            up.set()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:
        box["error"] = exc
    finally:
        pyfuse3.close(unmount=False)
        up.set()


def _unmount(path: Path) -> bool:
    """Unmount as a user would; False when that did not work (a file is still open)."""
    if not _is_mounted(path):
        return True
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    subprocess.run([*tool, str(path)], capture_output=True, timeout=30, check=False)
    return not _is_mounted(path)


def _is_mounted(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return True  # ENOTCONN: a dead FUSE mount is still a mount


def _terminate(token: trio.lowlevel.TrioToken) -> None:
    """Ask the FUSE thread to end pyfuse3.main() (it then closes /dev/fuse, which aborts the
    connection). Never waits: the trio loop may be the thing that is stuck."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(pyfuse3.terminate)


def _abort_fuse_connection(token: trio.lowlevel.TrioToken) -> None:
    """Watchdog: make every blocked call on the mount fail (ENOTCONN) instead of hanging, by
    replacing this process's /dev/fuse descriptor with /dev/null (the number stays valid for
    pyfuse3's own close), and end pyfuse3.main()."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                    os.dup2(null, int(name))
    finally:
        os.close(null)
    _terminate(token)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / "mnt"
    root.mkdir()
    node = FakeNode(memdb=initial_tree())
    up = threading.Event()
    box: dict[str, object] = {}
    thread = threading.Thread(target=_serve, args=(node, root, up, box), daemon=True)
    thread.start()
    token: trio.lowlevel.TrioToken | None = None
    watchdog: threading.Timer | None = None
    try:
        assert up.wait(MOUNT_TIMEOUT_S), "the FUSE thread did not come up"
        if "error" in box:
            raise AssertionError(f"mounting failed: {box['error']!r}")
        ops, started = box["ops"], box["token"]
        assert isinstance(ops, PmxfsOperations)
        assert isinstance(started, trio.lowlevel.TrioToken)
        token = started
        watchdog = threading.Timer(TEST_DEADLINE_S, _abort_fuse_connection, args=(token,))
        watchdog.start()
        yield Mount(root, node, ops, token)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        clean = _unmount(root)
        thread.join(MOUNT_TIMEOUT_S)
        if thread.is_alive() and token is not None:
            _terminate(token)
            thread.join(MOUNT_TIMEOUT_S)
        if _is_mounted(root):
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30,
                           check=False)
        assert not thread.is_alive(), "the FUSE thread did not stop"
        assert clean, "the mount was busy at the end of the test (a file left open?)"
    if "error" in box:
        raise AssertionError(f"the FUSE thread failed: {box['error']!r}")


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def fails_with(code: int, fn: Callable[[], object]) -> None:
    with pytest.raises(OSError, match=re.escape(os.strerror(code))) as caught:
        fn()
    assert caught.value.errno == code, (os.strerror(caught.value.errno or 0), os.strerror(code))


def link_refused() -> str:
    """What an OSError of link(2) on a file system without link says: pmxcfs's and our ENOSYS,
    which newer kernels turn into EPERM."""
    return "|".join(re.escape(os.strerror(code)) for code in (errno.ENOSYS, errno.EPERM))


def perm(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Fd:
    """An open file descriptor that a `with` block closes unless the test closed it (to see the
    error of close) -- so a failing assertion cannot leave a file open on the mount."""

    def __init__(self, path: Path, flags: int) -> None:
        self.fd = os.open(path, flags)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self.close()


# ------------------------------------------------------------------------ layout and attributes


def test_root_layout_symlinks_virtual_files_and_modes(mnt: Mount) -> None:
    names = os.listdir(mnt.root)
    assert names == sorted(names)
    assert set(names) == {"corosync.conf", "nodes", "priv", "local", "qemu-server", "lxc",
                          "openvz", ".members", ".vmlist", ".version", ".clusterlog", ".debug",
                          ".rrd"}
    for name, target in (("local", "nodes/node1"), ("qemu-server", "nodes/node1/qemu-server"),
                         ("lxc", "nodes/node1/lxc"), ("openvz", "nodes/node1/openvz")):
        st = os.lstat(mnt / name)
        assert stat.S_ISLNK(st.st_mode)
        assert perm(mnt / name) == 0o755
        assert os.readlink(mnt / name) == target
        assert st.st_ino >= FIXED_INODE_BASE
        assert st.st_size == len(target)
    assert (mnt / "local").resolve() == (mnt / "nodes/node1").resolve()
    for name in (".members", ".vmlist", ".version", ".clusterlog"):
        assert perm(mnt / name) == 0o440
        assert (mnt / name).read_bytes() == mnt.node.virtual[name]
    assert perm(mnt / ".debug") == 0o640
    assert (mnt / "nodes").stat().st_nlink == 2
    assert perm(mnt / "nodes") == 0o755
    assert perm(mnt / "priv") == 0o700
    assert perm(mnt / "nodes/node1/priv") == 0o700
    assert perm(mnt / "priv/lock") == 0o700
    (mnt / "a.cfg").write_bytes(b"x" * 1000)
    (mnt / "priv/secret").write_bytes(b"s")
    (mnt / "nodes/node1/priv/key").write_bytes(b"k")
    st = os.stat(mnt / "a.cfg")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, GID)
    assert (st.st_size, st.st_nlink, st.st_blocks, int(st.st_mtime)) == (1000, 1, 2, NOW)
    assert perm(mnt / "priv/secret") == 0o600
    assert perm(mnt / "nodes/node1/priv/key") == 0o600
    entry = mnt.call(lambda: mnt.node.memdb.lookup("a.cfg"))
    assert entry is not None
    assert st.st_ino == entry.inode + 1
    assert os.stat(mnt.root).st_ino == pyfuse3.ROOT_INODE
    listing = sh("ls -la", mnt.root).stdout
    assert any(line.startswith("lrwxr-xr-x") and "local -> nodes/node1" in line
               for line in listing.splitlines())
    assert any(line.startswith("-r--r-----") and ".members" in line
               for line in listing.splitlines())
    assert any(line.startswith("-rw-r-----") and "a.cfg" in line
               for line in listing.splitlines())


def test_statfs_reports_the_real_limits(mnt: Mount) -> None:
    before = os.statvfs(mnt.root)
    (mnt / "big").write_bytes(b"b" * (64 * 4096))
    after = os.statvfs(mnt.root)
    assert (after.f_bsize, after.f_frsize, after.f_namemax) == (4096, 4096, 255)
    assert after.f_blocks == MAX_TOTAL_BYTES // 4096
    assert after.f_files == MAX_ENTRIES
    assert before.f_bfree - after.f_bfree == 64
    assert after.f_bavail == after.f_bfree
    assert before.f_ffree - after.f_ffree == 1
    count = mnt.call(lambda: mnt.node.memdb.entry_count)
    assert after.f_ffree == MAX_ENTRIES - count


# ----------------------------------------------------------------------- writes and open files


def test_close_to_open_a_reader_sees_the_old_content_until_close(mnt: Mount) -> None:
    f = mnt / "file.cfg"
    assert sh("echo old > file.cfg", mnt.root).returncode == 0
    assert f.read_text() == "old\n"  # now in the page cache
    with Fd(f, os.O_RDONLY) as reader:
        start = mnt.op_count()
        with Fd(f, os.O_WRONLY | os.O_TRUNC) as writer:
            write_all(writer.fd, b"the new ")
            write_all(writer.fd, b"content\n")
            assert f.read_text() == "old\n"
            assert os.stat(f).st_size == 4
            assert os.pread(reader.fd, 100, 0) == b"old\n"
            assert mnt.ops_since(start) == []
            writer.close()
        assert mnt.ops_since(start) == [WriteFile("file.cfg", b"the new content\n", NOW)]
        assert f.read_text() == "the new content\n"
        assert os.stat(f).st_size == 16


def test_read_on_a_write_handle_sees_its_buffer_and_sparse_writes_fill_zeros(mnt: Mount) -> None:
    f = mnt / "sparse"
    f.write_bytes(b"abc")
    with Fd(f, os.O_RDWR) as h:
        os.pwrite(h.fd, b"Z", 6)
        assert os.pread(h.fd, 100, 0) == b"abc\0\0\0Z"
        os.pwrite(h.fd, b"B", 1)
        assert os.pread(h.fd, 2, 0) == b"aB"
        assert f.read_bytes() == b"abc"
        h.close()
    assert f.read_bytes() == b"aBc\0\0\0Z"


def test_o_trunc_without_a_write_empties_the_file_at_close(mnt: Mount) -> None:
    f = mnt / "t"
    f.write_bytes(b"content")
    start = mnt.op_count()
    with Fd(f, os.O_WRONLY | os.O_TRUNC) as h:
        assert f.read_bytes() == b"content"
        h.close()
    # The truncation goes out at the release, which close() does not wait for; an open on this
    # node waits for it, so read first.
    assert f.read_bytes() == b""
    assert f.stat().st_size == 0
    assert mnt.ops_since(start) == [WriteFile("t", b"", NOW)]


def test_open_without_writes_sends_nothing(mnt: Mount) -> None:
    f = mnt / "quiet"
    f.write_bytes(b"q")
    start = mnt.op_count()
    os.close(os.open(f, os.O_RDWR))
    os.close(os.open(mnt / "new", os.O_WRONLY | os.O_CREAT))
    # A new file without content is created at its release, which close() does not wait
    # for; an open on this node waits for it, so read first.
    assert (mnt / "new").read_bytes() == b""
    assert f.read_bytes() == b"q"
    assert mnt.ops_since(start) == [CreateFile("new", NOW)]


def test_o_append_and_o_excl(mnt: Mount) -> None:
    f = mnt / "log"
    f.write_bytes(b"one\n")
    with Fd(f, os.O_WRONLY | os.O_APPEND) as h:
        os.pwrite(h.fd, b"two\n", 0)  # the offset does not matter with O_APPEND
        write_all(h.fd, b"three\n")
        h.close()
    assert f.read_bytes() == b"one\ntwo\nthree\n"
    assert sh("echo four >> log", mnt.root).returncode == 0
    assert f.read_bytes() == b"one\ntwo\nthree\nfour\n"
    fails_with(errno.EEXIST, lambda: os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    start = mnt.op_count()
    os.close(os.open(mnt / "fresh", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    assert mnt.ops_since(start) == [CreateFile("fresh", NOW, exclusive=True)]


def test_efbig_at_the_crossing_write_and_nothing_committed(mnt: Mount) -> None:
    f = mnt / "big"
    f.write_bytes(b"keep me")
    with Fd(f, os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"x" * (MIB - 1))
        write_all(h.fd, b"y")  # exactly 1 MiB is allowed
        fails_with(errno.EFBIG, lambda: os.write(h.fd, b"z"))
        fails_with(errno.EFBIG, lambda: os.write(h.fd, b"z"))  # the handle stays poisoned
        fails_with(errno.EFBIG, h.close)
    assert f.read_bytes() == b"keep me"
    with Fd(f, os.O_WRONLY | os.O_TRUNC) as h:
        fails_with(errno.EFBIG, lambda: write_all(h.fd, b"w" * (MIB + 1)))
        fails_with(errno.EFBIG, h.close)
    assert f.read_bytes() == b"keep me"
    with open(f, "wb") as out:
        out.write(b"m" * MIB)
    assert f.stat().st_size == MAX_FILE_BYTES


def test_truncate_with_and_without_a_handle(mnt: Mount) -> None:
    f = mnt / "tr"
    f.write_bytes(b"0123456789")
    start = mnt.op_count()
    os.truncate(f, 4)
    assert mnt.ops_since(start) == [Truncate("tr", 4, NOW)]
    assert f.read_bytes() == b"0123"
    assert f.stat().st_size == 4
    with Fd(f, os.O_RDWR) as h:
        os.ftruncate(h.fd, 2)
        assert os.pread(h.fd, 10, 0) == b"01"
        os.ftruncate(h.fd, 6)
        assert os.pread(h.fd, 10, 0) == b"01\0\0\0\0"
        assert f.read_bytes() == b"0123"
        fails_with(errno.EFBIG, lambda: os.ftruncate(h.fd, MIB + 1))
        h.close()
    assert f.read_bytes() == b"01\0\0\0\0"
    fails_with(errno.EFBIG, lambda: os.truncate(f, MIB + 1))


# ---------------------------------------------------------------------------- rename and remove


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_semantics(mnt: Mount) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    assert sh("mv a b", mnt.root).returncode == 0
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"
    (mnt / "c").write_bytes(b"C")
    fails_with(errno.EEXIST, lambda: renameat2(mnt / "c", mnt / "b", RENAME_NOREPLACE))
    fails_with(errno.EINVAL, lambda: renameat2(mnt / "c", mnt / "b", RENAME_EXCHANGE))
    renameat2(mnt / "c", mnt / "d", RENAME_NOREPLACE)
    assert (mnt / "d").read_bytes() == b"C"
    os.makedirs(mnt / "full/sub")
    os.mkdir(mnt / "empty")
    fails_with(errno.ENOTEMPTY, lambda: os.rename(mnt / "full", mnt / "moved"))
    os.rename(mnt / "empty", mnt / "moved")
    assert (mnt / "moved").is_dir()
    assert not (mnt / "empty").exists()
    fails_with(errno.EACCES, lambda: os.rename(mnt / "local", mnt / "x"))
    fails_with(errno.EACCES, lambda: os.rename(mnt / ".members", mnt / "x"))
    fails_with(errno.EACCES, lambda: os.rename(mnt / "d", mnt / ".vmlist"))
    os.mkdir(mnt / "priv/lock/held")
    fails_with(errno.EACCES, lambda: os.rename(mnt / "priv/lock/held", mnt / "priv/x"))


def test_a_write_handle_follows_a_rename(mnt: Mount) -> None:
    (mnt / "before").write_bytes(b"1")
    with Fd(mnt / "before", os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"2")
        os.rename(mnt / "before", mnt / "after")
        h.close()
    assert (mnt / "after").read_bytes() == b"2"
    assert not (mnt / "before").exists()


def test_a_write_to_an_unlinked_file_fails_at_close(mnt: Mount) -> None:
    (mnt / "gone").write_bytes(b"1")
    with Fd(mnt / "gone", os.O_WRONLY) as h:
        write_all(h.fd, b"2")
        os.unlink(mnt / "gone")
        fails_with(errno.ENOENT, h.close)
    assert not (mnt / "gone").exists()


def test_an_unlinked_file_stays_readable_through_an_open_handle(mnt: Mount) -> None:
    (mnt / "r").write_bytes(b"still here")
    with open(mnt / "r", "rb") as reader:
        os.unlink(mnt / "r")
        assert reader.read() == b"still here"


def test_fixed_entries_cannot_be_removed_and_special_files_cannot_be_made(mnt: Mount) -> None:
    for name in ("local", "qemu-server", ".members", ".debug"):
        fails_with(errno.EACCES, lambda n=name: os.unlink(mnt / n))  # type: ignore[misc]
    (mnt / "f").write_bytes(b"f")
    fails_with(errno.ENOSYS, lambda: os.symlink("f", mnt / "link"))  # as pmxcfs
    with pytest.raises(OSError, match=link_refused()) as caught:
        os.link(mnt / "f", mnt / "hard")
    assert caught.value.errno in (errno.ENOSYS, errno.EPERM)
    fails_with(errno.ENOSYS, lambda: os.mkfifo(mnt / "fifo"))
    fails_with(errno.EOPNOTSUPP, lambda: os.getxattr(mnt / "f", "user.x"))
    fails_with(errno.EOPNOTSUPP, lambda: os.setxattr(mnt / "f", "user.x", b"1"))
    fails_with(errno.EOPNOTSUPP, lambda: os.listxattr(mnt / "f"))
    fails_with(errno.EEXIST, lambda: os.mkdir(mnt / ".members"))


# ------------------------------------------------------------------------------- chmod, chown


def test_chmod_and_chown_succeed_only_as_no_ops(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"f")
    (mnt / "priv/p").write_bytes(b"p")
    os.mkdir(mnt / "d")
    start = mnt.op_count()
    os.chmod(mnt / "f", 0o640)
    os.chmod(mnt / "priv/p", 0o600)
    os.chmod(mnt / "d", 0o640)  # pmxcfs's rule: the file mode of the path, directories too
    os.chmod(mnt / "priv/lock", 0o600)
    os.chmod(mnt / ".members", 0o640)
    os.chmod(mnt / ".debug", 0o640)
    os.chown(mnt / "f", 0, GID)
    os.chown(mnt / "d", -1, GID)
    assert mnt.ops_since(start) == []
    for path, mode in (("f", 0o644), ("f", 0o600), ("priv/p", 0o640), ("d", 0o700),
                       ("d", 0o755), ("priv/lock", 0o700), (".members", 0o440),
                       (".debug", 0o600)):
        fails_with(errno.EPERM, lambda p=path, m=mode: os.chmod(mnt / p, m))  # type: ignore[misc]
    fails_with(errno.EPERM, lambda: os.chown(mnt / "f", 1000, -1))
    fails_with(errno.EPERM, lambda: os.chown(mnt / "f", -1, 0))
    assert perm(mnt / "f") == 0o640
    assert os.stat(mnt / "f").st_gid == GID


# ---------------------------------------------------------------------------------- no quorum


def test_without_quorum_writes_fail_with_eacces_and_modes_lose_write_bits(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"before")
    (mnt / "priv/p").write_bytes(b"p")
    mnt.set_quorate(False)
    assert perm(mnt / "f") == 0o440
    assert perm(mnt / "nodes") == 0o555
    assert perm(mnt / "priv/p") == 0o400
    assert perm(mnt / "priv") == 0o500
    assert perm(mnt / "local") == 0o555
    assert perm(mnt / ".members") == 0o440
    assert perm(mnt / ".debug") == 0o640
    assert sh("ls -l", mnt.root).stdout.count("lr-xr-xr-x") == 4
    for path in ("f", "priv/p"):
        for flags in (os.O_WRONLY | os.O_TRUNC, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
                      os.O_WRONLY, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
            fails_with(errno.EACCES, lambda p=path, f=flags: os.open(mnt / p, f))  # type: ignore[misc]
    assert (mnt / "f").read_bytes() == b"before"
    fails_with(errno.EACCES, lambda: os.open(mnt / "new", os.O_WRONLY | os.O_CREAT))
    fails_with(errno.EACCES, lambda: os.mkdir(mnt / "dir"))
    fails_with(errno.EACCES, lambda: os.unlink(mnt / "f"))
    fails_with(errno.EACCES, lambda: os.rename(mnt / "f", mnt / "g"))
    fails_with(errno.EACCES, lambda: os.truncate(mnt / "f", 0))
    fails_with(errno.EACCES, lambda: os.utime(mnt / "f", (1, 1)))
    assert sh("echo 1 > .debug", mnt.root).returncode == 0  # this node's own setting
    assert mnt.call(lambda: mnt.node.debug) is True
    result = sh("cp /etc/hostname f", mnt.root)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert (mnt / "f").read_bytes() == b"before"
    assert (mnt / "priv/p").read_bytes() == b"p"
    mnt.set_quorate(True)
    assert perm(mnt / "f") == 0o640
    assert perm(mnt / "local") == 0o755
    (mnt / "f").write_bytes(b"after")
    assert (mnt / "f").read_bytes() == b"after"


# ------------------------------------------------------------------------------ virtual files


def test_virtual_files_are_read_only_except_debug(mnt: Mount) -> None:
    fails_with(errno.EACCES, lambda: open(mnt / ".members", "wb"))  # noqa: SIM115
    fails_with(errno.EACCES, lambda: open(mnt / ".vmlist", "ab"))  # noqa: SIM115
    assert (mnt / ".debug").read_bytes() == b"0\n"
    assert sh("echo 1 > .debug", mnt.root).returncode == 0
    assert mnt.call(lambda: mnt.node.debug) is True
    assert (mnt / ".debug").read_bytes() == b"1\n"
    with Fd(mnt / ".debug", os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"yes\n")
        fails_with(errno.EINVAL, h.close)
    assert mnt.call(lambda: mnt.node.debug) is True
    (mnt / ".debug").write_bytes(b"0")
    assert mnt.call(lambda: mnt.node.debug) is False
    with Fd(mnt / ".debug", os.O_WRONLY) as h:
        write_all(h.fd, b"junk")
        os.ftruncate(h.fd, 0)
        os.pwrite(h.fd, b"1\n", 0)
        h.close()
    assert mnt.call(lambda: mnt.node.debug) is True
    os.truncate(mnt / ".debug", 0)
    assert mnt.call(lambda: mnt.node.debug) is True
    fails_with(errno.EACCES, lambda: os.truncate(mnt / ".members", 0))
    fails_with(errno.EACCES, lambda: os.utime(mnt / ".members", (1, 1)))


def test_virtual_content_changes_show_at_once(mnt: Mount) -> None:
    assert (mnt / ".version").read_bytes() == b'{"starttime": 1}\n'
    longer = b'{"starttime": 1, "corosync.conf": 2}\n'

    def change() -> None:
        mnt.node.virtual[".version"] = longer
    mnt.call(change)
    assert (mnt / ".version").read_bytes() == longer
    assert (mnt / ".version").stat().st_size == len(longer)
    assert sh("cat .version", mnt.root).stdout.encode() == longer


# ---------------------------------------------------------------------------------- lock times


def test_utime_on_locks_and_files(mnt: Mount) -> None:
    lock = mnt / "priv/lock/backup"
    os.mkdir(lock)
    start = mnt.op_count()
    fails_with(errno.EACCES, lambda: os.utime(lock, (0, 0)))  # as pmxcfs, after the request
    os.utime(lock, (0, NOW + 5))
    os.utime(mnt / "corosync.conf", (7, 1234))
    assert mnt.ops_since(start) == [UnlockRequest("priv/lock/backup"),
                                    SetMtime("priv/lock/backup", 0),
                                    SetMtime("priv/lock/backup", NOW + 5),
                                    SetMtime("corosync.conf", 1234)]
    assert int(lock.stat().st_mtime) == NOW + 5
    assert int((mnt / "corosync.conf").stat().st_mtime) == 1234
    start = mnt.op_count()
    assert sh("touch corosync.conf", mnt.root).returncode == 0
    [op] = mnt.ops_since(start)
    assert isinstance(op, SetMtime)
    assert op.path == "corosync.conf"
    assert op.mtime > 1234
    fails_with(errno.EEXIST, lambda: os.mkdir(lock))
    os.rmdir(lock)
    assert not lock.exists()


# ------------------------------------------------------------------------------ corosync.conf


def test_corosync_conf_writes_are_validated_at_close(mnt: Mount, tmp_path: Path) -> None:
    conf = mnt / "corosync.conf"
    same_version = tmp_path / "same.conf"
    same_version.write_bytes(corosync_conf(3, name="other"))
    result = sh(f"cp {same_version} corosync.conf", mnt.root)
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr
    assert conf.read_bytes() == corosync_conf(3)
    newer = tmp_path / "newer.conf"
    newer.write_bytes(corosync_conf(4))
    assert sh(f"cp {newer} corosync.conf", mnt.root).returncode == 0
    assert conf.read_bytes() == corosync_conf(4)
    result = sh("sed -i 's/config_version: 4/config_version: 5/' corosync.conf", mnt.root)
    assert result.returncode == 0, result.stderr
    assert conf.read_bytes() == corosync_conf(5)
    result = sh("sed -i 's/config_version: 5/config_version: 1/' corosync.conf", mnt.root)
    assert result.returncode != 0
    assert conf.read_bytes() == corosync_conf(5)
    os.unlink(conf)
    fails_with(errno.EINVAL, lambda: open(conf, "wb"))  # noqa: SIM115
    (mnt / "corosync.conf.new").write_bytes(corosync_conf(6))
    os.rename(mnt / "corosync.conf.new", conf)
    assert conf.read_bytes() == corosync_conf(6)


# -------------------------------------------------------------------------------- shell tools


def test_shell_tools(mnt: Mount, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "x.cfg").write_text("x = 1\n")
    (source / "y.cfg").write_text("y = 2\n")
    for command in (f"cp -r {source} copied", "mkdir -p a/b/c",
                    "echo hello > a/b/c/h.txt", "sed -i 's/hello/bye/' a/b/c/h.txt",
                    "mv a/b/c/h.txt qemu-server/100.conf", "cat local/qemu-server/100.conf",
                    "ls -l copied copied/sub"):
        result = sh(command, mnt.root)
        assert result.returncode == 0, (command, result.stderr)
    assert (mnt / "copied/sub/x.cfg").read_text() == "x = 1\n"
    assert (mnt / "copied/y.cfg").read_text() == "y = 2\n"
    assert (mnt / "nodes/node1/qemu-server/100.conf").read_text() == "bye\n"
    assert sh("cat qemu-server/100.conf", mnt.root).stdout == "bye\n"
    vm = mnt.call(lambda: mnt.node.memdb.vmlist())
    assert list(vm) == [100]
    assert vm[100].node == "node1"
    assert not list((mnt / "a/b/c").iterdir())
    assert sh("rm -r a copied", mnt.root).returncode == 0
    assert not (mnt / "a").exists()
    assert not (mnt / "copied").exists()
    assert mnt.call(lambda: mnt.node.memdb.lookup("copied")) is None


# ------------------------------------------------------------------------------- invalidation


def test_remote_changes_show_after_the_invalidator_ran(mnt: Mount) -> None:
    f = mnt / "shared.cfg"
    f.write_bytes(b"one")
    assert f.read_bytes() == b"one"
    assert f.stat().st_size == 3
    with Fd(f, os.O_RDONLY) as reader:
        assert os.pread(reader.fd, 100, 0) == b"one"
        mnt.remote(WriteFile("shared.cfg", b"second version", NOW + 1), tell_kernel=False)
        assert os.pread(reader.fd, 100, 0) == b"one", "a read handle keeps its version"
        mnt.invalidate(("shared.cfg", ""))
        assert f.stat().st_size == 14
        assert int(f.stat().st_mtime) == NOW + 1
        assert f.read_bytes() == b"second version"
        assert os.pread(reader.fd, 100, 0) == b"one", "a read handle keeps its version"


def test_an_open_sees_a_remote_change_even_before_the_invalidation(mnt: Mount) -> None:
    """The kernel still caches the old pages and attributes, and the change has the same size
    and mtime, so nothing but the FUSE layer's own check at open can tell."""
    f = mnt / "early.cfg"
    f.write_bytes(b"aaaa")
    assert f.read_bytes() == b"aaaa"
    mnt.remote(WriteFile("early.cfg", b"bbbb", NOW), tell_kernel=False)
    assert f.read_bytes() == b"bbbb"
    mnt.remote(WriteFile("early.cfg", b"cccccccc", NOW), tell_kernel=False)
    assert f.read_bytes() == b"cccccccc"
    mnt.remote(WriteFile("early.cfg", b"d", NOW), tell_kernel=False)
    with Fd(f, os.O_RDONLY) as reader:
        assert os.pread(reader.fd, 100, 0) == b"d"
        assert os.fstat(reader.fd).st_size == 1


def test_remote_rename_and_delete_drop_the_kernels_entries(mnt: Mount) -> None:
    (mnt / "x").write_bytes(b"x")
    (mnt / "gone").write_bytes(b"g")
    os.mkdir(mnt / "dir")
    assert (mnt / "x").exists()
    assert (mnt / "gone").exists()
    assert (mnt / "dir").is_dir()
    with Fd(mnt / "dir", os.O_RDONLY | os.O_DIRECTORY) as cwd:
        mnt.remote(Rename("x", "y", NOW))
        mnt.remote(Unlink("gone"))
        mnt.remote(WriteFile("dir/inside", b"i", NOW, create=True))
        assert not (mnt / "x").exists()
        assert (mnt / "y").read_bytes() == b"x"
        assert not (mnt / "gone").exists()
        (mnt / "gone").write_bytes(b"new")  # no stale entry in the way
        assert (mnt / "gone").read_bytes() == b"new"
        assert os.listdir(cwd.fd) == ["inside"]
        mnt.remote(Unlink("dir/inside"))
        mnt.remote(Mkdir("dir/sub", NOW))
        assert os.listdir(cwd.fd) == ["sub"]
        mnt.remote(Rmdir("dir/sub"))
        mnt.remote(Rmdir("dir"))
        assert not (mnt / "dir").exists()
        fails_with(errno.ENOENT, lambda: os.fstat(cwd.fd))  # a stale inode


def test_a_listing_hands_out_the_current_attributes(mnt: Mount) -> None:
    os.mkdir(mnt / "d")
    (mnt / "d/f").write_bytes(b"abc")
    for _ in range(2):  # the second listing reuses the attributes made for the first
        with os.scandir(mnt / "d") as entries:
            assert [(e.name, e.stat().st_size) for e in entries] == [("f", 3)]
    mnt.remote(WriteFile("d/f", b"0123456789", NOW + 1))
    with os.scandir(mnt / "d") as entries:
        assert [(e.name, e.stat().st_size) for e in entries] == [("f", 10)]
    mnt.set_quorate(False)
    with os.scandir(mnt / "d") as entries:
        assert [stat.S_IMODE(e.stat().st_mode) for e in entries] == [0o440]
    assert perm(mnt / "d/f") == 0o440
    mnt.set_quorate(True)
    assert perm(mnt / "d/f") == 0o640


def test_a_large_directory_is_listed_over_several_readdir_calls(mnt: Mount) -> None:
    names = [f"{index:04d}-{'n' * 200}" for index in range(300)]

    def fill() -> None:
        for name in names:
            assert mnt.node.memdb.apply(Mkdir(f"nodes/{name}", NOW), 2).ok
    mnt.call(fill)
    assert os.listdir(mnt / "nodes") == sorted([*names, "node1"])


def test_a_replaced_tree_is_seen_after_everything_is_invalidated(mnt: Mount) -> None:
    (mnt / "file").write_bytes(b"old file")
    os.mkdir(mnt / "keep")
    (mnt / "keep/k").write_bytes(b"k")
    with Fd(mnt / "keep", os.O_RDONLY | os.O_DIRECTORY) as old_keep:
        assert (mnt / "file").is_file()
        assert (mnt / "keep/k").read_bytes() == b"k"
        old_inode = os.stat(mnt / "file").st_ino

        def resync() -> None:
            db = MemDB()
            for index in range(20):  # the rows below get other inode numbers than before
                assert db.apply(Mkdir(f"pad{index}", NOW), 2).ok
            assert db.apply(Mkdir("file", NOW), 2).ok  # a directory now
            assert db.apply(Mkdir("keep", NOW), 2).ok
            assert db.apply(WriteFile("keep/k", b"new k", NOW, create=True), 2).ok
            mnt.node.memdb = db

        mnt.call(resync)
        mnt.invalidate((), everything=True)
        assert (mnt / "file").is_dir()
        assert os.stat(mnt / "file").st_ino != old_inode
        assert (mnt / "keep/k").read_bytes() == b"new k"
        assert sorted(os.listdir(mnt / "keep")) == ["k"]
        fails_with(errno.ESTALE, lambda: os.listdir(old_keep.fd))  # its number is pad10's now
