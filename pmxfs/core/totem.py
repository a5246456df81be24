"""Totem single-ring ordered broadcast with extended virtual synchrony, as a pure state machine.

How it works
------------
Members of a ring pass a token around in ascending node-id order. Only the token holder
multicasts: it stamps each new frame with `token.seq + 1`, so the token's seq is a global order.
Every member delivers frames in seq order up to its `aru` (all received up to), so all members
deliver the same messages in the same order (agreed order), the sender included: a sender learns
that its message is ordered by delivering it itself.

Token fields and why they exist:
* `seq`        highest seq stamped in this ring; a member missing something below it knows it.
* `aru`, `aru_addr`  the lowest "all received up to" seen this rotation, and who set it. Only the
               node that lowered it may raise it again, so after two visits it is a safe bound:
               frames at or below it on two consecutive visits are held by every member and freed.
* `rtr`        retransmit requests. A member adds seqs it has missed for `miss_count_const` visits;
               whoever holds such a frame when the token reaches it multicasts it again.
* `fcc`, `backlog`  frames sent during the last rotation and frames waiting to be sent, each
               member replacing its own share; they bound a rotation to `window_size` frames and
               share that window among busy members (flow control).
* `retrans_flg`, `phase`  recovery bookkeeping (below).
* `token_seq`  counts hops, so a retransmitted duplicate token is recognised and dropped.

Membership (states OPERATIONAL, GATHER, COMMIT, RECOVERY):
* No token for `token` ms (or a join or merge-detect from outside the ring) → GATHER: every
  `join` ms the member multicasts its proc set (who it believes alive) and fail set. Sets only grow
  by merging what others send; when every non-failed member has sent identical sets (consensus),
  the lowest id builds a commit token. Members that do not agree within `consensus` ms are failed.
  As in corosync, only members of my own ring may tell me who else failed, and a node that lists
  me as failed is failed in return. A fail set belongs to one attempt at forming a ring: it is
  dropped when the attempt is abandoned or a join shows that a newer ring seq exists, so stale
  exclusions cannot keep splitting a healed network.
* COMMIT: the commit token names the new ring `{rep, highest seen seq + 4}` (persisted first, so a
  restarted node never reuses a ring id) and circulates twice: on the first rotation each member
  records its old ring id, aru and highest seq; on the second every member enters RECOVERY.
* RECOVERY: the new ring runs its token, but members only re-broadcast (as `Mcast.origin` frames)
  every frame of their old ring above the lowest aru of the members that come from that same
  ring. From RECOVERY entry on, old-ring frames are taken only from these recovery frames, so all
  members coming from one ring end with the same set of its frames. The representative counts
  rotations in which nothing was sent and every frame was received by all (aru == seq); after two
  it sets the token phase to INSTALL.
* Install (when the INSTALL token reaches a member): deliver the rest of the old ring's messages in
  seq order, skipping holes nobody had, then a TRANSITIONAL configuration (members that came from
  my old ring) and a REGULAR configuration (the new ring). The members coming from one old ring
  delivered the same set of its messages: extended virtual synchrony. One rotation later the
  representative sets phase OPERATIONAL and new application messages flow; a message that was only
  partly sent when its ring ended is sent again whole, and partial messages are discarded by all.
* The representative of an operational ring multicasts MERGE_DETECT every `merge` ms so healed
  partitions find each other; after `seqno_unchanged_const` idle rotations it holds the token for
  `hold` ms per rotation, and a member with something to send asks for it with TOKEN_HOLD_CANCEL.

Inputs are `receive(now, src, frame)`, `on_timer(now)` and `mcast(now, payload)`; outputs are
drained with `drain()`: `Send` (to one node, or None for every configured node), `Deliver`,
`ConfChange` and `PersistRingSeq`, in the order they must be carried out. Time is `now` in ms.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from .totem_params import TotemParams
from .wire import (
    CommitToken,
    Fragment,
    FrameOrigin,
    Join,
    Mcast,
    MemberInfo,
    MergeDetect,
    Message,
    ProtocolError,
    RingId,
    Token,
    TokenHoldCancel,
    TokenPhase,
    decode,
    encode,
)

FRAME_OVERHEAD_BYTES = 128
FRAGMENT_OVERHEAD_BYTES = 24
MAX_MESSAGE_BYTES = 16 << 20
RTR_LIMIT = 64
DEFAULT_SEND_QUEUE_MESSAGES = 1024
DEFAULT_SEND_QUEUE_BYTES = 32 << 20


class State(Enum):
    OPERATIONAL = "operational"
    GATHER = "gather"
    COMMIT = "commit"
    RECOVERY = "recovery"


class ConfChangeKind(Enum):
    TRANSITIONAL = "transitional"
    REGULAR = "regular"


class McastResult(Enum):
    ACCEPTED = "accepted"
    TRY_AGAIN = "try again"


class MessageTooLarge(ValueError):
    """A local caller tried to multicast more than MAX_MESSAGE_BYTES."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send `data` to node `to`, or to every configured node when `to` is None."""

    to: int | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """An application message, in agreed order. `seq` is its last frame's position in `ring_id`."""

    sender: int
    ring_id: RingId
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConfChange:
    kind: ConfChangeKind
    ring_id: RingId
    members: tuple[int, ...]
    left: tuple[int, ...]
    joined: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Stable:
    """Every member of `ring_id` has received every frame up to `seq` (totem's "safe" point):
    a message delivered with a seq at or below it survives any later partition of the ring,
    because every transitional configuration that follows holds it."""

    ring_id: RingId
    seq: int


