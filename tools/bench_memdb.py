"""Throughput of the tree and of its database: `MemDB.apply` and SQLite group commit, 1 KiB writes.

* apply, overwrite: `WriteFile` of 1 KiB onto one existing file, again and again (CPU only).
* apply, create: `WriteFile(create=True)` of 1 KiB new files, 1000 per directory. The tree holds
  at most 128 MiB, so every CREATE_CAP files the bench starts over with a new tree (untimed).
* commit, batch of B (1, 10, 100): B overwrites of 1 KiB (of 1000 files, round robin) applied by
  memdb (untimed), then the B `Persist`s committed with one `Database.commit_many`: one SQLite
  transaction and one WAL fsync (synchronous=FULL), as the replica commits a batch of deliveries.
  Reports ops/s and ms per commit (= per transaction). The database lives in a new directory
  under --dir, on disk (default /var/tmp: /tmp and /dev/shm may be in memory, where an fsync
  costs nothing), removed at the end.
* the disk: 4 KiB appends, each fdatasync'ed -- the floor under the cost of one commit, so the
  commit figures can be read against the machine they were taken on.

Each figure runs for --seconds of wall time. Prints one JSON line, then a table.

    python tools/bench_memdb.py [--seconds 2] [--dir /var/tmp] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pmxfs.core.fsop import Mkdir, WriteFile
from pmxfs.core.memdb import MemDB
from pmxfs.core.persist import Persist
from pmxfs.runtime.database import Database

PAYLOAD = bytes(range(256)) * 4  # 1 KiB
WRITER = 1
MTIME = 1_714_564_800
FILES_PER_DIR = 1000
CREATE_CAP = 100_000  # files per tree in the create bench: 100 MiB, under the 128 MiB limit
COMMIT_FILES = 1000
BATCH_SIZES = (1, 10, 100)


def _ok(tree: MemDB, op: WriteFile | Mkdir) -> Persist:
    result = tree.apply(op, WRITER)
    if not result.ok:
        raise SystemExit(f"bench_memdb: {op!r} failed with errno {result.errno}")
    return Persist(result.version, result.upserts, result.removed)


def bench_overwrite(seconds: float) -> dict[str, float]:
    tree = MemDB()
    _ok(tree, WriteFile("f", PAYLOAD, MTIME, create=True))
    ops = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(1000):
            _ok(tree, WriteFile("f", PAYLOAD, MTIME))
        ops += 1000
    return {"ops": ops, "seconds": round(elapsed, 3), "ops_per_second": round(ops / elapsed)}


def bench_create(seconds: float) -> dict[str, float]:
    ops = 0
    timed = 0.0
    while timed < seconds:
        tree = MemDB()  # a fresh tree (untimed) every CREATE_CAP files
        for i in range(CREATE_CAP // FILES_PER_DIR):
            _ok(tree, Mkdir(f"d{i}", MTIME))
        created = 0
        while created < CREATE_CAP and timed < seconds:
            start = time.perf_counter()
            for i in range(created, created + FILES_PER_DIR):
                _ok(tree, WriteFile(f"d{i // FILES_PER_DIR}/f{i}", PAYLOAD, MTIME, create=True))
            timed += time.perf_counter() - start
            created += FILES_PER_DIR
            ops += FILES_PER_DIR
    return {"ops": ops, "seconds": round(timed, 3), "ops_per_second": round(ops / timed)}


def bench_commit(directory: Path, batch: int, seconds: float) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="bench_memdb.", dir=directory))
    try:
        with Database.open(data) as db:
            tree = MemDB()
            db.commit_many([_ok(tree, WriteFile(f"f{i}", PAYLOAD, MTIME, create=True))
                            for i in range(COMMIT_FILES)])
            ops = commits = 0
            timed = 0.0
            while timed < seconds:
                persists = [_ok(tree, WriteFile(f"f{(ops + i) % COMMIT_FILES}", PAYLOAD, MTIME))
                            for i in range(batch)]
                start = time.perf_counter()
                db.commit_many(persists)
                timed += time.perf_counter() - start
                ops += batch
                commits += 1
    finally:
        shutil.rmtree(data)
    return {"batch": batch, "ops": ops, "commits": commits, "seconds": round(timed, 3),
            "ops_per_second": round(ops / timed), "ms_per_commit": round(timed / commits * 1e3, 3)}


def bench_fdatasync(directory: Path, seconds: float) -> dict[str, float]:
    """The disk's own pace: 4 KiB appended and fdatasync'ed, again and again (context for the
    commit figures: a commit costs at least one of these)."""
    fd, name = tempfile.mkstemp(prefix="bench_memdb.", dir=directory)
    try:
        syncs = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            os.write(fd, bytes(4096))
            os.fdatasync(fd)
            syncs += 1
    finally:
        os.close(fd)
        os.unlink(name)
    return {"syncs": syncs, "seconds": round(elapsed, 3),
            "ms_per_sync": round(elapsed / syncs * 1e3, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="wall seconds per figure")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the database goes (on disk; default /var/tmp)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    overwrite = bench_overwrite(args.seconds)
    create = bench_create(args.seconds)
    commits = [bench_commit(args.dir, b, args.seconds) for b in BATCH_SIZES]
    disk = bench_fdatasync(args.dir, args.seconds)
    print(json.dumps({"benchmark": "memdb", "dir": str(args.dir), "seconds": args.seconds,
                      "results": {"apply_overwrite_1k": overwrite, "apply_create_1k": create,
                                  "commit_1k": commits, "fdatasync_4k": disk}}))
    if not args.json_only:
        print(f"\n{'figure':<40} {'ops/s':>10} {'ms/commit':>10}")
        print(f"{'MemDB.apply WriteFile 1 KiB, overwrite':<40} {overwrite['ops_per_second']:>10,}")
        print(f"{'MemDB.apply WriteFile 1 KiB, create':<40} {create['ops_per_second']:>10,}")
        for r in commits:
            label = f"commit 1 KiB writes, batch of {r['batch']}"
            print(f"{label:<40} {r['ops_per_second']:>10,} {r['ms_per_commit']:>10}")
        print(f"\nthe disk under {args.dir}: {disk['ms_per_sync']} ms per 4 KiB fdatasync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
