"""The daemon's log (runtime/log_setup.py): a flood of identical messages is one line and a
count; levels reach the journal as syslog prefixes only when stderr is the journal stream."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator

import pytest

from pmxfs.runtime.log_setup import (
    JournalFormatter,
    PlainFormatter,
    RepeatLimitedHandler,
    stderr_is_journal,
    syslog_priority,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, Clock, RepeatLimitedHandler]]:
    out, clock = io.StringIO(), Clock()
    handler = RepeatLimitedHandler(out, window=30.0, clock=clock)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("pmxfs.test-rate-limit")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, out, clock, handler
    finally:
        logger.removeHandler(handler)


def test_a_flood_of_refusals_is_one_line_and_a_count(logged: tuple[
        logging.Logger, io.StringIO, Clock, RepeatLimitedHandler]) -> None:
    logger, out, clock, _ = logged
    for i in range(5000):  # a client retrying a refused write through a quorum loss
        clock.now = i * 0.001
        logger.warning("refused a write to %s: not quorate", "qemu-server/100.conf")
    assert out.getvalue() == "WARNING refused a write to qemu-server/100.conf: not quorate\n"
    clock.now = 31.0
    logger.info("quorum: quorate")  # the next line, after the window: the summary first
    assert out.getvalue().splitlines()[1:] == [
        "WARNING ... last message repeated 4999 times: refused a write to "
        "qemu-server/100.conf: not quorate",
        "INFO quorum: quorate"]


def test_a_flood_that_stops_is_summarised_when_its_window_ends(logged: tuple[
        logging.Logger, io.StringIO, Clock, RepeatLimitedHandler]) -> None:
    logger, out, clock, handler = logged
    for _ in range(3):
        logger.warning("refused")
    clock.now = 29.0
    handler.summarise_due()  # the window is not over: nothing yet
    assert out.getvalue().splitlines() == ["WARNING refused"]
    clock.now = 30.0
    handler.summarise_due()  # as the timer does, with no later line
    assert out.getvalue().splitlines() == [
        "WARNING refused", "WARNING ... last message repeated 2 times: refused"]


def test_the_timer_writes_the_summary_without_a_later_line() -> None:
    out = io.StringIO()
    handler = RepeatLimitedHandler(out, window=0.05)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("pmxfs.test-rate-limit-timer")
    logger.propagate = False
    logger.addHandler(handler)
    handler.start_timer()
    try:
        logger.warning("refused")
        logger.warning("refused")
        deadline = time.monotonic() + 10
        while "repeated 1 times" not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        handler.flush_repeats()
    assert out.getvalue().splitlines() == ["refused", "... last message repeated 1 times: refused"]


def test_different_messages_pass_and_a_window_ends(logged: tuple[
        logging.Logger, io.StringIO, Clock, RepeatLimitedHandler]) -> None:
    logger, out, clock, handler = logged
    logger.warning("a")
    logger.warning("b")
    logger.error("a")  # another level: another message
    logger.warning("a")
    clock.now = 30.0
    logger.warning("a")  # its window is over: summary, then the line again
    logger.warning("a")
    handler.flush_repeats()
    assert out.getvalue().splitlines() == [
        "WARNING a", "WARNING b", "ERROR a",
        "WARNING ... last message repeated 1 times: a", "WARNING a",
        "WARNING ... last message repeated 1 times: a"]


def test_the_tracked_messages_are_bounded() -> None:
    out = io.StringIO()
    handler = RepeatLimitedHandler(out, clock=Clock(), max_tracked=2)
    record = logging.makeLogRecord
    for text in ("x", "x", "y", "z", "x"):
        handler.emit(record({"msg": text, "levelno": logging.INFO, "levelname": "INFO"}))
    assert out.getvalue().splitlines() == [
        "x", "y", "... last message repeated 1 times: x", "z", "x"]


def test_syslog_prefixes_for_the_journal() -> None:
    record = logging.makeLogRecord({"msg": "one\ntwo", "levelno": logging.WARNING,
                                    "levelname": "WARNING"})
    assert JournalFormatter("%(message)s").format(record) == "<4>one\n<4>two"
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]
    plain = PlainFormatter().format(record)
    assert ": WARNING one" in plain
    assert " pmxfs[" in plain


def test_the_journal_is_recognised_by_device_and_inode() -> None:
    with tempfile.TemporaryFile("w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stderr_is_journal(stream, {})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
