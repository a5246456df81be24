"""Token handling: passing a token on reliably, and what a member keeps between visits of one
ring's regular token (flow control, freeing, failure and idle detection).

Passing on (`TokenRelay`). A token goes to exactly one node, over a lossy network. The sender
keeps the encoded token and sends it again every `token_retransmit` ms until there is evidence
that the next member has it: a token coming back, or a frame stamped above the seq the token
carried (only its holder could have sent that). A member that sees no token for `token` ms
declares the token lost, and with it the ring.

Between visits (`Rotation`, one per ring, from recovery on). Fields of the token that every
member updates in turn (`fcc`, `backlog`) hold everyone's share of the last rotation: a member
subtracts its own previous share to see the others' and adds its new one. From that it takes its
share of the window (`flow_window`). The token's aru on two consecutive visits bounds what every
member holds, so frames at or below it may be freed and reported stable. An aru stuck below seq
for `fail_recv_const` visits, and always set by the same member, means that member cannot receive
(`aru_stuck`). A seq unchanged for `seqno_unchanged_const` visits means the ring is idle and the
representative may hold the token (`idle`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .totem_outputs import Send
from .totem_params import TotemParams
from .totem_ringlog import RingLog
from .wire import Mcast, Token

RTR_LIMIT = 64


@dataclass(slots=True)
class ForwardedToken:
    """A token this member passed on and keeps until the next member is seen to have it."""

    to: int
    data: bytes  # the encoded token, sent again as it is
    seq: int  # the regular token's seq (0 for a commit token): a frame above it is evidence
    retransmit_at: int  # when it is sent again


class TokenRelay:
    """The timers of a member that takes part in a ring (or in forming one): token loss, and
    retransmission of the token it passed on. All off while gathering."""

    def __init__(self) -> None:
        self.forwarded: ForwardedToken | None = None  # passed on, arrival not yet seen
        self.loss_at: int | None = None  # the ring is lost if no token arrives before this

    def passed_on(self, now: int, to: int, data: bytes, seq: int, params: TotemParams) -> Send:
        """The encoded token `data` leaves for `to`: keep it for retransmission; the `Send`
        carries it."""
        self.forwarded = ForwardedToken(to, data, seq, now + params.token_retransmit)
        return Send(to, data)

    def arrived(self) -> None:
        """The token passed on has arrived (or was passed to this very member)."""
        self.forwarded = None

    def frame_seen(self, seq: int) -> None:
        """A frame of the ring at `seq`: if it is above the forwarded token's seq, the next member
        has the token and sent it."""
        if self.forwarded is not None and seq > self.forwarded.seq:
            self.arrived()

    def expect_token(self, now: int, params: TotemParams) -> None:
        """A token arrived (or this member just committed): the next one is due within `token`."""
        self.loss_at = now + params.token

    def retransmission(self, now: int, params: TotemParams) -> Send | None:
        """The forwarded token again, if its retransmission is due (the timer restarts)."""
        forwarded = self.forwarded
        if forwarded is None or now < forwarded.retransmit_at:
            return None
        forwarded.retransmit_at = now + params.token_retransmit
        return Send(forwarded.to, forwarded.data)

    def deadlines(self) -> tuple[int | None, int | None]:
        """(token loss, token retransmission), None when off."""
        return self.loss_at, None if self.forwarded is None else self.forwarded.retransmit_at

    def stop(self) -> None:
        """Gathering: no ring, no token, no timers."""
        self.loss_at = None
        self.forwarded = None


@dataclass(frozen=True, slots=True)
class FlowWindow:
    """What a visit may send, from the token's flow-control fields."""

    allowed: int  # frames this member may send now, retransmissions included
    fcc_others: int  # frames the other members sent during the last rotation
    backlog_others: int  # messages (RECOVERY: old-ring frames) the others have waiting


