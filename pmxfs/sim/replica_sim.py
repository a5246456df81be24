"""Replicas under the simulator: real `Replica` objects (totem + quorum + memdb) on the simulated
network, a random file-system workload, a simulated disk, and checkers on every output.

The disk of a node is what its `Persist` outputs committed, in order, and it behaves as the
runtime's does (runtime/persister.py, runtime/replica_node.py): a Persist is queued, a commit
takes every queued Persist at once (one transaction: group commit) and completes after a
latency, and only then is the replica told (`Replica.persisted`). Meanwhile the node goes on
delivering and passing the token. Each node's disk has a `DiskProfile` drawn from the seed
(`draw_disk_faults`; each kind is on in about a third of the runs, at rates that differ per
node):
* slow: a latency per commit (a base shared by every disk; some nodes up to two token timeouts
  on every commit) and stalls (rare ones of 3 to 20 token timeouts): the ring must not notice,
  only the replies that need the slow disk wait;
* failing: a commit ends in an error, and the runtime stops the node: the node crashes there,
  what was queued is lost, and a failed fsync may or may not have left the group on disk (both
  are drawn). It starts again later from what its disk holds -- unless the disk failed for good
  (at most one node per run), when it stays down and the others, a majority, go on;
* torn: a crash strikes a commit, either during it (nothing of the group: SQLite's transaction
  is atomic) or after it but before the report (all of the group on disk, the node never told:
  it must not have acknowledged anything on that basis, and when it starts again it uses it).
The ring seq file is written apart from the database, at once and before any later output is
carried out, as the runtime writes it (fsynced before the commit token that follows leaves): a
failure or a crash there leaves the old or the new value and stops the node. A crash also drops
whatever was queued or being written (the deliveries were applied in memory, not on disk), and
can strike exactly when a Persist is handed out. `heal` ends stalls, failures and crashes; slow
disks stay slow. A restart builds the replica from the disk and the node's own copy of
corosync.conf (the runtime rewrites it as soon as the replica takes a new one, before the tree's
rows are on disk). Each Persist makes durable the lineage (below) the replica had when it made
the Persist, which is not always the lineage at the drain (operations applied between two
Persists of one drain belong to the second).

Checkers (`ReplicaChecker`):
* lineage: every node's tree is the result of a sequence of applied operations (its *lineage*);
  a sync that adopts the leader's tree adopts the leader's lineage as it was when the leader sent
  its state; a restart goes back to the lineage of the last Persist on disk, and the restarted
  tree must be exactly that lineage replayed (the node uses what its disk holds, also a group
  it never heard was written). At the end, replaying the final lineage on an empty tree must
  give exactly the final tree (sync transfer is exact);
* an operation is answered with its decision (Reply 0, or a refusal the ring decided) only
  after the Persist that holds the decision completed on the disk of every member of the
  proposer's ring (the disks are checked at the reply, so a reply that came from a durability
  claim made too early is caught; a disk's lineage counts only the Persists written without a
  gap, so a node that ran on past a lost commit is caught too), and every acknowledged
  operation is in the final lineage; an operation answered with an error is never in the final
  lineage as a success;
* a mutation is applied only in a ring whose members hold a majority of the votes of the config
  the applying replica runs with at that moment (configs change at run time: lifecycle_sim);
* a node the cluster removed (or tried to) is never in a ring of a node whose config lacks it;
* members that complete the same sync hold identical state checksums;
* after healing, every node is synced in one ring with one checksum, and every proposal of a
  node that stayed up was answered.
"""

from __future__ import annotations

import errno as E
import random
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from pmxfs.core.conf import ClusterConfig, parse, totem_params
from pmxfs.core.entry import Entry, guest_config
from pmxfs.core.fsop import (
    CreateFile,
    FsOp,
    Mkdir,
    Rename,
    Rmdir,
    SetMtime,
    Truncate,
    Unlink,
    UnlockRequest,
    WriteFile,
    WriteRange,
)
from pmxfs.core.memdb import MemDB
from pmxfs.core.persist import Persist
from pmxfs.core.quorum import QuorumConfig
from pmxfs.core.replica import (
    DEFAULT_VERIFY_INTERVAL_MS,
    ConfigChanged,
    OpDecided,
    Replica,
    ReplicaEvent,
    Reply,
    SaveLost,
    StateTaken,
    StoredState,
    SyncCompleted,
)
from pmxfs.core.replica_msgs import OpId
from pmxfs.core.totem import ConfChange, ConfChangeKind, PersistRingSeq, State
from pmxfs.core.totem_params import TotemParams
from pmxfs.core.wire import RingId

from .faults import EVERY_FAULT, Swarm, draw_mix, install_mix, mixed_fault
from .network import Network, SimNode, SimulationStuck
from .totem_checker import Violation
from .totem_sim import RunResult, sim_params
from .trace import Trace

NodeKey = tuple[int, int]
REPLICA_SWARM: Swarm = EVERY_FAULT  # the fault kinds of the replica workloads' mixes


@dataclass(frozen=True, slots=True)
class _Step:
    op_id: OpId
    op: FsOp
    writer: int
    errno: int
    applied: bool


@dataclass
class _Lineage:
    """An append-only list of steps shared by snapshots: a snapshot is (list, length)."""

    steps: list[_Step] = field(default_factory=list)

    def snapshot(self) -> tuple[list[_Step], int]:
        return self.steps, len(self.steps)


class DiskFault(Enum):
    """The kinds of disk fault; `run_fs_chaos(force_disk=...)` forces one on for every node."""

    SLOW = "slow"  # long latencies on some nodes, stalls far longer than the token timeout
    FAILING = "failing"  # a commit fails: the node stops (its disk may be gone for good)
    TORN = "torn"  # a crash in the middle of a commit, or between the commit and its report


