"""The daemon's log: one line per event with its level, repeats rate-limited, levels for journald.

How it works. `install(debug=...)` gives the root logger one `RepeatLimitedHandler` on stderr
(the daemon's and qnetd's).
The handler passes the first of a run of identical messages (same logger, level and text) and
counts the ones that follow within `REPEAT_WINDOW_S`; they are not written. When the window of a
message is over, its next occurrence, any later line or the handler's timer (a thread that
looks every half window, started by `install`) -- whichever comes first -- writes one summary
line "... last message repeated N times: <text>"; so a flood that stops is still counted within
a window, not at the next line, which may come hours later. So a client retrying a
refused write through a quorum loss, or any per-request line, costs a line per window, never
one per request, and the count says how many there were. At most `MAX_TRACKED` distinct
messages are remembered (the oldest is summarised and forgotten first); `flush_repeats()` (at
the end of the daemon) stops the timer and writes the summaries still owed.

Levels. Under systemd, stderr is a journal stream (`$JOURNAL_STREAM` names its device and inode,
and they match stderr's): each line then starts with a syslog priority `<N>` (3 error, 4
warning, 6 info, 7 debug, 2 critical), which journald takes as the entry's level and strips, and
carries no timestamp (the journal has its own). Elsewhere a line is
`time pmxfs[pid]: LEVEL message` (the level word only for warnings and worse). Continuation lines
of a message (a traceback) get the same prefix, so they reach the journal at the same level.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

REPEAT_WINDOW_S = 30.0
MAX_TRACKED = 256

SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                   logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (the nearest level at or below it)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


def stderr_is_journal(stream: TextIO | None = None,
                      environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` (stderr) is the journal stream $JOURNAL_STREAM names."""
    env = os.environ if environ is None else environ
    wanted = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = wanted.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """`<N>message` on every line of the record (module header)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class PlainFormatter(logging.Formatter):
    """`time program[pid]: LEVEL message` (the level word for warnings and worse)."""

    def __init__(self, program: str = "pmxfs") -> None:
        super().__init__(f"%(asctime)s {program}[%(process)d]: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.levelno < logging.WARNING:
            return text
        head, sep, message = text.partition(": ")
        return f"{head}{sep}{record.levelname} {message}"


@dataclass
class _Run:
    record: logging.LogRecord  # the first of the run (the one written)
    until: float  # the end of its window
    repeats: int = 0  # not written since


class RepeatLimitedHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes a run of identical messages as one line and a count
    (module header). `clock` is monotonic seconds (injected by tests)."""

    def __init__(self, stream: TextIO | None = None, *, window: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        super().__init__(stream)
        self.window = window
        self.clock = clock
        self.max_tracked = max_tracked
        self._runs: OrderedDict[tuple[str, int, str], _Run] = OrderedDict()
        self._timer: threading.Thread | None = None
        self._stop_timer = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        try:
            key = (record.name, record.levelno, record.getMessage())
        except Exception:
            self.handleError(record)
            return
        self._summarise_due(now)
        run = self._runs.get(key)
        if run is not None:  # within its window (a due one was summarised and dropped)
            run.repeats += 1
            return
        self._runs[key] = _Run(record, now + self.window)
        while len(self._runs) > self.max_tracked:
            self._summarise(self._runs.popitem(last=False)[1])
        super().emit(record)

    def start_timer(self) -> None:
        """Write due summaries every half window from a thread of its own (module header)."""
        self._timer = threading.Thread(target=self._summarise_periodically,
                                       name="pmxfs log summaries", daemon=True)
        self._timer.start()

    def summarise_due(self) -> None:
        """Write the summaries of the runs whose window is over."""
        self.acquire()
        try:
            self._summarise_due(self.clock())
        finally:
            self.release()

    def flush_repeats(self) -> None:
        """Stop the timer and write every summary still owed (at the end of the daemon)."""
        self._stop_timer.set()
        if self._timer is not None:
            self._timer.join()
        self.acquire()
        try:
            while self._runs:
                self._summarise(self._runs.popitem(last=False)[1])
        finally:
            self.release()
        self.flush()

    def _summarise_periodically(self) -> None:
        while not self._stop_timer.wait(self.window / 2):
            self.summarise_due()

    def _summarise_due(self, now: float) -> None:
        """Runs are kept in the order they began, and every window is as long: the due ones
        are at the front."""
        while self._runs:
            key, run = next(iter(self._runs.items()))
            if run.until > now:
                return
            del self._runs[key]
            self._summarise(run)

    def _summarise(self, run: _Run) -> None:
        if not run.repeats:
            return
        first = run.record
        summary = logging.LogRecord(
            first.name, first.levelno, first.pathname, first.lineno,
            "... last message repeated %d times: %s", (run.repeats, first.getMessage()), None)
        super().emit(summary)


def install(*, debug: bool, stream: TextIO | None = None,
            program: str = "pmxfs") -> RepeatLimitedHandler:
    """The log of the daemon (or of qnetd: `program` "pmxfs-qnetd") on `stream` (stderr) as
    the module header says; returns the handler, whose `flush_repeats` the caller owes."""
    out = stream or sys.stderr
    handler = RepeatLimitedHandler(out)
    handler.setFormatter(JournalFormatter("%(message)s") if stderr_is_journal(out)
                         else PlainFormatter(program))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler.start_timer()
    return handler
