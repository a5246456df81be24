"""What a shell and a forking program see when they write (fuse_ops.py, "Open files"): errors
reach the caller at the first moment they can, an error belongs to the open file (not to the
descriptor that flushed it), `cmd > file` is atomic, a read handle sees one version, and an
exception in a handler is answered EIO while the mount goes on.

On the real FUSE layer with `FakeNode` (tests/test_fuse_ops.py has the fixture and helpers).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_fuse_ops import (
    NOW,
    RENAME_NOREPLACE,
    Fd,
    Mount,
    fails_with,
    mnt,
    renameat2,
    sh,
    write_all,
)

from pmxfs.core.fsop import CreateFile, FsOp, Mkdir, Rename, Rmdir, Unlink, WriteFile
from pmxfs.core.memdb import MAX_FILE_BYTES, MemDB

pytestmark = [pytest.mark.fuse, pytest.mark.root]
__all__ = ["mnt"]  # the fixture, imported from test_fuse_ops

DEADLINE_S = 30.0


def tree_content(m: Mount, path: str) -> bytes | None:
    """What the replicated tree holds: what every other node reads."""
    entry = m.call(lambda: m.node.memdb.lookup(path))
    return None if entry is None else entry.data


def writes_since(m: Mount, start: int) -> list[WriteFile]:
    return [op for op in m.ops_since(start) if isinstance(op, WriteFile)]


def exit_status_of_child(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# ------------------------------------------------------------------------------- no quorum


def test_without_quorum_shell_redirects_fail_and_say_so(mnt: Mount) -> None:
    (mnt / "app.cfg").write_bytes(b"old\n")
    (mnt / "priv/secret").write_bytes(b"s\n")
    mnt.set_quorate(False)
    start = mnt.call(lambda: len(mnt.node.ops))
    for command in ("echo new > app.cfg", "echo more >> app.cfg", "echo x > priv/secret",
                    "printf x 1<> app.cfg"):
        result = sh(command, mnt.root)
        assert result.returncode != 0, command
        assert "Permission denied" in result.stderr, (command, result.stderr)
    assert sh("cat app.cfg", mnt.root).stdout == "old\n"  # reads keep working
    assert tree_content(mnt, "app.cfg") == b"old\n"
    assert tree_content(mnt, "priv/secret") == b"s\n"
    assert mnt.ops_since(start) == []  # nothing was even sent


def test_quorum_lost_between_open_and_write_fails_the_write_and_the_close(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"before")
    start = mnt.call(lambda: len(mnt.node.ops))
    with Fd(mnt / "f", os.O_WRONLY | os.O_TRUNC) as h:
        mnt.set_quorate(False)
        fails_with(errno.EACCES, lambda: os.write(h.fd, b"after"))
        mnt.set_quorate(True)  # quorum is back before the close: still nothing is written
        fails_with(errno.EACCES, h.close)
    assert tree_content(mnt, "f") == b"before"
    assert writes_since(mnt, start) == []


def test_quorum_lost_between_write_and_close_fails_the_close(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"before")
    with Fd(mnt / "f", os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"after")
        mnt.set_quorate(False)
        fails_with(errno.EACCES, h.close)
    mnt.set_quorate(True)
    assert tree_content(mnt, "f") == b"before"


# ------------------------------------------------------------ the error belongs to the open file


@pytest.mark.parametrize("child_closes", [False, True], ids=["child-exits", "child-closes"])
def test_a_forked_child_closing_first_cannot_make_the_parents_close_succeed(
        mnt: Mount, child_closes: bool) -> None:
    """open(O_TRUNC), write, fork; the child's close sends the flush that is refused; the
    parent's close must report that refusal, not 0 -- and no write lands later."""
    (mnt / "f").write_bytes(b"v2")
    with Fd(mnt / "f", os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"v3")
        mnt.set_quorate(False)
        pid = os.fork()
        if pid == 0:
            code = 0
            if child_closes:
                try:
                    os.close(h.fd)
                    code = 1  # the refused commit must fail this close
                except OSError as exc:
                    code = 0 if exc.errno == errno.EACCES else 2
            os._exit(code)
        assert exit_status_of_child(pid) == 0
        fails_with(errno.EACCES, h.close)
    mnt.set_quorate(True)
    assert tree_content(mnt, "f") == b"v2"