class CommitEnd(Enum):
    """How one commit ends, drawn when it starts."""

    DONE = "done"  # on disk, reported
    FAILED = "failed"  # the commit reports an error: nothing of the group on disk, node stops
    FAILED_WRITTEN = "failed but written"  # an error (a failed fsync), yet all of it on disk
    TORN_BEFORE = "crash during it"  # power cut during the commit: nothing of the group
    TORN_AFTER = "crash before its report"  # the group is on disk, the node never learns it


@dataclass
class DiskProfile:
    """How one node's disk behaves in a run, drawn from the seed (`draw_disk_faults`)."""

    delay: tuple[int, int] = (0, 0)  # a commit's latency in ms, drawn uniformly from this range
    stall: float = 0.0  # the chance that a commit stalls, for a time drawn from `stall_ms`
    stall_ms: tuple[int, int] = (0, 0)
    fail: float = 0.0  # the chance that a commit (or a write of the ring seq file) fails
    fail_for_good: bool = False  # after failing, the disk never comes back: the node stays down
    torn: float = 0.0  # the chance that a crash strikes during a commit or a ring seq write


@dataclass
class _Disk:
    rows: dict[int, Entry] = field(default_factory=dict)
    version: int = 0
    meta: dict[str, bytes] = field(default_factory=dict)
    ring_seq: int = 0
    lineage: tuple[list[_Step], int] = field(default_factory=lambda: ([], 0))
    # Handed out, not written yet: each Persist with the lineage it makes durable.
    queue: list[tuple[Persist, tuple[list[_Step], int]]] = field(default_factory=list)
    writing: bool = False  # a commit is under way (it took what was queued when it started)
    written: int = 0  # the id of the last Persist of the running incarnation on disk
    profile: DiskProfile = field(default_factory=DiskProfile)
    dead: bool = False  # failed for good: the node cannot start again

    def write(self, batch: Persist, lineage: tuple[list[_Step], int]) -> None:
        """Write one Persist. Its lineage is durable only if every earlier Persist of the
        incarnation is: a write that follows a lost one (which a correct runtime never makes)
        leaves the durable lineage where it was, so the reply checker sees the hole."""
        if batch.replace_all:
            self.rows = {}
        for inode in batch.removed:
            self.rows.pop(inode, None)
        for entry in batch.upserts:
            self.rows[entry.inode] = entry
        self.version = batch.version
        self.meta.update(batch.meta)
        if batch.id == self.written + 1:
            self.written = batch.id
            self.lineage = lineage

    def lose_unwritten(self) -> None:
        """The node crashed: what was queued or being written never reached the disk."""
        self.queue = []
        self.writing = False

    def stored(self) -> StoredState:
        """What a node starting from this disk reads."""
        return StoredState(entries=tuple(self.rows[i] for i in sorted(self.rows)),
                           version=self.version, meta=dict(self.meta))


def _persists(batch: list[tuple[Persist, tuple[list[_Step], int]]]) -> str:
    return f"committing Persists {batch[0][0].id}-{batch[-1][0].id}"


def _healed(end: CommitEnd, profile: DiskProfile) -> bool:
    """Whether the fault drawn for a commit (`end`) was ended by `heal` before it struck."""
    if end is CommitEnd.FAILED or end is CommitEnd.FAILED_WRITTEN:
        return not profile.fail
    if end is CommitEnd.TORN_BEFORE or end is CommitEnd.TORN_AFTER:
        return not profile.torn
    return False


def cluster_config_text(node_ids: Iterable[int], config_version: int = 1) -> str:
    """A corosync.conf of `node_ids` (one vote each) with the simulator's totem timers (those of
    `sim_params`), so that a node taking it from the tree keeps the timers it runs with."""
    nodes = "".join(f"  node {{\n    name: node{n}\n    nodeid: {n}\n    quorum_votes: 1\n"
                    f"    ring0_addr: 127.0.1.{n}\n  }}\n" for n in sorted(node_ids))
    return (f"totem {{\n  version: 2\n  cluster_name: sim\n  config_version: {config_version}\n"
            f"  transport: udpu\n  token: 400\n  token_coefficient: 50\n  join: 30\n"
            f"  merge: 100\n}}\nnodelist {{\n{nodes}}}\n"
            f"quorum {{\n  provider: corosync_votequorum\n}}\n")


def configured_nodes(config: ClusterConfig) -> frozenset[int]:
    return frozenset(n.nodeid for n in config.node_infos() if n.nodeid is not None)


def holds_majority(config: ClusterConfig, members: Iterable[int]) -> bool:
    """Whether `members` hold more than half of the votes `config` expects."""
    quorum = QuorumConfig.from_config(config)
    votes = sum(quorum.node_votes.get(m, 0) for m in set(members))
    return 2 * votes > quorum.configured_expected


