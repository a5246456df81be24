"""A daemon never lets writes land beside the cluster (issue 10 §3), with real daemons and mounts.

* A daemon that dies -- of an exception (here a real one: its database cannot commit because the
  disk is full) or of SIGKILL -- leaves its mount dead: a write into the mount point fails with
  ENOTCONN instead of landing in the directory underneath. The next start takes the dead mount
  away and mounts again.
* The daemon refuses to mount over a non-empty directory, naming what it would hide, and over a
  mount point that is already mounted and answers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cpg_harness import wait_until
from daemon_harness import DaemonCluster, fuse_unavailable, is_mounted, unmount

pytestmark = [pytest.mark.fuse, pytest.mark.root]

EXIT_TIMEOUT_S = 30.0
DATA_FS_BYTES = 4 * 1024 * 1024  # the small file system the data directory lives on
BIG_WRITE_BYTES = 512 * 1024  # more than the database's write-ahead log can take in place
FILL_CHUNK_BYTES = 64 * 1024


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[[int], DaemonCluster]]:
    """Makes clusters of N nodes (not started); each is stopped and unmounted whatever the test
    does."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made: list[DaemonCluster] = []

    def make(count: int) -> DaemonCluster:
        made.append(DaemonCluster(tmp_path, count, first=71))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            c.close()


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[None]:
    """A tmpfs of DATA_FS_BYTES mounted at `path` for the duration; unmounted afterwards."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DATA_FS_BYTES},mode=0700", "tmpfs",
                    str(path)], check=True, capture_output=True, timeout=30)
    try:
        yield
    finally:
        unmount(path)


def fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    chunk = b"\0" * FILL_CHUNK_BYTES

    def write_forever() -> None:
        while True:
            os.write(fd, chunk)

    try:
        fails_with(errno.ENOSPC, write_forever)
    finally:
        os.close(fd)


def fails_with(code: int, action: Callable[[], object]) -> None:
    with pytest.raises(OSError, match=re.escape(os.strerror(code))) as caught:
        action()
    assert caught.value.errno == code


def assert_dead(mount: Path) -> None:
    """The mount is still in the mount table and every access fails with ENOTCONN."""
    assert is_mounted(mount)
    fails_with(errno.ENOTCONN, lambda: (mount / "f").write_text("x\n"))
    fails_with(errno.ENOTCONN, lambda: os.listdir(mount))


def restart_and_stop(cluster: DaemonCluster, name: str) -> None:
    """Start `name` on its dead mount, check its tree, then stop it in order: the directory under
    the mount must be empty -- nothing written while the mount was dead landed there."""
    d = cluster[name]
    cluster.start(name)
    cluster.wait_mounted(name)
    cluster.wait_synced(list(cluster.daemons))
    assert (d.mount / "kept").read_text() == "kept\n"
    assert not (d.mount / "f").exists()
    assert "unmounting the dead mount at" in d.log.read_text()
    assert cluster.stop(name) == 0
    assert not is_mounted(d.mount)
    assert os.listdir(d.mount) == []


def test_a_daemon_that_dies_of_an_error_leaves_a_dead_mount(
        clusters: Callable[[int], DaemonCluster]) -> None:
    """node2's disk fills up, so it cannot commit what node1 writes: it stops with the error (the
    commit runs in its node loop, as for every change that comes from the ring)."""
    cluster = clusters(3)
    m1, d2 = cluster["node1"].mount, cluster["node2"]
    with small_filesystem(d2.data_dir):
        cluster.start_all()
        (m1 / "kept").write_text("kept\n")
        wait_until(lambda: (d2.mount / "kept").exists(), EXIT_TIMEOUT_S, "node2 to have it")
        fill(d2.data_dir / "filler")
        (m1 / "big").write_bytes(b"x" * BIG_WRITE_BYTES)
        assert d2.proc is not None
        assert d2.proc.wait(EXIT_TIMEOUT_S) == 1, d2.log_tail()
        log = d2.log.read_text()
        assert "stopped by an error: DatabaseError" in log, log
        assert "cannot commit" in log, log
        assert f"leaving {d2.mount} mounted but dead" in log
        assert_dead(d2.mount)
        (d2.data_dir / "filler").unlink()
        restart_and_stop(cluster, "node2")
    assert (m1 / "big").stat().st_size == BIG_WRITE_BYTES


def test_sigkill_leaves_a_dead_mount_and_the_next_start_recovers_it(
        clusters: Callable[[int], DaemonCluster]) -> None:
    cluster = clusters(1)
    d = cluster["node1"]
    cluster.start("node1")
    cluster.wait_mounted("node1")
    (d.mount / "kept").write_text("kept\n")
    cluster.kill("node1")
    assert_dead(d.mount)
    restart_and_stop(cluster, "node1")


def start_refused(cluster: DaemonCluster) -> subprocess.CompletedProcess[str]:
    d = cluster["node1"]
    result = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    return result


def test_refuses_to_mount_over_a_non_empty_directory(
        clusters: Callable[[int], DaemonCluster]) -> None:
    cluster = clusters(1)
    mount = cluster["node1"].mount
    for name in ("b.conf", "a.conf", "c", "d"):
        (mount / name).write_text(f"{name}\n")
    result = start_refused(cluster)
    assert result.stderr == (f"pmxfs: mount point {mount} is not empty: mounting would hide "
                             "'a.conf', 'b.conf', 'c' and 1 more; move them away first\n")
    assert not is_mounted(mount)
    assert sorted(os.listdir(mount)) == ["a.conf", "b.conf", "c", "d"]
    assert (mount / "a.conf").read_text() == "a.conf\n"


def test_a_dead_mount_over_a_non_empty_directory_is_taken_away_then_refused(
        clusters: Callable[[int], DaemonCluster], tmp_path: Path) -> None:
    cluster = clusters(1)
    d = cluster["node1"]
    cluster.start("node1")
    cluster.wait_mounted("node1")
    cluster.kill("node1")
    assert_dead(d.mount)
    view = tmp_path / "view"  # a bind mount without submounts shows what the dead mount covers
    view.mkdir()
    subprocess.run(["mount", "--bind", str(d.home), str(view)], check=True, timeout=30)
    try:
        (view / "mnt" / "underneath").write_text("x\n")
    finally:
        unmount(view)
    result = start_refused(cluster)
    assert result.stderr.endswith(f"pmxfs: mount point {d.mount} is not empty: mounting would "
                                  "hide 'underneath'; move them away first\n")
    assert result.stderr.count("pmxfs: ") == 1
    assert not is_mounted(d.mount)
    assert os.listdir(d.mount) == ["underneath"]


def test_refuses_a_mount_point_that_is_mounted_and_answers(
        clusters: Callable[[int], DaemonCluster]) -> None:
    cluster = clusters(1)
    mount = cluster["node1"].mount
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "other", str(mount)], check=True,
                   timeout=30)
    try:
        result = start_refused(cluster)
        assert result.stderr == (f"pmxfs: {mount} is already mounted (other, type tmpfs) and "
                                 "answers; stop what serves it first\n")
        assert is_mounted(mount)
    finally:
        unmount(mount)
