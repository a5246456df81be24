"""The replica (DFSM): totem + quorum + memdb, so that every member holds the same tree.

How it works
------------
* Normal mode (SYNCED): a proposal becomes an `OpMsg` through totem; every member applies the
  delivered operation with the same deterministic `MemDB.apply`, gated by the ring's agreed
  quorum (not quorate: EACCES everywhere). Each decision is recorded in the *applied table*
  (operation id -> errno), which travels with the tree, so a re-sent operation is never applied
  twice.
* The disk is off the token's path (in the style of etcd-raft's Ready/Advance). Applying a
  delivery changes memory only; the batch's rows go out as one `Persist` (numbered, `id`) that
  the runtime commits on its own time -- in a worker thread, group-committing whatever is ready
  -- and reports with `persisted(now, id)`. Persists complete in order. The position up to which
  this node's deliveries are on disk goes to totem (`Totem.set_durable`), which carries every
  member's position on the token and hands up `Durable(ring, seq)` once all of them reached
  `seq`. Nothing waits for the disk before passing the token, and no message is sent to
  announce durability.
* Acknowledgement waits for durability on every member: a proposer replies when `Durable`
  covers its operation's position. Delivery alone is not enough: a message delivered here
  may never reach the partition that goes on, or a member may crash before writing it, and a
  reply would promise a write the cluster can lose. Since the ring was quorate, every later
  quorate ring shares a member that holds the write on disk (majorities intersect), and the
  leader rule below makes that write win. An operation decided here but not durable when the
  ring ends becomes *doubtful*. A crash between delivery and persistence loses only what no
  one was told is written: the restarted node is simply behind and syncs.
* Sync, after every REGULAR configuration change (SYNCING): every member multicasts a `StateMsg`
  (quorum announcement, version, state checksum, per-entry digests, history, cluster log). With
  all of them delivered, every member computes the same quorum and the same leader: the member
  whose tree comes from the newest quorate ring (every quorate sync stamps the tree with its
  ring seq, and so does a ring that turns quorate later in the order, e.g. by the quorum
  device's vote), then the highest version, then the lowest node id. Versions alone cannot order two
  partitions' trees; the newest quorate ring can, because only one partition is quorate.
  If all checksums agree the sync is over; otherwise the leader multicasts the rows some member
  lacks (`EntriesMsg`, in chunks) and `DoneMsg` (history and applied table); a member that
  differs builds the leader's tree, verifies its checksum, and swaps it in atomically (one
  `Persist(replace_all)`). Operations delivered meanwhile are
  queued and applied when the sync completes, at the same point of the order on every member.
* Nothing is dropped silently: rows written here that the leader never saw (the history tells:
  their version lies in a ring span the leader's history does not have) are handed out as
  `SaveLost` (the runtime writes them under lost+found) and announced in the cluster log --
  but only what the cluster really lacks: a row at a path that one of this node's unanswered
  operations names waits until that operation is settled (it is usually sent again and
  applied), and is saved then only if the tree held the same content neither when that
  operation was decided nor when it was answered (a write of another node may replace the
  content in between: the resent write was acknowledged, nothing was lost). Those waiting
  rows are unacknowledged writes of this node, so a crash before the settling loses nothing
  anyone was told is written. Each node saves only the rows it wrote itself: a row of another
  node that reached it in the tail of a ring may come back when that node sends its operation
  again, and only the writer knows that; the writer holds every row of its own (on disk, if it
  was ever acknowledged), so it saves what is really lost, also when it comes back later.
* Minority reads are "dirty" by design: an operation that only this node delivered (in the
  transitional tail of a ring whose other members never got it) is visible here until the next
  sync replaces it; it was never acknowledged (acknowledgement waits for every member's disk)
  and is then settled as above.
* Doubtful operations are settled after the next quorate sync: the applied table says whether
  and how they were decided (the answer waits until the sync's completion, with its stamp, is
  durable on every member); if not at all they are sent again. After `unresolved_timeout` they
  are answered ETIMEDOUT (the outcome is unknown to this node), so no write hangs for ever.
* Every proposal is bounded, in every state: it is checked before it is sent with the
  receivers' own decoding rules (`fsop.op_errno`; `expected` must lie in 1..the votes that
  exist) and memdb's path rules, which do not depend on the tree (`valid_path`), so a member
  never drops what a caller waits for, and one that is still unanswered
  `unresolved_timeout` after its last change of state (in flight, decided, doubtful) is answered
  ETIMEDOUT: its outcome is unknown here, and a later decision finds no caller.
* The quorum device's vote is for one ring: at a configuration change every member announces
  none, and a member whose device client is told the vote for the current ring sends a
  `QdeviceMsg` through the ring, so every member counts it at the same point of the order; a
  vote for an older ring is dropped on delivery.
* Verification: every `verify_interval` the lowest member opens a round; every member reports
  its checksum at that point of the order; any difference starts a new sync epoch.
"""

from __future__ import annotations

import errno as E
import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import msgpack

from pmxfs.core.clusterlog import ClusterLog, LogEntry, LogWriter
from pmxfs.core.conf import ClusterConfig, totem_params
from pmxfs.core.conf import check as check_config
from pmxfs.core.entry import Entry, EntryType
from pmxfs.core.errors import ProtocolError
from pmxfs.core.fsop import FsOp, Unlock, UnlockRequest, op_errno, op_paths
from pmxfs.core.memdb import COROSYNC_CONF, CorruptTree, MemDB, valid_path
from pmxfs.core.persist import Persist
from pmxfs.core.quorum import LastManStanding, Quorum, QuorumConfig, QuorumStatus
from pmxfs.core.replica_msgs import (
    DoneMsg,
    EntriesMsg,
    ExpectedMsg,
    HistorySpan,
    LmsMsg,
    LogMsg,
    OpId,
    OpMsg,
    QdeviceMsg,
    ReplicaMsg,
    ResyncMsg,
    StateMsg,
    VerifyMsg,
    decode_applied,
    decode_history,
    decode_msg,
    encode_applied,
    encode_history,
    encode_msg,
    is_entries_msg,
)
from pmxfs.core.totem import (
    ConfChange,
    ConfChangeKind,
    Deliver,
    Durable,
    McastResult,
    PersistRingSeq,
    Send,
    Totem,
    TotemStatus,
)
from pmxfs.core.totem import Output as TotemOutput
from pmxfs.core.totem_params import TotemParams
from pmxfs.core.wire import RingId