class ReplicaChecker:
    def __init__(self) -> None:
        self.majority_required = True  # off in tests that lower the expected votes on purpose
        # Nodes the cluster removed (or tried to): none may be in a ring of a node whose
        # config does not have it.
        self.removed: set[int] = set()
        self.lineages: dict[NodeKey, _Lineage] = {}
        self.snapshots: dict[tuple[int, RingId, int], tuple[list[_Step], int]] = {}
        # Per sync: the checksum and every node run that completed it with that checksum.
        self.sync_sums: dict[tuple[RingId, int], tuple[bytes, set[NodeKey]]] = {}
        self.ring_members: dict[NodeKey, tuple[int, ...]] = {}
        self.acked: dict[OpId, int] = {}
        self.applied_ops = 0
        self.syncs = 0

    def started(self, key: NodeKey, lineage: tuple[list[_Step], int]) -> None:
        steps, length = lineage
        self.lineages[key] = _Lineage(steps[:length])
        self.ring_members[key] = ()

    def on_event(self, key: NodeKey, ev: ReplicaEvent, config: ClusterConfig) -> None:
        """`config`: the one the replica runs with as it reports `ev`."""
        lineage = self.lineages[key]
        if isinstance(ev, OpDecided):
            if ev.applied and ev.errno == 0:
                members = self.ring_members[key]
                if self.majority_required and not holds_majority(config, members):
                    raise Violation(f"n{key[0]} applied {ev.op_id} in ring {members}, which "
                                    f"holds no majority of its config's nodes "
                                    f"{sorted(configured_nodes(config))}")
                self.applied_ops += 1
            lineage.steps.append(_Step(ev.op_id, ev.op, ev.writer, ev.errno, ev.applied))
        elif isinstance(ev, StateTaken):
            self.snapshots[(key[0], ev.ring, ev.epoch)] = lineage.snapshot()
        elif isinstance(ev, SyncCompleted):
            self.syncs += 1
            first, completed = self.sync_sums.setdefault((ev.ring, ev.epoch),
                                                         (ev.checksum, set()))
            if first != ev.checksum:
                raise Violation(f"n{key[0]} completed sync {ev.ring}/{ev.epoch} with another "
                                f"state than its peers")
            completed.add(key)
            if ev.adopted:
                steps, length = self.snapshots[(ev.leader, ev.ring, ev.epoch)]
                self.lineages[key] = _Lineage(steps[:length])

    def ring_void(self, key: NodeKey, ring_seq: int) -> None:
        """Node run `key` died before its ring seq file held `ring_seq`: nothing of a ring with
        that seq left it (no frame leaves before the file is written), and its next run forms
        a ring with the same id again -- what it completed in such a ring never happened."""
        for sync, (_, completed) in list(self.sync_sums.items()):
            if sync[0].seq == ring_seq:
                completed.discard(key)
                if not completed:
                    del self.sync_sums[sync]

    def on_confchg(self, key: NodeKey, c: ConfChange, config: ClusterConfig | None) -> None:
        """`config`: the one the replica runs with, when its totem is still in `c`'s ring
        (None when it has left it already: a config taken from the old ring's last messages
        made it gather before its replica saw the change)."""
        if c.kind is ConfChangeKind.REGULAR:
            self.ring_members[key] = c.members
            if config is None:
                return
            intruders = (set(c.members) & self.removed) - configured_nodes(config) - {key[0]}
            if intruders:
                raise Violation(f"n{key[0]} formed ring {c.ring_id} {list(c.members)} with "
                                f"removed node(s) {sorted(intruders)} its config does not have")

    def on_reply(self, key: NodeKey, op_id: OpId, reply: Reply,
                 disks: dict[int, tuple[list[_Step], int]]) -> None:
        """`disks`: the persisted lineage of every member of the proposer's ring. Every answer
        that reports a decision -- success or a refusal the ring decided (EEXIST, EACCES
        without quorum, ...) -- comes from a durability claim, so the decision must be on every
        member's disk."""
        decided = reply.errno == 0 or (
            reply.errno not in (E.ETIMEDOUT, E.EIO)
            and any(s.op_id == op_id for s in reversed(self.lineages[key].steps)))
        if decided:
            for member, (steps, length) in disks.items():
                if not any(s.op_id == op_id and s.errno == reply.errno
                           for s in reversed(steps[:length])):
                    raise Violation(f"n{key[0]} answered {op_id} "
                                    f"({E.errorcode.get(reply.errno, reply.errno)}) before its "
                                    f"decision was on the disk of ring member n{member}")
        if reply.errno not in (E.ETIMEDOUT, E.EIO):
            self.acked[op_id] = reply.errno

    def check_restart(self, key: NodeKey, memdb: MemDB) -> None:
        """A node that starts holds what its disk holds: the tree its lineage gives (after a
        crash between a commit and its report, the unreported group too)."""
        if self._replay(key).checksum() != memdb.checksum():
            raise Violation(f"n{key[0]} started with a tree that is not the result of the "
                            f"{len(self.lineages[key].steps)} operations on its disk")

    def _replay(self, key: NodeKey) -> MemDB:
        """An empty tree with `key`'s lineage applied (each step must decide as it did)."""
        replay = MemDB()
        for step in self.lineages[key].steps:
            if step.applied:
                got = replay.apply(step.op, step.writer).errno
                if got != step.errno:
                    raise Violation(f"replaying {step.op_id} {step.op} gave errno {got}, the "
                                    f"cluster decided {step.errno}")
        return replay

    def check_final(self, key: NodeKey, memdb: MemDB) -> None:
        steps = self.lineages[key].steps
        if self._replay(key).checksum() != memdb.checksum():
            raise Violation(f"n{key[0]}'s tree is not the result of its lineage of "
                            f"{len(steps)} operations")
        decided = {s.op_id: s.errno for s in steps}
        for op_id, errno in self.acked.items():
            if errno == 0 and decided.get(op_id) != 0:
                raise Violation(f"acknowledged {op_id} is not in the final tree's lineage")
            if errno != 0 and decided.get(op_id) == 0:
                raise Violation(f"{op_id} was answered {E.errorcode.get(errno)} yet applied")


