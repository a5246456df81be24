"""Run-time nodelist changes under the simulator: nodes are added and removed while the file
workload runs and the network, the disks and the nodes fail (`run_lifecycle_chaos`).

Each seed starts a cluster with some of its node ids (at least three) configured; the other ids
are spare, "not yet installed". During the chaos an administrator (`Admin`), one change at a time:
* adds a node as `pmxfs add` does: the next corosync.conf -- the proposer's current one with the
  spare node added and config_version + 1 -- is written through a live quorate member; only once
  that write is acknowledged does the new node start, with an empty disk and that config text;
* removes a node as `pmxfs delnode` does: the node is stopped first (crashed when it runs), then
  the corosync.conf without it is written the same way;
* sometimes starts a removed node again with its old config: the others must refuse it (their
  ring never takes it in) and it must not break their safety.
A change whose write is refused, times out or loses its proposer is not carried out (no new
node starts; a node that was to be removed is a member again) -- though the write may still have
been applied, which the checks allow for: they go by the configs the replicas hold.

The network and process faults are those of the run's mix (`faults.draw_mix`, the same kinds
as the fs workload's), the disk faults the fs workload's. The checks are `ReplicaChecker`'s, with
a changing config: a mutation is applied only in a ring holding a majority of the votes of the
config the applying replica runs with at that moment; a node that was (or was to be) removed
never is in a ring of a node whose config lacks it; every acknowledged write is in the final
lineage. After healing (crashed members restart, and so does
a removed node now and then, with its old config): every live node outside the final config is
one the administrator removed or tried to; the live nodes of the final config are one synced ring
of exactly them with one checksum, each holding that config in the replica and in totem; no
acknowledged removal is undone; each of them takes a probe write, and every proposal of theirs
is answered.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from enum import Enum

from pmxfs.core.conf import ClusterConfig, check
from pmxfs.core.fsop import WriteFile
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.core.replica import Replica
from pmxfs.core.totem import State

from .faults import Swarm, draw_mix, install_mix, mixed_fault
from .network import SimulationStuck
from .replica_sim import (
    REPLICA_SWARM,
    NodeKey,
    ReplicaCluster,
    Workload,
    check_after_healing,
    cluster_config_text,
    configured_nodes,
    draw_faults,
    heal,
    node_states,
    run_result,
)
from .totem_checker import Violation
from .totem_sim import RunResult, sim_params

MIN_NODES = 3  # never fewer configured nodes than this
MAX_NODES = 7  # never more
LIFECYCLE_ODDS = 0.08  # the chance that a chaos step is the administrator's


class ChangeKind(Enum):
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class _Change:
    """A nodelist change whose corosync.conf write is in flight."""

    kind: ChangeKind
    node: int
    text: str  # the new corosync.conf
    proposer: NodeKey
    request: int


class Admin:
    """The administrator: adds spare nodes and removes nodes, one change at a time, always
    through a live quorate member, as `pmxfs add` and `pmxfs delnode` do."""

    def __init__(self, cluster: ReplicaCluster, rng: random.Random, installed: list[int],
                 spare: list[int]) -> None:
        self.cluster = cluster
        self.rng = rng
        self.members = set(installed)  # nodes it counts as the cluster's (crashed or not)
        self.spare = list(spare)  # never installed
        self.removed: set[int] = set()  # removals that were acknowledged
        self.change: _Change | None = None
        self.done: list[tuple[ChangeKind, int]] = []

    # ------------------------------------------------------------------ questions

    def fault_targets(self) -> list[int]:
        """Nodes the random faults may partition, crash and restart: every installed node but
        one that is being removed (it stays down until its removal is settled)."""
        victim = self.change.node if self.change and self.change.kind is ChangeKind.REMOVE else 0
        return sorted(n for n in self.cluster.started if n != victim)

    def _proposer(self) -> Replica | None:
        """A live member, running, synced and quorate, whose tree holds a valid config."""
        net = self.cluster.net
        ready = [n for n in sorted(self.members)
                 if net.nodes[n].up and net.nodes[n].paused_until is None
                 and self.cluster.replica(n).synced() and self.cluster.replica(n).writable()
                 and _tree_config(self.cluster.replica(n)) is not None]
        return self.cluster.replica(self.rng.choice(ready)) if ready else None

    # ------------------------------------------------------------------ actions

    def act(self) -> None:
        """One random administrator's action, if none is in flight."""
        if self.change is not None:
            return
        roll = self.rng.random()
        if roll < 0.45:
            self._add()
        elif roll < 0.85:
            self._remove()
        else:
            self._restart_removed()

    def _add(self) -> None:
        proposer = self._proposer()
        if proposer is None or not self.spare:
            return
        config = _tree_config(proposer)
        assert config is not None
        nodes = configured_nodes(config)
        if len(nodes) >= MAX_NODES:
            return
        node = self.spare.pop(self.rng.randrange(len(self.spare)))
        self._write(proposer, ChangeKind.ADD, node,
                    cluster_config_text(nodes | {node}, config.config_version + 1))

    def _remove(self) -> None:
        proposer = self._proposer()
        if proposer is None:
            return
        config = _tree_config(proposer)
        assert config is not None
        nodes = configured_nodes(config)
        victims = sorted(nodes - {proposer.node_id})
        if len(nodes) <= MIN_NODES or not victims:
            return
        node = self.rng.choice(victims)
        if self.cluster.net.nodes[node].up:
            self.cluster.crash(node)  # stopped first, as delnode requires
        self.members.discard(node)
        self.cluster.checker.removed.add(node)
        self._write(proposer, ChangeKind.REMOVE, node,
                    cluster_config_text(nodes - {node}, config.config_version + 1))

    def down_removed(self) -> list[int]:
        """Removed nodes that ran once and are down: they may start again with their old
        config (a removed node that never ran has nothing to start with)."""
        return sorted(n for n in self.removed
                      if n in self.cluster.started and not self.cluster.net.nodes[n].up)

    def _restart_removed(self) -> None:
        down = self.down_removed()
        if down:
            node = self.rng.choice(down)
            self.cluster.trace(f"{self.cluster.net.now} admin starts removed n{node} again")
            self.cluster.restart(node)

    def _write(self, proposer: Replica, kind: ChangeKind, node: int, text: str) -> None:
        cluster = self.cluster
        request = cluster.propose(proposer.node_id, WriteFile(
            COROSYNC_CONF, text.encode(), cluster.net.now // 1000, create=True))
        assert request is not None
        cluster.trace(f"{cluster.net.now} admin: {kind.value} n{node} through "
                      f"n{proposer.node_id} (request {request})")
        self.change = _Change(kind, node, text, cluster.key(proposer.node_id), request)

    def settle(self, *, give_up: bool = False) -> None:
        """Carry out the change in flight once its write is answered (or can no longer be, or
        the administrator gives up waiting)."""
        change = self.change
        if change is None:
            return
        cluster = self.cluster
        reply = cluster.replies.get(change.request)
        gone = not cluster.net.nodes[change.proposer[0]].up or (
            cluster.key(change.proposer[0]) != change.proposer)
        if reply is None and not gone and not give_up:
            return
        self.change = None
        acknowledged = reply is not None and reply.errno == 0
        cluster.trace(f"{cluster.net.now} admin: {change.kind.value} n{change.node} "
                      f"{'acknowledged' if acknowledged else 'not acknowledged'}")
        if change.kind is ChangeKind.ADD:
            if acknowledged:
                self.members.add(change.node)
                self.done.append((change.kind, change.node))
                cluster.install(change.node, change.text)
        elif acknowledged:
            self.removed.add(change.node)
            self.done.append((change.kind, change.node))
        elif change.node in cluster.started:
            self.members.add(change.node)  # it may come back as a member (or be refused)


def _tree_config(replica: Replica) -> ClusterConfig | None:
    entry = replica.memdb.lookup(COROSYNC_CONF)
    if entry is None or entry.is_dir:
        return None
    return check(entry.data.decode("utf-8", "replace")).config


# ------------------------------------------------------------------------------ the final state


def final_ring(cluster: ReplicaCluster) -> tuple[list[int], frozenset[int]] | None:
    """The live nodes of the cluster's final config, and that config's nodes, when they are
    settled in one ring of exactly them, each holding that config in the replica and in totem,
    and every other live node is one the administrator removed (or tried to); else None."""
    live = cluster.live()
    for text in sorted({cluster.config_texts[n] for n in live}):
        config = check(text).config
        assert config is not None
        nodes = configured_nodes(config)
        ring = sorted(set(live) & nodes)
        if not set(live) - nodes <= cluster.checker.removed or not ring:
            continue
        if cluster.settled(ring) and all(
                cluster.config_texts[n] == text and cluster.replica(n).config_text == text
                and cluster.replica(n).totem.nodes == nodes for n in ring):
            return ring, nodes
    return None


def _describe(cluster: ReplicaCluster) -> str:
    configs = {n: cluster.configs[n].config_version for n in cluster.live()}
    totem = {n: (cluster.replica(n).totem.state.value, sorted(cluster.replica(n).totem.nodes))
             for n in cluster.live()
             if cluster.replica(n).totem.state is not State.OPERATIONAL
             or cluster.replica(n).totem.nodes != configured_nodes(cluster.configs[n])}
    return f"{node_states(cluster)} config versions {configs} totem {totem}"


# ------------------------------------------------------------------------------ chaos


def run_lifecycle_chaos(seed: int, node_range: tuple[int, int], *, keep_trace: bool = False,
                        swarm: Swarm = REPLICA_SWARM) -> RunResult:
    """One seed's run; `swarm`: the chance of each fault kind to be in the run's mix."""
    rng = random.Random(seed)
    n_nodes = rng.randint(max(MIN_NODES, node_range[0]), max(MIN_NODES, node_range[1]))
    n_spare = rng.randint(1, 3)
    pool = sorted(rng.sample(range(1, 3 * (n_nodes + n_spare) + 1), n_nodes + n_spare))
    installed = sorted(rng.sample(pool, n_nodes))
    spare = [n for n in pool if n not in installed]
    params = sim_params(n_nodes)
    cluster = ReplicaCluster(pool, params, rng, keep_trace=keep_trace, installed=installed)
    net = cluster.net
    workload = Workload(rng, pool)
    admin = Admin(cluster, rng, installed, spare)
    violation: str | None = None
    try:
        if not net.run_while(lambda: not cluster.settled(installed), net.now + 30_000):
            raise Violation("the cluster did not form and sync at start")
        first = cluster.write(installed[0], WriteFile(
            COROSYNC_CONF, cluster_config_text(installed).encode(), 1, create=True))
        if first.errno != 0:
            raise Violation(f"the first corosync.conf was refused: errno {first.errno}")
        for op in workload.setup():
            cluster.propose(installed[0], op)
        draw_faults(cluster, rng, f"seed {seed} nodes {installed} spare {spare}")
        install_mix(net, draw_mix(rng, swarm, params.token))
        chaos_until = net.now + rng.randint(10_000, 25_000)
        while net.now < chaos_until:
            net.run_until(net.now + rng.randint(1, 300))
            admin.settle()
            roll = rng.random()
            if roll < LIFECYCLE_ODDS:
                admin.act()
            elif roll < 0.75:
                live = cluster.live()
                for _ in range(rng.randint(1, 5) if live else 0):
                    cluster.propose(rng.choice(live), workload.op(net.now // 1000))
            else:
                mixed_fault(rng, net, admin.fault_targets(), params.token, cluster.crash,
                            cluster.restart)
        admin.settle(give_up=True)
        heal(cluster, sorted(admin.members))
        for node in admin.down_removed():
            if rng.random() < 0.5:
                cluster.trace(f"{net.now} removed n{node} starts again with its old config")
                cluster.restart(node)
        cluster.trace(f"{net.now} healed; changes {admin.done}")
        found: list[tuple[list[int], frozenset[int]]] = []

        def unsettled() -> bool:
            final = final_ring(cluster)
            found[:] = [final] if final is not None else []
            return final is None

        if not net.run_while(unsettled, net.now + 120_000):
            raise Violation(f"no single synced ring of the final config 120 s after healing: "
                            f"{_describe(cluster)}")
        ring, nodes = found[0]
        if admin.removed & nodes:
            raise Violation(f"acknowledged removal(s) of {sorted(admin.removed & nodes)} undone: "
                            f"the final config has {sorted(nodes)}")
        check_after_healing(cluster, ring)
    except (Violation, SimulationStuck) as exc:
        violation = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a crash of the code under test is a finding
        violation = f"exception {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return run_result(cluster, seed, n_nodes, violation)
