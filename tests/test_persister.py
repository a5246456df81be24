"""The persister thread: group commit in order, reports in the trio thread, a failing commit
reported once and nothing committed after it, and a stop that commits what is queued."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from pmxfs.core.entry import Entry, EntryType
from pmxfs.core.persist import Persist
from pmxfs.runtime.database import Database, DatabaseError
from pmxfs.runtime.persister import Persister


def batch(i: int) -> Persist:
    return Persist(version=i, upserts=(Entry(i, 0, i, 1, 1, EntryType.FILE, f"f{i}", b"x"),),
                   id=i)


async def test_commits_in_order_and_reports_in_the_trio_thread(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    reports: list[tuple[int, Exception | None, bool]] = []
    done = trio.Event()
    trio_thread = threading.get_ident()

    def on_done(last_id: int, error: Exception | None) -> None:
        reports.append((last_id, error, threading.get_ident() == trio_thread))
        if last_id == 50:
            done.set()

    persister = Persister(database, on_done)
    persister.start()
    for i in range(1, 51):
        persister.submit(batch(i))
    with trio.fail_after(10):
        await done.wait()
    persister.stop()
    assert [r[0] for r in reports] == sorted(r[0] for r in reports)  # in order
    assert all(error is None and in_trio for _, error, in_trio in reports)
    assert {e.name for e in database.load().entries} >= {f"f{i}" for i in range(1, 51)}
    database.close()


async def test_a_failing_commit_is_reported_and_ends_the_thread(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    calls: list[int] = []

    def full(batches: object) -> None:
        calls.append(1)
        raise DatabaseError(tmp_path / "config.db", ["database or disk is full"])

    database.commit_many = full  # type: ignore[method-assign]
    failed = trio.Event()
    errors: list[Exception | None] = []

    def on_done(last_id: int, error: Exception | None) -> None:
        errors.append(error)
        failed.set()

    persister = Persister(database, on_done)
    persister.start()
    persister.submit(batch(1))
    with trio.fail_after(10):
        await failed.wait()
    persister.submit(batch(2))
    persister.stop()
    assert len(calls) == 1
    assert len(errors) == 1
    assert isinstance(errors[0], DatabaseError)


async def test_stop_commits_what_is_queued(tmp_path: Path) -> None:
    database = Database.open(tmp_path)
    persister = Persister(database, lambda last_id, error: None)
    for i in range(1, 4):  # queued before the thread runs
        persister.submit(batch(i))
    persister.start()
    persister.stop()
    assert {"f1", "f2", "f3"} <= {e.name for e in database.load().entries}
    database.close()