class ReplicaCluster:
    """Replicas on a simulated network with disks and the checker wired in.

    `node_ids` are every node the network knows; `installed` (default: all of them) start at
    once, configured with a corosync.conf of exactly the installed nodes, and the others wait
    for `install`. Each node keeps its own copy of corosync.conf, as the runtime does: it starts
    (and restarts) with that copy, and the copy follows the `ConfigChanged` outputs. A node's
    totem timers are those of its config; `params` are the ones of the first config."""

    def __init__(self, node_ids: list[int], params: TotemParams, rng: random.Random, *,
                 keep_trace: bool = False,
                 verify_interval: int = DEFAULT_VERIFY_INTERVAL_MS,
                 installed: list[int] | None = None) -> None:
        self.node_ids = node_ids
        self.params = params
        self.rng = rng
        first = node_ids if installed is None else installed
        text = cluster_config_text(first)
        self.config_texts: dict[int, str] = dict.fromkeys(first, text)
        self.configs: dict[int, ClusterConfig] = dict.fromkeys(first, parse(text))
        self.checker = ReplicaChecker()
        self.trace = Trace(keep_trace)
        self.net = Network(rng, self._on_output, self.trace)
        self.disks: dict[int, _Disk] = {n: _Disk() for n in node_ids}
        self.requests: dict[NodeKey, dict[int, OpId | None]] = {}
        self.next_request = 0
        self.crash_in_batch = 0.0
        self.crash_at_next_persist: set[int] = set()
        # The lineage each Persist makes durable, as it was when the replica made the Persist
        # (several may leave in one drain, with operations applied between them): per running
        # replica, how many Persists it had made at its last event, and the lineages of those
        # not carried out yet.
        self.persists_made: dict[NodeKey, int] = {}
        self.persist_lineages: dict[NodeKey, dict[int, tuple[list[_Step], int]]] = {}
        self.verify_interval = verify_interval
        self.replies: dict[int, Reply] = {}
        self.lost: list[tuple[int, SaveLost]] = []
        self.started: set[int] = set()
        for n in node_ids:
            self.net.add(n, None)
            if n in self.configs:
                self._start(n)

    # ------------------------------------------------------------------ plumbing

    @property
    def disk_delay(self) -> tuple[int, int]:
        """A commit's latency in ms, drawn uniformly from this range (the first node's; setting
        it sets every node's)."""
        return self.disks[self.node_ids[0]].profile.delay

    @disk_delay.setter
    def disk_delay(self, delay: tuple[int, int]) -> None:
        for disk in self.disks.values():
            disk.profile.delay = delay

    def key(self, node_id: int) -> NodeKey:
        return node_id, self.net.nodes[node_id].incarnation

    def _start(self, node_id: int) -> None:
        node = self.net.nodes[node_id]
        if node_id in self.started:
            node.incarnation += 1
        self.started.add(node_id)
        key = (node_id, node.incarnation)
        disk = self.disks[node_id]
        disk.written = 0  # the new incarnation numbers its Persists from 1
        self.checker.started(key, disk.lineage)
        self.requests[key] = {}
        config = self.configs[node_id]
        core = Replica(node_id, config, totem_params(config), self.net.local_now(node_id),
                       incarnation=node.incarnation, stored=disk.stored(),
                       ring_seq=disk.ring_seq, first_log_uid=node.incarnation * 1_000_000 + 1,
                       verify_interval=self.verify_interval,
                       on_event=lambda ev: self._on_event(key, ev),
                       on_totem_event=lambda text: self.trace(
                           f"{self.net.now} n{node_id} {text}"))
        self.checker.check_restart(key, core.memdb)
        self.net.start(node_id, core)

    def _on_event(self, key: NodeKey, ev: ReplicaEvent) -> None:
        self.trace(f"{self.net.now} n{key[0]} {type(ev).__name__} "
                    f"{getattr(ev, 'op_id', '')} {getattr(ev, 'errno', '')}")
        core = self.net.nodes[key[0]].core
        # While it is being built, a replica runs with the config it was started with.
        config = core.config if isinstance(core, Replica) else self.configs[key[0]]
        if isinstance(core, Replica):
            self._note_persists_made(key, core)
        self.checker.on_event(key, ev, config)

    def _note_persists_made(self, key: NodeKey, core: Replica) -> None:
        """Before the replica's event changes the lineage: the Persists it made since its last
        event hold the lineage as it is now."""
        made = core.persists_made
        seen = self.persists_made.get(key, 0)
        if made > seen:
            snapshot = self.checker.lineages[key].snapshot()
            lineages = self.persist_lineages.setdefault(key, {})
            for persist_id in range(seen + 1, made + 1):
                lineages[persist_id] = snapshot
            self.persists_made[key] = made

    def _on_output(self, node: SimNode, out: object) -> None:
        key = (node.node_id, node.incarnation)
        disk = self.disks[node.node_id]
        if isinstance(out, Persist):
            if node.node_id in self.crash_at_next_persist or (
                    self.crash_in_batch and self.rng.random() < self.crash_in_batch):
                self.crash_at_next_persist.discard(node.node_id)
                self.trace(f"{self.net.now} n{node.node_id} crashes before a Persist")
                self.crash(node.node_id)
                return
            lineage = self.persist_lineages.get(key, {}).pop(out.id, None)
            self.persists_made[key] = max(self.persists_made.get(key, 0), out.id)
            disk.queue.append((out, lineage or self.checker.lineages[key].snapshot()))
            if not disk.writing:
                self._start_commit(key)
        elif isinstance(out, SaveLost):
            self.lost.append((node.node_id, out))
        elif isinstance(out, PersistRingSeq):
            self._write_ring_seq(key, out.ring_seq)
        elif isinstance(out, ConfChange):
            self.trace(f"{self.net.now} n{node.node_id} {out.kind.value} {out.ring_id} "
                        f"{list(out.members)}")
            totem = self.replica(node.node_id).totem
            current = totem.state is State.OPERATIONAL and totem.ring.ring_id == out.ring_id
            self.checker.on_confchg(key, out, self.replica(node.node_id).config if current
                                    else None)
        elif isinstance(out, ConfigChanged):
            self.config_texts[node.node_id] = out.text
            self.configs[node.node_id] = parse(out.text)
            self.trace(f"{self.net.now} n{node.node_id} takes config version "
                        f"{self.configs[node.node_id].config_version}")
        elif isinstance(out, Reply):
            op_id = self.requests[key].pop(out.request_id)
            self.replies[out.request_id] = out
            self.trace(f"{self.net.now} n{node.node_id} reply {out.request_id} {out.errno}")
            if op_id is not None:
                members = self.checker.ring_members[key]
                self.checker.on_reply(key, op_id, out,
                                      {m: self.disks[m].lineage for m in members})

    def _write_ring_seq(self, key: NodeKey, ring_seq: int) -> None:
        """The ring seq file, as the runtime writes it: at once, before any later output is
        carried out (runtime/ring_seq.py: temporary file, fsync, rename). A failed write stops
        the node and a crash may strike during it; either way the file holds the old value or
        the new one, and nothing after it happens."""
        disk = self.disks[key[0]]
        end = self._draw_end(disk.profile)
        if end is not CommitEnd.FAILED and end is not CommitEnd.TORN_BEFORE:
            disk.ring_seq = max(disk.ring_seq, ring_seq)
        elif disk.ring_seq < ring_seq:
            self.checker.ring_void(key, ring_seq)
        if end is not CommitEnd.DONE:
            self._stop_node(key, end, f"writing ring seq {ring_seq}")

    def _draw_end(self, profile: DiskProfile) -> CommitEnd:
        """How a write ends (no draw at all when the disk has neither fault)."""
        if profile.fail and self.rng.random() < profile.fail:
            return self.rng.choice([CommitEnd.FAILED, CommitEnd.FAILED_WRITTEN])
        if profile.torn and self.rng.random() < profile.torn:
            return self.rng.choice([CommitEnd.TORN_BEFORE, CommitEnd.TORN_AFTER])
        return CommitEnd.DONE

    def _start_commit(self, key: NodeKey) -> None:
        """The disk takes everything queued and writes it in one commit (one transaction)."""
        disk = self.disks[key[0]]
        batch, disk.queue = disk.queue, []
        disk.writing = True
        profile = disk.profile
        latency = self.rng.randint(*profile.delay)
        if profile.stall and self.rng.random() < profile.stall:
            latency += self.rng.randint(*profile.stall_ms)
            self.trace(f"{self.net.now} n{key[0]} disk stalls for {latency} ms")
        end = self._draw_end(profile)
        if end is CommitEnd.TORN_BEFORE:
            at = self.net.now + self.rng.randint(0, latency)
            self.net.schedule(at, lambda: self._crash_during_commit(key, batch))
        self.net.schedule(self.net.now + latency, lambda: self._commit_done(key, batch, end))

    def _commit_done(self, key: NodeKey, batch: list[tuple[Persist, tuple[list[_Step], int]]],
                     end: CommitEnd) -> None:
        node_id = key[0]
        if not self.net.nodes[node_id].up or self.key(node_id) != key:
            return  # the node crashed meanwhile: the commit never completed
        disk = self.disks[node_id]
        if _healed(end, disk.profile):
            end = CommitEnd.DONE
        if end is CommitEnd.FAILED or end is CommitEnd.FAILED_WRITTEN:
            self._commit_failed(key, batch, end)
            return
        for persist, lineage in batch:
            disk.write(persist, lineage)
        if end is CommitEnd.TORN_AFTER:
            self._stop_node(key, end, _persists(batch))
            return
        self.trace(f"{self.net.now} n{node_id} persisted up to {batch[-1][0].id}")
        self._tell_persisted(key, batch[-1][0].id)

    def _commit_failed(self, key: NodeKey,
                       batch: list[tuple[Persist, tuple[list[_Step], int]]],
                       end: CommitEnd) -> None:
        """The commit reported an error: the runtime stops the node (runtime/replica_node.py),
        which never learns whether a failed fsync left the group on disk after all."""
        if end is CommitEnd.FAILED_WRITTEN:
            disk = self.disks[key[0]]
            for persist, lineage in batch:
                disk.write(persist, lineage)
        self._stop_node(key, end, _persists(batch))

    def _crash_during_commit(self, key: NodeKey,
                             batch: list[tuple[Persist, tuple[list[_Step], int]]]) -> None:
        if (self.net.nodes[key[0]].up and self.key(key[0]) == key
                and not _healed(CommitEnd.TORN_BEFORE, self.disks[key[0]].profile)):
            self._stop_node(key, CommitEnd.TORN_BEFORE, _persists(batch))

    def _stop_node(self, key: NodeKey, end: CommitEnd, what: str) -> None:
        """A write ended in a failure (the runtime stops the node) or a crash struck it."""
        node_id = key[0]
        disk = self.disks[node_id]
        if end is CommitEnd.FAILED or end is CommitEnd.FAILED_WRITTEN:
            disk.dead = disk.profile.fail_for_good
            self.trace(f"{self.net.now} n{node_id}'s disk fails {what} ({end.value}): the node "
                       f"stops{' and its disk is gone for good' if disk.dead else ''}")
        else:
            self.trace(f"{self.net.now} n{node_id} crashes, {what}: {end.value}")
        self.crash(node_id)

    def _tell_persisted(self, key: NodeKey, persist_id: int) -> None:
        """The commit is on disk; a paused process learns it when it runs again."""
        node = self.net.nodes[key[0]]
        if not node.up or self.key(key[0]) != key:
            return
        if node.paused_until is not None:
            # just after the resume (an action at the resume's own time would run before it)
            self.net.schedule(node.paused_until + 1,
                              lambda: self._tell_persisted(key, persist_id))
            return
        disk = self.disks[key[0]]
        disk.writing = False
        self.replica(key[0]).persisted(self.net.local_now(key[0]), persist_id)
        self.net.flush(node)
        if disk.queue and node.up and self.key(key[0]) == key:
            self._start_commit(key)

    def replica(self, node_id: int) -> Replica:
        core = self.net.nodes[node_id].core
        assert isinstance(core, Replica)
        return core

    # ------------------------------------------------------------------ actions

    def propose(self, node_id: int, op: FsOp) -> int | None:
        """Propose `op` on a node; returns the request id (None if the node is down)."""
        node = self.net.nodes[node_id]
        if not node.up or node.paused_until is not None:
            return None
        key = self.key(node_id)
        self.next_request += 1
        request = self.next_request
        self.requests[key][request] = None
        op_id = self.replica(node_id).propose(self.net.local_now(node_id), request, op)
        if request in self.requests[key]:
            self.requests[key][request] = op_id
        self.trace(f"{self.net.now} n{node_id} propose {request} {op_id} {op}"[:200])
        self.net.flush(node)
        return request

    def propose_expected(self, node_id: int, expected: int) -> int:
        """`pmxfs expected N` on a node; returns the request id (its Reply lands in
        `replies`, at once when it is refused before anything is sent)."""
        self.next_request += 1
        request = self.next_request
        self.requests[self.key(node_id)][request] = None
        self.replica(node_id).propose_expected(self.net.local_now(node_id), request, expected)
        self.net.flush(self.net.nodes[node_id])
        return request

    def expected(self, node_id: int, expected: int, timeout: int = 5_000) -> Reply:
        """`pmxfs expected N` on a node, and wait for the answer."""
        request = self.propose_expected(node_id, expected)
        self.wait(lambda: request in self.replies, timeout, "the reply to expected")
        return self.replies[request]

    def both_sides_write_while_apart(self, path: str, lonely: bytes, majority: bytes) -> None:
        """The lost+found scenario: node 1 is cut off from the others, an operator runs
        `expected 1` on it, both sides write `path`, and the network heals into one synced ring.
        Writes of the lone node are its own, so the majority checker is told so."""
        first, *rest = self.node_ids
        self.checker.majority_required = False
        self.net.partition([[first], rest])
        self.wait(lambda: not self.replica(first).writable(), 10_000, "the lone node alone")
        self.wait(lambda: self.replica(rest[0]).synced() and self.replica(rest[0]).members
                  == tuple(rest), 10_000, "the majority's ring")
        assert self.expected(first, 1).errno == 0
        assert self.write(first, WriteFile(path, lonely, 4, create=True)).errno == 0
        assert self.write(rest[0], WriteFile(path, majority, 4, create=True)).errno == 0
        self.net.heal()
        self.wait(self.settled, 30_000, "one synced ring after healing")

    def wait(self, condition: Callable[[], bool], timeout: int, what: str) -> None:
        """Run until `condition()` holds; Violation naming `what` after `timeout` ms."""
        if not self.net.run_while(lambda: not condition(), self.net.now + timeout):
            raise Violation(f"timed out after {timeout} ms waiting for {what}")

    def write(self, node_id: int, op: FsOp, timeout: int = 20_000) -> Reply:
        """Propose and wait for the answer."""
        request = self.propose(node_id, op)
        assert request is not None, f"n{node_id} is down"
        self.wait(lambda: request in self.replies, timeout, f"the reply to {op}")
        return self.replies[request]

    def crash(self, node_id: int) -> None:
        self.net.crash(node_id)
        self.disks[node_id].lose_unwritten()

    def restart(self, node_id: int) -> None:
        """Start a node that is down again from its disk (not when its disk failed for good)."""
        if self.disks[node_id].dead:
            self.trace(f"{self.net.now} n{node_id} cannot start: its disk failed for good")
            return
        self._start(node_id)

    def install(self, node_id: int, config_text: str) -> None:
        """Start a node that never ran, with an empty disk and `config_text` as its config."""
        assert node_id not in self.started, f"n{node_id} is installed already"
        self.config_texts[node_id] = config_text
        self.configs[node_id] = parse(config_text)
        self._start(node_id)

    def run_for(self, ms: int) -> None:
        self.net.run_until(self.net.now + ms)

    # ------------------------------------------------------------------ questions

    def live(self) -> list[int]:
        return [n for n, node in self.net.nodes.items() if node.up]

    def runnable(self) -> list[int]:
        """The nodes whose disks did not fail for good."""
        return [n for n in self.node_ids if not self.disks[n].dead]

    def settled(self, nodes: Iterable[int] | None = None) -> bool:
        """`nodes` (default: all that can run) are up and in one ring of exactly them, synced,
        with one state and nothing outstanding."""
        live = self.live()
        members = sorted(self.runnable() if nodes is None else nodes)
        if not members or not set(members) <= set(live):
            return False
        reps = [self.replica(n) for n in members]
        if any(r.totem.state is not State.OPERATIONAL or not r.synced() or r.pending
               or r.outbox or r.update or r.totem.pending for r in reps):
            return False
        return (len({r.ring for r in reps}) == 1 and list(reps[0].members) == members
                and len({r.state_checksum() for r in reps}) == 1)

    def unanswered(self, nodes: Iterable[int] | None = None) -> list[tuple[NodeKey, int]]:
        """Requests without an answer on the running incarnations of `nodes` (default: all)."""
        among = set(self.node_ids if nodes is None else nodes)
        return [(key, req) for key, reqs in self.requests.items() for req in reqs
                if key[0] in among and self.net.nodes[key[0]].up and self.key(key[0]) == key]


