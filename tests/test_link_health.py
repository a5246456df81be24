"""Link health (pmxfs.core.link_health): scripted link failures, and a property under loss.

`Sim` runs node 1's `LinkHealth` against peers that echo every ping after a fixed one-way delay,
unless the test has cut that peer's link. It steps from deadline to deadline exactly as the
transport's timer would (`next_deadline`, then `on_timer` and `pings_due`), so a scenario also
checks that the deadlines are never missed. The property drives the same object with random
loss, delays, junk pongs and run-time reconfigurations, and checks what `status` and `routes`
claim against what really happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core.link_health import LinkConfig, LinkEvent, LinkHealth, LinkMode, LinkState, Pong

INTERVAL = 250
TIMEOUT = 500
DELAY = 1  # one way


def link(number: int, priority: int = 1, pong_count: int = 2) -> LinkConfig:
    return LinkConfig(number, priority, INTERVAL, TIMEOUT, pong_count)


@dataclass
class Sim:
    links: Sequence[LinkConfig]
    mode: LinkMode = "passive"
    peers: tuple[int, ...] = (2, 3)
    now: int = 0
    cut: set[tuple[int, int]] = field(default_factory=set)  # (peer, link) dropping everything
    inflight: list[tuple[int, Pong]] = field(default_factory=list)
    log: list[tuple[int, LinkEvent]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.health = LinkHealth(self.now, 1, (1, *self.peers), self.links, self.mode)
        self._step(self.now)

    def _step(self, now: int) -> None:
        arrived = [pong for at, pong in self.inflight if at <= now]
        self.inflight = [(at, pong) for at, pong in self.inflight if at > now]
        for pong in arrived:
            if (pong.peer, pong.link) not in self.cut:
                self.health.on_pong(now, pong.peer, pong.link, pong.seq)
        self.health.on_timer(now)
        for ping in self.health.pings_due(now):
            if (ping.peer, ping.link) not in self.cut:
                self.inflight.append((now + 2 * DELAY, Pong(ping.peer, ping.link, ping.seq)))
        self.log.extend((now, event) for event in self.health.events())
        deadline = self.health.next_deadline()
        assert deadline is None or deadline > now

    def run_until(self, end: int) -> None:
        for _ in range(100_000):
            times = [at for at, _ in self.inflight]
            deadline = self.health.next_deadline()
            if deadline is not None:
                times.append(deadline)
            upcoming = min(times, default=end + 1)
            if upcoming > end:
                break
            self.now = upcoming
            self._step(upcoming)
        else:
            raise AssertionError("simulation did not reach its end")
        self.now = end
        self._step(end)

    def routes(self, peer: int = 2) -> tuple[int, ...]:
        return self.health.routes(peer)

    def connected(self, peer: int = 2) -> set[int]:
        return {s.link for s in self.health.status() if s.peer == peer and s.connected}

    def when(self, event: LinkEvent) -> list[int]:
        return [at for at, seen in self.log if seen == event]


def test_start_every_link_until_pongs_then_the_best() -> None:
    sim = Sim([link(0), link(1)])
    assert sim.routes() == (0, 1)  # nothing connected yet: try every link
    # pings at 0 and 250, pongs back at 2 and 252: pong_count 2 reached at 252
    sim.run_until(251)
    assert sim.connected() == set()
    sim.run_until(252)
    assert sim.connected() == {0, 1}
    assert sim.routes() == (0,)
    assert sim.when(LinkEvent(2, 0, True)) == [252]
    assert sim.when(LinkEvent(3, 1, True)) == [252]


def test_link_0_dies_route_moves_to_link_1_within_the_timeout_and_back_by_priority() -> None:
    sim = Sim([link(0), link(1)])
    sim.run_until(1000)
    assert sim.routes() == (0,)
    cut_at = 1100
    sim.run_until(cut_at)
    sim.cut.add((2, 0))
    sim.run_until(cut_at + TIMEOUT)
    down = sim.when(LinkEvent(2, 0, False))
    assert len(down) == 1
    assert down[0] <= cut_at + TIMEOUT
    assert sim.routes() == (1,)
    assert sim.routes(3) == (0,)  # the other peer is not affected
    assert sim.when(LinkEvent(2, 1, False)) == []
    back_at = 3000
    sim.run_until(back_at)
    assert sim.routes() == (1,)
    sim.cut.discard((2, 0))
    # the next two pings after the repair bring link 0 back; passive returns to it
    sim.run_until(back_at + 2 * INTERVAL + 2 * DELAY)
    up = sim.when(LinkEvent(2, 0, True))
    assert len(up) == 2
    assert back_at < up[1] <= back_at + 2 * INTERVAL + 2 * DELAY
    assert sim.routes() == (0,)
    assert [s for s in sim.health.status() if s.peer == 2] == [
        LinkState(2, 0, connected=True, active=True),
        LinkState(2, 1, connected=True, active=False),
    ]


def test_link_comes_back_only_after_pong_count_pongs() -> None:
    sim = Sim([link(0, pong_count=3), link(1, pong_count=3)])
    sim.run_until(1000)
    sim.cut.add((2, 0))
    sim.run_until(2000)
    sim.cut.discard((2, 0))
    sim.run_until(2000 + 2 * INTERVAL + 2 * DELAY)  # only two pongs so far
    assert sim.routes() == (1,)
    sim.run_until(2000 + 3 * INTERVAL + 2 * DELAY)
    assert sim.routes() == (0,)


def test_active_uses_every_connected_link() -> None:
    sim = Sim([link(0), link(1, priority=5)], mode="active")
    sim.run_until(1000)
    assert sim.routes() == (0, 1)
    assert all(s.active for s in sim.health.status())
    sim.cut.add((2, 1))
    sim.run_until(2000)
    assert sim.routes() == (0,)
    assert sim.routes(3) == (0, 1)
    assert [s.active for s in sim.health.status() if s.peer == 2] == [True, False]


def test_no_link_connected_means_every_link() -> None:
    sim = Sim([link(0), link(1)])
    sim.run_until(1000)
    sim.cut |= {(2, 0), (2, 1)}
    sim.run_until(2000)
    assert sim.connected() == set()
    assert sim.routes() == (0, 1)
    assert [s for s in sim.health.status() if s.peer == 2] == [
        LinkState(2, 0, connected=False, active=True),
        LinkState(2, 1, connected=False, active=True),
    ]
    assert sim.routes(3) == (0,)


def test_priority_wins_and_ties_go_to_the_lowest_link_number() -> None:
    sim = Sim([link(0, priority=1), link(1, priority=10)])
    sim.run_until(1000)
    assert sim.routes() == (1,)
    sim.cut.add((2, 1))
    sim.run_until(2000)
    assert sim.routes() == (0,)

    tie = Sim([link(5, priority=3), link(3, priority=3), link(7, priority=1)])
    tie.run_until(1000)
    assert tie.routes() == (3,)
    tie.cut.add((2, 3))
    tie.run_until(2000)
    assert tie.routes() == (5,)


def test_flapping_link_0_never_takes_the_route_away_from_a_working_link() -> None:
    sim = Sim([link(0), link(1)])
    sim.run_until(1000)
    for flip in range(30):  # down/up every 2 s for a minute
        start = 1000 + flip * 2000
        if flip % 2 == 0:
            sim.cut.add((2, 0))
        else:
            sim.cut.discard((2, 0))
        for t in range(start, start + 2000, 50):
            sim.run_until(t)
            route = sim.routes()
            assert len(route) == 1
            assert route[0] in sim.connected()
    assert sim.when(LinkEvent(2, 1, False)) == []
    downs = sim.when(LinkEvent(2, 0, False))
    ups = sim.when(LinkEvent(2, 0, True))
    assert len(downs) == 15
    assert len(ups) == 15 + 1  # the first up at start
    assert sim.log == sorted(sim.log, key=lambda item: item[0])


def test_pongs_that_do_not_answer_a_recent_ping_are_ignored() -> None:
    health = LinkHealth(0, 1, [2], [link(0), link(1)], "passive")
    pings = health.pings_due(0)
    assert sorted((p.peer, p.link) for p in pings) == [(2, 0), (2, 1)]
    on_0 = next(p for p in pings if p.link == 0)
    on_1 = next(p for p in pings if p.link == 1)
    assert on_0.seq != on_1.seq
    health.on_pong(1, 9, 0, on_0.seq)  # unknown peer
    health.on_pong(1, 2, 6, on_0.seq)  # unknown link
    health.on_pong(1, 2, 0, on_1.seq)  # the other link's ping
    health.on_pong(1, 2, 0, 10**30)  # never sent
    health.on_pong(1, 2, 0, -5)
    health.on_pong(1, 2, 0, on_0.seq)
    health.on_pong(2, 2, 0, on_0.seq)  # the same pong twice counts once
    assert health.status()[0].connected is False
    late = health.pings_due(INTERVAL)[0]
    health.on_pong(INTERVAL + TIMEOUT, 2, late.link, late.seq)  # answered after the timeout
    assert not any(s.connected for s in health.status())
    assert health.events() == []


def test_an_older_pong_after_a_newer_one_does_not_count() -> None:
    health = LinkHealth(0, 1, [2], [link(0, pong_count=2)], "passive")
    first = health.pings_due(0)[0]
    second = health.pings_due(INTERVAL)[0]
    health.on_pong(INTERVAL + 1, 2, 0, second.seq)
    health.on_pong(INTERVAL + 2, 2, 0, first.seq)
    assert health.status() == [LinkState(2, 0, connected=False, active=True)]
    third = health.pings_due(2 * INTERVAL)[0]
    health.on_pong(2 * INTERVAL + 1, 2, 0, third.seq)
    assert health.status() == [LinkState(2, 0, connected=True, active=True)]


def test_counting_restarts_when_pongs_stop_for_the_timeout() -> None:
    health = LinkHealth(0, 1, [2], [link(0, pong_count=2)], "passive")
    first = health.pings_due(0)[0]
    health.on_pong(1, 2, 0, first.seq)
    assert health.next_deadline() == INTERVAL  # the next ping comes before the timeout
    health.on_timer(1 + TIMEOUT)  # the count of one pong is forgotten
    later = health.pings_due(1 + TIMEOUT)[0]
    health.on_pong(2 + TIMEOUT, 2, 0, later.seq)
    assert health.status()[0].connected is False


def test_ping_is_echoed_and_events_are_drained() -> None:
    health = LinkHealth(0, 1, [2], [link(0, pong_count=1)], "passive")
    assert health.on_ping(0, 2, 0, 77) == Pong(2, 0, 77)
    assert health.on_ping(0, 99, 6, -1) == Pong(99, 6, -1)
    ping = health.pings_due(0)[0]
    health.on_pong(1, 2, 0, ping.seq)
    assert health.events() == [LinkEvent(2, 0, True)]
    assert health.events() == []


def test_deadlines() -> None:
    assert LinkHealth(0, 1, [1], [link(0)], "passive").next_deadline() is None
    assert LinkHealth(0, 1, [2], [], "passive").next_deadline() is None
    assert LinkHealth(0, 1, [2], [], "passive").routes(2) == ()
    health = LinkHealth(100, 1, [2], [link(0)], "passive")
    assert health.next_deadline() == 100
    assert health.pings_due(99) == []
    ping = health.pings_due(100)[0]
    assert health.next_deadline() == 100 + INTERVAL
    health.on_pong(101, 2, 0, ping.seq)
    health.pings_due(100 + INTERVAL)
    health.on_pong(100 + INTERVAL + 1, 2, 0, ping.seq + 1)
    assert health.status()[0].connected
    assert health.next_deadline() == 100 + 2 * INTERVAL
    slow = LinkHealth(0, 1, [2], [LinkConfig(0, 1, 1000, 300, 1)], "passive")
    ping = slow.pings_due(0)[0]
    slow.on_pong(10, 2, 0, ping.seq)
    assert slow.next_deadline() == 310  # the timeout comes before the next ping


def test_reconfigure_keeps_known_state() -> None:
    sim = Sim([link(0), link(1)])
    sim.run_until(1000)
    health = sim.health
    health.reconfigure(1000, [2, 4], [link(1), link(2, priority=9)], "passive")
    assert health.events() == []  # removed paths leave without an event
    assert [(s.peer, s.link, s.connected) for s in health.status()] == [
        (2, 1, True),
        (2, 2, False),
        (4, 1, False),
        (4, 2, False),
    ]
    assert health.routes(2) == (1,)  # link 2 wins by priority only once connected
    assert health.routes(3) == ()
    assert health.routes(4) == (1, 2)
    assert sorted((p.peer, p.link) for p in health.pings_due(1000)) == [(2, 2), (4, 1), (4, 2)]
    sim.run_until(1000 + 2 * INTERVAL + 2 * DELAY)
    assert health.routes(2) == (2,)
    assert health.routes(4) == (2,)
    health.reconfigure(1600, [2, 4], [link(1), link(2, priority=9)], "active")
    assert health.routes(2) == (1, 2)
    assert health.events() == []


def test_reconfigure_applies_new_timings_from_now() -> None:
    sim = Sim([link(0)])
    sim.run_until(1102)  # the last pong came at 1002 (ping at 1000)
    assert sim.connected() == {0}
    shorter = replace(link(0), ping_timeout_ms=100, ping_interval_ms=50)
    sim.health.reconfigure(1102, [2, 3], [shorter], "passive")
    assert sim.health.events() == [LinkEvent(2, 0, False), LinkEvent(3, 0, False)]
    assert sim.health.next_deadline() == 1152  # the next ping within the new interval
    sim.run_until(1152 + 50 + 2 * DELAY)
    assert sim.connected() == {0}


def test_self_is_not_a_peer_and_duplicate_links_are_refused() -> None:
    health = LinkHealth(0, 1, [1, 2], [link(0)], "passive")
    assert {s.peer for s in health.status()} == {2}
    with pytest.raises(ValueError, match="twice"):
        LinkHealth(0, 1, [2], [link(0), link(0, priority=4)], "passive")


def test_nonsense_timings_are_taken_as_one() -> None:
    health = LinkHealth(0, 1, [2], [LinkConfig(0, 1, 0, -5, 0)], "active")
    ping = health.pings_due(0)[0]
    assert health.next_deadline() == 1
    health.on_pong(0, 2, 0, ping.seq)
    assert health.status()[0].connected
    health.on_timer(1)
    assert not health.status()[0].connected


# -- property: random loss, delays, junk and reconfiguration ------------------------------------

link_configs = st.builds(
    LinkConfig,
    number=st.integers(0, 7),
    priority=st.integers(0, 3),
    ping_interval_ms=st.integers(20, 300),
    ping_timeout_ms=st.integers(20, 900),
    pong_count=st.integers(1, 3),
)
link_sets = st.lists(link_configs, max_size=4, unique_by=lambda c: c.number)
modes: st.SearchStrategy[LinkMode] = st.sampled_from(["passive", "active"])
peer_sets = st.frozensets(st.integers(1, 5), max_size=4)


def check(
    health: LinkHealth,
    now: int,
    links: Sequence[LinkConfig],
    mode: LinkMode,
    last_pong: dict[tuple[int, int], int],
    model: dict[tuple[int, int], bool],
) -> None:
    timeouts = {c.number: max(1, c.ping_timeout_ms) for c in links}
    for event in health.events():
        model[(event.peer, event.link)] = event.up
    states = health.status()
    for state in states:
        assert state.link in timeouts
        assert state.peer != 1
        assert model.get((state.peer, state.link), False) == state.connected
        if state.connected:
            assert now - last_pong[(state.peer, state.link)] < timeouts[state.link]
    for peer in {s.peer for s in states}:
        route = health.routes(peer)
        assert route
        assert set(route) <= set(timeouts)
        connected = {s.link for s in states if s.peer == peer and s.connected}
        if connected and mode == "passive":
            assert len(route) == 1
            assert route[0] in connected
        if connected and mode == "active":
            assert set(route) == connected
        assert {s.link for s in states if s.peer == peer and s.active} == set(route)
    deadline = health.next_deadline()
    assert deadline is None or deadline >= now  # == now: pings of new paths not yet taken


@settings(max_examples=150, deadline=None)
@given(st.data(), link_sets, modes, peer_sets)
def test_what_status_and_routes_claim_is_true(
    data: st.DataObject, links: list[LinkConfig], mode: LinkMode, peers: frozenset[int]
) -> None:
    now = 0
    health = LinkHealth(now, 1, peers, links, mode)
    inflight: list[tuple[int, int, int, int]] = []  # arrival, peer, link, seq
    last_pong: dict[tuple[int, int], int] = {}
    model: dict[tuple[int, int], bool] = {}
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(["advance", "advance", "advance", "junk", "reconf"]))
        if action == "reconf":
            links = data.draw(link_sets, label="links")
            mode = data.draw(modes, label="mode")
            peers = data.draw(peer_sets, label="peers")
            numbers = {c.number for c in links}
            model = {k: v for k, v in model.items() if k[0] in peers and k[1] in numbers}
            health.reconfigure(now, peers, links, mode)
        elif action == "junk":
            peer, number, seq = data.draw(
                st.tuples(st.integers(0, 6), st.integers(-1, 8), st.integers(-3, 10**6)),
                label="junk",
            )
            last_pong[(peer, number)] = now  # a pong all the same (its seq may be real)
            health.on_pong(now, peer, number, seq)
        else:
            target = now + data.draw(st.integers(0, 700), label="advance")
            while True:
                times = [at for at, *_ in inflight]
                deadline = health.next_deadline()
                if deadline is not None:
                    times.append(deadline)
                step = min([t for t in times if t <= target], default=target)
                now = max(now, step)
                for _at, peer, number, seq in [p for p in inflight if p[0] <= now]:
                    last_pong[(peer, number)] = now
                    health.on_pong(now, peer, number, seq)
                    check(health, now, links, mode, last_pong, model)
                inflight = [p for p in inflight if p[0] > now]
                health.on_timer(now)
                for ping in health.pings_due(now):
                    assert ping.sent_at == now
                    if data.draw(st.booleans(), label="delivered"):
                        delay = data.draw(st.integers(0, 1000), label="round trip")
                        inflight.append((now + delay, ping.peer, ping.link, ping.seq))
                deadline = health.next_deadline()
                assert deadline is None or deadline > now
                check(health, now, links, mode, last_pong, model)
                if now >= target:
                    break
        check(health, now, links, mode, last_pong, model)


def test_before_the_deadline_nothing_happens() -> None:
    sim = Sim([link(0), link(1)])
    sim.run_until(1000)
    deadline = sim.health.next_deadline()
    assert deadline is not None
    sim.health.on_timer(deadline - 1)
    assert sim.health.pings_due(deadline - 1) == []
    assert sim.health.events() == []