def test_a_dup_closed_first_reports_the_error_to_every_later_close(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"v2")
    with Fd(mnt / "f", os.O_WRONLY | os.O_TRUNC) as h:
        write_all(h.fd, b"v3")
        copy = os.dup(h.fd)
        mnt.set_quorate(False)
        fails_with(errno.EACCES, lambda: os.close(copy))
        mnt.set_quorate(True)
        fails_with(errno.EACCES, lambda: os.fsync(h.fd))
        fails_with(errno.EACCES, lambda: os.write(h.fd, b"more"))
        fails_with(errno.EACCES, h.close)
    assert tree_content(mnt, "f") == b"v2"


def test_a_fork_between_open_trunc_and_the_first_write_publishes_no_empty_file(
        mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"old")
    start = mnt.call(lambda: len(mnt.node.ops))
    with Fd(mnt / "f", os.O_WRONLY | os.O_TRUNC) as h:
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # closes the inherited descriptor: a flush with nothing written
        assert exit_status_of_child(pid) == 0
        assert tree_content(mnt, "f") == b"old"
        assert writes_since(mnt, start) == []
        write_all(h.fd, b"new")
        h.close()
    assert tree_content(mnt, "f") == b"new"
    assert [op.data for op in writes_since(mnt, start)] == [b"new"]


# ------------------------------------------------------------------- `cmd > file` is atomic