# ------------------------------------------------------------------------------ the workload


class Workload:
    """Random operations over a small name space, so that they collide often."""

    def __init__(self, rng: random.Random, node_ids: list[int]) -> None:
        self.rng = rng
        self.node_names = [f"node{n}" for n in node_ids]
        self.dirs = ["a", "b", "a/c", "priv", "priv/lock"]
        self.files = ["f1", "f2", "a/f3", "a/c/f4", "b/f5", "priv/secret", "corosync.conf.new"]
        self.locks = ["priv/lock/l1", "priv/lock/l2"]

    def setup(self) -> list[FsOp]:
        ops: list[FsOp] = [Mkdir("nodes", 1), Mkdir("a", 1), Mkdir("b", 1), Mkdir("priv", 1),
                           Mkdir("priv/lock", 1)]
        for name in self.node_names:
            ops += [Mkdir(f"nodes/{name}", 1), Mkdir(f"nodes/{name}/qemu-server", 1),
                    Mkdir(f"nodes/{name}/lxc", 1)]
        return ops

    def _guest_path(self) -> str:
        kind = self.rng.choice(["qemu-server", "lxc"])
        return f"nodes/{self.rng.choice(self.node_names)}/{kind}/{self.rng.randint(100, 104)}.conf"

    def _data(self) -> bytes:
        size = self.rng.choice([0, 10, 100, 1024, 5000])
        return self.rng.randbytes(size)

    def op(self, mtime: int) -> FsOp:
        r = self.rng.random()
        rng = self.rng
        if r < 0.30:
            return WriteFile(rng.choice(self.files), self._data(), mtime, rng.random() < 0.8)
        if r < 0.40:
            return WriteFile(self._guest_path(), b"memory: 512\n", mtime, True)
        if r < 0.47:
            src = self._guest_path()
            info = guest_config(src)
            assert info is not None
            dst = f"nodes/{rng.choice(self.node_names)}/qemu-server/{info.vmid}.conf"
            return Rename(src, dst, mtime)
        if r < 0.55:
            return Rename(rng.choice(self.files + self.dirs), rng.choice(self.files + self.dirs),
                          mtime)
        if r < 0.60:
            return CreateFile(rng.choice(self.files), mtime, rng.random() < 0.5)
        if r < 0.65:
            return Unlink(rng.choice(self.files))
        if r < 0.70:
            return Mkdir(rng.choice(self.dirs), mtime)
        if r < 0.73:
            return Rmdir(rng.choice(self.dirs))
        if r < 0.78:
            return WriteRange(rng.choice(self.files), rng.randint(0, 3000), self._data()[:500],
                              mtime)
        if r < 0.81:
            return Truncate(rng.choice(self.files), rng.randint(0, 2000), mtime)
        if r < 0.88:
            return Mkdir(rng.choice(self.locks), mtime)
        if r < 0.93:
            return Rmdir(rng.choice(self.locks))
        if r < 0.97:
            return SetMtime(rng.choice(self.locks), mtime)
        return UnlockRequest(rng.choice(self.locks))


