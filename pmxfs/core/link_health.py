"""Health of every link to every peer, from heartbeats, and which links carry traffic -- pure.

Why
---
With knet (corosync 3) a node reaches each peer over up to 8 independent links. A dead link must
be noticed, and traffic moved to a working one, well before totem's token timeout, so that losing
one network costs no membership change. This module decides it; the transport does the I/O. Time
only enters as the `now` argument (ms, monotonic), so every rule can be tested by a script.

How it works (knet's rules)
---------------------------
Each (peer, link) pair is a *path* with its own heartbeat:
* Every `ping_interval_ms` a `Ping` with a new sequence number is due on every path, connected or
  not (a dead link must be probed to notice that it is back). The peer echoes it as a `Pong`
  (`on_ping` builds the answer; it keeps no state).
* A pong counts only when it answers a ping this object sent on that path (one of the newest
  `MAX_OUTSTANDING_PINGS`, so a silent path costs bounded memory), less than
  `ping_timeout_ms` ago (knet discards pongs whose latency exceeds the timeout), and newer than
  the last counted one (duplicates and reordered old answers are ignored). Sequence numbers are
  unique across paths, so a pong cannot count on a link other than its ping's. Unknown peers,
  links or sequence numbers are ignored: peer input never raises.
* A path that is down becomes *connected* after `pong_count` counted pongs in a row, "in a row"
  meaning with no gap of `ping_timeout_ms` between them (knet's counter is reset exactly when
  that timeout passes).
* A path is *down* again as soon as `ping_timeout_ms` passed since its last counted pong
  (`on_timer`; every method taking `now` applies the timeouts first).
Every change of a path's state is a `LinkEvent`, collected until `events()` drains them (the
daemon logs one line per event).

Routes (`routes(peer)`), knet's link modes:
* passive: the connected link with the highest priority (`knet_link_priority`: higher wins;
  ties: the lowest link number), so traffic fails over and returns by priority;
* active: every connected link (the receiver drops the duplicates);
* no connected link: every link, so traffic still tries and totem sees the failure as it would
  with one link.

Run-time changes (`reconfigure`) keep what is known: paths that stay keep their state (new
timings apply from `now`), added peers and links start down with a ping due at once, removed ones
are forgotten without an event. Configuration values below 1 are taken as 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

MAX_OUTSTANDING_PINGS = 64  # pings per path awaiting a pong; older ones can no longer count

LinkMode: TypeAlias = Literal["passive", "active"]


@dataclass(frozen=True)
class LinkConfig:
    """One link's heartbeat settings (from `pmxfs.core.conf.link_settings`)."""

    number: int
    priority: int
    ping_interval_ms: int
    ping_timeout_ms: int
    pong_count: int


@dataclass(frozen=True)
class Ping:
    """A heartbeat to send to `peer` on `link`; the peer echoes `seq`."""

    peer: int
    link: int
    seq: int
    sent_at: int


@dataclass(frozen=True)
class Pong:
    """The answer to a ping: send it back to `peer` on the `link` the ping came in on."""

    peer: int
    link: int
    seq: int


@dataclass(frozen=True)
class LinkEvent:
    """The path to `peer` on `link` went up (`up`) or down."""

    peer: int
    link: int
    up: bool


@dataclass(frozen=True)
class LinkState:
    """One path as `pmxfs links` shows it: `active` = traffic to `peer` goes on this link now."""

    peer: int
    link: int
    connected: bool
    active: bool


@dataclass
class _Path:
    """The heartbeat state of one (peer, link) pair."""

    next_ping_at: int
    sent: dict[int, int] = field(default_factory=dict)  # seq -> sent_at, young enough to count
    last_seq: int = 0  # the newest seq a counted pong answered
    pongs: int = 0  # counted pongs in a row while down
    last_pong: int | None = None  # when the last counted pong came (None: none since quiet)
    connected: bool = False


def _normalised(link: LinkConfig) -> LinkConfig:
    return LinkConfig(
        number=link.number,
        priority=link.priority,
        ping_interval_ms=max(1, link.ping_interval_ms),
        ping_timeout_ms=max(1, link.ping_timeout_ms),
        pong_count=max(1, link.pong_count),
    )


