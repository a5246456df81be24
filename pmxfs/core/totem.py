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
* `durable`    one seq per member: up to where what was delivered to it is on its disk, as the
               application reports it (`set_durable`). Each member writes only its own entry, so
               the lowest entry is a bound every member has reached: `Durable` hands it up. The
               disk never holds the token: a member persists after delivery, on its own time,
               and says so on a later visit; a member whose disk caught up wakes a held token
               as a member with something to send does. This replaces one acknowledgement
               message per member and write with a few bytes on a token that goes round anyway.

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
* Configured nodes (`nodes`) can differ between nodes while a new configuration spreads: a node
  that was away when one was taken runs with the one before. Frames from a node outside my set
  are dropped, and so is a join naming one; such a join was sent by a node whose configuration
  differs from mine, so I answer it, `join` ms later and to that node alone, with a join whose
  fail set also lists the unknown nodes outside its proc set: a *refusal* (a normal join always
  has fail within proc). The receiver leaves refused nodes out of its proc set and ignores them
  until it takes a configuration (`reconfigure`; the replica hands one over after every sync)
  in a ring with the refusing node -- both hold the same configuration then -- or, should that
  node not come back, until `REFUSAL_CONSENSUS_TIMEOUTS` consensus timeouts after the last
  refusal of that node. Refusals by a node that is refused itself do not count: a removed node
  running again must not keep a node the others have out of the ring of one that is behind.
  So a node whose configuration is behind, and still has a node the others removed (and which
  is running again), leaves that node out and joins the others; and a node that does not know
  one the others added makes them form a ring without the new node first. Either way the ring
  that forms syncs, the node that was behind takes the configuration from the tree, and the
  nodes that were left out merge back -- or stay out, having been removed.

Inputs are `receive(now, src, frame)`, `on_timer(now)`, `mcast(now, payload)`,
`set_durable(now, ring_id, seq)` and `reconfigure(now, nodes, params)` (a configuration taken at
run time: the node set and the timers); outputs are drained with `drain()`: `Send` (to one node, or
None for every configured node), `Deliver`, `ConfChange`, `Stable`, `Durable` and
`PersistRingSeq`, in the order they must be carried out. Time is `now` in ms.