@dataclass(frozen=True, slots=True)
class PersistRingSeq:
    """Store the highest ring seq seen; hand it back as `ring_seq` when the node restarts."""

    ring_seq: int


Output = Send | Deliver | ConfChange | Stable | PersistRingSeq


@dataclass(frozen=True, slots=True)
class TotemStatus:
    node_id: int
    state: State
    ring_id: RingId
    members: tuple[int, ...]
    seq: int
    aru: int
    pending_messages: int
    counters: dict[str, int]


class _RingLog:
    """The frames of one ring: receive buffer, retransmit store and delivery pointer."""

    __slots__ = ("aru", "delivered", "frames", "freed", "high_seq", "members", "miss_counts",
                 "ring_id")

    def __init__(self, ring_id: RingId, members: tuple[int, ...]) -> None:
        self.ring_id = ring_id
        self.members = members
        self.frames: dict[int, Mcast] = {}
        self.aru = 0
        self.high_seq = 0
        self.delivered = 0
        self.freed = 0
        self.miss_counts: dict[int, int] = {}

    def add(self, frame: Mcast, seq: int) -> bool:
        if seq <= self.aru or seq in self.frames:
            return False
        self.frames[seq] = frame
        self.miss_counts.pop(seq, None)
        if seq > self.high_seq:
            self.high_seq = seq
        while self.aru + 1 in self.frames:
            self.aru += 1
        return True

    def free_upto(self, seq: int) -> None:
        for s in range(self.freed + 1, seq + 1):
            self.frames.pop(s, None)
        self.freed = max(self.freed, seq)


class _Outgoing:
    """An application message waiting to be (fully) multicast."""

    __slots__ = ("count", "msg_id", "next_index", "payload")

    def __init__(self, payload: bytes, msg_id: int, count: int) -> None:
        self.payload = payload
        self.msg_id = msg_id
        self.count = count
        self.next_index = 0


@dataclass(slots=True)
class _Reassembly:
    msg_id: int
    next_index: int
    size: int = 0
    parts: list[bytes] = field(default_factory=list)


