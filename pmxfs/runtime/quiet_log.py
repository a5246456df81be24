"""Log a refusal once per source and window, so that a client hammering a service cannot flood
the log (the refusal itself is answered every time). Used by the join service and qnetd."""

from __future__ import annotations

from collections import OrderedDict

MAX_SOURCES = 1024  # sources remembered at most (the oldest are forgotten first)


class QuietSources:
    """Which sources were logged recently, and until when to stay quiet about each."""

    def __init__(self, max_sources: int = MAX_SOURCES) -> None:
        self._quiet_until: OrderedDict[str, float] = OrderedDict()
        self._max_sources = max_sources

    def should_log(self, source: str, now: float, wait: float) -> bool:
        """Whether to log about `source` at `now` (monotonic seconds); if so, stay quiet about
        it for `wait` seconds."""
        if self._quiet_until.get(source, 0.0) > now:
            return False
        self._quiet_until[source] = now + wait
        self._quiet_until.move_to_end(source)
        while len(self._quiet_until) > self._max_sources:
            self._quiet_until.popitem(last=False)
        return True