Code: `Totem` (here) runs the membership state machine and the token's visits, and composes the
parts that each have one job: `totem_membership` (the states, their data and the legal
transitions), `totem_token` (passing the token on, flow control, what a member keeps between
visits), `totem_ringlog` (one ring's frames), `totem_packing` (messages into frames and back) and
`totem_outputs` (what the caller carries out). Everything a caller needs is importable from here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from pmxfs.core.errors import ProtocolError

from .totem_membership import (
    Committing,
    Gathering,
    IllegalTransition,
    Operational,
    Phase,
    Recovering,
    State,
    check_transition,
)
from .totem_outputs import (
    ConfChange,
    ConfChangeKind,
    Counters,
    Deliver,
    Durable,
    Output,
    PersistRingSeq,
    Send,
    Stable,
)
from .totem_packing import (
    DEFAULT_SEND_QUEUE_BYTES,
    DEFAULT_SEND_QUEUE_MESSAGES,
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    Reassembler,
    SendQueue,
)
from .totem_params import TotemParams
from .totem_ringlog import RingLog
from .totem_token import Rotation, TokenRelay, next_aru, retransmissions, retransmit_requests
from .wire import (
    CommitToken,
    Fragment,
    FrameOrigin,
    Join,
    Mcast,
    MemberInfo,
    MergeDetect,
    Message,
    RingId,
    Token,
    TokenHoldCancel,
    TokenPhase,
    decode,
    encode,
)

__all__ = [
    "DEFAULT_SEND_QUEUE_BYTES",
    "DEFAULT_SEND_QUEUE_MESSAGES",
    "MAX_MESSAGE_BYTES",
    "ConfChange",
    "ConfChangeKind",
    "Deliver",
    "Durable",
    "IllegalTransition",
    "McastResult",
    "MessageTooLarge",
    "Output",
    "PersistRingSeq",
    "Send",
    "Stable",
    "State",
    "Totem",
    "TotemStatus",
]


REFUSAL_CONSENSUS_TIMEOUTS = 10  # refusals lapse this many consensus timeouts after the last


class McastResult(Enum):
    """ACCEPTED: queued, and delivered to every member (this one included) in agreed order
    unless this node fails first. TRY_AGAIN: the send queue is full; nothing was queued."""

    ACCEPTED = "accepted"
    TRY_AGAIN = "try again"


@dataclass(frozen=True, slots=True)
class TotemStatus:
    """A snapshot of one node's totem instance, for status reports."""

    node_id: int
    state: State  # membership state
    ring_id: RingId  # the ring it is operational in, or comes from
    members: tuple[int, ...]  # that ring's members
    seq: int  # the highest seq received in that ring
    aru: int  # every frame of that ring up to here has been received
    pending_messages: int  # messages waiting to be multicast
    counters: dict[str, int]  # what happened how often (see `Counters`)


def _member_infos(ct: CommitToken) -> tuple[MemberInfo, ...] | None:
    """Every member's info, once the commit token has been all the way round; else None."""
    infos = tuple(i for i in ct.infos if i is not None)
    return infos if len(infos) == len(ct.infos) else None


class Totem:
    """One node's totem instance. See the module comment for the protocol.

    It is always in one membership `phase` (state and the data that state holds) and leaves it
    only through `_transition`. What lives across states: the ring it is in or came from
    (`ring`), its view of who is alive (`proc`, `fail`), the ring seqs it has seen, the token
    relay, the send queue and the reassembly of delivered fragments."""

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
        self.on_event = on_event  # told a line of text per membership event (for traces)
        self.nodes = frozenset(nodes)  # every configured node; frames from others are dropped
        if node_id not in self.nodes:
            raise ValueError(f"node {node_id} is not in the node list")
        self.params = params
        self.pending = SendQueue(params.netmtu, send_queue_messages, send_queue_bytes)
        self.counters = Counters()
        self.reassembly = Reassembler(self.counters)
        self.outputs: list[Output] = []  # to be drained, in the order they must be carried out
        self.loopback: deque[Message] = deque()  # tokens passed to myself, handled next

        # The ring we are operational in (or came from). A fresh node's pseudo ring has seq 0,
        # which no real ring has, so nobody mistakes it for a ring with messages.
        self.ring = RingLog(RingId(seq=0, rep=node_id), (node_id,))
        self.highest_ring_seq = ring_seq  # the highest ring seq seen, persisted or heard of
        self.last_commit_seq = 0  # seq of the last ring we committed to (even if abandoned)
        self.proc: set[int] = {node_id}  # who I believe alive
        self.fail: set[int] = set()  # who I believe failed, in this attempt at forming a ring
        # Configured nodes left out because a peer's configuration lacks them -> those peers.
        self.refused: dict[int, set[int]] = {}
        self.refused_until: dict[int, int] = {}  # refused node -> when its refusal lapses
        # Peers whose joins named nodes I do not have, and those nodes: owed a refusal, sent
        # at `refusals_at`.
        self.refusals_owed: dict[int, set[int]] = {}
        self.refusals_at: int | None = None
        self.relay = TokenRelay()
        self.phase: Phase = self._gathering(now)

        self._enter_gather(now)
        self._run_loopback(now)

    # ------------------------------------------------------------------ public interface

    @property
    def state(self) -> State:
        return self.phase.state

    @property
    def held_token(self) -> Token | None:
        """The token the representative of an idle ring holds, if it holds one."""
        return self.phase.held_token if isinstance(self.phase, Operational) else None

    @property
    def send_queue_messages(self) -> int:
        return self.pending.max_messages

    def drain(self) -> list[Output]:
        out, self.outputs = self.outputs, []
        return out

    def next_deadline(self) -> int | None:
        timers = [*self.relay.deadlines(), self.refusals_at, *self.refused_until.values()]
        phase = self.phase
        if isinstance(phase, Gathering):
            timers += [phase.join_at, phase.consensus_at]
        elif isinstance(phase, Operational):
            timers += [phase.hold_release_at, phase.merge_at]
        armed = [t for t in timers if t is not None]
        return min(armed) if armed else None

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
        was_idle = not self.pending
        if not self.pending.offer(payload):
            self.counters.add("mcast_try_again")
            return McastResult.TRY_AGAIN
        phase = self.phase
        if was_idle and isinstance(phase, Operational):
            self._want_token(now, phase)
        self._run_loopback(now)
        return McastResult.ACCEPTED

    def set_durable(self, now: int, ring_id: RingId, seq: int) -> None:
        """What was delivered here in ring `ring_id` up to `seq` is on this node's disk; the next
        visit of the token tells the others. Ignored for any ring but the operational one."""
        phase = self.phase
        if not isinstance(phase, Operational) or ring_id != self.ring.ring_id:
            return
        rotation = phase.rotation
        if seq <= rotation.durable_here:
            return
        rotation.durable_here = seq
        if rotation.durable_news(self.ring.members, self.node_id):
            self._want_token(now, phase)
        self._run_loopback(now)

    def reconfigure(self, now: int, nodes: Iterable[int], params: TotemParams) -> None:
        """A new configuration was taken at run time: the configured node set and the timers.
        A node that is added is heard from now on and merges through the protocol (merge
        detection, joins); frames of a node that is removed are dropped from now on, and when
        it belongs to the ring in progress this node gathers, so the ring changes through a
        configuration change as after a failure. This node never removes itself: a config
        without it leaves it running with its old peers (who drop its frames), not stopped
        mid-protocol. New timers apply from the next time each one is armed. A refusal by a
        member of the ring this node is in (or was in last) ends here: the replica hands over a
        configuration when the ring's sync completed, so both hold the same one now."""
        new_nodes = frozenset(nodes) | {self.node_id}
        removed = self.nodes - new_nodes
        self.nodes = new_nodes
        self.params = params
        synced = set(self.ring.members)
        self._narrow_refusals(lambda node, by: (by & new_nodes) - synced if node in new_nodes
                              else set())
        self.refusals_owed = {}
        self.refusals_at = None
        if not removed:
            return
        self.proc -= removed
        self.fail -= removed
        self._event(f"nodes {sorted(removed)} removed from the configuration")
        _, members = self._ring_in_progress()
        if self.state is not State.GATHER and removed & set(members):
            self._enter_gather(now)
        elif isinstance(self.phase, Gathering):
            self.phase.consensus -= removed
            self._check_consensus(now)
        self._run_loopback(now)

    def _want_token(self, now: int, phase: Operational) -> None:
        """This node has something for the token: release it if I hold it, else ask the holder
        of an idle ring to let it go. Members count idle visits one visit apart at most, so the
        representative may hold the token while my count is a visit or two short of
        `seqno_unchanged_const`: asking from two visits earlier on, as corosync does not, keeps
        such a write from waiting for the `hold` time."""
        if phase.held_token is not None:
            self._release_held_token(now, phase)
        elif phase.rotation.seq_unchanged >= max(1, self.params.seqno_unchanged_const - 2):
            self._multicast(TokenHoldCancel(sender=self.node_id, ring_id=self.ring.ring_id))

    def receive(self, now: int, src: int, data: bytes) -> None:
        """Feed one frame that arrived from node `src` (already authenticated by the transport)."""
        if src not in self.nodes:
            self.counters.add("dropped_unknown_node")
            return
        try:
            msg = decode(data)
        except ProtocolError:
            self.counters.add("dropped_malformed")
            return
        self._dispatch(now, src, msg)
        self._run_loopback(now)

    def on_timer(self, now: int) -> None:
        if self.refusals_at is not None and now >= self.refusals_at:
            self._send_refusals()
        lapsed = {node for node, until in self.refused_until.items() if now >= until}
        if lapsed:
            self._event(f"refusals of {sorted(lapsed)} lapse")
            self._narrow_refusals(lambda node, by: set() if node in lapsed else by)
        if self.relay.loss_at is not None and now >= self.relay.loss_at:
            self.counters.add("token_lost")
            self._event(f"token lost in {self.state.value}")
            self._enter_gather(now)
        if isinstance(self.phase, Gathering) and now >= self.phase.consensus_at:
            self._consensus_expired(now, self.phase)
        if isinstance(self.phase, Gathering) and now >= self.phase.join_at:
            self._multicast_join()
            self.phase.join_at = now + self.params.join
        retransmission = self.relay.retransmission(now, self.params)
        if retransmission is not None:
            self.counters.add("token_retransmits")
            self.outputs.append(retransmission)
        phase = self.phase
        if (isinstance(phase, Operational) and phase.hold_release_at is not None
                and now >= phase.hold_release_at):
            self._release_held_token(now, phase)
        phase = self.phase
        if isinstance(phase, Operational) and phase.merge_at is not None and now >= phase.merge_at:
            self._multicast(MergeDetect(sender=self.node_id, ring_id=self.ring.ring_id))
            phase.merge_at = now + self.params.merge
        self._run_loopback(now)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, now: int, src: int, msg: Message) -> None:
        match msg:
            case Mcast():
                # A recovery frame carries a frame of an old ring, whose sender a configuration
                # taken since may no longer have: it is a frame of the new ring all the same,
                # and a member dropping it could never complete the recovery.
                if msg.sender not in self.nodes and msg.origin is None:
                    self.counters.add("dropped_unknown_node")
                else:
                    self._on_mcast(msg)
            case Token():
                self._on_token(now, msg)
            case CommitToken():
                self._on_commit_token(now, msg)
            case Join() | MergeDetect() | TokenHoldCancel() if msg.sender != src:
                self.counters.add("dropped_sender_mismatch")
            case Join():
                self._on_join(now, msg)
            case MergeDetect():
                self._on_merge_detect(now, msg)
            case TokenHoldCancel():
                phase = self.phase
                if msg.ring_id == self.ring.ring_id and isinstance(phase, Operational):
                    # Someone has something to send: not idle any more. Resetting the idle
                    # count matters when the cancel arrives while the token is on its way
                    # back: the representative must not hold it again (as corosync).
                    phase.rotation.seq_unchanged = 0
                    if phase.held_token is not None:
                        self._release_held_token(now, phase)

    def _run_loopback(self, now: int) -> None:
        while self.loopback:
            self._dispatch(now, self.node_id, self.loopback.popleft())

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _multicast(self, msg: Message) -> None:
        self.outputs.append(Send(None, encode(msg)))

    def _send_token(self, now: int, to: int, msg: Token | CommitToken) -> None:
        """Pass a token on; keep it for retransmission until there is evidence it arrived."""
        if to == self.node_id:
            self.loopback.append(msg)
            self.relay.arrived()
            return
        seq = msg.seq if isinstance(msg, Token) else 0
        self.outputs.append(self.relay.passed_on(now, to, encode(msg), seq, self.params))

    def _next_member(self, members: tuple[int, ...]) -> int:
        return members[(members.index(self.node_id) + 1) % len(members)]

    # ------------------------------------------------------------------ multicast frames

    def _on_mcast(self, frame: Mcast) -> None:
        phase = self.phase
        if isinstance(phase, Operational):
            if frame.ring_id != self.ring.ring_id:
                return
            self.relay.frame_seen(frame.seq)
            if self.ring.add(frame, frame.seq):
                self._deliver_ready()
        elif isinstance(phase, Recovering):
            if frame.ring_id != phase.ring.ring_id:
                return
            self.relay.frame_seen(frame.seq)
            if phase.ring.add(frame, frame.seq):
                self._take_recovered(frame)
        elif frame.ring_id == self.ring.ring_id and frame.origin is None:
            # GATHER / COMMIT: keep collecting frames of the ring we came from.
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
            self.counters.add("recovered_frames")

    def _send_frame(self, ring: RingLog, frame: Mcast) -> None:
        self.outputs.append(Send(None, encode(frame)))
        ring.add(frame, frame.seq)

    # ------------------------------------------------------------------ the regular token

    def _on_token(self, now: int, token: Token) -> None:
        phase = self.phase
        if isinstance(phase, Operational):
            ring = self.ring
        elif isinstance(phase, Recovering):
            ring = phase.ring
        else:
            return
        if token.ring_id != ring.ring_id:
            self.counters.add("dropped_foreign_token")
            return
        if not phase.rotation.fresh(token):
            self.counters.add("dropped_duplicate_token")
            return
        self.relay.arrived()
        self.relay.expect_token(now, self.params)
        self.counters.add("tokens")
        if (isinstance(phase, Operational) and token.phase is TokenPhase.OPERATIONAL
                and self.node_id == ring.members[0] and not self.pending
                and not phase.rotation.durable_news(ring.members, self.node_id)
                and phase.rotation.idle(token, self.params)):
            # Idle ring: the representative keeps the token for `hold` ms per rotation.
            phase.held_token = token
            phase.hold_release_at = now + self.params.hold
            return
        self._token_visit(now, ring, phase.rotation, token)

    def _release_held_token(self, now: int, phase: Operational) -> None:
        token = phase.held_token
        phase.held_token = None
        phase.hold_release_at = None
        if token is not None:
            self._token_visit(now, self.ring, phase.rotation, token)

    def _token_visit(self, now: int, ring: RingLog, rotation: Rotation, token: Token) -> None:
        """One visit of the token: retransmit, send, update aru/rtr/fcc, free, deliver, pass on.
        `ring` is the token's ring and `rotation` its bookkeeping (in RECOVERY and after the
        install this visit may do, the same objects)."""
        phase = token.phase
        retrans_flg = token.retrans_flg
        if isinstance(self.phase, Recovering):
            if self.node_id == ring.members[0]:
                # The representative starts each rotation's retransmission flag afresh.
                phase, retrans_flg = self._recovery_progress(self.phase, token), False
            if phase is not TokenPhase.RECOVERY:
                self._install(now, self.phase)
        elif self.node_id == ring.members[0] and phase is TokenPhase.INSTALL:
            phase = TokenPhase.OPERATIONAL
        recovery = self.phase if isinstance(self.phase, Recovering) else None

        # Flow control: the window left by the others during the last rotation.
        my_backlog = len(recovery.rebroadcast) if recovery else len(self.pending)
        window = rotation.flow_window(token, my_backlog, self.params)

        # Retransmit what others asked for and I hold.
        resent, rtr_left = retransmissions(ring, token.rtr, self.params.max_messages)
        for frame in resent:
            self.outputs.append(Send(None, encode(frame)))
        if resent:
            self.counters.add("retransmitted", len(resent))

        # New frames.
        seq = token.seq
        budget = max(0, window.allowed - len(resent))
        if recovery is not None:
            seq = self._send_recovery_frames(recovery, seq, budget)
            retrans_flg = retrans_flg or bool(recovery.rebroadcast)
        elif phase is TokenPhase.OPERATIONAL:
            seq = self._send_new_frames(ring, seq, budget)
        sent = len(resent) + (seq - token.seq)
        rotation.my_fcc = sent
        rotation.my_backlog = len(recovery.rebroadcast) if recovery else len(self.pending)

        aru, aru_addr = next_aru(token, ring.aru, seq, self.node_id)
        rtr = retransmit_requests(ring, token, rtr_left, self.params)
        if len(rtr) > len(rtr_left):
            self.counters.add("rtr_requested", len(rtr) - len(rtr_left))

        # Free what every member holds (covered by the token's aru on two visits).
        if recovery is None:
            safe = rotation.safe_seq(token)
            ring.free_upto(min(safe, ring.delivered))
            if safe > rotation.stable_seq:
                rotation.stable_seq = safe
                self.outputs.append(Stable(ring.ring_id, safe))
        rotation.prev_visit_aru = token.aru

        # A member that cannot receive: aru stuck below seq for fail_recv_const rotations.
        if (rotation.aru_stuck(token, self.params) and token.aru_addr != self.node_id
                and token.aru_addr in ring.members):
            self.counters.add("fail_to_receive")
            self._enter_gather(now, failed={token.aru_addr})
            return

        durable: tuple[int, ...] = ()
        if recovery is None:
            self._deliver_ready()
            durable = rotation.durable_vector(token, ring.members, self.node_id, ring.delivered)
            if min(durable) > rotation.durable_reported:
                rotation.durable_reported = min(durable)
                self.outputs.append(Durable(ring.ring_id, rotation.durable_reported))
        rotation.note_visit(seq, rtr, token, sent, durable)
        self._send_token(now, self._next_member(ring.members), Token(
            ring_id=ring.ring_id, token_seq=token.token_seq + 1, seq=seq, aru=aru,
            aru_addr=aru_addr, fcc=window.fcc_others + sent,
            backlog=window.backlog_others + rotation.my_backlog, rtr=tuple(rtr),
            retrans_flg=retrans_flg, phase=phase, durable=durable,
        ))

    def _send_new_frames(self, ring: RingLog, seq: int, budget: int) -> int:
        """Pack pending application messages into at most `budget` frames; returns the new seq."""
        for fragments in self.pending.take_frames(budget):
            seq += 1
            self._send_frame(ring, Mcast(ring_id=ring.ring_id, seq=seq, sender=self.node_id,
                                         fragments=fragments))
        return seq

    def _send_recovery_frames(self, recovery: Recovering, seq: int, budget: int) -> int:
        """Re-broadcast at most `budget` old-ring frames as recovery frames; returns the new seq."""
        while recovery.rebroadcast and budget > 0:
            old = recovery.rebroadcast.popleft()
            seq += 1
            self._send_frame(recovery.ring, Mcast(
                ring_id=recovery.ring.ring_id, seq=seq, sender=old.sender,
                fragments=old.fragments, origin=FrameOrigin(ring_id=old.ring_id, seq=old.seq),
            ))
            budget -= 1
        return seq

    def _recovery_progress(self, recovery: Recovering, token: Token) -> TokenPhase:
        """Representative, in RECOVERY: install after two rotations in which all was quiet."""
        quiet = (not token.retrans_flg and token.aru == token.seq and not token.rtr
                 and token.seq == recovery.last_seq and not recovery.rebroadcast)
        recovery.quiet_rotations = recovery.quiet_rotations + 1 if quiet else 0
        recovery.last_seq = token.seq
        if recovery.quiet_rotations >= 2:
            return TokenPhase.INSTALL
        return TokenPhase.RECOVERY

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
        payload = self.reassembly.add(sender, frag)
        if payload is not None:
            self.counters.add("delivered")
            self.outputs.append(Deliver(sender=sender, ring_id=ring_id, seq=seq, payload=payload))

    # ------------------------------------------------------------------ membership

    def _transition(self, phase: Phase) -> None:
        """The only way the membership state changes; an illegal transition is a bug."""
        check_transition(self.phase.state, phase.state)
        self.phase = phase

    def _gathering(self, now: int) -> Gathering:
        return Gathering(consensus={self.node_id}, consensus_at=now + self.params.consensus,
                         join_at=now + self.params.join)

    def _enter_gather(self, now: int, failed: set[int] | None = None) -> None:
        """Start (or restart) gathering; `failed` are nodes this very step found failed."""
        if self.state is not State.GATHER:
            self.counters.add("gather")
        if self.state in (State.COMMIT, State.RECOVERY):
            # The attempt our fail set belonged to is over; the others drop theirs when they
            # hear of its ring seq. Carrying it into the next attempt revives stale exclusions.
            # What made us leave it (a deaf member, a join's failures) is news and stays.
            self.fail = set()
        if failed:
            self.fail |= failed
        self._transition(self._gathering(now))
        self._event(f"gather proc={sorted(self.proc)} fail={sorted(self.fail)}")
        self.relay.stop()
        self.proc.add(self.node_id)
        self.fail.discard(self.node_id)
        self._multicast_join()
        self._check_consensus(now)

    def _multicast_join(self) -> None:
        self._multicast(Join(sender=self.node_id, ring_seq=self.highest_ring_seq,
                             proc=tuple(sorted(self.proc)), fail=tuple(sorted(self.fail))))

    def _ring_in_progress(self) -> tuple[int, tuple[int, ...]]:
        """(seq, members) of the ring I am committing to, else of the ring I am in."""
        match self.phase:
            case Committing(commit=commit) | Recovering(commit=commit):
                return commit.ring_id.seq, commit.members
        return self.ring.ring_id.seq, self.ring.members

    def _on_join(self, now: int, join: Join) -> None:
        if join.sender == self.node_id:
            return
        if join.sender in self.refused:
            self.counters.add("dropped_refused_node")
            return
        refused = set(join.fail) - set(join.proc) - {self.node_id}
        if refused:
            # Taken even from a join dropped below: two nodes whose configurations each lack
            # a node of the other's refuse each other's joins, and must still learn this.
            self._refuse(now, refused, join.sender)
        unknown = {n for n in join.proc if n not in self.nodes}
        if unknown or any(n not in self.nodes for n in join.fail):
            self.counters.add("dropped_unknown_node")
            if unknown:
                self._owe_refusal(now, join.sender, unknown)
            return
        if refused:
            join = Join(sender=join.sender, ring_seq=join.ring_seq, proc=join.proc,
                        fail=tuple(n for n in join.fail if n not in refused))
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
            ring_seq, members = self._ring_in_progress()
            if join.sender in members and join.ring_seq < ring_seq:
                return  # sent before the sender joined the ring we are in
            if self.node_id in join.fail:
                return  # it forms a ring without us; merge detection reunites us later
            if self.state is not State.OPERATIONAL and self.node_id not in join.proc:
                return  # committing: only a join that wants us interrupts
        proc, fail = set(join.proc), set(join.fail)
        if isinstance(self.phase, Gathering) and proc == self.proc and fail == self.fail:
            self.phase.consensus.add(join.sender)
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
        # Refused nodes stay out, also of the fail set (a normal join has fail within proc).
        merged_fail -= self.refused.keys()
        merged_proc = self.proc | (proc - self.refused.keys())
        if (self.state is State.GATHER and merged_proc == self.proc and merged_fail == self.fail
                and not forgot_failures):
            return  # nothing new; the join timer keeps repeating our view
        self._event(f"join from {join.sender} (ring seq {join.ring_seq}) proc={sorted(proc)} "
                    f"fail={sorted(fail)} in {self.state.value}")
        self.proc = merged_proc
        self._enter_gather(now, failed=merged_fail)

    def _owe_refusal(self, now: int, peer: int, unknown: set[int]) -> None:
        """`peer`'s join named `unknown`, nodes my configuration does not have: tell it."""
        self.refusals_owed.setdefault(peer, set()).update(unknown)
        if self.refusals_at is None:
            self.refusals_at = now + self.params.join

    def _send_refusals(self) -> None:
        """To each peer owed one, a join of mine whose fail set also lists, outside my proc
        set, the nodes it named that I do not have (see the module comment)."""
        for peer, unknown in sorted(self.refusals_owed.items()):
            self.counters.add("refusals_sent")
            self.outputs.append(Send(peer, encode(Join(
                sender=self.node_id, ring_seq=self.highest_ring_seq,
                proc=tuple(sorted(self.proc)), fail=tuple(sorted(self.fail | unknown))))))
        self.refusals_owed = {}
        self.refusals_at = None

    def _refuse(self, now: int, nodes: set[int], by: int) -> None:
        """Peer `by`'s configuration does not have `nodes`: leave them out (as a removal by
        `reconfigure` does) until I take a configuration in a ring with `by` (or the refusal
        lapses)."""
        nodes = (nodes & self.nodes) - {self.node_id}
        if not nodes:
            return
        new = nodes - set(self.refused)
        for node in nodes:
            self.refused.setdefault(node, set()).add(by)
            self.refused_until[node] = now + REFUSAL_CONSENSUS_TIMEOUTS * self.params.consensus
        # A refused node's own refusals no longer count: it is not part of any ring of mine.
        self._narrow_refusals(lambda node, refusers: refusers - set(self.refused))
        if not new:
            return
        self.counters.add("nodes_refused", len(new))
        self._event(f"n{by} does not have {sorted(new)} configured: left out")
        self.proc -= new
        self.fail -= new
        _, members = self._ring_in_progress()
        if self.state is State.GATHER or new & set(members):
            self._enter_gather(now)

    def _narrow_refusals(self, remaining: Callable[[int, set[int]], set[int]]) -> None:
        """Each refused node keeps the refusing peers `remaining(node, peers)` names; a node
        none refuses any more is refused no more."""
        narrowed = {node: remaining(node, by) for node, by in self.refused.items()}
        self.refused = {node: by for node, by in narrowed.items() if by}
        self.refused_until = {node: until for node, until in self.refused_until.items()
                              if node in self.refused}

    def _on_merge_detect(self, now: int, msg: MergeDetect) -> None:
        if msg.sender in self.refused:
            return
        if (self.state is State.OPERATIONAL and msg.ring_id != self.ring.ring_id
                and msg.sender not in self.ring.members):
            self.counters.add("merge_detected")
            self._event(f"merge detect from {msg.sender} of ring {msg.ring_id}")
            self.proc.add(msg.sender)
            self._enter_gather(now)

    def _consensus_expired(self, now: int, gathering: Gathering) -> None:
        consensus = gathering.consensus
        live = self.proc - self.fail
        if not live <= consensus:
            self.fail |= live - consensus
            self.counters.add("consensus_timeouts")
            self._event(f"consensus timeout, failing {sorted(live - consensus)}")
        self._enter_gather(now)

    def _check_consensus(self, now: int) -> None:
        live = self.proc - self.fail
        if not isinstance(self.phase, Gathering) or not live <= self.phase.consensus:
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
        self._transition(Committing(commit=commit, hop=commit.hop))
        self.last_commit_seq = commit.ring_id.seq
        self._event(f"commit {commit.ring_id} members={list(commit.members)}")
        self.relay.expect_token(now, self.params)
        self._send_token(now, self._next_member(commit.members),
                         CommitToken(commit.ring_id, commit.hop + 1, commit.members,
                                     commit.infos))

    def _on_commit_token(self, now: int, ct: CommitToken) -> None:
        if self.node_id not in ct.members:
            return
        phase = self.phase
        if isinstance(phase, Gathering):
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
        if (isinstance(phase, Operational) or ct.ring_id != phase.commit.ring_id
                or ct.hop <= phase.hop):
            return
        phase.hop = ct.hop
        self.relay.arrived()
        self.relay.expect_token(now, self.params)
        if isinstance(phase, Committing):
            complete = _member_infos(ct)
            if complete is not None:
                self._enter_recovery(now, ct, complete)
                self._send_token(now, self._next_member(ct.members),
                                 CommitToken(ct.ring_id, ct.hop + 1, ct.members, ct.infos))
        elif self.node_id == ct.members[0]:
            self._send_token(now, self.node_id, Token(
                ring_id=ct.ring_id, token_seq=1, seq=0, aru=0, aru_addr=0, fcc=0, backlog=0,
                rtr=(), retrans_flg=False, phase=TokenPhase.RECOVERY,
            ))

    def _enter_recovery(self, now: int, ct: CommitToken, infos: tuple[MemberInfo, ...]) -> None:
        """The commit token's second rotation: start the new ring, re-broadcasting every frame of
        my old ring that a member coming from it may lack (above their lowest aru)."""
        old = self.ring
        trans = []
        low_aru = old.aru
        for member, info in zip(ct.members, infos, strict=True):
            if info.old_ring_id == old.ring_id:
                trans.append(member)
                low_aru = min(low_aru, info.aru)
        self._transition(Recovering(
            commit=ct, hop=ct.hop, ring=RingLog(ct.ring_id, ct.members),
            trans_members=tuple(trans),
            rebroadcast=deque(old.frames[s] for s in sorted(old.frames)
                              if s > low_aru and old.frames[s].origin is None),
            rotation=Rotation(),
        ))
        self._event(f"recovery {ct.ring_id}")
        self.relay.expect_token(now, self.params)

    def _install(self, now: int, recovery: Recovering) -> None:
        """Recovery is complete: finish the old ring, deliver the configuration changes."""
        old = self.ring
        for s in sorted(old.frames):
            if s > old.delivered:
                self._deliver_frame(old.ring_id, s, old.frames[s])
        self.reassembly.drop_partials()
        new = recovery.ring
        trans = recovery.trans_members
        self.outputs.append(ConfChange(
            kind=ConfChangeKind.TRANSITIONAL, ring_id=new.ring_id, members=trans,
            left=tuple(m for m in old.members if m not in trans), joined=(),
        ))
        self.outputs.append(ConfChange(
            kind=ConfChangeKind.REGULAR, ring_id=new.ring_id, members=new.members, left=(),
            joined=tuple(m for m in new.members if m not in trans),
        ))
        self.counters.add("rings_installed")
        new.delivered = new.aru
        self.ring = new
        # Idle detection (token hold) counts from the install on.
        rotation = recovery.rotation
        rotation.seq_unchanged = 0
        rotation.last_visit_seq = -1
        self._transition(Operational(
            rotation=rotation,
            merge_at=now + self.params.merge if self.node_id == new.members[0] else None,
        ))
        self.proc = set(new.members)
        self.fail = set()
        self.pending.restart_partial()