class Totem:
    """One node's totem instance. See the module comment for the protocol."""

    def __init__(
        self,
        node_id: int,
        nodes: Iterable[int],
        params: TotemParams,
        now: int,
        *,
        ring_seq: int = 0,
        send_queue_messages: int = DEFAULT_SEND_QUEUE_MESSAGES,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.on_event = on_event
        self.nodes = frozenset(nodes)
        if node_id not in self.nodes:
            raise ValueError(f"node {node_id} is not in the node list")
        self.params = params
        self.frame_budget = params.netmtu - FRAME_OVERHEAD_BYTES
        self.max_fragment = self.frame_budget - FRAGMENT_OVERHEAD_BYTES
        if self.max_fragment < 256:
            raise ValueError(f"netmtu {params.netmtu} is too small")
        self.send_queue_messages = send_queue_messages
        self.send_queue_bytes = send_queue_bytes

        self.state = State.GATHER
        # The ring we are operational in (or came from). A fresh node's pseudo ring has seq 0,
        # which no real ring has, so nobody mistakes it for a ring with messages.
        self.ring = _RingLog(RingId(seq=0, rep=node_id), (node_id,))
        self.highest_ring_seq = ring_seq
        self.outputs: list[Output] = []
        self.loopback: deque[Message] = deque()
        self.counters: dict[str, int] = {}

        # membership
        self.proc: set[int] = {node_id}
        self.fail: set[int] = set()
        self.consensus: set[int] = {node_id}
        self.commit: CommitToken | None = None
        self.last_commit_seq = 0  # seq of the last ring we committed to (even if abandoned)
        self.new_ring: _RingLog | None = None
        self.trans_members: tuple[int, ...] = ()
        self.recovery_queue: deque[Mcast] = deque()
        self.recovery_quiet = 0
        self.recovery_last_seq = -1

        # token handling
        self.last_token_seq = 0
        self.commit_hop = -1
        self.forwarded: tuple[int, bytes] | None = None
        self.forwarded_seq = 0
        self.held_token: Token | None = None
        self.prev_visit_aru = 0
        self.stable_seq = 0
        self.last_seen_aru = -1
        self.aru_unchanged = 0
        self.last_visit_seq = -1
        self.seq_unchanged = 0
        self.my_fcc = 0
        self.my_backlog = 0

        # timers (absolute ms, None = off)
        self.join_at: int | None = None
        self.consensus_at: int | None = None
        self.token_loss_at: int | None = None
        self.token_retransmit_at: int | None = None
        self.hold_release_at: int | None = None
        self.merge_at: int | None = None

        # application messages
        self.pending: deque[_Outgoing] = deque()
        self.pending_bytes = 0
        self.next_msg_id = 0
        self.reassembly: dict[int, _Reassembly] = {}

        self._enter_gather(now)
        self._run_loopback(now)

    # ------------------------------------------------------------------ public interface

    def drain(self) -> list[Output]:
        out, self.outputs = self.outputs, []
        return out

    def next_deadline(self) -> int | None:
        timers = [
            t for t in (self.join_at, self.consensus_at, self.token_loss_at,
                        self.token_retransmit_at, self.hold_release_at, self.merge_at)
            if t is not None
        ]
        return min(timers) if timers else None

    def status(self) -> TotemStatus:
        return TotemStatus(
            node_id=self.node_id,
            state=self.state,
            ring_id=self.ring.ring_id,
            members=self.ring.members,
            seq=self.ring.high_seq,
            aru=self.ring.aru,
            pending_messages=len(self.pending),
            counters=dict(self.counters),
        )

    def mcast(self, now: int, payload: bytes) -> McastResult:
        """Queue one application message; TRY_AGAIN when the send queue is full."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"message of {len(payload)} bytes > {MAX_MESSAGE_BYTES}")
        if (len(self.pending) >= self.send_queue_messages
                or self.pending_bytes + len(payload) > self.send_queue_bytes):
            self._count("mcast_try_again")
            return McastResult.TRY_AGAIN
        was_idle = not self.pending
        count = max(1, -(-len(payload) // self.max_fragment))
        self.pending.append(_Outgoing(payload, self._new_msg_id(), count))
        self.pending_bytes += len(payload)
        if was_idle and self.state is State.OPERATIONAL:
            if self.held_token is not None:
                self._release_held_token(now)
            elif self.seq_unchanged >= self.params.seqno_unchanged_const:
                self._multicast(TokenHoldCancel(sender=self.node_id, ring_id=self.ring.ring_id))
        self._run_loopback(now)
        return McastResult.ACCEPTED

    def receive(self, now: int, src: int, data: bytes) -> None:
        """Feed one frame that arrived from node `src` (already authenticated by the transport)."""
        if src not in self.nodes:
            self._count("dropped_unknown_node")
            return
        try:
            msg = decode(data)
        except ProtocolError:
            self._count("dropped_malformed")
            return
        self._dispatch(now, src, msg)
        self._run_loopback(now)

    def on_timer(self, now: int) -> None:
        if self.token_loss_at is not None and now >= self.token_loss_at:
            self._count("token_lost")
            self._event(f"token lost in {self.state.value}")
            self._enter_gather(now)
        if self.consensus_at is not None and now >= self.consensus_at:
            self._consensus_expired(now)
        if self.join_at is not None and now >= self.join_at:
            self._send_join(now)
        if self.token_retransmit_at is not None and now >= self.token_retransmit_at:
            assert self.forwarded is not None
            self._count("token_retransmits")
            self.outputs.append(Send(self.forwarded[0], self.forwarded[1]))
            self.token_retransmit_at = now + self.params.token_retransmit
        if self.hold_release_at is not None and now >= self.hold_release_at:
            self._release_held_token(now)
        if self.merge_at is not None and now >= self.merge_at:
            self._multicast(MergeDetect(sender=self.node_id, ring_id=self.ring.ring_id))
            self.merge_at = now + self.params.merge
        self._run_loopback(now)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, now: int, src: int, msg: Message) -> None:
        match msg:
            case Mcast():
                if msg.sender not in self.nodes:
                    self._count("dropped_unknown_node")
                else:
                    self._on_mcast(now, msg)
            case Token():
                self._on_token(now, msg)
            case CommitToken():
                self._on_commit_token(now, msg)
            case Join() | MergeDetect() | TokenHoldCancel() if msg.sender != src:
                self._count("dropped_sender_mismatch")
            case Join():
                self._on_join(now, msg)
            case MergeDetect():
                self._on_merge_detect(now, msg)
            case TokenHoldCancel():
                if msg.ring_id == self.ring.ring_id and self.state is State.OPERATIONAL:
                    # Someone has something to send: not idle any more. Resetting the idle
                    # count matters when the cancel arrives while the token is on its way
                    # back: the representative must not hold it again (as corosync).
                    self.seq_unchanged = 0
                    if self.held_token is not None:
                        self._release_held_token(now)

    def _run_loopback(self, now: int) -> None:
        while self.loopback:
            self._dispatch(now, self.node_id, self.loopback.popleft())

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _new_msg_id(self) -> int:
        self.next_msg_id += 1
        return self.next_msg_id

    def _multicast(self, msg: Message) -> None:
        self.outputs.append(Send(None, encode(msg)))

    def _send_token(self, now: int, to: int, msg: Token | CommitToken) -> None:
        """Pass a token on; keep it for retransmission until there is evidence it arrived."""
        if to == self.node_id:
            self.loopback.append(msg)
            self.forwarded = None
            self.token_retransmit_at = None
            return
        data = encode(msg)
        self.outputs.append(Send(to, data))
        self.forwarded = (to, data)
        self.forwarded_seq = msg.seq if isinstance(msg, Token) else 0
        self.token_retransmit_at = now + self.params.token_retransmit

    def _next_member(self, members: tuple[int, ...]) -> int:
        return members[(members.index(self.node_id) + 1) % len(members)]

    # ------------------------------------------------------------------ multicast frames

    def _on_mcast(self, now: int, frame: Mcast) -> None:
        if self.state is State.OPERATIONAL:
            if frame.ring_id != self.ring.ring_id:
                return
            if self.forwarded is not None and frame.seq > self.forwarded_seq:
                self._token_arrived()
            if self.ring.add(frame, frame.seq):
                self._deliver_ready()
        elif self.state is State.RECOVERY:
            assert self.new_ring is not None
            if frame.ring_id != self.new_ring.ring_id:
                return
            if self.forwarded is not None and frame.seq > self.forwarded_seq:
                self._token_arrived()
            if self.new_ring.add(frame, frame.seq):
                self._take_recovered(frame)
        else:
            # GATHER / COMMIT: keep collecting frames of the ring we came from.
            if frame.ring_id == self.ring.ring_id and frame.origin is None:
                self.ring.add(frame, frame.seq)
            else:
                self._take_recovered(frame)

    def _take_recovered(self, frame: Mcast) -> None:
        """A recovery frame carrying a frame of my old ring: keep the old frame."""
        origin = frame.origin
        if origin is None or origin.ring_id != self.ring.ring_id:
            return
        if self.ring.add(
            Mcast(ring_id=origin.ring_id, seq=origin.seq, sender=frame.sender,
                  fragments=frame.fragments),
            origin.seq,
        ):
            self._count("recovered_frames")

    def _token_arrived(self) -> None:
        self.forwarded = None
        self.token_retransmit_at = None

    # ------------------------------------------------------------------ the regular token

    def _on_token(self, now: int, token: Token) -> None:
        if self.state is State.OPERATIONAL:
            ring = self.ring
        elif self.state is State.RECOVERY:
            assert self.new_ring is not None
            ring = self.new_ring
        else:
            return
        if token.ring_id != ring.ring_id:
            self._count("dropped_foreign_token")
            return
        if token.token_seq <= self.last_token_seq:
            self._count("dropped_duplicate_token")
            return
        self.last_token_seq = token.token_seq
        self._token_arrived()
        self.token_loss_at = now + self.params.token
        self._count("tokens")
        if (self.state is State.OPERATIONAL and token.phase is TokenPhase.OPERATIONAL
                and self.node_id == ring.members[0] and not self.pending and not token.rtr
                and token.backlog == 0 and token.seq == self.last_visit_seq
                and self.seq_unchanged >= self.params.seqno_unchanged_const):
            # Idle ring: the representative keeps the token for `hold` ms per rotation.
            self.held_token = token
            self.hold_release_at = now + self.params.hold
            return
        self._token_visit(now, ring, token)

    def _release_held_token(self, now: int) -> None:
        token = self.held_token
        self.held_token = None
        self.hold_release_at = None
        if token is not None:
            self._token_visit(now, self.ring, token)

    def _token_visit(self, now: int, ring: _RingLog, token: Token) -> None:
        """One visit of the token: retransmit, send, update aru/rtr/fcc, free, deliver, pass on."""
        phase = token.phase
        retrans_flg = token.retrans_flg
        if self.state is State.RECOVERY:
            if self.node_id == ring.members[0]:
                phase, retrans_flg = self._recovery_progress(token)
            if phase is not TokenPhase.RECOVERY:
                self._install(now)
                ring = self.ring
        elif self.node_id == ring.members[0] and phase is TokenPhase.INSTALL:
            phase = TokenPhase.OPERATIONAL
        recovering = self.state is State.RECOVERY

        # Flow control: the window left by the others during the last rotation.
        fcc_others = max(0, token.fcc - self.my_fcc)
        backlog_others = max(0, token.backlog - self.my_backlog)
        my_backlog = len(self.recovery_queue) if recovering else len(self.pending)
        allowed = min(self.params.max_messages, max(0, self.params.window_size - fcc_others))
        total_backlog = backlog_others + my_backlog
        if my_backlog and total_backlog > self.params.window_size:
            allowed = min(allowed, max(1, self.params.window_size * my_backlog // total_backlog))

        # Retransmit what others asked for and I hold.
        rtr_left: list[int] = []
        retransmitted = 0
        for s in token.rtr:
            frame = ring.frames.get(s)
            if frame is not None and retransmitted < self.params.max_messages:
                self.outputs.append(Send(None, encode(frame)))
                retransmitted += 1
            else:
                rtr_left.append(s)
        if retransmitted:
            self._count("retransmitted", retransmitted)

        # New frames.
        seq = token.seq
        budget = max(0, allowed - retransmitted)
        if recovering:
            seq = self._send_recovery_frames(ring, seq, budget)
            retrans_flg = retrans_flg or bool(self.recovery_queue)
        elif phase is TokenPhase.OPERATIONAL:
            seq = self._send_new_frames(ring, seq, budget)
        sent = retransmitted + (seq - token.seq)
        self.my_fcc = sent
        self.my_backlog = len(self.recovery_queue) if recovering else len(self.pending)

        # aru: lower it to mine, or raise it if I was the one who lowered it.
        aru, aru_addr = token.aru, token.aru_addr
        if ring.aru < aru or aru_addr in (0, self.node_id):
            aru = ring.aru
            aru_addr = 0 if aru == seq else self.node_id

        # Ask for what I keep missing (after miss_count_const visits, as corosync).
        requested = set(rtr_left)
        scan_end = min(token.seq, ring.aru + 4 * self.params.window_size)
        for s in range(ring.aru + 1, scan_end + 1):
            if len(rtr_left) >= RTR_LIMIT:
                break
            if s in ring.frames or s in requested:
                continue
            misses = ring.miss_counts.get(s, 0) + 1
            ring.miss_counts[s] = misses
            if misses >= self.params.miss_count_const:
                rtr_left.append(s)
                self._count("rtr_requested")

        # Free what every member holds (covered by the token's aru on two visits).
        if not recovering:
            safe = min(token.aru, self.prev_visit_aru)
            ring.free_upto(min(safe, ring.delivered))
            if safe > self.stable_seq:
                self.stable_seq = safe
                self.outputs.append(Stable(ring.ring_id, safe))
        self.prev_visit_aru = token.aru

        # A member that cannot receive: aru stuck below seq for fail_recv_const rotations.
        if token.aru == self.last_seen_aru and token.aru < token.seq and token.aru_addr != 0:
            self.aru_unchanged += 1
        else:
            self.aru_unchanged = 0
        self.last_seen_aru = token.aru
        if (self.aru_unchanged >= self.params.fail_recv_const
                and token.aru_addr != self.node_id and token.aru_addr in ring.members):
            self._count("fail_to_receive")
            self._enter_gather(now, failed={token.aru_addr})
            return

        if not recovering:
            self._deliver_ready()

        # Idle detection for token hold and TOKEN_HOLD_CANCEL.
        if seq == self.last_visit_seq and not rtr_left and token.backlog == 0 and not sent:
            self.seq_unchanged += 1
        else:
            self.seq_unchanged = 0
        self.last_visit_seq = seq

        self._send_token(now, self._next_member(ring.members), Token(
            ring_id=ring.ring_id, token_seq=token.token_seq + 1, seq=seq, aru=aru,
            aru_addr=aru_addr, fcc=fcc_others + sent, backlog=backlog_others + self.my_backlog,
            rtr=tuple(rtr_left), retrans_flg=retrans_flg, phase=phase,
        ))

    def _send_new_frames(self, ring: _RingLog, seq: int, budget: int) -> int:
        """Pack pending application messages into at most `budget` frames; returns the new seq."""
        fragments: list[Fragment] = []
        size = 0
        while self.pending and budget > 0:
            head = self.pending[0]
            start = head.next_index * self.max_fragment
            data = head.payload[start:start + self.max_fragment]
            if fragments and size + len(data) + FRAGMENT_OVERHEAD_BYTES > self.frame_budget:
                seq = self._emit_frame(ring, seq, fragments)
                fragments, size = [], 0
                budget -= 1
                continue
            fragments.append(Fragment(head.msg_id, head.next_index, head.count, data))
            size += len(data) + FRAGMENT_OVERHEAD_BYTES
            head.next_index += 1
            if head.next_index == head.count:
                self.pending.popleft()
                self.pending_bytes -= len(head.payload)
        if fragments:
            seq = self._emit_frame(ring, seq, fragments)
        return seq

    def _emit_frame(self, ring: _RingLog, seq: int, fragments: list[Fragment]) -> int:
        seq += 1
        frame = Mcast(ring_id=ring.ring_id, seq=seq, sender=self.node_id,
                      fragments=tuple(fragments))
        self.outputs.append(Send(None, encode(frame)))
        ring.add(frame, seq)
        return seq

    def _send_recovery_frames(self, ring: _RingLog, seq: int, budget: int) -> int:
        while self.recovery_queue and budget > 0:
            old = self.recovery_queue.popleft()
            seq += 1
            frame = Mcast(ring_id=ring.ring_id, seq=seq, sender=old.sender,
                          fragments=old.fragments,
                          origin=FrameOrigin(ring_id=old.ring_id, seq=old.seq))
            self.outputs.append(Send(None, encode(frame)))
            ring.add(frame, seq)
            budget -= 1
        return seq

    def _recovery_progress(self, token: Token) -> tuple[TokenPhase, bool]:
        """Representative, in RECOVERY: install after two rotations in which all was quiet."""
        quiet = (not token.retrans_flg and token.aru == token.seq and not token.rtr
                 and token.seq == self.recovery_last_seq and not self.recovery_queue)
        self.recovery_quiet = self.recovery_quiet + 1 if quiet else 0
        self.recovery_last_seq = token.seq
        if self.recovery_quiet >= 2:
            return TokenPhase.INSTALL, False
        return TokenPhase.RECOVERY, False

    # ------------------------------------------------------------------ delivery

    def _deliver_ready(self) -> None:
        ring = self.ring
        while ring.delivered < ring.aru:
            ring.delivered += 1
            frame = ring.frames.get(ring.delivered)
            if frame is not None:
                self._deliver_frame(ring.ring_id, ring.delivered, frame)

    def _deliver_frame(self, ring_id: RingId, seq: int, frame: Mcast) -> None:
        if frame.origin is not None:
            return  # a recovery frame: its content was delivered when the ring was installed
        for frag in frame.fragments:
            self._reassemble(ring_id, seq, frame.sender, frag)

    def _reassemble(self, ring_id: RingId, seq: int, sender: int, frag: Fragment) -> None:
        if frag.count == 1:
            if self.reassembly.pop(sender, None) is not None:
                self._count("partial_messages_dropped")
            self._emit_deliver(sender, ring_id, seq, frag.data)
            return
        partial = self.reassembly.get(sender)
        if frag.index == 0:
            if partial is not None:
                self._count("partial_messages_dropped")
            partial = self.reassembly[sender] = _Reassembly(frag.msg_id, 0)
        elif partial is None or partial.msg_id != frag.msg_id or partial.next_index != frag.index:
            if self.reassembly.pop(sender, None) is not None:
                self._count("partial_messages_dropped")
            return
        partial.size += len(frag.data)
        if partial.size > MAX_MESSAGE_BYTES:
            # Only a broken or hostile member sends this; refuse to buffer without bound.
            del self.reassembly[sender]
            self._count("oversized_messages_dropped")
            return
        partial.parts.append(frag.data)
        partial.next_index += 1
        if partial.next_index == frag.count:
            del self.reassembly[sender]
            self._emit_deliver(sender, ring_id, seq, b"".join(partial.parts))

    def _emit_deliver(self, sender: int, ring_id: RingId, seq: int, payload: bytes) -> None:
        self._count("delivered")
        self.outputs.append(Deliver(sender=sender, ring_id=ring_id, seq=seq, payload=payload))

    # ------------------------------------------------------------------ membership

    def _cancel_ring_timers(self) -> None:
        self.token_loss_at = None
        self.token_retransmit_at = None
        self.forwarded = None
        self.hold_release_at = None
        self.held_token = None
        self.merge_at = None

    def _enter_gather(self, now: int, failed: set[int] | None = None) -> None:
        """Start (or restart) gathering; `failed` are nodes this very step found failed."""
        if self.state is not State.GATHER:
            self._count("gather")
        if self.state in (State.COMMIT, State.RECOVERY):
            # The attempt our fail set belonged to is over; the others drop theirs when they
            # hear of its ring seq. Carrying it into the next attempt revives stale exclusions.
            # What made us leave it (a deaf member, a join's failures) is news and stays.
            self.fail = set()
        if failed:
            self.fail |= failed
        self.state = State.GATHER
        self._event(f"gather proc={sorted(self.proc)} fail={sorted(self.fail)}")
        self._cancel_ring_timers()
        self.commit = None
        self.new_ring = None
        self.recovery_queue.clear()
        self.proc.add(self.node_id)
        self.fail.discard(self.node_id)
        self.consensus = {self.node_id}
        self.consensus_at = now + self.params.consensus
        self._send_join(now)
        self._check_consensus(now)

    def _send_join(self, now: int) -> None:
        self._multicast(Join(sender=self.node_id, ring_seq=self.highest_ring_seq,
                             proc=tuple(sorted(self.proc)), fail=tuple(sorted(self.fail))))
        self.join_at = now + self.params.join if self.state is State.GATHER else None

    def _current_ring_seq(self) -> int:
        if self.state in (State.COMMIT, State.RECOVERY):
            assert self.commit is not None
            return self.commit.ring_id.seq
        return self.ring.ring_id.seq

    def _current_members(self) -> tuple[int, ...]:
        if self.state in (State.COMMIT, State.RECOVERY):
            assert self.commit is not None
            return self.commit.members
        return self.ring.members

    def _on_join(self, now: int, join: Join) -> None:
        if join.sender == self.node_id:
            return
        if any(n not in self.nodes for n in join.proc) or any(n not in self.nodes
                                                                for n in join.fail):
            self._count("dropped_unknown_node")
            return
        forgot_failures = False
        if join.ring_seq > self.highest_ring_seq:
            self.highest_ring_seq = join.ring_seq
            if self.state is State.GATHER and self.fail:
                # Someone formed or tried a newer ring: who failed in our older attempt is no
                # longer known. Forgetting it keeps stale exclusions from splitting every merge.
                self._event(f"ring seq {join.ring_seq} is news: forget fail={sorted(self.fail)}")
                self.fail = set()
                forgot_failures = True
        if self.state is not State.GATHER:
            if join.sender in self._current_members() and join.ring_seq < self._current_ring_seq():
                return  # sent before the sender joined the ring we are in
            if self.node_id in join.fail:
                return  # it forms a ring without us; merge detection reunites us later
            if self.state is not State.OPERATIONAL and self.node_id not in join.proc:
                return  # committing: only a join that wants us interrupts
        proc, fail = set(join.proc), set(join.fail)
        if self.state is State.GATHER and proc == self.proc and fail == self.fail:
            self.consensus.add(join.sender)
            self._check_consensus(now)
            return
        if join.sender in self.fail:
            return
        abandoning_attempt = self.state in (State.COMMIT, State.RECOVERY)
        merged_fail = set() if abandoning_attempt else set(self.fail)
        if join.ring_seq < self.highest_ring_seq:
            # The sender has not heard of the newest ring (attempt) yet: its opinion of who
            # failed is older than that. Only its proc set is news; my joins will update it.
            pass
        elif self.node_id in fail:
            merged_fail.add(join.sender)
        elif join.sender in self.ring.members:
            merged_fail |= fail
        else:
            # A node from outside my ring may not declare my ring's members failed: its view
            # comes from another partition, and believing it lets partitions break each other.
            merged_fail |= fail - set(self.ring.members)
        merged_proc = self.proc | proc
        if (self.state is State.GATHER and merged_proc == self.proc and merged_fail == self.fail
                and not forgot_failures):
            return  # nothing new; the join timer keeps repeating our view
        self._event(f"join from {join.sender} (ring seq {join.ring_seq}) proc={sorted(proc)} "
                    f"fail={sorted(fail)} in {self.state.value}")
        self.proc = merged_proc
        self._enter_gather(now, failed=merged_fail)

    def _on_merge_detect(self, now: int, msg: MergeDetect) -> None:
        if (self.state is State.OPERATIONAL and msg.ring_id != self.ring.ring_id
                and msg.sender not in self.ring.members):
            self._count("merge_detected")
            self._event(f"merge detect from {msg.sender} of ring {msg.ring_id}")
            self.proc.add(msg.sender)
            self._enter_gather(now)

    def _consensus_expired(self, now: int) -> None:
        live = self.proc - self.fail
        if not live <= self.consensus:
            self.fail |= live - self.consensus
            self._count("consensus_timeouts")
            self._event(f"consensus timeout, failing {sorted(live - self.consensus)}")
        self._enter_gather(now)

    def _check_consensus(self, now: int) -> None:
        live = self.proc - self.fail
        if self.state is not State.GATHER or not live <= self.consensus:
            return
        members = tuple(sorted(live))
        if members[0] != self.node_id:
            return
        new_seq = max(self.highest_ring_seq, self.ring.ring_id.seq, self.last_commit_seq) + 4
        self.highest_ring_seq = new_seq
        infos: list[MemberInfo | None] = [None] * len(members)
        infos[0] = self._my_member_info()
        commit = CommitToken(ring_id=RingId(seq=new_seq, rep=self.node_id), hop=0,
                             members=members, infos=tuple(infos))
        self._enter_commit(now, commit)

    def _my_member_info(self) -> MemberInfo:
        return MemberInfo(node_id=self.node_id, old_ring_id=self.ring.ring_id,
                          aru=self.ring.aru, high_seq=max(self.ring.high_seq, self.ring.aru))

    def _enter_commit(self, now: int, commit: CommitToken) -> None:
        self.outputs.append(PersistRingSeq(commit.ring_id.seq))
        self.state = State.COMMIT
        self.last_commit_seq = commit.ring_id.seq
        self._event(f"commit {commit.ring_id} members={list(commit.members)}")
        self.join_at = None
        self.consensus_at = None
        self.commit = commit
        self.commit_hop = commit.hop
        self.token_loss_at = now + self.params.token
        self._send_token(now, self._next_member(commit.members),
                         CommitToken(commit.ring_id, commit.hop + 1, commit.members,
                                     commit.infos))

    def _on_commit_token(self, now: int, ct: CommitToken) -> None:
        if self.node_id not in ct.members:
            return
        if self.state is State.GATHER:
            if set(ct.members) != self.proc - self.fail:
                return
            if ct.ring_id.seq <= max(self.ring.ring_id.seq, self.last_commit_seq):
                # a commit token we already entered (and abandoned) or an older one: accepting it
                # again would let a stale token circulate for ever between gathering nodes
                return
            self.highest_ring_seq = max(self.highest_ring_seq, ct.ring_id.seq)
            index = ct.members.index(self.node_id)
            infos = list(ct.infos)
            infos[index] = self._my_member_info()
            self._enter_commit(now, CommitToken(ct.ring_id, ct.hop, ct.members, tuple(infos)))
            return
        if self.commit is None or ct.ring_id != self.commit.ring_id or ct.hop <= self.commit_hop:
            return
        self.commit_hop = ct.hop
        self._token_arrived()
        self.token_loss_at = now + self.params.token
        if self.state is State.COMMIT and all(i is not None for i in ct.infos):
            self._enter_recovery(now, ct)
            self._send_token(now, self._next_member(ct.members),
                             CommitToken(ct.ring_id, ct.hop + 1, ct.members, ct.infos))
        elif self.state is State.RECOVERY and self.node_id == ct.members[0]:
            self._send_token(now, self.node_id, Token(
                ring_id=ct.ring_id, token_seq=1, seq=0, aru=0, aru_addr=0, fcc=0, backlog=0,
                rtr=(), retrans_flg=False, phase=TokenPhase.RECOVERY,
            ))

    def _enter_recovery(self, now: int, ct: CommitToken) -> None:
        self.state = State.RECOVERY
        self._event(f"recovery {ct.ring_id}")
        self.commit = ct
        old_id = self.ring.ring_id
        trans = []
        low_aru = self.ring.aru
        for member, info in zip(ct.members, ct.infos, strict=True):
            assert info is not None
            if info.old_ring_id == old_id:
                trans.append(member)
                low_aru = min(low_aru, info.aru)
        self.trans_members = tuple(trans)
        self.new_ring = _RingLog(ct.ring_id, ct.members)
        self.recovery_queue = deque(
            self.ring.frames[s] for s in sorted(self.ring.frames)
            if s > low_aru and self.ring.frames[s].origin is None
        )
        self.last_token_seq = 0
        self.recovery_quiet = 0
        self.recovery_last_seq = -1
        self.my_fcc = 0
        self.my_backlog = 0
        self.prev_visit_aru = 0
        self.stable_seq = 0
        self.last_seen_aru = -1
        self.aru_unchanged = 0
        self.token_loss_at = now + self.params.token

    def _install(self, now: int) -> None:
        """Recovery is complete: finish the old ring, deliver the configuration changes."""
        assert self.new_ring is not None
        old = self.ring
        for s in sorted(self.ring.frames):
            if s > old.delivered:
                self._deliver_frame(old.ring_id, s, old.frames[s])
        if self.reassembly:
            self._count("partial_messages_dropped", len(self.reassembly))
            self.reassembly.clear()
        new = self.new_ring
        trans = self.trans_members
        self.outputs.append(ConfChange(
            kind=ConfChangeKind.TRANSITIONAL, ring_id=new.ring_id, members=trans,
            left=tuple(m for m in old.members if m not in trans), joined=(),
        ))
        self.outputs.append(ConfChange(
            kind=ConfChangeKind.REGULAR, ring_id=new.ring_id, members=new.members, left=(),
            joined=tuple(m for m in new.members if m not in trans),
        ))
        self._count("rings_installed")
        new.delivered = new.aru
        self.ring = new
        self.new_ring = None
        self.recovery_queue.clear()
        self.state = State.OPERATIONAL
        self.proc = set(new.members)
        self.fail = set()
        self.seq_unchanged = 0
        self.last_visit_seq = -1
        # A message that was only partly sent in the old ring is sent again whole.
        if self.pending and self.pending[0].next_index:
            self.pending[0].next_index = 0
            self.pending[0].msg_id = self._new_msg_id()
        self.merge_at = now + self.params.merge if self.node_id == new.members[0] else None