HISTORY_SPANS = 64
APPLIED_PER_NODE = 256
MAX_PENDING = 256
SYNC_CHUNK_BYTES = 2 << 20
SYNC_QUEUED_BYTES = 2 * SYNC_CHUNK_BYTES  # the leader makes its next chunk below this backlog
DEFAULT_VERIFY_INTERVAL_MS = 3_600_000
DEFAULT_UNRESOLVED_TIMEOUT_MS = 60_000
META_HISTORY = "history"
META_QUORATE_RING = "quorate_ring_seq"
META_APPLIED = "applied/"  # + node id


class Mode(Enum):
    """SYNCING from a REGULAR configuration change (or a new epoch) until the sync completes;
    SYNCED while operations are applied as they are delivered."""

    SYNCING = "syncing"
    SYNCED = "synced"


class PendingState(Enum):
    """Where one of this node's proposals stands, until it is answered."""

    IN_FLIGHT = "in flight"  # handed to totem, not delivered yet
    DECIDED = "decided"  # decided here, waiting for the decision to be stable
    DOUBTFUL = "doubtful"  # the ring ended first: maybe decided elsewhere, maybe nowhere


@dataclass
class _Pending:
    """One of this node's proposals that has not been answered yet."""

    request_id: int  # the caller's id, put in the `Reply`
    op: FsOp
    state: PendingState
    since: int  # when it entered `state`: the bound on its wait counts from here
    ring: RingId | None = None  # DECIDED: the ring it was delivered in
    seq: int = 0  # DECIDED: its position in that ring
    errno: int = 0  # DECIDED: the outcome


# ------------------------------------------------------------------------------ outputs


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of proposal `request_id`: 0 or an errno, and a reason for humans."""

    request_id: int
    errno: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class SaveLost:
    """Files this node had that the sync replaced: keep them under lost+found/<ring>/."""

    ring_id: RingId
    files: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Invalidate:
    """Cached views of these paths are stale ("" with everything=True: the whole tree)."""

    paths: tuple[str, ...]
    everything: bool = False


@dataclass(frozen=True, slots=True)
class QuorumChanged:
    """The agreed quorum changed (membership, `expected`, last man standing)."""

    status: QuorumStatus


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """A new corosync.conf was taken by the cluster; rewrite the local copy."""

    text: str


Output = (Send | PersistRingSeq | ConfChange | Persist | Reply | SaveLost | Invalidate
          | QuorumChanged | ConfigChanged)


# ------------------------------------------------------------------------------ events
# Structured notes for the simulator's checkers and for tracing; they never change behaviour.


@dataclass(frozen=True, slots=True)
class OpDecided:
    """An operation was decided here at its place in the order."""

    op_id: OpId
    op: FsOp
    writer: int  # the node that proposed it
    errno: int
    applied: bool  # went through memdb.apply (False: refused for lack of quorum)
    version: int


@dataclass(frozen=True, slots=True)
class StateTaken:
    """A sync started: this node's state was captured for its `StateMsg`."""

    ring: RingId
    epoch: int  # the sync's number within the ring (a failed or diverged sync starts the next)


@dataclass(frozen=True, slots=True)
class SyncCompleted:
    """A sync completed here."""

    ring: RingId
    epoch: int
    leader: int  # whose tree every member now holds
    adopted: bool  # this node swapped its tree for the leader's
    checksum: bytes  # the state checksum afterwards