# ------------------------------------------------------------------------------ chaos


def run_fs_chaos(seed: int, node_range: tuple[int, int], *, keep_trace: bool = False,
                 force_disk: DiskFault | None = None) -> RunResult:
    """One run of the file workload under chaos; `force_disk` turns one kind of disk fault on
    for every node (tests use it to show the checkers catch what the fault targets)."""
    rng = random.Random(seed)
    n_nodes = rng.randint(*node_range)
    node_ids = sorted(rng.sample(range(1, 3 * n_nodes + 1), n_nodes))
    params = sim_params(n_nodes)
    cluster = ReplicaCluster(node_ids, params, rng, keep_trace=keep_trace)
    net = cluster.net
    workload = Workload(rng, node_ids)
    violation: str | None = None
    try:
        if not net.run_while(lambda: not cluster.settled(), net.now + 30_000):
            raise Violation("the cluster did not form and sync at start")
        for op in workload.setup():
            cluster.propose(node_ids[0], op)
        draw_faults(cluster, rng, f"seed {seed} nodes {node_ids}", permanent_failures=True,
                    force_disk=force_disk)
        install_mix(net, draw_mix(rng, REPLICA_SWARM, params.token))
        chaos_until = net.now + rng.randint(8_000, 20_000)
        while net.now < chaos_until:
            net.run_until(net.now + rng.randint(1, 300))
            _random_action(cluster, workload, rng, params)
        heal(cluster, node_ids)
        if not net.run_while(lambda: not cluster.settled(), net.now + 120_000):
            raise Violation(f"no single synced ring 120 s after healing: {node_states(cluster)}")
        check_after_healing(cluster, cluster.runnable())
    except (Violation, SimulationStuck) as exc:
        violation = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a crash of the code under test is a finding
        violation = f"exception {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return run_result(cluster, seed, n_nodes, violation)


