"""A deterministic discrete-event network for driving pure core state machines.

Everything random comes from one `random.Random(seed)`; events are ordered by (time, insertion
counter), so the same seed gives the same run, event for event. The network can lose, duplicate,
delay (and so reorder) packets, split nodes into partitions, crash and restart nodes (a restart
gets back only what the node persisted) and pause nodes (as under SIGSTOP: no timers, packets
queue up in a bounded socket buffer and are read when the node resumes).

A node is anything with the core interface: `receive(now, src, data)`, `on_timer(now)`,
`next_deadline()` and `drain()`; `Send` outputs are carried by the network and every other output
is handed to the `on_output` callback together with the node's identity. `schedule(at, action)`
runs an action of the caller's at a time of its choosing, in the same order of events (the
simulated disks complete their writes this way).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pmxfs.core.totem import Send

INBOX_LIMIT = 2000


class CoreNode(Protocol):
    def receive(self, now: int, src: int, data: bytes) -> None: ...
    def on_timer(self, now: int) -> None: ...
    def next_deadline(self) -> int | None: ...
    def drain(self) -> Sequence[object]: ...


@dataclass
class NetworkFaults:
    loss: float = 0.0
    duplicate: float = 0.0
    min_delay: int = 0
    max_jitter: int = 0


@dataclass
class SimNode:
    node_id: int
    core: CoreNode | None
    incarnation: int = 0
    paused_until: int | None = None
    inbox: list[tuple[int, bytes]] = field(default_factory=list)

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
        self.groups: dict[int, int] = {}
        self.on_output = on_output
        self.trace = trace
        self._packets: list[tuple[int, int, int, int, bytes]] = []
        self._actions: list[tuple[int, int, Callable[[], None]]] = []
        self._counter = 0
        self.packets_sent = 0
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

    def heal(self) -> None:
        for n in self.groups:
            self.groups[n] = 0
        self.trace(f"{self.now} heal")

    def connected(self, a: int, b: int) -> bool:
        return self.groups[a] == self.groups[b]

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.core = None
        node.paused_until = None
        node.inbox.clear()
        self.trace(f"{self.now} crash n{node_id}")

    def start(self, node_id: int, core: CoreNode) -> None:
        """(Re)start a node with a fresh core; outputs of its construction are carried out."""
        node = self.nodes[node_id]
        node.core = core
        self.trace(f"{self.now} start n{node_id}")
        self.flush(node)

    def pause(self, node_id: int, duration: int) -> None:
        node = self.nodes[node_id]
        if node.up:
            node.paused_until = self.now + duration
            self.trace(f"{self.now} pause n{node_id} for {duration}")

    # ------------------------------------------------------------------ packets

    def send(self, src: int, out: Send) -> None:
        targets = [out.to] if out.to is not None else [n for n in self.nodes if n != src]
        for dst in targets:
            if not self.connected(src, dst):
                continue
            if self.faults.loss and self.rng.random() < self.faults.loss:
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
            return
        assert node.core is not None
        node.core.receive(self.now, src, data)
        self.flush(node)

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

    def schedule(self, at: int, action: Callable[[], None]) -> None:
        """Run `action()` at time `at` (not before now)."""
        self._counter += 1
        heapq.heappush(self._actions, (max(at, self.now), self._counter, action))

    # ------------------------------------------------------------------ the clock

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
                t = max(deadline, self.now)
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
                timer_node.core.on_timer(self.now)
                self.flush(timer_node)

    def _resume(self, node: SimNode) -> None:
        node.paused_until = None
        self.trace(f"{self.now} resume n{node.node_id}")
        assert node.core is not None
        node.core.on_timer(self.now)
        self.flush(node)
        inbox, node.inbox = node.inbox, []
        for src, data in inbox:
            if node.core is None or node.paused_until is not None:
                break
            node.core.receive(self.now, src, data)
            self.flush(node)

    def run_while(self, condition: Callable[[], bool], deadline: int, step: int = 10) -> bool:
        """Advance time until `condition()` is false or `deadline`; True if it became false."""
        while condition():
            if self.now >= deadline:
                return False
            self.run_until(min(deadline, self.now + step))
        return True
