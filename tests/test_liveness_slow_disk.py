"""Liveness under a slow disk (issue 12), with real processes: node3's data directory is a FUSE
pass-through whose fsyncs stall (tools/slowdisk.py; the kernel here has no device-mapper, so no
dm-delay), while node1 and node2 write. The ring must keep its membership, the writes complete
once the disk catches up, and every acknowledged write is on every node afterwards, in its mount
and in its config.db.

CI runs the short form (one 5 s stall, three files from each of two writers);
PMXFS_LIVENESS_FULL=1 (or tools/liveness.py) runs the full one. A first test checks that the
slow disk itself carries what the daemon's SQLite needs, and that a stall really holds fsyncs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path

import pytest
from cpg_harness import wait_until
from daemon_harness import fuse_unavailable
from liveness_harness import (
    SLOW_DISK_CI,
    SLOW_DISK_FULL,
    SlowDiskMount,
    SlowDiskPlan,
    run_slow_disk,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

FULL = os.environ.get("PMXFS_LIVENESS_FULL") == "1"


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)


def test_slow_disk_carries_sqlite_wal(tmp_path: Path) -> None:
    """Two connections in WAL mode (the -shm file shared by mmap), a checkpoint, a hard link and
    a rename as the daemon's durable files use them, an exclusive flock; then a stall holds the
    next commit's fsync and the commit still lands."""
    disk = SlowDiskMount(tmp_path / "backing", tmp_path / "mnt", SlowDiskPlan(stall_s=1.0))
    try:
        db_path = disk.mount / "t.db"
        with (contextlib.closing(sqlite3.connect(db_path)) as writer,
              contextlib.closing(sqlite3.connect(db_path)) as reader):
            assert writer.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
            writer.execute("PRAGMA synchronous = FULL")
            writer.execute("CREATE TABLE t (k INTEGER, v BLOB)")
            for k in range(50):
                with writer:
                    writer.execute("INSERT INTO t VALUES (?, ?)", (k, os.urandom(300)))
                assert reader.execute("SELECT count(*) FROM t").fetchone() == (k + 1,)
            assert writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            disk.stall()
            wait_until(lambda: any(e.get("event") == "stall" for e in disk.proc.events()),
                       10, "the stall")
            with writer:
                writer.execute("INSERT INTO t VALUES (50, x'00')")
            assert reader.execute("SELECT count(*) FROM t").fetchone() == (51,)
            assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert disk.held_fsyncs() >= 1
        tmp = disk.mount / "tmp.1"
        tmp.write_bytes(b"seq\n")
        os.link(tmp, disk.mount / "linked")
        os.unlink(tmp)
        os.rename(disk.mount / "linked", disk.mount / "final")
        assert (disk.mount / "final").read_bytes() == b"seq\n"
        assert (tmp_path / "backing" / "final").read_bytes() == b"seq\n"
        assert sorted(os.listdir(disk.mount)) == sorted(os.listdir(tmp_path / "backing"))
        with open(disk.mount / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        disk.close()


@pytest.mark.slow
def test_ring_survives_a_stalled_disk(tmp_path: Path) -> None:
    report = run_slow_disk(tmp_path, SLOW_DISK_FULL if FULL else SLOW_DISK_CI)
    details = report.describe()
    assert report.held_fsyncs >= 1, f"the stall held no fsync of node3\n{details}"
    assert report.ring_changes() == [], f"the ring changed\n{details}"
    deltas = report.counter_deltas()
    assert deltas["token_lost"] == 0, details
    assert deltas["rings_installed"] == 0, details
    assert report.unfinished == 0, details
    assert report.failed_writes() == [], details
    assert report.synced, details
    assert report.lost == [], details