def _open_fifo_writer(fifo: Path) -> int:
    """Open the FIFO for writing once its reader (the shell) has opened it."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.01)  # a poll for the shell to reach `read`, bounded by the deadline


@contextlib.contextmanager
def _redirect_in_place(mnt: Mount, tmp_path: Path, name: str) -> Iterator[None]:
    """`echo new content > NAME` in a shell: the body runs while the redirect is in place (the
    file is open, nothing written), then the command writes and exits 0."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    command = f"sh -c 'read line < {fifo}; echo new content' > {name}"
    with subprocess.Popen(["sh", "-c", command], cwd=mnt.root, stderr=subprocess.PIPE) as proc:
        try:
            go = _open_fifo_writer(fifo)  # the redirect is in place: the inner shell reads
            yield
            os.write(go, b"go\n")
            os.close(go)
            assert proc.wait(DEADLINE_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(DEADLINE_S)


def test_a_shell_redirect_shows_the_old_content_until_the_command_is_done(
        mnt: Mount, tmp_path: Path) -> None:
    (mnt / "atom.cfg").write_bytes(b"old content\n")
    with _redirect_in_place(mnt, tmp_path, "atom.cfg"):
        assert tree_content(mnt, "atom.cfg") == b"old content\n"
        assert (mnt / "atom.cfg").read_bytes() == b"old content\n"
    assert tree_content(mnt, "atom.cfg") == b"new content\n"
    assert (mnt / "atom.cfg").read_bytes() == b"new content\n"


def test_a_reader_on_the_same_node_never_sees_a_writer_s_truncation(mnt: Mount) -> None:
    """A writer's open(O_TRUNC) makes the kernel believe the file is empty until it asks again
    (atomic O_TRUNC); readers must still get a whole version. Found by tools/faults.py: with a
    writer and a reader on one file, one read in five came back empty through the page cache."""
    path = mnt / "busy.cfg"
    path.write_bytes(b"v:0")
    stop = time.monotonic() + 5.0
    empty: list[int] = []
    reads = 0

    def write_forever() -> None:
        for i in range(1, 100_000):
            if time.monotonic() > stop:
                return
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                write_all(fd, b"v:%d" % i)
            finally:
                os.close(fd)

    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(write_forever)
        while not writer.done() and reads < 3000:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.read(fd, 100)
            finally:
                os.close(fd)
            reads += 1
            if not data.startswith(b"v:"):
                empty.append(reads)
        stop = 0.0
        writer.result(DEADLINE_S)
    assert reads > 100
    assert empty == [], f"{len(empty)} of {reads} reads saw no whole version"


def test_cat_of_a_too_big_file_keeps_the_old_content(mnt: Mount, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    (mnt / "keep.cfg").write_bytes(b"keep\n")
    result = sh(f"cat {big} > keep.cfg", mnt.root)
    assert result.returncode != 0
    assert "File too large" in result.stderr
    assert tree_content(mnt, "keep.cfg") == b"keep\n"
    assert (mnt / "keep.cfg").read_bytes() == b"keep\n"


def test_an_empty_redirect_still_empties_the_file(mnt: Mount) -> None:
    (mnt / "f").write_bytes(b"something\n")
    result = sh(": > f; cat f; wc -c < f", mnt.root)
    assert result.returncode == 0
    assert result.stdout.split() == ["0"]
    assert tree_content(mnt, "f") == b""


# ------------------------------------------------------------------------------ read handles


def test_a_read_handle_sees_one_version_from_open_to_close(mnt: Mount) -> None:
    size = 300 * 1024  # several FUSE reads
    (mnt / "big.cfg").write_bytes(b"a" * size)
    with Fd(mnt / "big.cfg", os.O_RDONLY) as old:
        first = os.read(old.fd, 4096)
        mnt.remote(WriteFile("big.cfg", b"b" * size, NOW + 1))
        with Fd(mnt / "big.cfg", os.O_RDONLY) as new:
            assert os.read(new.fd, 4096) == b"b" * 4096
            rest = b"".join(iter(lambda: os.read(old.fd, 65536), b""))
            assert first + rest == b"a" * size
            assert os.pread(new.fd, size, 0) == b"b" * size
    assert (mnt / "big.cfg").read_bytes() == b"b" * size


# -------------------------------------------------------------------------------- exceptions


def test_an_exception_in_a_handler_is_answered_eio_and_the_mount_goes_on(
        mnt: Mount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str) -> bytes:
        raise RuntimeError(f"rendering {name} failed")

    monkeypatch.setattr(mnt.node, "virtual_file", broken)
    with caplog.at_level(logging.ERROR, logger="pmxfs.runtime.fuse_ops"):
        fails_with(errno.EIO, lambda: (mnt / ".members").read_bytes())
    assert any("answered EIO" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    (mnt / "after.cfg").write_bytes(b"still serving")
    assert (mnt / "after.cfg").read_bytes() == b"still serving"
    assert (mnt / ".members").read_bytes().startswith(b'{"nodename"')


# ------------------------------------------------------ new files: created by their first commit


def new_file_ops(m: Mount, start: int, *names: str) -> list[FsOp]:
    """What was sent since `start`, once the commits of the files `names` are done (an open
    waits for the commits of its file in flight, also those of a release)."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (m / name).read_bytes()
    return m.ops_since(start)


def in_tree(m: Mount, path: str) -> bool:
    return m.call(lambda: m.node.memdb.lookup(path)) is not None


def test_a_new_file_is_shown_here_at_once_and_replicated_once_with_its_content(
        mnt: Mount) -> None:
    start = mnt.op_count()
    with Fd(mnt / "new.cfg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        assert mnt.ops_since(start) == []
        assert not in_tree(mnt, "new.cfg")  # what every other node reads
        assert "new.cfg" in os.listdir(mnt.root)
        assert os.stat(mnt / "new.cfg").st_size == 0
        assert stat.S_IMODE(os.stat(mnt / "new.cfg").st_mode) == 0o640
        assert (mnt / "new.cfg").read_bytes() == b""  # another open on this node
        with Fd(mnt / "new.cfg", os.O_RDONLY) as reader:
            write_all(h.fd, b"content\n")
            assert tree_content(mnt, "new.cfg") is None
            h.close()
            assert os.read(reader.fd, 100) == b"", "a read handle keeps its version"
    assert mnt.ops_since(start) == [WriteFile("new.cfg", b"content\n", NOW, create=True)]
    assert (mnt / "new.cfg").read_bytes() == b"content\n"
    entry = mnt.call(lambda: mnt.node.memdb.lookup("new.cfg"))
    assert entry is not None
    assert os.stat(mnt / "new.cfg").st_ino == entry.inode + 1
    assert os.listdir(mnt.root).count("new.cfg") == 1


def test_a_shell_redirect_to_a_new_file_publishes_it_with_its_content(
        mnt: Mount, tmp_path: Path) -> None:
    start = mnt.op_count()
    with _redirect_in_place(mnt, tmp_path, "fresh.cfg"):
        assert not in_tree(mnt, "fresh.cfg")
        assert (mnt / "fresh.cfg").read_bytes() == b""
    assert new_file_ops(mnt, start, "fresh.cfg") == [
        WriteFile("fresh.cfg", b"new content\n", NOW, create=True)]
    assert (mnt / "fresh.cfg").read_bytes() == b"new content\n"


def test_a_new_file_without_content_is_created_at_the_last_close(mnt: Mount) -> None:
    start = mnt.op_count()
    assert sh(": > empty; cat empty; : >> appended", mnt.root).returncode == 0
    assert new_file_ops(mnt, start, "empty", "appended") == [
        WriteFile("empty", b"", NOW, create=True), CreateFile("appended", NOW)]
    assert tree_content(mnt, "empty") == b""
    assert tree_content(mnt, "appended") == b""


def test_what_open_refused_it_still_refuses_and_sends_nothing(mnt: Mount) -> None:
    os.mkdir(mnt / "d")
    (mnt / "d/f").write_bytes(b"f")
    assert (mnt / "d/f").exists()  # the kernel holds d: the next create reaches the handler
    mnt.remote(Unlink("d/f"))
    mnt.remote(Rmdir("d"), tell_kernel=False)
    start = mnt.op_count()
    create = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fails_with(errno.ENOENT, lambda: os.open(mnt / "d/new", create))  # its directory is gone
    fails_with(errno.ENAMETOOLONG, lambda: os.open(mnt / ("n" * 256), create))
    fails_with(errno.EINVAL, lambda: os.open(os.fsencode(mnt.root) + b"/\xff", create))
    os.unlink(mnt / "corosync.conf")
    start = mnt.op_count()
    fails_with(errno.EINVAL, lambda: os.open(mnt / "corosync.conf", create))  # empty: invalid
    assert mnt.ops_since(start) == []
    mnt.set_quorate(False)
    fails_with(errno.EACCES, lambda: os.open(mnt / "new", create))
    mnt.set_quorate(True)
    assert mnt.ops_since(start) == []
    assert not (mnt / "new").exists()


def test_a_guest_config_and_o_excl_are_still_created_at_open(mnt: Mount) -> None:
    mnt.remote(Mkdir("nodes/node2", NOW))
    mnt.remote(Mkdir("nodes/node2/lxc", NOW))
    mnt.remote(WriteFile("nodes/node2/lxc/100.conf", b"x", NOW, create=True))
    start = mnt.op_count()
    fails_with(errno.EEXIST, lambda: os.open(mnt / "qemu-server/100.conf",
                                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
    with Fd(mnt / "qemu-server/101.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        assert in_tree(mnt, "nodes/node1/qemu-server/101.conf")  # the VMID is taken at open
        write_all(h.fd, b"memory: 512\n")
        h.close()
    with Fd(mnt / "lock.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL) as h:
        assert in_tree(mnt, "lock.tmp")
        h.close()
    assert new_file_ops(mnt, start, "lock.tmp") == [
        CreateFile("nodes/node1/qemu-server/100.conf", NOW),
        CreateFile("nodes/node1/qemu-server/101.conf", NOW),
        WriteFile("nodes/node1/qemu-server/101.conf", b"memory: 512\n", NOW),
        CreateFile("lock.tmp", NOW, exclusive=True)]


def test_unlinking_a_new_file_sends_nothing(mnt: Mount) -> None:
    start = mnt.op_count()
    with Fd(mnt / "gone", os.O_WRONLY | os.O_CREAT) as h:
        write_all(h.fd, b"never seen")
        os.unlink(mnt / "gone")
        assert not (mnt / "gone").exists()
        fails_with(errno.ENOENT, h.close)  # as for any file unlinked while written
    with Fd(mnt / "quiet", os.O_WRONLY | os.O_CREAT):
        os.unlink(mnt / "quiet")
    assert new_file_ops(mnt, start, "gone", "quiet") == []
    assert "gone" not in os.listdir(mnt.root)


def test_removing_an_empty_new_file_right_after_its_close_removes_it(mnt: Mount) -> None:
    """The release publishes an empty new file and the kernel does not wait for it: an unlink
    or a rename onto the name that comes while that create is in flight must wait for it and
    then act on the tree, not take the file for unpublished, answer 0 and let the create land
    (found by test_hostile_property under load)."""
    def slow(delay: float) -> None:
        mnt.node.write_delay_s = delay
    os.mkdir(mnt / "d")
    (mnt / "d/src").write_bytes(b"src\n")
    mnt.call(lambda: slow(0.3))
    try:
        start = mnt.op_count()
        os.close(os.open(mnt / "d/gone", os.O_WRONLY | os.O_CREAT))
        os.unlink(mnt / "d/gone")
        os.close(os.open(mnt / "d/dst", os.O_WRONLY | os.O_CREAT))
        os.rename(mnt / "d/src", mnt / "d/dst")
    finally:
        mnt.call(lambda: slow(0.0))
    assert mnt.ops_since(start) == [CreateFile("d/gone", NOW), Unlink("d/gone"),
                                    CreateFile("d/dst", NOW), Rename("d/src", "d/dst", NOW)]
    assert not in_tree(mnt, "d/gone")
    assert tree_content(mnt, "d/dst") == b"src\n"
    assert sorted(os.listdir(mnt / "d")) == ["dst"]


def test_renaming_a_new_file_creates_it_first(mnt: Mount) -> None:
    start = mnt.op_count()
    with Fd(mnt / "a.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        write_all(h.fd, b"data")
        os.rename(mnt / "a.tmp", mnt / "a.cfg")
        h.close()
    assert new_file_ops(mnt, start, "a.cfg") == [
        CreateFile("a.tmp", NOW), Rename("a.tmp", "a.cfg", NOW), WriteFile("a.cfg", b"data", NOW)]
    assert (mnt / "a.cfg").read_bytes() == b"data"
    with Fd(mnt / "b.tmp", os.O_WRONLY | os.O_CREAT):
        fails_with(errno.EEXIST, lambda: renameat2(mnt / "b.tmp", mnt / "a.cfg",
                                                   RENAME_NOREPLACE))
    with Fd(mnt / "c.tmp", os.O_WRONLY | os.O_CREAT) as h:
        os.rename(mnt / "a.cfg", mnt / "c.tmp")  # a rename onto a new file replaces it
        assert (mnt / "c.tmp").read_bytes() == b"data"
        write_all(h.fd, b"lost")
        fails_with(errno.ENOENT, h.close)
    assert (mnt / "c.tmp").read_bytes() == b"data"


def test_two_opens_of_a_new_file(mnt: Mount) -> None:
    start = mnt.op_count()
    with Fd(mnt / "two", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as creator:
        with Fd(mnt / "two", os.O_WRONLY) as second:
            write_all(second.fd, b"second")
            second.close()
        assert tree_content(mnt, "two") == b"second"
        write_all(creator.fd, b"first")
        creator.close()
    assert new_file_ops(mnt, start, "two") == [
        WriteFile("two", b"second", NOW, create=True), WriteFile("two", b"first", NOW)]
    with Fd(mnt / "three", os.O_WRONLY | os.O_CREAT) as creator:
        with Fd(mnt / "three", os.O_RDWR):
            pass
        creator.close()
    assert (mnt / "three").read_bytes() == b""


def test_a_new_file_whose_creation_fails_disappears(mnt: Mount) -> None:
    with Fd(mnt / "q", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        write_all(h.fd, b"x")
        mnt.set_quorate(False)
        fails_with(errno.EACCES, h.close)
        assert not (mnt / "q").exists()
    mnt.set_quorate(True)
    with Fd(mnt / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        fails_with(errno.EFBIG, lambda: write_all(h.fd, b"b" * (MAX_FILE_BYTES + 1)))
        assert not (mnt / "big").exists()  # nothing can create it any more
        fails_with(errno.EFBIG, h.close)
    assert not in_tree(mnt, "q")
    assert not in_tree(mnt, "big")


def test_another_node_making_the_same_name_meanwhile(mnt: Mount) -> None:
    with Fd(mnt / "same", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        mnt.remote(WriteFile("same", b"theirs", NOW, create=True))
        assert (mnt / "same").read_bytes() == b"", "this node shows its own new file"
        write_all(h.fd, b"ours")
        h.close()
    assert tree_content(mnt, "same") == b"ours"  # as if created at open: the last write wins
    with Fd(mnt / "dir", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        mnt.remote(Mkdir("dir", NOW))
        write_all(h.fd, b"x")
        fails_with(errno.EISDIR, h.close)
    assert (mnt / "dir").is_dir()
    os.mkdir(mnt / "parent")
    with Fd(mnt / "parent/child", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        mnt.remote(Rmdir("parent"))
        write_all(h.fd, b"x")
        fails_with(errno.ENOENT, h.close)
    assert not (mnt / "parent").exists()


def test_touch_and_truncate_by_path_create_a_new_file_at_once(mnt: Mount) -> None:
    start = mnt.op_count()
    assert sh("touch touched", mnt.root).returncode == 0
    [touched] = mnt.ops_since(start)  # its utime (now, by the test's clock) is the creation
    assert isinstance(touched, CreateFile)
    assert touched.path == "touched"
    with Fd(mnt / "cut", os.O_WRONLY | os.O_CREAT):
        os.truncate(mnt / "cut", 3)
        assert tree_content(mnt, "cut") == b"\0\0\0"
    with Fd(mnt / "stamped", os.O_WRONLY | os.O_CREAT):
        os.utime(mnt / "stamped", (5, 1234))
        assert int(os.stat(mnt / "stamped").st_mtime) == 1234
    assert new_file_ops(mnt, start, "touched", "cut", "stamped") == [
        touched, WriteFile("cut", b"\0\0\0", NOW, create=True), CreateFile("stamped", 1234)]


def test_a_new_file_keeps_its_directory_busy(mnt: Mount) -> None:
    os.mkdir(mnt / "d")
    with Fd(mnt / "d/new", os.O_WRONLY | os.O_CREAT):
        fails_with(errno.ENOTEMPTY, lambda: os.rmdir(mnt / "d"))
        fails_with(errno.EEXIST, lambda: os.mkdir(mnt / "d/new"))
        os.mkdir(mnt / "e")
        fails_with(errno.ENOTEMPTY, lambda: os.rename(mnt / "e", mnt / "d"))
        os.rename(mnt / "d", mnt / "moved")  # the tree's directory is empty: it moves
        assert os.listdir(mnt / "moved") == ["new"]
    assert os.listdir(mnt / "moved") == ["new"]
    assert in_tree(mnt, "moved/new")


def test_a_new_file_follows_its_directory_through_a_sync(mnt: Mount) -> None:
    os.mkdir(mnt / "d")
    with Fd(mnt / "d/new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as h:
        def resync() -> None:
            db = MemDB()
            for index in range(5):  # "d" gets another inode number than before
                assert db.apply(Mkdir(f"pad{index}", NOW), 2).ok
            assert db.apply(Mkdir("d", NOW), 2).ok
            mnt.node.memdb = db

        mnt.call(resync)
        mnt.invalidate((), everything=True)
        assert os.listdir(mnt / "d") == ["new"]
        write_all(h.fd, b"after the sync")
        h.close()
    assert tree_content(mnt, "d/new") == b"after the sync"
