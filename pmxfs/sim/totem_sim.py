"""Totem under the simulator: a cluster of real `Totem` objects on the simulated network, the
checkers wired to every output, scripted scenario helpers and the seeded chaos run.

A chaos run draws everything from its seed: node count, the run's fault mix (`faults.draw_mix`:
loss 0 to 30 %, duplication, delay and jitter, and which of the fault kinds strike how often --
partitions, isolation, bridges, one-way cuts, lossy directions, heal, crash, restart from the
persisted ring seq, pauses longer than the token timeout, clock jumps, slow nodes, a stalled
token holder), and a schedule of fault steps interleaved with application messages of all sizes.
Then the network heals, crashed nodes restart and paused ones resume; after a quiet period every
node must be in one ring, every message a surviving node accepted must have been delivered by
it, and a probe from every node must reach every node. Every call into a core passes the node's
own clock (`Network.local_now`).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from pmxfs.core.totem import (
    ConfChange,
    Deliver,
    McastResult,
    PersistRingSeq,
    Stable,
    State,
    Totem,
)
from pmxfs.core.totem_params import TotemParams, derive_params

from .faults import (
    EVERY_FAULT,
    FaultOdds,
    Swarm,
    classic_fault,
    draw_mix,
    install_mix,
    mixed_fault,
)
from .network import Network, SimNode, SimulationStuck
from .totem_checker import TotemChecker, Violation
from .trace import Trace

BYTE_CYCLE = bytes(range(256))  # payload bodies count up from the message counter, mod 256


@dataclass
class RunResult:
    seed: int
    nodes: int
    violation: str | None
    delivered: int
    confchgs: int
    accepted: int
    events: int
    trace_hash: str
    trace: list[str] = field(default_factory=list)


class TotemCluster:
    """N totem nodes on a simulated network, with every guarantee checked as it happens."""

    def __init__(
        self,
        node_ids: list[int],
        params: TotemParams,
        rng: random.Random,
        *,
        keep_trace: bool = False,
        on_deliver: Callable[[int, Deliver], None] | None = None,
    ) -> None:
        self.node_ids = node_ids
        self.params = params
        self.rng = rng
        self.checker = TotemChecker()
        self.trace = Trace(keep_trace)
        self.net = Network(rng, self._on_output, self.trace)
        self.disk: dict[int, int] = {}
        self.counters: dict[int, int] = {}
        self.accepted: dict[tuple[int, int], list[bytes]] = {}
        self.ever_crashed: set[int] = set()
        self.started: set[int] = set()
        self.on_deliver = on_deliver
        for n in node_ids:
            self.net.add(n, None)
            self._start(n)

    # ------------------------------------------------------------------ plumbing

    def _make_core(self, node_id: int) -> Totem:
        return Totem(node_id, self.node_ids, self.params, self.net.local_now(node_id),
                     ring_seq=self.disk.get(node_id, 0),
                     on_event=lambda text: self.trace(f"{self.net.now} n{node_id} {text}"))

    def _start(self, node_id: int) -> None:
        node = self.net.nodes[node_id]
        if node_id in self.started:
            node.incarnation += 1
        self.started.add(node_id)
        self.checker.node_started((node_id, node.incarnation))
        self.accepted[(node_id, node.incarnation)] = []
        self.net.start(node_id, self._make_core(node_id))

    def _on_output(self, node: SimNode, out: object) -> None:
        key = (node.node_id, node.incarnation)
        if isinstance(out, Deliver):
            self.checker.on_deliver(key, out)
            self.trace(f"{self.net.now} n{node.node_id} deliver {out.ring_id}/{out.seq} "
                        f"{out.payload[:24]!r}")
            if self.on_deliver is not None:
                self.on_deliver(node.node_id, out)
        elif isinstance(out, ConfChange):
            self.checker.on_confchg(key, out)
            self.trace(f"{self.net.now} n{node.node_id} {out.kind.value} {out.ring_id} "
                        f"members={list(out.members)} left={list(out.left)} "
                        f"joined={list(out.joined)}")
        elif isinstance(out, Stable):
            self.checker.on_stable(key, out)
        elif isinstance(out, PersistRingSeq):
            self.disk[node.node_id] = max(self.disk.get(node.node_id, 0), out.ring_seq)

    def core(self, node_id: int) -> Totem:
        core = self.net.nodes[node_id].core
        assert isinstance(core, Totem)
        return core

    # ------------------------------------------------------------------ actions

    def mcast(self, node_id: int, size: int = 32) -> bytes | None:
        """Multicast a fresh, uniquely named payload; None when the node said try again."""
        node = self.net.nodes[node_id]
        if not node.up or node.paused_until is not None:
            return None
        counter = self.counters.get(node_id, 0) + 1
        self.counters[node_id] = counter
        head = b"%d:%d:" % (node_id, counter)
        length, start = max(0, size - len(head)), counter % 256
        payload = head + (BYTE_CYCLE * ((start + length) // 256 + 1))[start:start + length]
        self.checker.accepted(payload)
        result = self.core(node_id).mcast(self.net.local_now(node_id), payload)
        self.net.flush(node)
        if result is McastResult.TRY_AGAIN:
            return None
        self.accepted[(node_id, node.incarnation)].append(payload)
        self.trace(f"{self.net.now} n{node_id} mcast {head!r} {len(payload)}B")
        return payload

    def crash(self, node_id: int) -> None:
        self.ever_crashed.add(node_id)
        self.net.crash(node_id)

    def restart(self, node_id: int) -> None:
        self._start(node_id)

    def run_for(self, ms: int) -> None:
        self.net.run_until(self.net.now + ms)

    # ------------------------------------------------------------------ questions

    def live(self) -> list[int]:
        return [n for n, node in self.net.nodes.items() if node.up]

    def one_ring(self, nodes: list[int] | None = None) -> bool:
        """Are `nodes` (default: all live ones) operational together in a ring of exactly them?"""
        nodes = self.live() if nodes is None else nodes
        rings = set()
        for n in nodes:
            core = self.core(n)
            if core.state is not State.OPERATIONAL or list(core.ring.members) != sorted(nodes):
                return False
            rings.add(core.ring.ring_id)
        return len(rings) == 1

    def wait_one_ring(self, nodes: list[int] | None = None, timeout: int = 60_000) -> bool:
        return self.net.run_while(lambda: not self.one_ring(nodes), self.net.now + timeout)

    def wait_stable_ring(self, stable_for: int, timeout: int = 60_000) -> bool:
        """Wait until all live nodes have been in one and the same ring for `stable_for` ms."""
        since: dict[str, object] = {"ring": None, "at": self.net.now}

        def unsettled() -> bool:
            ring = self.core(self.live()[0]).ring.ring_id if self.one_ring() else None
            if ring != since["ring"]:
                since["ring"], since["at"] = ring, self.net.now
            at = since["at"]
            assert isinstance(at, int)
            return ring is None or self.net.now - at < stable_for

        return self.net.run_while(unsettled, self.net.now + timeout)

    def check_self_delivery(self) -> None:
        for (node_id, incarnation), payloads in self.accepted.items():
            node = self.net.nodes[node_id]
            if node.up and node.incarnation == incarnation:
                self.checker.check_self_delivery((node_id, incarnation), payloads)


TOTEM_FAULTS = FaultOdds(partition=0.76, isolate=0.80, heal=0.88, crash=0.92, restart=0.96)
TOTEM_SWARM: Swarm = EVERY_FAULT


def sim_params(node_count: int) -> TotemParams:
    """Short timers so a simulated second sees plenty of membership activity."""
    return derive_params(node_count, token=400, token_coefficient=50, join=30, merge=100)


def run_chaos(seed: int, node_range: tuple[int, int], *, keep_trace: bool = False,
              swarm: Swarm | None = TOTEM_SWARM) -> RunResult:
    """One seed's chaos run. `swarm`: the chance of each fault kind to be in the run's mix;
    None runs the classic fixed odds (`TOTEM_FAULTS`) with which the regression seeds were
    found."""
    rng = random.Random(seed)
    n_nodes = rng.randint(*node_range)
    node_ids = sorted(rng.sample(range(1, 3 * n_nodes + 1), n_nodes))
    params = sim_params(n_nodes)
    cluster = TotemCluster(node_ids, params, rng, keep_trace=keep_trace)
    net = cluster.net
    faults = net.faults
    if swarm is None:
        faults.loss = rng.choice([0.0, 0.01, 0.05, 0.1, 0.2, 0.3])
        faults.duplicate = rng.choice([0.0, 0.0, 0.02, 0.05])
        faults.min_delay = rng.randint(0, 2)
        faults.max_jitter = rng.choice([0, 1, 3, 10])
        cluster.trace(f"seed {seed} nodes {node_ids} loss {faults.loss} dup {faults.duplicate} "
                      f"delay {faults.min_delay}+{faults.max_jitter}")
    else:
        cluster.trace(f"seed {seed} nodes {node_ids}")
        install_mix(net, draw_mix(rng, swarm, params.token))
    violation: str | None = None
    try:
        chaos_until = rng.randint(8_000, 25_000 if swarm is None else 20_000)
        while net.now < chaos_until:
            net.run_until(net.now + rng.randint(1, 400))
            _random_action(cluster, rng, params)
        # Heal everything and let the cluster settle.
        net.heal()
        faults.loss = 0.0
        faults.duplicate = 0.0
        for n in node_ids:
            node = net.nodes[n]
            if not node.up:
                cluster.restart(n)
            elif node.paused_until is not None:
                node.paused_until = net.now
        if not cluster.wait_stable_ring(2 * params.consensus, timeout=60_000):
            states = {n: (cluster.core(n).state.value, list(cluster.core(n).ring.members))
                      for n in node_ids}
            raise Violation(f"no stable single ring 60 s after healing: {states}")
        if not net.run_while(lambda: any(cluster.core(n).pending for n in node_ids),
                             net.now + 60_000):
            raise Violation("send queues did not drain in a healed ring")
        cluster.check_self_delivery()
        probes = [p for n in node_ids if (p := cluster.mcast(n)) is not None]
        if len(probes) != len(node_ids):
            raise Violation("a healed node refused a probe message")
        def probes_missing() -> bool:
            return not all(
                p in cluster.checker.views[(n, net.nodes[n].incarnation)].delivered
                for n in node_ids for p in probes
            )

        if not net.run_while(probes_missing, net.now + 30_000):
            raise Violation("probe messages were not delivered everywhere after healing")
    except (Violation, SimulationStuck) as exc:
        violation = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a crash of the code under test is a finding, reported with its seed
        violation = f"exception {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return RunResult(
        seed=seed, nodes=n_nodes, violation=violation,
        delivered=cluster.checker.delivered_count, confchgs=cluster.checker.confchg_count,
        accepted=sum(len(v) for v in cluster.accepted.values()), events=net.events,
        trace_hash=cluster.trace.digest, trace=cluster.trace.lines,
    )


def _random_action(cluster: TotemCluster, rng: random.Random, params: TotemParams) -> None:
    net = cluster.net
    ids = cluster.node_ids
    roll = rng.random()
    if roll < 0.70:
        for _ in range(rng.randint(1, 8)):
            size = rng.choice([8, 32, 100, 500, 1400, 3000]) if rng.random() < 0.97 else rng.choice(
                [20_000, 100_000, 300_000])
            cluster.mcast(rng.choice(ids), size)
    elif net.mix is not None:
        mixed_fault(rng, net, ids, params.token, cluster.crash, cluster.restart)
    else:
        classic_fault(roll, TOTEM_FAULTS, rng, net, ids, params.token, cluster.crash,
                      cluster.restart)