ReplicaEvent = OpDecided | StateTaken | SyncCompleted


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A replica at one moment, as the node reports it (status, nodes, `.members`,
    `.clusterlog`, debug topics): all the runtime reads of a replica besides its tree."""

    ring: RingId  # the ring of the last regular configuration
    members: tuple[int, ...]  # that ring's members
    mode: Mode  # SYNCING until the ring's sync completed
    quorum: QuorumStatus  # the agreed votequorum state
    totem: TotemStatus  # membership state, seq/aru, totem counters
    counters: dict[str, int]  # the replica's own counters (a copy)
    recent_log: tuple[LogEntry, ...]  # the newest cluster log entries, newest first

    @property
    def synced(self) -> bool:
        return self.mode is Mode.SYNCED


@dataclass(frozen=True)
class StoredState:
    """What the database held at start."""

    entries: tuple[Entry, ...] = ()  # the tree's rows
    version: int = 0  # the tree's global version
    meta: dict[str, bytes] = field(default_factory=dict)  # side state, as `Persist.meta` wrote it


class Replica:
    """One node's replica; see the module comment. Inputs: `receive`, `on_timer`, `propose`,
    `propose_expected`, `log`; outputs via `drain`; `next_deadline` for the timer."""

    def __init__(
        self,
        node_id: int,
        config: ClusterConfig,
        params: TotemParams,
        now: int,
        *,
        incarnation: int,
        stored: StoredState | None = None,
        ring_seq: int = 0,
        wall_offset: int = 0,
        first_log_uid: int = 1,
        verify_interval: int = DEFAULT_VERIFY_INTERVAL_MS,
        unresolved_timeout: int = DEFAULT_UNRESOLVED_TIMEOUT_MS,
        on_event: Callable[[ReplicaEvent], None] | None = None,
        on_totem_event: Callable[[str], None] | None = None,
    ) -> None:
        """`now` is in ms on any clock; `now + wall_offset` is ms since the Unix epoch.
        `first_log_uid` must be above every cluster log uid an earlier run of this node used
        (the runtime passes its boot id)."""
        stored = stored or StoredState()
        self.node_id = node_id
        self.incarnation = incarnation
        self.config = config
        self.names = {n.nodeid: n.name for n in config.node_infos() if n.nodeid is not None}
        self.wall_offset = wall_offset
        self.verify_interval = verify_interval
        self.unresolved_timeout = unresolved_timeout
        self.on_event = on_event
        self.memdb = MemDB(stored.entries, stored.version)
        self.history: list[HistorySpan] = list(
            decode_history(msgpack.unpackb(stored.meta[META_HISTORY]))
            if META_HISTORY in stored.meta else ())
        self.quorate_ring_seq = int(stored.meta.get(META_QUORATE_RING, b"0"))
        self.applied: dict[int, OrderedDict[OpId, int]] = {}
        for key, blob in stored.meta.items():
            if key.startswith(META_APPLIED):
                for op_id, errno in decode_applied(msgpack.unpackb(blob)):
                    self._record(op_id, errno)
        self.quorum = Quorum(QuorumConfig.from_config(config), node_id)
        self.config_text: str | None = None  # the corosync.conf last taken from the tree
        self.log_buffer = ClusterLog()
        self.log_writer = LogWriter(self.names.get(node_id, str(node_id)), first_log_uid)
        self.counters: dict[str, int] = {}

        self.mode = Mode.SYNCING
        self.ring = RingId(seq=0, rep=node_id)
        self.members: tuple[int, ...] = ()
        self.epoch = 0
        self.states: dict[int, StateMsg] = {}
        self.leader: int | None = None
        self.need_update = False
        self.incoming: dict[int, Entry] = {}
        self.queue: list[tuple[int, ReplicaMsg]] = []
        self.verify_round = 0
        self.verify_sums: dict[int, bytes] = {}
        self.verify_at: int | None = None

        self.next_counter = 0
        self.pending: dict[OpId, _Pending] = {}
        # Rows a sync replaced at paths that an unanswered operation of this node names:
        # operation -> (the sync's ring, [(path, content)]), kept if still missing once answered.
        self.lost_waiting: dict[OpId, tuple[RingId, list[tuple[str, bytes]]]] = {}
        self.expected_requests: dict[OpId, tuple[int, int]] = {}  # -> (request, sent at)
        self.outbox: deque[tuple[bytes, tuple[RingId, int] | None]] = deque()
        # The sync leader's transfer, made a chunk at a time as totem's queue drains: (the
        # sync's ring and epoch, the messages still to make).
        self.update: tuple[tuple[RingId, int], Iterator[ReplicaMsg]] | None = None
        self.outputs: list[Output] = []
        self._replies: list[Reply] = []
        self._upserts: dict[int, Entry] = {}
        self._removed: set[int] = set()
        self._meta: dict[str, bytes] = {}
        self._replace_all = False
        self._invalid: set[str] = set()
        self._invalid_all = False
        self._deliver_at: tuple[RingId, int] = (self.ring, 0)  # the last delivery's position
        self._applied_dirty: set[int] = set()  # nodes whose applied table the batch changed
        self._history_dirty = False
        self._next_persist = 0
        # Persists handed out and not reported done: (id, the delivery position they cover).
        self._unpersisted: deque[tuple[int, RingId, int]] = deque()
        self._persisted_at: tuple[RingId, int] = (self.ring, 0)  # covered by the last done
        self._durable_told: tuple[RingId, int] = (self.ring, 0)  # last told to totem
        self._arrived: list[TotemOutput] = []  # totem outputs accepted, not digested yet
        self._now = now

        self.totem = Totem(node_id, self.names, params, now, ring_seq=ring_seq,
                           on_event=on_totem_event)
        self._process(now)

    # ------------------------------------------------------------------ inputs

    def receive(self, now: int, src: int, data: bytes) -> None:
        self.accept(now, src, data)
        self.digest(now)

    def accept(self, now: int, src: int, data: bytes) -> None:
        """Totem's part of `receive`: the frames it wants sent (the token above all) are ready in
        `drain` at once; deliveries wait for `digest`, so that a runtime can pass the token on
        before it does the application's work."""
        self.totem.receive(now, src, data)
        for out in self.totem.drain():
            if isinstance(out, Send | PersistRingSeq):
                self.outputs.append(out)
            else:
                self._arrived.append(out)

    def digest(self, now: int) -> None:
        """Process what `accept` took in."""
        self._process(now)

    def persisted(self, now: int, persist_id: int) -> None:
        """Every `Persist` up to `persist_id` is on disk (they complete in order)."""
        while self._unpersisted and self._unpersisted[0][0] <= persist_id:
            _, ring, seq = self._unpersisted.popleft()
            self._persisted_at = (ring, seq)
        self._process(now)

    def on_timer(self, now: int) -> None:
        self.totem.on_timer(now)
        self._now = now
        step = self.quorum.on_timer(now)
        if step is not None and self._is_lowest():
            self._send(LmsMsg(step.members, step.expected_votes))
        if self.verify_at is not None and now >= self.verify_at:
            self.verify_at = now + self.verify_interval
            if self._is_lowest():
                self._open_verify_round()
        for op_id, p in list(self.pending.items()):
            if now - p.since >= self.unresolved_timeout:
                self._count("unresolved_timeouts")
                self._answer(op_id, E.ETIMEDOUT, f"the outcome of this write is unknown here: "
                                                 f"still {p.state.value} after "
                                                 f"{self.unresolved_timeout // 1000} s")
        for op_id, (request, sent_at) in list(self.expected_requests.items()):
            if now - sent_at >= self.unresolved_timeout:
                del self.expected_requests[op_id]
                self._replies.append(Reply(request, E.ETIMEDOUT,
                                           "no decision on the expected votes in time"))
        self._process(now)

    def propose(self, now: int, request_id: int, op: FsOp) -> OpId | None:
        """Send `op`; its `Reply(request_id, ...)` comes out of `drain` later, or at once (and
        then None is returned) when this node cannot take writes now."""
        self._now = now
        op_id: OpId | None = None
        invalid = op_errno(op) or next(
            (code for path in op_paths(op) if (code := valid_path(path))), 0)
        if invalid:
            self._replies.append(Reply(request_id, invalid, "no member would accept this "
                                                            "operation"))
        elif not self.writable():
            self._replies.append(Reply(request_id, E.EACCES, "this partition is not quorate"))
        elif self.full():
            self._replies.append(Reply(request_id, E.EAGAIN, "too many writes in flight"))
        else:
            op_id = self._new_op_id()
            self.pending[op_id] = _Pending(request_id, op, PendingState.IN_FLIGHT, now)
            self._send(OpMsg(op_id, op))
        self._process(now)
        return op_id

    def propose_expected(self, now: int, request_id: int, expected: int) -> None:
        """`expected N`: refused at once outside 1..the votes that exist (the receivers would
        refuse it too); otherwise decided in the ring, where votequorum's rules apply."""
        self._now = now
        refusal = self.quorum.expected_range_refusal(expected)
        if refusal is not None:
            self._replies.append(Reply(request_id, E.EINVAL, refusal))
        else:
            op_id = self._new_op_id()
            self.expected_requests[op_id] = (request_id, now)
            self._send(ExpectedMsg(op_id, expected))
        self._process(now)

    def set_qdevice_vote(self, now: int, ring: RingId, vote: bool) -> None:
        """This node's quorum-device client got (`vote`) or lost the device's vote for `ring`
        (qnetd's decision for that ring). Sent through the ring, so every member counts it at
        the same point of the order; a vote for any other ring than the current one is
        dropped here, and one that arrives after the ring changed is dropped on delivery."""
        self._now = now
        if ring == self.ring:
            self._send(QdeviceMsg(ring, vote))
        self._process(now)

    def verify_now(self, now: int) -> None:
        """Start a verification round now (`pmxfs debug verify`)."""
        self._now = now
        self._open_verify_round()
        self._process(now)

    def _open_verify_round(self) -> None:
        if self.mode is Mode.SYNCED:
            self._send(VerifyMsg(self.ring, self.epoch, self.verify_round + 1, True, b""))

    def log(self, now: int, *, pri: int, tag: str, pid: int, user: str, msg: str) -> None:
        """Add an entry to the cluster log of every member."""
        self._now = now
        self._send(LogMsg(self.log_writer.entry(time=self._wall_seconds(), pri=pri, tag=tag,
                                                pid=pid, user=user, msg=msg)))
        self._process(now)

    # ------------------------------------------------------------------ outputs and queries

    def drain(self) -> list[Output]:
        out, self.outputs = self.outputs, []
        return out

    def next_deadline(self) -> int | None:
        times = [t for t in (self.totem.next_deadline(), self.quorum.next_deadline(),
                             self.verify_at) if t is not None]
        waits = [p.since for p in self.pending.values()]
        waits += [sent_at for _, sent_at in self.expected_requests.values()]
        if waits:
            times.append(min(waits) + self.unresolved_timeout)
        return min(times, default=None)

    def writable(self) -> bool:
        return self.quorum.status().quorate

    @property
    def persists_made(self) -> int:
        """How many Persists the replica has handed out (the id of the last one)."""
        return self._next_persist

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.ring, self.members, self.mode, self.quorum.status(),
                             self.totem.status(), dict(self.counters),
                             tuple(self.log_buffer.newest()))

    def full(self) -> bool:
        """Whether MAX_PENDING proposals wait for answers: `propose` would answer EAGAIN."""
        return len(self.pending) >= MAX_PENDING

    def synced(self) -> bool:
        return self.mode is Mode.SYNCED

    def state_checksum(self) -> bytes:
        """Tree, history and applied table: equal checksums mean equal replicated state."""
        h = hashlib.sha256(self.memdb.checksum())
        h.update(msgpack.packb(encode_history(tuple(self.history))))
        h.update(msgpack.packb(encode_applied(self._applied_items())))
        return h.digest()

    # ------------------------------------------------------------------ the loop

    def _process(self, now: int) -> None:
        self._now = now
        while True:
            outs, self._arrived = [*self._arrived, *self.totem.drain()], []
            for out in outs:
                if isinstance(out, Send | PersistRingSeq):
                    self.outputs.append(out)
                elif isinstance(out, Deliver):
                    self._on_deliver(out)
                elif isinstance(out, Durable):
                    self._on_durable(out)
                elif isinstance(out, ConfChange):
                    # What the old ring decided and answered comes out before the change.
                    self._emit_persist()
                    self.outputs.extend(self._replies)
                    self._replies = []
                    self.outputs.append(out)
                    self._on_confchg(out)
            if self._pump() or outs:
                continue
            self._emit_persist()
            self._tell_durable()
            if not self.totem.outputs:
                break
        self._flush_batch()

    def _pump(self) -> bool:
        """Hand queued messages to totem while it takes them, and make the leader's next sync
        chunk while totem's backlog is short; True if anything was handed over."""
        sent = False
        while True:
            while self.outbox:
                data, _ = self.outbox[0]
                if self.totem.mcast(self._now, data) is McastResult.TRY_AGAIN:
                    return sent
                self.outbox.popleft()
                sent = True
            if self.update is None or self.totem.pending.bytes >= SYNC_QUEUED_BYTES:
                return sent
            msg = next(self.update[1], None)
            if msg is None:
                self.update = None
                return sent
            self.outbox.append((encode_msg(msg), self.update[0]))

    def _send(self, msg: ReplicaMsg) -> None:
        tag = (msg.ring, msg.epoch) if isinstance(msg, StateMsg | EntriesMsg | DoneMsg
                                                  | VerifyMsg | ResyncMsg) else None
        self.outbox.append((encode_msg(msg), tag))

    def _emit_persist(self) -> None:
        """Hand out the batch's rows and side state as one numbered Persist (group commit).
        The applied tables and the history are encoded here, once per batch, and only the
        nodes' tables that changed."""
        for node in self._applied_dirty:
            table = self.applied.get(node, OrderedDict())
            self._meta[f"{META_APPLIED}{node}"] = msgpack.packb(
                encode_applied(tuple(table.items())))
        self._applied_dirty = set()
        if self._history_dirty:
            self._meta[META_HISTORY] = msgpack.packb(encode_history(tuple(self.history)))
            self._history_dirty = False
        if not (self._upserts or self._removed or self._meta or self._replace_all):
            return
        self._next_persist += 1
        self.outputs.append(Persist(
            version=self.memdb.version,
            upserts=tuple(self._upserts[i] for i in sorted(self._upserts)),
            removed=tuple(sorted(self._removed)),
            replace_all=self._replace_all,
            meta=tuple(sorted(self._meta.items())),
            id=self._next_persist,
        ))
        self._unpersisted.append((self._next_persist, *self._deliver_at))
        self._upserts, self._removed, self._meta = {}, set(), {}
        self._replace_all = False

    def _tell_durable(self) -> None:
        """Tell totem how far this node's deliveries are on disk: all of them when no Persist is
        outstanding, else as far as the last completed one covers."""
        at = self._persisted_at if self._unpersisted else self._deliver_at
        if at != self._durable_told:
            self._durable_told = at
            self.totem.set_durable(self._now, *at)

    def _flush_batch(self) -> None:
        if self._invalid or self._invalid_all:
            self.outputs.append(Invalidate(tuple(sorted(self._invalid)), self._invalid_all))
            self._invalid, self._invalid_all = set(), False
        self.outputs.extend(self._replies)
        self._replies = []

    # ------------------------------------------------------------------ membership

    def _on_confchg(self, c: ConfChange) -> None:
        if c.kind is ConfChangeKind.TRANSITIONAL:
            # Every message of the old ring has been delivered: what is not stable by now may
            # be missing in the partition that goes on.
            for p in self.pending.values():
                if p.state is PendingState.DECIDED:
                    p.state, p.since = PendingState.DOUBTFUL, self._now
            return
        if self.mode is Mode.SYNCING:
            self._abandon_queue()
        self.ring = c.ring_id
        self.members = c.members
        self.verify_at = None
        self.quorum.drop_qdevice_vote()
        self._start_sync(0)

    def _start_sync(self, epoch: int) -> None:
        self.mode = Mode.SYNCING
        self.epoch = epoch
        self.states = {}
        self.leader = None
        self.need_update = False
        self.incoming = {}
        self.verify_sums = {}
        self.outbox = deque(item for item in self.outbox
                            if item[1] is None or item[1] == (self.ring, epoch))
        if self.update is not None and self.update[0] != (self.ring, epoch):
            self.update = None
        self._emit_event(StateTaken(self.ring, epoch))
        self._send(StateMsg(
            ring=self.ring, epoch=epoch, announcement=self.quorum.announcement(),
            version=self.memdb.version, checksum=self.state_checksum(),
            last_ring_seq=self.quorate_ring_seq,
            digests=tuple(sorted(self.memdb.digests().items())),
            log=tuple(self.log_buffer.entries()),
            log_cutoff=self.log_buffer.cutoff,
        ))

    def _abandon_queue(self) -> None:
        """A sync ended without completing: queued operations were not decided here."""
        for _, msg in self.queue:
            if isinstance(msg, OpMsg):
                self._mark_doubtful(msg.op_id)
            elif isinstance(msg, ExpectedMsg) and msg.op_id in self.expected_requests:
                self._replies.append(Reply(self.expected_requests.pop(msg.op_id)[0], E.EAGAIN,
                                           "the membership changed; try again"))
        self.queue = []

    # ------------------------------------------------------------------ deliveries

    def _on_deliver(self, d: Deliver) -> None:
        self._deliver_at = (d.ring_id, d.seq)
        if (self.mode is Mode.SYNCING and not self.need_update
                and is_entries_msg(d.payload)):
            self._count("sync_chunks_skipped")  # rows for others: not even decoded
            return
        try:
            msg = decode_msg(d.payload)
        except ProtocolError:
            self._count("bad_messages")
            return
        if isinstance(msg, LogMsg):
            self.log_buffer.add(msg.entry)
        elif isinstance(msg, StateMsg | EntriesMsg | DoneMsg | ResyncMsg | VerifyMsg):
            self._on_sync_msg(d.sender, msg)
        elif self.mode is Mode.SYNCING:
            self.queue.append((d.sender, msg))
        else:
            self._on_ordered(d.sender, msg)

    def _on_ordered(self, sender: int, msg: ReplicaMsg) -> None:
        if isinstance(msg, OpMsg):
            self._decide(sender, msg)
        elif isinstance(msg, ExpectedMsg):
            self._on_expected(msg)
        elif isinstance(msg, LmsMsg):
            status = self.quorum.apply_last_man_standing(
                LastManStanding(msg.members, msg.expected))
            if status is not None:
                self.outputs.append(QuorumChanged(status))
        elif isinstance(msg, QdeviceMsg):
            self._on_qdevice_vote(sender, msg)
        self._stamp_quorate_ring()

    def _stamp_quorate_ring(self) -> None:
        """The tree comes from this ring while it is quorate: stamp it with the ring's seq (the
        sync leader rule). At the end of a sync, and wherever the ring turns quorate later in
        the order -- a device vote, `expected`, a config with more votes -- since the writes it
        then takes are acknowledged and must win the next sync against older trees."""
        if self.quorum.status().quorate and self.quorate_ring_seq != self.ring.seq:
            self.quorate_ring_seq = self.ring.seq
            self._meta[META_QUORATE_RING] = b"%d" % self.ring.seq

    def _on_qdevice_vote(self, sender: int, msg: QdeviceMsg) -> None:
        if msg.ring != self.ring:
            self._count("stale_qdevice_votes")
            return
        before = self.quorum.status()
        status = self.quorum.update_qdevice_vote(sender, msg.vote)
        if status != before:
            self.outputs.append(QuorumChanged(status))

    def _on_expected(self, msg: ExpectedMsg) -> None:
        before = self.quorum.status()
        result = self.quorum.set_expected(msg.expected)
        waiting = self.expected_requests.pop(msg.op_id, None)
        if waiting is not None:
            self._replies.append(Reply(waiting[0], 0 if result.accepted else E.EINVAL,
                                       result.reason or ""))
        if self.quorum.status() != before:
            self.outputs.append(QuorumChanged(self.quorum.status()))

    def _decide(self, sender: int, msg: OpMsg) -> None:
        op_id = msg.op_id
        if op_id.node != sender:
            self._count("forged_op_ids")
            return
        recorded = self._recorded(op_id)
        if recorded is not None:
            self._count("duplicate_ops")
            self._decided_here(op_id, recorded)
            return
        if not self.writable():
            self._record_decision(op_id, E.EACCES)
            self._emit_event(OpDecided(op_id, msg.op, sender, E.EACCES, False,
                                       self.memdb.version))
            self._decided_here(op_id, E.EACCES)
            return
        result = self.memdb.apply(msg.op, sender)
        self._record_decision(op_id, result.errno)
        self._emit_event(OpDecided(op_id, msg.op, sender, result.errno, True,
                                   self.memdb.version))
        if result.ok:
            self._note_history()
            for entry in result.upserts:
                self._upserts[entry.inode] = entry
                self._removed.discard(entry.inode)
            for inode in result.removed:
                self._upserts.pop(inode, None)
                self._removed.add(inode)
            self._invalid.update(result.paths)
            if COROSYNC_CONF in result.paths:
                self._take_config_from_tree()
            if isinstance(msg.op, UnlockRequest):
                self._check_lock(msg.op.path)
        self._decided_here(op_id, result.errno)

    def _check_lock(self, path: str) -> None:
        if self.memdb.lock_expired(path, self._now) and self._is_lowest():
            checksum = self.memdb.lock_checksum(path)
            if checksum is not None:
                self._count("locks_expired")
                self._send(OpMsg(self._new_op_id(), Unlock(path, checksum)))

    def _take_config_from_tree(self, *, sync: bool = False) -> None:
        """The tree's corosync.conf, when it differs from the one last taken: out as
        `ConfigChanged`, and into totem (node set and timers, at run time). Called where every
        member of the ring holds the same tree, so they all agree on the result: an applied
        write (the config goes into the quorum, whose E it resets) or the end of a `sync`,
        where a member that was away when the config changed takes it. There every member
        settles the quorum on the tree's config, changed for it or not (`Quorum.settle_config`),
        since only some members may have announced an older one; and totem is handed the
        config again, with the timers it runs with, even when unchanged: nodes it left out
        because a peer's config lacked them come back, unless this config lacks them too (see
        `Totem.reconfigure`)."""
        entry = self.memdb.lookup(COROSYNC_CONF)
        taken = entry is not None and entry.type is EntryType.FILE and self._take_config_text(
            entry.data.decode("utf-8", "replace"))
        if sync:
            before = self.quorum.status()
            status = self.quorum.settle_config(
                QuorumConfig.from_config(self.config),
                {m: s.announcement for m, s in self.states.items()},
                self._saw_newest_quorate_ring())
            if taken or status != before:
                self.outputs.append(QuorumChanged(status))
        elif taken:
            self.outputs.append(QuorumChanged(
                self.quorum.reconfigure(QuorumConfig.from_config(self.config))))
        self.totem.reconfigure(self._now, self.names,
                               totem_params(self.config) if taken else self.totem.params)

    def _saw_newest_quorate_ring(self) -> set[int]:
        """The members whose last quorate sync is the newest among the sync's states."""
        newest = max(s.last_ring_seq for s in self.states.values())
        return {m for m, s in self.states.items() if s.last_ring_seq == newest}

    def _take_config_text(self, text: str) -> bool:
        """Take `text` if it is new and valid; whether it was taken."""
        if text == self.config_text:
            return False
        config = check_config(text).config
        if config is None:
            return False
        self.config_text = text
        self.config = config
        self.names = {n.nodeid: n.name for n in config.node_infos() if n.nodeid is not None}
        self.outputs.append(ConfigChanged(text))
        return True

    def _note_history(self) -> None:
        version = self.memdb.version
        ring = self._deliver_at[0]
        if self.history and self.history[-1].ring == ring:
            last = self.history[-1]
            self.history[-1] = HistorySpan(ring, last.first, version)
        else:
            self.history.append(HistorySpan(ring, version, version))
            del self.history[:-HISTORY_SPANS]
        self._history_dirty = True

    # ------------------------------------------------------------------ pending proposals

    def _new_op_id(self) -> OpId:
        self.next_counter += 1
        return OpId(self.node_id, self.incarnation, self.next_counter)

    def _decided_here(self, op_id: OpId, errno: int) -> None:
        p = self.pending.get(op_id)
        if p is not None and p.state is not PendingState.DECIDED:
            p.state, p.errno, p.since = PendingState.DECIDED, errno, self._now
            p.ring, p.seq = self._deliver_at
        waiting = self.lost_waiting.get(op_id)
        if waiting is not None:
            # A row the tree holds now, right after the operation's decision, is in the agreed
            # order: a later write to the path before the answer is no loss.
            _, files = waiting
            files[:] = [(path, data) for path, data in files if not self._tree_holds(path, data)]

    def _answer(self, op_id: OpId, errno: int, message: str = "") -> None:
        p = self.pending.pop(op_id)
        self._replies.append(Reply(p.request_id, errno, message))
        waiting = self.lost_waiting.pop(op_id, None)
        if waiting is not None:
            ring, files = waiting
            self._keep_lost(ring, [(path, data) for path, data in files
                                   if not self._tree_holds(path, data)])

    def _on_durable(self, durable: Durable) -> None:
        """Every member holds this ring's deliveries up to `durable.seq` on disk: answer what
        was decided at or before that point."""
        for op_id, p in list(self.pending.items()):
            if (p.state is PendingState.DECIDED and p.ring == durable.ring_id
                    and p.seq <= durable.seq):
                self._answer(op_id, p.errno)

    def _mark_doubtful(self, op_id: OpId) -> None:
        p = self.pending.get(op_id)
        if p is not None:
            p.state = PendingState.DOUBTFUL
            p.since = self._now

    def _settle_doubtful(self) -> None:
        """After a quorate sync: answer from the applied table, or send again."""
        if not self.quorum.status().quorate:
            return
        for op_id, p in list(self.pending.items()):
            if p.state is not PendingState.DOUBTFUL:
                continue
            recorded = self._recorded(op_id)
            if recorded is not None:
                self._decided_here(op_id, recorded)  # answered once this point is durable
            elif self._forgotten(op_id):
                self._answer(op_id, E.EIO, "the outcome of this write is no longer known")
            else:
                self._count("ops_resent")
                p.state, p.since = PendingState.IN_FLIGHT, self._now
                self._send(OpMsg(op_id, p.op))

    # ------------------------------------------------------------------ applied table

    def _record(self, op_id: OpId, errno: int) -> None:
        """Record a decision. Each node's table is kept in OpId order and forgets its smallest
        ids first, so everything forgotten lies below what it holds (`_forgotten`), also when a
        re-sent operation is decided after newer ones."""
        table = self.applied.setdefault(op_id.node, OrderedDict())
        out_of_order = bool(table) and op_id < next(reversed(table))
        table[op_id] = errno
        if out_of_order:
            table = self.applied[op_id.node] = OrderedDict(sorted(table.items()))
        while len(table) > APPLIED_PER_NODE:
            table.popitem(last=False)

    def _record_decision(self, op_id: OpId, errno: int) -> None:
        self._record(op_id, errno)
        self._applied_dirty.add(op_id.node)

    def _recorded(self, op_id: OpId) -> int | None:
        table = self.applied.get(op_id.node)
        return None if table is None else table.get(op_id)

    def _forgotten(self, op_id: OpId) -> bool:
        table = self.applied.get(op_id.node)
        return (table is not None and len(table) >= APPLIED_PER_NODE
                and op_id < next(iter(table)))

    def _applied_items(self) -> tuple[tuple[OpId, int], ...]:
        return tuple(item for node in sorted(self.applied)
                     for item in self.applied[node].items())

    def _replace_applied(self, items: Iterable[tuple[OpId, int]]) -> None:
        old_nodes = set(self.applied)
        self.applied = {}
        for op_id, errno in items:
            self._record(op_id, errno)
        self._applied_dirty |= old_nodes | set(self.applied)

    # ------------------------------------------------------------------ sync

    def _on_sync_msg(self, sender: int, msg: StateMsg | EntriesMsg | DoneMsg | ResyncMsg
                     | VerifyMsg) -> None:
        if msg.ring != self.ring or sender not in self.members:
            self._count("stale_sync_messages")
            return
        if isinstance(msg, ResyncMsg):
            if msg.epoch == self.epoch + 1:
                self._start_sync(msg.epoch)
            return
        if msg.epoch != self.epoch:
            self._count("stale_sync_messages")
            return
        if isinstance(msg, VerifyMsg):
            self._on_verify(sender, msg)
        elif self.mode is not Mode.SYNCING:
            self._count("stale_sync_messages")
        elif isinstance(msg, StateMsg):
            self.states[sender] = msg
            if len(self.states) == len(self.members):
                self._states_complete()
        elif sender != self.leader:
            self._count("stale_sync_messages")
        elif isinstance(msg, EntriesMsg):
            if self.need_update:
                self.incoming.update((e.inode, e) for e in msg.entries)
        else:
            self._on_done(msg)

    def _states_complete(self) -> None:
        before = self.quorum.status()
        status = self.quorum.on_membership(
            self._now, self.members, {m: s.announcement for m, s in self.states.items()},
            self._saw_newest_quorate_ring())
        if status != before:
            self.outputs.append(QuorumChanged(status))
        for state in self.states.values():
            self.log_buffer.merge(state.log, state.log_cutoff)
        leader = max(self.members, key=lambda m: (self.states[m].last_ring_seq,
                                                  self.states[m].version, -m))
        self.leader = leader
        target = self.states[leader].checksum
        if all(s.checksum == target for s in self.states.values()):
            self._finish_sync(adopted=False)
            return
        self.need_update = self.states[self.node_id].checksum != target
        if leader == self.node_id:
            self._send_update()

    def _send_update(self) -> None:
        """Start the leader's transfer. It is made a chunk at a time (`_pump`), so that no
        single step encodes the whole tree; the tree, history and applied table stay as they
        are until the sync completes (operations are queued meanwhile)."""
        mine = self.memdb.digests()
        theirs = [dict(s.digests) for s in self.states.values()]
        wanted = sorted(inode for inode, digest in mine.items()
                        if any(other.get(inode) != digest for other in theirs))
        self.update = ((self.ring, self.epoch), self._update_messages(wanted))

    def _update_messages(self, wanted: list[int]) -> Iterator[ReplicaMsg]:
        chunk: list[Entry] = []
        size = 0
        for inode in wanted:
            entry = self.memdb.get(inode)
            assert entry is not None
            chunk.append(entry)
            size += len(entry.data) + len(entry.name) + 64
            if size >= SYNC_CHUNK_BYTES:
                yield EntriesMsg(self.ring, self.epoch, tuple(chunk))
                chunk, size = [], 0
        if chunk:
            yield EntriesMsg(self.ring, self.epoch, tuple(chunk))
        yield DoneMsg(self.ring, self.epoch, self.memdb.version, tuple(self.history),
                      self._applied_items())

    def _on_done(self, msg: DoneMsg) -> None:
        if not self.need_update:
            self._finish_sync(adopted=False)
            return
        assert self.leader is not None
        leader_state = self.states[self.leader]
        rows: list[Entry] = []
        mine = self.memdb.digests()
        for inode, digest in leader_state.digests:
            row = self.memdb.get(inode) if mine.get(inode) == digest else None
            if row is None:
                row = self.incoming.get(inode)
                if row is None or row.digest() != digest:
                    self._sync_failed("the leader's rows did not all arrive")
                    return
            rows.append(row)
        try:
            tree = MemDB(rows, msg.version)
        except CorruptTree as exc:
            self._sync_failed(f"the leader's tree is damaged: {exc}")
            return
        old_memdb, old_history, old_applied = self.memdb, self.history, self.applied
        old_dirty = set(self._applied_dirty)
        self.memdb, self.history = tree, list(msg.history)
        self._replace_applied(msg.applied)
        if self.state_checksum() != leader_state.checksum:
            self.memdb, self.history, self.applied = old_memdb, old_history, old_applied
            self._applied_dirty = old_dirty  # what the batch held before; the sync's part goes
            self._sync_failed("the rebuilt tree does not match the leader's checksum")
            return
        self._save_lost(old_memdb, old_history)
        self.quorate_ring_seq = max(self.quorate_ring_seq, leader_state.last_ring_seq)
        self._history_dirty = True
        self._upserts = {e.inode: e for e in self.memdb.entries()}
        self._removed = set()
        self._replace_all = True
        self._invalid_all = True
        self._count("syncs_adopted")
        self._finish_sync(adopted=True)

    def _sync_failed(self, reason: str) -> None:
        self._count("sync_failures")
        self._local_log(3, f"sync of ring {self.ring} epoch {self.epoch} failed: {reason}; "
                           "starting again")
        self._send(ResyncMsg(self.ring, self.epoch + 1))

    def _save_lost(self, old: MemDB, old_history: Sequence[HistorySpan]) -> None:
        lost: list[tuple[str, bytes]] = []
        for entry in old.entries():
            if entry.type is not EntryType.FILE or entry.writer != self.node_id:
                continue  # another node's write: its writer saves it (see the module header)
            span = next((h for h in old_history if h.first <= entry.version <= h.last), None)
            if span is None or any(h.ring == span.ring and h.first <= entry.version <= h.last
                                   for h in self.history):
                continue  # made by an operation the leader applied too: superseded, not lost
            path = old.path_of(entry.inode)
            if not self._tree_holds(path, entry.data):
                lost.append((path, entry.data))
        unsettled = {path: op_id for op_id, p in self.pending.items()
                     if self._recorded(op_id) is None for path in op_paths(p.op)}
        for path, data in lost:
            if path in unsettled:
                _, files = self.lost_waiting.setdefault(unsettled[path], (self.ring, []))
                files.append((path, data))
        self._keep_lost(self.ring, [(path, data) for path, data in lost
                                    if path not in unsettled])

    def _tree_holds(self, path: str, data: bytes) -> bool:
        entry = self.memdb.lookup(path)
        return entry is not None and entry.type is EntryType.FILE and entry.data == data

    def _keep_lost(self, ring: RingId, files: list[tuple[str, bytes]]) -> None:
        """Hand `files` out for lost+found/<ring>/ and say so in the cluster log."""
        if not files:
            return
        self._count("lost_files_saved", len(files))
        self.outputs.append(SaveLost(ring, tuple(sorted(files))))
        self._local_log(4, f"sync with node {self.leader}: {len(files)} file(s) changed here "
                           f"while apart were replaced; saved under lost+found/"
                           f"{ring.rep}.{ring.seq}/: "
                           + ", ".join(p for p, _ in sorted(files)[:10]))

    def _finish_sync(self, *, adopted: bool) -> None:
        assert self.leader is not None
        self.mode = Mode.SYNCED
        self._count("syncs")
        self._take_config_from_tree(sync=True)
        self._stamp_quorate_ring()
        if self.on_event is not None:  # the checksum is work only an observer needs
            self.on_event(SyncCompleted(self.ring, self.epoch, self.leader, adopted,
                                        self.state_checksum()))
        queue, self.queue = self.queue, []
        for sender, msg in queue:
            self._on_ordered(sender, msg)
        self._settle_doubtful()
        self.verify_at = self._now + self.verify_interval

    def _on_verify(self, sender: int, msg: VerifyMsg) -> None:
        if self.mode is not Mode.SYNCED:
            return
        if msg.request:
            # Every member reports its checksum at this very point of the order.
            self.verify_round = msg.round
            self.verify_sums = {}
            self._send(VerifyMsg(self.ring, self.epoch, msg.round, False, self.state_checksum()))
            return
        if msg.round != self.verify_round:
            return
        self.verify_sums[sender] = msg.checksum
        if len(self.verify_sums) == len(self.members):
            if len(set(self.verify_sums.values())) > 1:
                self._count("verify_mismatches")
                if self._is_lowest():
                    self._local_log(3, "tree checksums differ between members; resyncing")
                    self._send(ResyncMsg(self.ring, self.epoch + 1))
            self.verify_sums = {}

    # ------------------------------------------------------------------ helpers

    def _is_lowest(self) -> bool:
        return bool(self.members) and self.node_id == min(self.members)

    def _wall_seconds(self) -> int:
        return max(0, (self._now + self.wall_offset) // 1000)

    def _local_log(self, pri: int, msg: str) -> None:
        self._send(LogMsg(self.log_writer.entry(time=self._wall_seconds(), pri=pri,
                                                tag="pmxfs", pid=0, user="root", msg=msg)))

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _emit_event(self, event: ReplicaEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