@dataclass(slots=True)
class Rotation:
    """What this member remembers between visits of one ring's regular token."""

    last_token_seq: int = 0  # the newest token_seq seen; older or equal ones are duplicates
    my_fcc: int = 0  # frames I sent on my last visit (my share of the token's fcc)
    my_backlog: int = 0  # what I had waiting after my last visit (my share of its backlog)
    prev_visit_aru: int = 0  # the token's aru on my previous visit
    stable_seq: int = 0  # the highest seq reported stable
    last_seen_aru: int = -1  # the token's aru on my previous visit, for failure detection
    aru_unchanged: int = 0  # consecutive visits with that aru stuck below seq
    last_visit_seq: int = -1  # the seq I passed on last visit
    seq_unchanged: int = 0  # consecutive idle visits (nothing sent, asked for or waiting)
    durable_here: int = 0  # the seq up to which this member's deliveries are on its disk
    durable_passed: tuple[int, ...] = ()  # the durable vector I passed on last visit
    durable_reported: int = 0  # the highest seq reported durable on every member

    def durable_news(self, members: tuple[int, ...], node_id: int) -> bool:
        """Has my disk caught up beyond what my last visit put on the token?"""
        passed = self.durable_passed
        mine = passed[members.index(node_id)] if len(passed) == len(members) else 0
        return self.durable_here > mine

    def durable_vector(self, token: Token, members: tuple[int, ...], node_id: int,
                       delivered: int) -> tuple[int, ...]:
        """The token's durable vector with my own entry brought up to date."""
        vector = list(token.durable) if len(token.durable) == len(members) else [0] * len(members)
        index = members.index(node_id)
        vector[index] = max(vector[index], min(self.durable_here, delivered))
        return tuple(vector)

    def fresh(self, token: Token) -> bool:
        """Record the token's hop count; False for a duplicate or an older token."""
        if token.token_seq <= self.last_token_seq:
            return False
        self.last_token_seq = token.token_seq
        return True

    def flow_window(self, token: Token, my_backlog: int, params: TotemParams) -> FlowWindow:
        """At most `window_size` frames per rotation, `max_messages` per visit; when the members'
        backlog exceeds the window, each gets a share in proportion to its backlog (at least 1)."""
        fcc_others = max(0, token.fcc - self.my_fcc)
        backlog_others = max(0, token.backlog - self.my_backlog)
        allowed = min(params.max_messages, max(0, params.window_size - fcc_others))
        total_backlog = backlog_others + my_backlog
        if my_backlog and total_backlog > params.window_size:
            allowed = min(allowed, max(1, params.window_size * my_backlog // total_backlog))
        return FlowWindow(allowed, fcc_others, backlog_others)

    def safe_seq(self, token: Token) -> int:
        """The seq every member is known to hold: the token's aru now and on my previous visit."""
        return min(token.aru, self.prev_visit_aru)

    def aru_stuck(self, token: Token, params: TotemParams) -> bool:
        """Has the token's aru, set by one member, stayed below seq for `fail_recv_const`
        visits?"""
        if token.aru == self.last_seen_aru and token.aru < token.seq and token.aru_addr != 0:
            self.aru_unchanged += 1
        else:
            self.aru_unchanged = 0
        self.last_seen_aru = token.aru
        return self.aru_unchanged >= params.fail_recv_const

    def note_visit(self, seq: int, rtr: list[int], token: Token, sent: int,
                   durable: tuple[int, ...]) -> None:
        """Count idle visits: the seq did not move, nobody sent, asked for or had anything, and
        no member's disk caught up."""
        if (seq == self.last_visit_seq and not rtr and token.backlog == 0 and not sent
                and durable == self.durable_passed):
            self.seq_unchanged += 1
        else:
            self.seq_unchanged = 0
        self.last_visit_seq = seq
        self.durable_passed = durable

    def idle(self, token: Token, params: TotemParams) -> bool:
        """Has the ring been idle long enough for the representative to hold this token?"""
        return (not token.rtr and token.backlog == 0 and token.seq == self.last_visit_seq
                and token.durable == self.durable_passed
                and self.seq_unchanged >= params.seqno_unchanged_const)


def next_aru(token: Token, my_aru: int, seq: int, node_id: int) -> tuple[int, int]:
    """The (aru, aru_addr) to pass on: lowered to mine, or raised by me if I lowered it (or
    nobody did); aru_addr 0 once it has caught up with seq."""
    aru, aru_addr = token.aru, token.aru_addr
    if my_aru < aru or aru_addr in (0, node_id):
        aru = my_aru
        aru_addr = 0 if aru == seq else node_id
    return aru, aru_addr


def retransmissions(ring: RingLog, rtr: tuple[int, ...],
                    limit: int) -> tuple[list[Mcast], list[int]]:
    """The requested frames I hold (at most `limit`), and the requests left for others."""
    frames: list[Mcast] = []
    left: list[int] = []
    for s in rtr:
        frame = ring.frames.get(s)
        if frame is not None and len(frames) < limit:
            frames.append(frame)
        else:
            left.append(s)
    return frames, left


def retransmit_requests(ring: RingLog, token: Token, left: list[int],
                        params: TotemParams) -> list[int]:
    """The token's new rtr list: the requests nobody answered, then what I have now missed
    `miss_count_const` times (as corosync), scanning at most four windows above my aru and
    keeping the list within RTR_LIMIT."""
    upto = min(token.seq, ring.aru + 4 * params.window_size)
    return left + ring.overdue(upto, set(left), RTR_LIMIT - len(left), params.miss_count_const)
