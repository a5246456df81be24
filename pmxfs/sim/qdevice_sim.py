"""The quorum device in the simulator: replicas, a qnetd arbiter and each node's device client.

What it runs
------------
A cluster whose corosync.conf has a quorum device (ffsplit with one vote for an even node count,
lms with nodes - 1 votes for an odd one), the fs workload, and next to the faults of the run's
mix (`faults.draw_mix`: partitions, one-way cuts, lossy directions, crashes, restarts, pauses,
clock jumps, slow nodes, a stalled token holder) the device's own: a node losing or regaining
its link to qnetd, and qnetd restarting with no memory. The clients follow the runtime's rules
(`qdevice_wire`): they report every ring change, cast the vote through the replica only while
the last answer is ACK for the node's current ring, and withdraw it at once on NACK / WAIT / a
ring change, and when qnetd has been silent for `silence_limit_ms` -- measured on their node's
own clock, so a clock jump makes a client think qnetd went silent. qnetd's side notices a lost
client only after a delay of up to the device timeout, as a TCP peer that vanished silently.
The clients act every `STEP_MS`, except on a node that is paused or busy.

What it checks
--------------
* qnetd keeps only the last holder's members and the newest stamp across a restart (as the
  runtime keeps them on disk).
* Never two quorate partitions: at every step, at most one *live* ring (every member up and
  still in it, synced) is quorate. No override is used, so there is no exception.
* After healing, every node is in one synced ring and the fs checks hold (every acknowledged
  write is in the final tree, each tree is the result of its lineage).
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass

from pmxfs.core.qdevice_wire import (
    Hello,
    Membership,
    Ring,
    Vote,
    silence_limit_ms,
)
from pmxfs.core.qnetd_arbiter import ClusterArbiter
from pmxfs.core.replica import Mode
from pmxfs.core.wire import RingId

from .faults import Swarm, draw_mix, install_mix, mixed_fault
from .network import SimulationStuck
from .replica_sim import (
    REPLICA_SWARM,
    ReplicaCluster,
    Workload,
    check_after_healing,
    cluster_config_text,
    draw_faults,
    heal,
    node_states,
    run_result,
)
from .totem_checker import Violation
from .totem_sim import RunResult, sim_params

STEP_MS = 50
TIMEOUT_MS = 2_000  # quorum.device.timeout in the simulator (corosync's default is 10 s)
SYNC_TIMEOUT_MS = 6_000
CLUSTER_ID = "00000000000051a1"


def qdevice_config_text(node_ids: list[int]) -> str:
    """The simulator's corosync.conf with a quorum device, set up as `qdevice setup` does."""
    even = len(node_ids) % 2 == 0
    votes = "    votes: 1\n" if even else ""
    algorithm = "ffsplit" if even else "lms"
    device = (f"  device {{\n    model: net\n{votes}    timeout: {TIMEOUT_MS}\n"
              f"    sync_timeout: {SYNC_TIMEOUT_MS}\n    net {{\n      host: 127.0.0.9\n"
              f"      algorithm: {algorithm}\n      tie_breaker: lowest\n    }}\n  }}\n")
    text = cluster_config_text(node_ids)
    return text.replace("  provider: corosync_votequorum\n",
                        "  provider: corosync_votequorum\n" + device)


@dataclass
class _Client:
    """One node's device client (for the node's current incarnation)."""

    incarnation: int
    connected: bool = False  # to qnetd, as the client sees it
    reported: tuple[Ring, int] | None = None  # the ring and stamp last reported
    answer: tuple[Ring, Vote] | None = None  # qnetd's last answer it received
    last_heard: int = 0
    cast: RingId | None = None  # the ring it told the replica it has the vote for


