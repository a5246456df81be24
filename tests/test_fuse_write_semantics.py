"""What a shell and a forking program see when they write (fuse_ops.py, "Open files"): errors
reach the caller at the first moment they can, an error belongs to the open file (not to the
descriptor that flushed it), `cmd > file` is atomic, a read handle sees one version, and an
exception in a handler is answered EIO while the mount goes on.

On the real FUSE layer with `FakeNode` (tests/test_fuse_ops.py has the fixture and helpers).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_fuse_ops import NOW, Fd, Mount, fails_with, mnt, sh, write_all

from pmxfs.core.fsop import WriteFile
from pmxfs.core.memdb import MAX_FILE_BYTES

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


def test_a_shell_redirect_shows_the_old_content_until_the_command_is_done(
        mnt: Mount, tmp_path: Path) -> None:
    (mnt / "atom.cfg").write_bytes(b"old content\n")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    command = f"sh -c 'read line < {fifo}; echo new content' > atom.cfg"
    with subprocess.Popen(["sh", "-c", command], cwd=mnt.root, stderr=subprocess.PIPE) as proc:
        try:
            go = _open_fifo_writer(fifo)  # the redirect is in place: the inner shell reads
            assert tree_content(mnt, "atom.cfg") == b"old content\n"
            assert (mnt / "atom.cfg").read_bytes() == b"old content\n"
            os.write(go, b"go\n")
            os.close(go)
            assert proc.wait(DEADLINE_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(DEADLINE_S)
    assert tree_content(mnt, "atom.cfg") == b"new content\n"
    assert (mnt / "atom.cfg").read_bytes() == b"new content\n"


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