def draw_faults(cluster: ReplicaCluster, rng: random.Random, what: str, *,
                permanent_failures: bool = False, force_disk: DiskFault | None = None) -> None:
    """Draw the run's disk faults and crashes within a batch of outputs from the seed (and
    trace them after `what`); see `draw_disk_faults` for the two keywords. The network's faults
    are the run's mix (`faults.draw_mix`, installed by the caller)."""
    cluster.crash_in_batch = rng.choice([0.0, 0.0, 0.002, 0.01])
    cluster.trace(f"{what} crash in batch {cluster.crash_in_batch}")
    draw_disk_faults(cluster, rng, permanent_failures=permanent_failures, force=force_disk)


def draw_disk_faults(cluster: ReplicaCluster, rng: random.Random, *,
                     permanent_failures: bool = False, force: DiskFault | None = None) -> None:
    """Each node's `DiskProfile` for the run (swarm testing: each kind of fault is on in about
    a third of the runs, and its rates differ per node and per seed). Every disk shares a base
    latency; slow: some nodes take up to two token timeouts per commit, and stalls last 3 to 20
    token timeouts (else rare stalls of one to three); failing: commits and ring seq writes fail
    at a rate per node, and with `permanent_failures` one node's disk may be gone for good
    (the others are a majority, so the cluster goes on); torn: crashes strike writes. `force`
    turns a kind on for every node."""
    token = cluster.params.token
    base = rng.choice([(0, 0), (0, 2), (1, 10), (5, 60)])
    kinds = {kind for kind in DiskFault if rng.random() < 0.3 or kind is force}
    doomed = (rng.choice(cluster.node_ids) if DiskFault.FAILING in kinds and permanent_failures
              and rng.random() < 0.3 else None)
    for n in cluster.node_ids:
        profile = cluster.disks[n].profile = DiskProfile(delay=base)
        if DiskFault.SLOW in kinds:
            if force is DiskFault.SLOW or rng.random() < 0.5:
                profile.delay = (token // 4, 2 * token)
            profile.stall = rng.choice([0.002, 0.005])
            profile.stall_ms = (3 * token, 20 * token)
        else:
            profile.stall = rng.choice([0.0, 0.0, 0.005, 0.02])
            profile.stall_ms = (token, 3 * token)
        if DiskFault.FAILING in kinds:
            profile.fail = rng.choice([0.0005, 0.002, 0.005] if n == doomed or
                                      force is DiskFault.FAILING else [0.0, 0.0005, 0.002])
            profile.fail_for_good = n == doomed
        if DiskFault.TORN in kinds:
            profile.torn = rng.choice([0.002, 0.01] if force is DiskFault.TORN
                                      else [0.0, 0.002, 0.01])
        cluster.trace(f"n{n} disk {profile}")


def check_after_healing(cluster: ReplicaCluster, nodes: list[int]) -> None:
    """`nodes` are settled in one ring: each takes a probe write, every proposal of theirs is
    answered, and each one's tree is the result of its lineage, which holds every
    acknowledged write."""
    net = cluster.net
    probes = [(n, Mkdir(f"probe{n}", net.now // 1000)) for n in nodes]
    for n, op in probes:
        if cluster.propose(n, op) is None:
            raise Violation(f"n{n} could not take a probe write after healing")
    if not net.run_while(lambda: not cluster.settled(nodes) or bool(cluster.unanswered(nodes)),
                         net.now + 60_000):
        raise Violation(f"proposals unanswered after healing: {cluster.unanswered(nodes)[:5]}")
    for n in nodes:
        if cluster.replica(n).memdb.lookup(f"probe{n}") is None:
            raise Violation(f"n{n}'s probe write is missing after healing")
        cluster.checker.check_final(cluster.key(n), cluster.replica(n).memdb)


def run_result(cluster: ReplicaCluster, seed: int, n_nodes: int,
               violation: str | None) -> RunResult:
    return RunResult(
        seed=seed, nodes=n_nodes, violation=violation, delivered=cluster.checker.applied_ops,
        confchgs=cluster.checker.syncs,
        accepted=sum(1 for errno in cluster.checker.acked.values() if errno == 0),
        events=cluster.net.events,
        trace_hash=cluster.trace.digest, trace=cluster.trace.lines,
    )


def node_states(cluster: ReplicaCluster) -> dict[int, object]:
    """Each node's totem state, mode, ring members, pending proposals and checksum, for
    messages."""
    out: dict[int, object] = {}
    for n in cluster.node_ids:
        if not cluster.net.nodes[n].up:
            out[n] = "down"
            continue
        r = cluster.replica(n)
        out[n] = (r.totem.state.value, r.mode.value, list(r.members), len(r.pending),
                  r.state_checksum().hex()[:8])
    return out


def heal(cluster: ReplicaCluster, nodes: Iterable[int]) -> None:
    """End every fault: the network heals, loss, disk stalls, failures and crashes stop (slow
    disks stay slow), the nodes of `nodes` that are down restart (not those whose disk failed
    for good) and paused nodes resume."""
    net = cluster.net
    net.heal()
    net.faults.loss = 0.0
    net.faults.duplicate = 0.0
    cluster.crash_in_batch = 0.0
    for disk in cluster.disks.values():
        disk.profile.stall = disk.profile.fail = disk.profile.torn = 0.0
    for n in nodes:
        node = net.nodes[n]
        if not node.up:
            cluster.restart(n)
    for node in net.nodes.values():
        if node.up and node.paused_until is not None:
            node.paused_until = net.now
    net.run_until(net.now)  # resume the paused nodes now


def _random_action(cluster: ReplicaCluster, workload: Workload, rng: random.Random,
                   params: TotemParams) -> None:
    net = cluster.net
    ids = cluster.node_ids
    roll = rng.random()
    if roll < 0.75:
        live = cluster.live()
        for _ in range(rng.randint(1, 5) if live else 0):
            cluster.propose(rng.choice(live), workload.op(net.now // 1000))
    else:
        mixed_fault(rng, net, ids, params.token, cluster.crash, cluster.restart)

