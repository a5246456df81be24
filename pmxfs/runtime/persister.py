"""The persister: a thread of its own that commits the replica's Persists, off the token's path.

How it works. The trio thread hands each `Persist` over with `submit` (a put on a queue, never a
wait). The persister thread takes whatever is queued when it wakes, commits it in one SQLite
transaction (group commit: one fsync for all of it), and reports the last one done back into the
trio thread with `TrioToken.run_sync_soon` (`on_done(last id, None)`, or `on_done(last id, the
error)` after which it commits nothing more). Persists are committed in the order submitted, so
"done up to id N" covers every earlier one. Each commit is timed (monotonic clock, in the
persister thread) and handed with the report to `on_commit(seconds, Persists in it)` in the trio
thread: the database commit latency of `pmxfs metrics`.

Why a thread of its own rather than `trio.to_thread` per commit: a commit is the only thing it
does, and it does it thousands of times a second under load. Blocking on a queue and waking trio
once per commit costs two wake-ups; a `to_thread` call added its thread-cache bookkeeping and a
scheduled task on each side, and the commit's latency (what every write waits for) was several
times the commit itself.

`stop()` (at the end of the node's run, in the trio thread) lets the thread commit what is still
queued -- a clean stop writes what was delivered, though nobody waits for it any more -- and
joins it. Reports of those last commits may still reach the trio thread; the owner ignores what
arrives after its end.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import trio

from pmxfs.core.persist import Persist
from pmxfs.runtime.database import Database

_STOP = None  # the queue's end marker


class Persister:
    def __init__(self, database: Database,
                 on_done: Callable[[int, Exception | None], None],
                 on_commit: Callable[[float, int], None] | None = None) -> None:
        self._database = database
        self._on_done = on_done
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Persist | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, batch: Persist) -> None:
        self._queue.put(batch)

    def start(self) -> None:
        """Start the thread; called in the trio thread that will receive the reports."""
        self._thread = threading.Thread(target=self._run, name="pmxfs persister", daemon=True,
                                        args=(trio.lowlevel.current_trio_token(),))
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread (see the module header)."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()

    def _run(self, trio_token: trio.lowlevel.TrioToken) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            ending = first is None
            while not ending:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    ending = True
                else:
                    batch.append(item)
            error: Exception | None = None
            if batch:
                started = time.monotonic()
                try:
                    self._database.commit_many(batch)
                except Exception as exc:
                    error = exc
                seconds = time.monotonic() - started
                try:
                    if self._on_commit is not None and error is None:
                        trio_token.run_sync_soon(self._on_commit, seconds, len(batch))
                    trio_token.run_sync_soon(self._on_done, batch[-1].id, error)
                except trio.RunFinishedError:
                    return
            if ending or error is not None:
                return