class LinkHealth:
    """Link state of this node (`node_id`) towards every peer; see the module docstring."""

    def __init__(
        self,
        now: int,
        node_id: int,
        peers: Iterable[int],
        links: Sequence[LinkConfig],
        mode: LinkMode,
    ) -> None:
        self.node_id = node_id
        self._links: dict[int, LinkConfig] = {}
        self._paths: dict[tuple[int, int], _Path] = {}
        self._events: list[LinkEvent] = []
        self._next_seq = 1  # one counter for all paths: a seq names the path it was sent on
        self.mode: LinkMode = mode
        self.reconfigure(now, peers, links, mode)

    # -- configuration -------------------------------------------------------------------------

    def reconfigure(
        self, now: int, peers: Iterable[int], links: Sequence[LinkConfig], mode: LinkMode
    ) -> None:
        """Take a new set of peers, links and mode at run time, keeping what is known.

        Raises ValueError when `links` names a link number twice (a local configuration error).
        """
        numbers = [link.number for link in links]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"link numbers given twice: {sorted(numbers)}")
        new_links = {link.number: _normalised(link) for link in links}
        wanted = {(peer, number) for peer in set(peers) - {self.node_id} for number in new_links}
        paths: dict[tuple[int, int], _Path] = {}
        for key in sorted(wanted):
            path = self._paths.get(key)
            interval = new_links[key[1]].ping_interval_ms
            if path is None:
                path = _Path(next_ping_at=now)
            else:
                path.next_ping_at = min(path.next_ping_at, now + interval)
            paths[key] = path
        self._paths = paths
        self._links = new_links
        self.mode = mode
        self._expire(now)

    # -- heartbeats ----------------------------------------------------------------------------

    def pings_due(self, now: int) -> list[Ping]:
        """The pings to send now; each path's next one is due `ping_interval_ms` later."""
        self._expire(now)
        due: list[Ping] = []
        for (peer, number), path in self._paths.items():
            if path.next_ping_at > now:
                continue
            seq = self._next_seq
            self._next_seq += 1
            path.sent[seq] = now
            if len(path.sent) > MAX_OUTSTANDING_PINGS:  # a silent path: keep the newest only
                del path.sent[min(path.sent)]
            path.next_ping_at = now + self._links[number].ping_interval_ms
            due.append(Ping(peer=peer, link=number, seq=seq, sent_at=now))
        return due

    def on_ping(self, now: int, peer: int, link: int, seq: int) -> Pong:
        """The answer to a ping that `peer` sent on `link` (an echo; no state changes)."""
        self._expire(now)
        return Pong(peer=peer, link=link, seq=seq)

    def on_pong(self, now: int, peer: int, link: int, seq: int) -> None:
        """A pong from `peer` on `link`; counted only when it answers a recent ping of ours."""
        self._expire(now)
        path = self._paths.get((peer, link))
        if path is None or seq <= path.last_seq or seq not in path.sent:
            return
        path.sent = {s: at for s, at in path.sent.items() if s > seq}
        path.last_seq = seq
        path.last_pong = now
        if path.connected:
            return
        path.pongs += 1
        if path.pongs >= self._links[link].pong_count:
            path.connected = True
            self._events.append(LinkEvent(peer=peer, link=link, up=True))

    def on_timer(self, now: int) -> None:
        """Apply the timeouts: a path without a counted pong for `ping_timeout_ms` is down."""
        self._expire(now)

    def _expire(self, now: int) -> None:
        for (peer, number), path in self._paths.items():
            timeout = self._links[number].ping_timeout_ms
            if path.sent and now - min(path.sent.values()) >= timeout:
                path.sent = {s: at for s, at in path.sent.items() if now - at < timeout}
            if path.last_pong is None or now - path.last_pong < timeout:
                continue
            path.last_pong = None
            path.pongs = 0
            if path.connected:
                path.connected = False
                self._events.append(LinkEvent(peer=peer, link=number, up=False))

    # -- what the transport and the daemon read ------------------------------------------------

    def routes(self, peer: int) -> tuple[int, ...]:
        """The links to send to `peer` on now (ascending); () for an unknown peer."""
        mine = [(number, path) for (p, number), path in self._paths.items() if p == peer]
        connected = [number for number, path in mine if path.connected]
        if not connected:
            return tuple(sorted(number for number, _ in mine))
        if self.mode == "active":
            return tuple(sorted(connected))
        best = max(connected, key=lambda number: (self._links[number].priority, -number))
        return (best,)

    def events(self) -> list[LinkEvent]:
        """The link ups and downs since the last call, oldest first (drained)."""
        drained, self._events = self._events, []
        return drained

    def status(self) -> list[LinkState]:
        """Every path, ordered by peer and link."""
        states: list[LinkState] = []
        routes: dict[int, tuple[int, ...]] = {}
        for (peer, number), path in sorted(self._paths.items()):
            if peer not in routes:
                routes[peer] = self.routes(peer)
            states.append(LinkState(peer, number, path.connected, number in routes[peer]))
        return states

    def next_deadline(self) -> int | None:
        """When `pings_due` or `on_timer` next has something to do (None: no paths)."""
        times: list[int] = []
        for (_, number), path in self._paths.items():
            times.append(path.next_ping_at)
            if path.last_pong is not None:
                times.append(path.last_pong + self._links[number].ping_timeout_ms)
        return min(times, default=None)
