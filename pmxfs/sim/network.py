"""A deterministic discrete-event network for driving pure core state machines.

Everything random comes from one `random.Random(seed)`; events are ordered by (time, insertion
counter), so the same seed gives the same run, event for event.

Links. Every packet goes from one node to one other (a multicast is one packet per receiver, as
udpu sends it). Packets can be lost, duplicated and delayed (and so reordered) with the rates of
`faults`, which hold for every link. On top of that each *ordered* pair of nodes can be cut or
lossy on its own: `partition` splits the nodes into groups that do not hear each other (both
ways), `cut` blocks single directions (a one-way partition: a->b blocked while b->a passes),
`bridge` splits two sides that both still hear one bridge node, and `set_link_loss` gives one
direction its own loss rate (asymmetric loss). `heal` ends all of them (and slow episodes,
below); the rates of `faults` stay. A packet is checked against the links both when it is sent
and when it arrives, so a partition also drops what is in flight.

Processes. Nodes crash and restart (a restart gets back only what the node persisted) and pause
(as under SIGSTOP: no timers, packets queue up in a bounded socket buffer and are read when the
node resumes; the timers due by then fire first, all at once). A node can be *slow* for a while
(`slow`): each receive and timer it handles costs it a processing time drawn from a range, it is
busy until that time has passed (its outputs leave at the end of it, packets queue as during a
pause, due timers and queued packets take turns), so a slow node falls behind under load.

Clocks. Each node's core sees its own clock, `now + clock_offset` (`local_now`), in every call
the network makes (receive, on_timer), and its `next_deadline()` is converted back to network
time; simulations pass `local_now` in the calls they make themselves. `jump_clock` moves a
node's clock forward (a VM frozen or suspended, a clock source that leaps): every timer that
falls within the jump fires at once while the others' clocks did not move. A clock never goes
back: the runtime's `now` is trio's monotonic clock, which the kernel never sets back (wall time
maps to it by a `wall_offset` taken once at start, so setting the wall clock back changes
nothing a running replica computes). A crash ends the process and with it its clock: a restart
starts at offset 0 (the runtime's core loop counts from its own start, too).

A node is anything with the core interface: `receive(now, src, data)`, `on_timer(now)`,
`next_deadline()` and `drain()`; `Send` outputs are carried by the network and every other output
is handed to the `on_output` callback together with the node's identity. `schedule(at, action)`
runs an action of the caller's at a time of its choosing, in the same order of events (the
simulated disks complete their writes this way). Each fault is one trace line.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pmxfs.core.totem import Send

if TYPE_CHECKING:
    from .faults import FaultMix

INBOX_LIMIT = 2000

Link = tuple[int, int]  # (from, to)


class CoreNode(Protocol):
    def receive(self, now: int, src: int, data: bytes) -> None: ...
    def on_timer(self, now: int) -> None: ...
    def next_deadline(self) -> int | None: ...
    def drain(self) -> Sequence[object]: ...


@dataclass
class NetworkFaults:
    """Rates that hold on every link."""

    loss: float = 0.0
    duplicate: float = 0.0
    min_delay: int = 0
    max_jitter: int = 0


@dataclass
class SimNode:
    node_id: int
    core: CoreNode | None
    incarnation: int = 0
    paused_until: int | None = None  # it runs nothing before then (paused, or busy)
    busy: bool = False  # the wait is processing time of a slow node, not a pause
    inbox: deque[tuple[int, bytes]] = field(default_factory=deque)
    clock_offset: int = 0  # its core's clock runs this far ahead of the network's
    slow_until: int = 0  # slow until then, each event costing a time from `slow_cost`
    slow_cost: tuple[int, int] = (0, 0)

    @property
    def up(self) -> bool:
        return self.core is not None


class SimulationStuck(Exception):
    """The event budget ran out: something spins without making progress."""


class Network:
    def __init__(
        self,
        rng: random.Random,
        on_output: Callable[[SimNode, object], None],
        trace: Callable[[str], None],
    ) -> None:
        self.rng = rng
        self.now = 0
        self.nodes: dict[int, SimNode] = {}
        self.faults = NetworkFaults()
        self.mix: FaultMix | None = None  # the run's fault mix (faults.py), once drawn
        self.groups: dict[int, int] = {}
        self.cuts: set[Link] = set()
        self.link_loss: dict[Link, float] = {}
        self.on_output = on_output
        self.trace = trace
        self._packets: list[tuple[int, int, int, int, bytes]] = []
        self._actions: list[tuple[int, int, Callable[[], None]]] = []
        self._counter = 0
        self.packets_sent = 0
        self.inbox_overflows = 0
        self.events = 0

    # ------------------------------------------------------------------ topology

    def add(self, node_id: int, core: CoreNode | None) -> SimNode:
        node = SimNode(node_id, core)
        self.nodes[node_id] = node
        self.groups.setdefault(node_id, 0)
        return node

    def partition(self, groups: list[list[int]]) -> None:
        for index, group in enumerate(groups):
            for n in group:
                self.groups[n] = index
        self.trace(f"{self.now} partition {groups}")

    def cut(self, links: Iterable[Link]) -> None:
        """Block each direction in `links` (the reverse directions are untouched)."""
        new = sorted(set(links) - self.cuts)
        self.cuts.update(new)
        self.trace(f"{self.now} cut {' '.join(f'n{a}->n{b}' for a, b in new)}")

    def bridge(self, left: list[int], node: int, right: list[int]) -> None:
        """`left` and `right` do not hear each other; both hear `node` and it hears both."""
        self.cuts.update((a, b) for a in left for b in right)
        self.cuts.update((b, a) for a in left for b in right)
        self.trace(f"{self.now} bridge {left} <n{node}> {right}")

    def set_link_loss(self, link: Link, loss: float) -> None:
        """Lose this fraction of the packets in one direction, besides `faults.loss`."""
        self.link_loss[link] = loss
        self.trace(f"{self.now} loss n{link[0]}->n{link[1]} {loss}")

    def heal(self) -> None:
        """End partitions, cuts, bridges and link losses, and slow episodes."""
        for n in self.groups:
            self.groups[n] = 0
        self.cuts.clear()
        self.link_loss.clear()
        for node in self.nodes.values():
            node.slow_until = 0
        self.trace(f"{self.now} heal")

    def connected(self, a: int, b: int) -> bool:
        """Does a packet from `a` reach `b` (loss aside)?"""
        return self.groups[a] == self.groups[b] and (a, b) not in self.cuts

    # ------------------------------------------------------------------ processes

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.core = None
        node.paused_until = None
        node.busy = False
        node.clock_offset = 0  # the process and its clock are gone
        node.inbox.clear()
        self.trace(f"{self.now} crash n{node_id}")

    def start(self, node_id: int, core: CoreNode) -> None:
        """(Re)start a node with a fresh core; outputs of its construction are carried out."""
        node = self.nodes[node_id]
        node.core = core
        self.trace(f"{self.now} start n{node_id}")
        self.flush(node)

    def pause(self, node_id: int, duration: int, what: str = "pause") -> None:
        node = self.nodes[node_id]
        if node.up:
            if node.busy:
                self.flush(node)  # the work in hand completes as the process stops
            node.paused_until = self.now + duration
            node.busy = False
            self.trace(f"{self.now} {what} n{node_id} for {duration}")

    def slow(self, node_id: int, duration: int, cost: tuple[int, int]) -> None:
        """For `duration` ms every event `node_id` handles costs it `cost` ms (a uniform draw)."""
        node = self.nodes[node_id]
        node.slow_until = self.now + duration
        node.slow_cost = cost
        self.trace(f"{self.now} slow n{node_id} for {duration}, {cost[0]}-{cost[1]} ms per event")

    # ------------------------------------------------------------------ clocks

    def local_now(self, node_id: int) -> int:
        """The time on `node_id`'s own clock."""
        return self.now + self.nodes[node_id].clock_offset

    def jump_clock(self, node_id: int, ms: int) -> None:
        """`node_id`'s clock leaps `ms` forward."""
        assert ms >= 0, "a monotonic clock never goes back"
        self.nodes[node_id].clock_offset += ms
        self.trace(f"{self.now} clock n{node_id} jumps {ms} ms")

    # ------------------------------------------------------------------ packets

    def send(self, src: int, out: Send) -> None:
        targets = [out.to] if out.to is not None else [n for n in self.nodes if n != src]
        for dst in targets:
            if not self.connected(src, dst):
                continue
            if self.faults.loss and self.rng.random() < self.faults.loss:
                continue
            if self.link_loss:
                loss = self.link_loss.get((src, dst), 0.0)
                if loss and self.rng.random() < loss:
                    continue
            copies = 2 if self.faults.duplicate and self.rng.random() < self.faults.duplicate else 1
            for _ in range(copies):
                delay = self.faults.min_delay
                if self.faults.max_jitter:
                    delay += self.rng.randint(0, self.faults.max_jitter)
                self._counter += 1
                heapq.heappush(self._packets, (self.now + delay, self._counter, src, dst, out.data))
                self.packets_sent += 1

    def _deliver_packet(self, src: int, dst: int, data: bytes) -> None:
        node = self.nodes[dst]
        if not node.up or not self.connected(src, dst):
            return
        if node.paused_until is not None:
            if len(node.inbox) < INBOX_LIMIT:
                node.inbox.append((src, data))
            else:
                self.inbox_overflows += 1
            return
        assert node.core is not None
        node.core.receive(self.now + node.clock_offset, src, data)
        self._handled(node)

    def flush(self, node: SimNode) -> None:
        if node.core is None:
            return
        for out in node.core.drain():
            if node.core is None:
                return  # crashed while carrying out its outputs: the rest never happens
            if isinstance(out, Send):
                self.send(node.node_id, out)
            else:
                self.on_output(node, out)

    def _handled(self, node: SimNode) -> None:
        """`node` handled an event: its outputs leave now, or when a slow node is done."""
        if node.slow_until <= self.now or node.core is None:
            self.flush(node)
            return
        cost = self.rng.randint(*node.slow_cost)
        if not cost:
            self.flush(node)
            return
        node.paused_until = self.now + cost
        node.busy = True
        core = node.core
        self.schedule(self.now + cost, lambda: self.flush(node) if node.core is core else None)

    def schedule(self, at: int, action: Callable[[], None]) -> None:
        """Run `action()` at time `at` (not before now)."""
        self._counter += 1
        heapq.heappush(self._actions, (max(at, self.now), self._counter, action))

    # ------------------------------------------------------------------ the event loop

    def _next_timer(self) -> tuple[int, SimNode | None]:
        best: tuple[int, SimNode | None] = (2**62, None)
        for node in self.nodes.values():
            if node.core is None:
                continue
            if node.paused_until is not None:
                t = node.paused_until
            else:
                deadline = node.core.next_deadline()
                if deadline is None:
                    continue
                t = max(deadline - node.clock_offset, self.now)
            if t < best[0]:
                best = (t, node)
        return best

    def run_until(self, until: int, max_events: int = 2_000_000) -> None:
        """Process every event up to time `until` (inclusive)."""
        while True:
            t_timer, timer_node = self._next_timer()
            t_packet = self._packets[0][0] if self._packets else 2**62
            t_action = self._actions[0][0] if self._actions else 2**62
            t = min(t_timer, t_packet, t_action)
            if t > until:
                self.now = until
                return
            self.events += 1
            if self.events > max_events:
                raise SimulationStuck(f"more than {max_events} events by t={self.now}")
            self.now = t
            if t_action <= min(t_packet, t_timer):
                _, _, action = heapq.heappop(self._actions)
                action()
                continue
            if t_packet <= t_timer:
                _, _, src, dst, data = heapq.heappop(self._packets)
                self._deliver_packet(src, dst, data)
                continue
            assert timer_node is not None
            assert timer_node.core is not None
            if timer_node.paused_until is not None:
                self._resume(timer_node)
            else:
                timer_node.core.on_timer(self.now + timer_node.clock_offset)
                self._handled(timer_node)

    def _resume(self, node: SimNode) -> None:
        """The pause (or the busy time) of `node` is over: it handles its due timers, then
        its queued packets in order, until it is busy again (or paused, or crashed)."""
        assert node.core is not None
        busy, node.busy, node.paused_until = node.busy, False, None
        local = self.now + node.clock_offset
        if not busy:
            self.trace(f"{self.now} resume n{node.node_id}")
            node.core.on_timer(local)
            self._handled(node)
        else:
            deadline = node.core.next_deadline()
            if deadline is not None and deadline <= local:
                node.core.on_timer(local)
                self._handled(node)
        while node.inbox and node.core is not None and node.paused_until is None:
            src, data = node.inbox.popleft()
            node.core.receive(self.now + node.clock_offset, src, data)
            self._handled(node)

    def run_while(self, condition: Callable[[], bool], deadline: int, step: int = 10) -> bool:
        """Advance time until `condition()` is false or `deadline`; True if it became false."""
        while condition():
            if self.now >= deadline:
                return False
            self.run_until(min(deadline, self.now + step))
        return True
