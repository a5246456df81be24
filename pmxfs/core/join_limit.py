"""How often a join may fail before the join service stops listening to a source -- pure.

A join token's secret has 256 bits, so guessing is hopeless; the limit is there so that a
scanner or a broken script cannot make a member spend CPU on TLS and tree lookups, nor fill its
log, without end. `FailureLimiter` counts failed attempts in a sliding window of `window_s`
seconds: a source (the peer's IP address) with `max_failures` failures in the window is refused,
and so is everybody once `max_total` failures from all sources together are in the window (a
flood from many addresses). A refusal says how long until the oldest counted failure ages out,
after which attempts are let through again. Successful joins are not counted.

Memory stays bounded whatever the sources: each source keeps at most `max_failures` times
(older ones cannot matter: the newest `max_failures` decide), the total at most `max_total`, and
sources are kept in order of their last failure, so those whose failures have all aged out are
dropped from the front as time passes. At most `max_sources` are tracked at once; past that the
one whose last failure is oldest is forgotten (the total still counts its failures).

Time comes in as `now`, in seconds of a monotonic clock, from the caller.
"""

from __future__ import annotations

from collections import OrderedDict, deque

DEFAULT_MAX_SOURCES = 1024


class FailureLimiter:
    """At most `max_failures` failed attempts per source within `window_s`, and at most
    `max_total` from all sources together; past that, attempts are refused until old failures
    age out."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, max_total: int = 30,
                 *, max_sources: int = DEFAULT_MAX_SOURCES) -> None:
        assert min(max_failures, max_total, max_sources) >= 1, "limits must be at least 1"
        assert window_s > 0, "the window must be positive"
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_total = max_total
        self.max_sources = max_sources
        self._total: deque[float] = deque(maxlen=max_total)
        # per source, its newest failures; ordered by the time of each source's last failure
        self._sources: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, now: float, source: str) -> float | None:
        """None when `source` may try now; else the seconds until it may."""
        self._forget_aged(now)
        waits = [self._wait(now, self._total)]
        own = self._sources.get(source)
        if own is not None:
            waits.append(self._wait(now, own))
        wait = max(waits)
        return wait if wait > 0 else None

    def failed(self, now: float, source: str) -> None:
        """Count a failed attempt of `source` at `now`."""
        self._forget_aged(now)
        own = self._sources.pop(source, None)
        if own is None:
            own = deque(maxlen=self.max_failures)
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
        own.append(now)
        self._sources[source] = own
        self._total.append(now)

    def tracked_sources(self) -> int:
        """How many sources have failures counted now (for tests and debugging)."""
        return len(self._sources)

    def _wait(self, now: float, times: deque[float]) -> float:
        """Seconds until the window has room for one more failure besides `times` (the newest
        failures, at most maxlen of them); 0 or less when it has room now."""
        if len(times) < (times.maxlen or 0):
            return 0.0
        return min(times[0] + self.window_s - now, self.window_s)

    def _forget_aged(self, now: float) -> None:
        """Drop the sources whose last failure aged out (they are at the front). The times kept
        need no pruning: `_wait` only looks at the oldest of a full deque."""
        horizon = now - self.window_s
        while self._sources:
            source, times = next(iter(self._sources.items()))
            if times[-1] > horizon:
                break
            del self._sources[source]