class QdeviceWorld:
    """qnetd (an arbiter), the links to it, and every node's client."""

    def __init__(self, cluster: ReplicaCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.nodes = tuple(sorted(cluster.node_ids))
        self.algorithm = "ffsplit" if len(self.nodes) % 2 == 0 else "lms"
        self.arbiter = ClusterArbiter(cluster.net.now)
        self.qnetd_up = True
        self.reach = dict.fromkeys(self.nodes, True)
        self.clients: dict[int, _Client] = {}
        self.server_connected: set[int] = set()  # what qnetd believes
        self.server_loses: dict[int, int] = {}  # node -> when qnetd notices its link is gone

    def _hello(self, node: int) -> Hello:
        return Hello("sim", CLUSTER_ID, node, self.algorithm, "lowest", False, TIMEOUT_MS,
                     SYNC_TIMEOUT_MS, self.nodes)

    def _link(self, node: int) -> bool:
        return self.qnetd_up and self.reach[node] and self.cluster.net.nodes[node].up

    # -- faults of the device

    def toggle_reach(self, node: int) -> None:
        self.reach[node] = not self.reach[node]
        self.cluster.trace(f"{self.cluster.net.now} n{node} qnetd link "
                           f"{'up' if self.reach[node] else 'down'}")

    def restart_qnetd(self) -> None:
        now = self.cluster.net.now
        self.cluster.trace(f"{now} qnetd restarts")
        self.arbiter = ClusterArbiter(now, self.arbiter.last_holder,  # kept on its disk
                                      self.arbiter.newest_stamp)
        self.server_connected.clear()
        self.server_loses.clear()
        for client in self.clients.values():
            client.connected = False  # the connection is reset: every client notices

    def heal(self) -> None:
        self.qnetd_up = True
        for node in self.nodes:
            self.reach[node] = True

    # -- one step of every client and of qnetd

    def step(self) -> None:
        now = self.cluster.net.now
        for node, when in list(self.server_loses.items()):
            if when <= now:
                del self.server_loses[node]
                if node in self.server_connected:
                    self.server_connected.discard(node)
                    self.arbiter.gone(now, node)
        for node in self.nodes:
            self._client_step(now, node)
        answers = self.arbiter.decisions(now)
        for node in self.nodes:
            client = self.clients.get(node)
            if client is None or not client.connected or not self._link(node):
                continue
            client.last_heard = self.cluster.net.local_now(node)  # heartbeats answered
            reply = answers.get(node)
            if reply is not None and node in self.server_connected:
                client.answer = (reply.ring, reply.vote)
        for node in self.nodes:
            self._cast(now, node)
        self._check_one_quorate_ring()

    def _client_step(self, now: int, node: int) -> None:
        sim_node = self.cluster.net.nodes[node]
        client = self.clients.get(node)
        if not sim_node.up:
            if client is not None and node in self.server_connected:
                self.server_loses.setdefault(node, now)  # the process died: a reset at once
            self.clients.pop(node, None)
            return
        if client is None or client.incarnation != sim_node.incarnation:
            client = self.clients[node] = _Client(sim_node.incarnation)
        local = self.cluster.net.local_now(node)  # the client runs on its node's clock
        if client.connected and not self._link(node):
            if local - client.last_heard >= silence_limit_ms(TIMEOUT_MS) or not self.qnetd_up:
                client.connected, client.answer, client.reported = False, None, None
            if node in self.server_connected and node not in self.server_loses:
                self.server_loses[node] = now + self.rng.randint(0, TIMEOUT_MS)
        if not client.connected and self._link(node) and node not in self.server_loses:
            client.connected, client.last_heard = True, local
            client.reported, client.answer = None, None
            self.server_connected.add(node)
            self.arbiter.hello(now, self._hello(node))
        replica = self.cluster.replica(node)
        ring = Ring(replica.ring.seq, replica.ring.rep)
        report = (ring, replica.quorate_ring_seq)
        if client.connected and self._link(node) and report != client.reported:
            client.reported = report
            self.arbiter.membership(now, node, Membership(ring, tuple(replica.members),
                                                          replica.writable(), report[1]))

    def _cast(self, now: int, node: int) -> None:
        client = self.clients.get(node)
        if client is None or self.cluster.net.nodes[node].paused_until is not None:
            return  # a stopped (or busy) process acts when it runs again
        replica = self.cluster.replica(node)
        ring = Ring(replica.ring.seq, replica.ring.rep)
        local = self.cluster.net.local_now(node)
        fresh = client.connected and local - client.last_heard < silence_limit_ms(TIMEOUT_MS)
        want = replica.ring if fresh and client.answer == (ring, Vote.ACK) else None
        if want == client.cast:
            return
        if client.cast is not None:
            self.cluster.trace(f"{now} n{node} withdraws the device vote for {client.cast}")
            replica.set_qdevice_vote(local, client.cast, False)
        if want is not None:
            self.cluster.trace(f"{now} n{node} casts the device vote for {want}")
            replica.set_qdevice_vote(local, want, True)
        client.cast = want
        self.cluster.net.run_until(now)  # the replica's sends go out now

    def _check_one_quorate_ring(self) -> None:
        net = self.cluster.net
        up = [n for n in self.nodes if net.nodes[n].up]
        quorate: dict[RingId, tuple[int, ...]] = {}
        for n in up:
            r = self.cluster.replica(n)
            if r.mode is not Mode.SYNCED or not r.writable():
                continue
            if all(net.nodes[m].up and self.cluster.replica(m).ring == r.ring
                   for m in r.members):
                quorate[r.ring] = tuple(r.members)
        if len(quorate) > 1:
            raise Violation(f"two quorate partitions at {net.now}: {quorate}")


def run_qdevice_chaos(seed: int, node_range: tuple[int, int], *, keep_trace: bool = False,
                      swarm: Swarm = REPLICA_SWARM) -> RunResult:
    """One seed's run; `swarm`: the chance of each fault kind to be in the run's mix."""
    rng = random.Random(seed)
    n_nodes = rng.randint(max(2, node_range[0]), max(2, node_range[1]))
    node_ids = sorted(rng.sample(range(1, 3 * n_nodes + 1), n_nodes))
    params = sim_params(n_nodes)
    cluster = ReplicaCluster(node_ids, params, rng, keep_trace=keep_trace, installed=[])
    for n in node_ids:
        cluster.install(n, qdevice_config_text(node_ids))
    cluster.checker.majority_required = False  # a device vote makes a minority quorate
    net = cluster.net
    world = QdeviceWorld(cluster, rng)
    workload = Workload(rng, node_ids)
    violation: str | None = None

    def run_steps(until: int) -> None:
        while net.now < until:
            net.run_until(min(until, net.now + STEP_MS))
            world.step()

    try:
        run_steps(net.now + 5_000)
        if not net.run_while(lambda: not cluster.settled(), net.now + 30_000):
            raise Violation("the cluster did not form and sync at start")
        for op in workload.setup():
            cluster.propose(node_ids[0], op)
        draw_faults(cluster, rng, f"seed {seed} nodes {node_ids} {world.algorithm}")
        install_mix(net, draw_mix(rng, swarm, params.token))
        chaos_until = net.now + rng.randint(10_000, 25_000)
        while net.now < chaos_until:
            run_steps(net.now + rng.randint(1, 300))
            roll = rng.random()
            if roll < 0.55:
                live = cluster.live()
                for _ in range(rng.randint(1, 5) if live else 0):
                    cluster.propose(rng.choice(live), workload.op(net.now // 1000))
            elif roll < 0.68:
                world.toggle_reach(rng.choice(node_ids))
            elif roll < 0.70:
                world.restart_qnetd()
            else:
                mixed_fault(rng, net, node_ids, params.token, cluster.crash, cluster.restart)
        heal(cluster, node_ids)
        world.heal()
        deadline = net.now + 120_000
        while not cluster.settled() and net.now < deadline:
            run_steps(net.now + STEP_MS)
        if not cluster.settled():
            raise Violation(f"no single synced ring 120 s after healing: {node_states(cluster)}")
        check_after_healing(cluster, node_ids)
    except (Violation, SimulationStuck) as exc:
        violation = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a crash of the code under test is a finding
        violation = f"exception {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return run_result(cluster, seed, n_nodes, violation)
