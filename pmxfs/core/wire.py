"""Totem wire messages: frozen dataclasses and a strict msgpack codec.

Every frame on the wire is a msgpack array `[PROTOCOL_VERSION, type, field, ...]`. The codec is
the only place that touches raw bytes from the network, so `decode` is deliberately paranoid:
every field is checked for type and range, and anything that is not exactly a message of this
protocol version raises `ProtocolError` (and nothing else), so the caller can drop and count it.

Messages:
* `Mcast`          — an ordered frame of ring `ring_id` at position `seq`, holding fragments of
                     application messages of `sender`; with `origin` set it is a recovery frame that
                     carries an old-ring frame into the new ring.
* `Token`          — the regular (ORF) token that circulates in a ring: seq, aru, aru_addr,
                     retransmit list, flow control counters, recovery phase.
* `Join`           — membership proposal during GATHER: the sender's process and failed sets.
* `CommitToken`    — circulates twice to commit a new ring; collects every member's old-ring state.
* `MergeDetect`    — a representative's periodic "I exist", so healed partitions find each other.
* `TokenHoldCancel`— asks the representative to release a held token: the sender has data.

`Token` and `CommitToken` only ever travel from one node to the next (totem sends them with
`Send(to=N)`); everything else goes to all. `unicast_only` tells the tokens from raw bytes, so the
frame layer can refuse a token that was sealed for every node (see `frame_crypto`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from pmxfs.core.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_NODE_ID = 2**32 - 1
MAX_SEQ = 2**63 - 1
MAX_FRAGMENTS_PER_FRAME = 4096
MAX_FRAGMENT_BYTES = 1 << 20
MAX_RTR_ENTRIES = 1024
MAX_MEMBERS = 1024
MAX_FRAME_BYTES = 4 << 20


class MessageType(IntEnum):
    """The second element of every frame: which message the rest of the array is."""

    MCAST = 1
    TOKEN = 2
    JOIN = 3
    COMMIT_TOKEN = 4
    MERGE_DETECT = 5
    TOKEN_HOLD_CANCEL = 6


class TokenPhase(IntEnum):
    """Where a ring is in its life, as carried on its token.

    RECOVERY: old-ring frames are being re-broadcast; no new application messages.
    INSTALL: recovery is complete; each member installs the ring when the token reaches it.
    OPERATIONAL: every member has installed the ring; application messages may be sent.
    """

    RECOVERY = 0
    INSTALL = 1
    OPERATIONAL = 2


@dataclass(frozen=True, slots=True, order=True)
class RingId:
    """A ring's identity. Ordered by seq first, so a newer ring compares greater."""

    seq: int
    rep: int

    def __str__(self) -> str:
        return f"{self.rep}.{self.seq}"


@dataclass(frozen=True, slots=True)
class Fragment:
    """Part `index` of `count` of application message `msg_id` of the frame's sender."""

    msg_id: int
    index: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FrameOrigin:
    """Where a recovered frame first stood: ring and seq of the old ring."""

    ring_id: RingId
    seq: int


@dataclass(frozen=True, slots=True)
class Mcast:
    """An ordered frame: position `seq` of ring `ring_id`, stamped by the token holder."""

    ring_id: RingId
    seq: int  # 1, 2, ... within the ring; the agreed order
    sender: int  # whose application messages the fragments belong to
    fragments: tuple[Fragment, ...]
    origin: FrameOrigin | None = None  # set on a recovery frame: where the carried frame stood


@dataclass(frozen=True, slots=True)
class Token:
    """The regular token of ring `ring_id`; `pmxfs.core.totem` explains each field's use."""

    ring_id: RingId
    token_seq: int  # counts hops, so a retransmitted duplicate is recognised
    seq: int  # the highest seq stamped in the ring
    aru: int  # the lowest "all received up to" seen this rotation
    aru_addr: int  # who set `aru` (0: nobody is behind)
    fcc: int  # frames sent during the last rotation
    backlog: int  # messages waiting to be sent (RECOVERY: old-ring frames), over all members
    rtr: tuple[int, ...]  # seqs some member asks to be retransmitted
    retrans_flg: bool  # RECOVERY: some member still has old-ring frames to re-broadcast
    phase: TokenPhase
    durable: tuple[int, ...] = ()  # per member (ring order): the seq it holds on disk up to


@dataclass(frozen=True, slots=True)
class Join:
    """A gathering member's view of the membership."""

    sender: int
    ring_seq: int  # the highest ring seq the sender has seen: how current its view is
    proc: tuple[int, ...]  # who it believes alive, sorted
    fail: tuple[int, ...]  # who it believes failed, sorted


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What a member reports on the commit token about the ring it comes from."""

    node_id: int
    old_ring_id: RingId  # the ring it was operational in (or came from)
    aru: int  # all of that ring's frames up to here it has
    high_seq: int  # the highest seq of that ring it has


@dataclass(frozen=True, slots=True)
class CommitToken:
    """The token that commits the members to new ring `ring_id`."""

    ring_id: RingId  # the new ring: the representative's id and a seq higher than any seen
    hop: int  # counts hops, so a duplicate is recognised
    members: tuple[int, ...]  # the new ring's members, sorted; the first is the representative
    infos: tuple[MemberInfo | None, ...]  # per member, filled in on its first visit


@dataclass(frozen=True, slots=True)
class MergeDetect:
    """The representative of ring `ring_id` announcing it, for other partitions to find."""

    sender: int
    ring_id: RingId


@dataclass(frozen=True, slots=True)
class TokenHoldCancel:
    """A member of ring `ring_id` with something to send: the representative must not hold
    the token."""

    sender: int
    ring_id: RingId


Message = Mcast | Token | Join | CommitToken | MergeDetect | TokenHoldCancel


def _ring(r: RingId) -> list[int]:
    return [r.seq, r.rep]


def encode(msg: Message) -> bytes:
    """Serialise a message; the result always decodes back to an equal message."""
    body: list[Any]
    match msg:
        case Mcast():
            origin = None if msg.origin is None else [_ring(msg.origin.ring_id), msg.origin.seq]
            frags = [[f.msg_id, f.index, f.count, f.data] for f in msg.fragments]
            body = [MessageType.MCAST, _ring(msg.ring_id), msg.seq, msg.sender, frags, origin]
        case Token():
            body = [
                MessageType.TOKEN, _ring(msg.ring_id), msg.token_seq, msg.seq, msg.aru,
                msg.aru_addr, msg.fcc, msg.backlog, list(msg.rtr), msg.retrans_flg, int(msg.phase),
                list(msg.durable),
            ]
        case Join():
            body = [MessageType.JOIN, msg.sender, msg.ring_seq, list(msg.proc), list(msg.fail)]
        case CommitToken():
            infos = [
                None if i is None else [i.node_id, _ring(i.old_ring_id), i.aru, i.high_seq]
                for i in msg.infos
            ]
            body = [MessageType.COMMIT_TOKEN, _ring(msg.ring_id), msg.hop, list(msg.members), infos]
        case MergeDetect():
            body = [MessageType.MERGE_DETECT, msg.sender, _ring(msg.ring_id)]
        case TokenHoldCancel():
            body = [MessageType.TOKEN_HOLD_CANCEL, msg.sender, _ring(msg.ring_id)]
    packed: bytes = msgpack.packb([PROTOCOL_VERSION, *body], use_bin_type=True)
    return packed


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"bad {what}")
    return value


def _seq(value: object, what: str) -> int:
    return _int(value, 0, MAX_SEQ, what)


def _node(value: object, what: str) -> int:
    return _int(value, 1, MAX_NODE_ID, what)


def _list(value: object, max_len: int, what: str, exact: int | None = None) -> list[Any]:
    if type(value) is not list or len(value) > max_len:
        raise ProtocolError(f"bad {what}")
    if exact is not None and len(value) != exact:
        raise ProtocolError(f"bad {what}")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"bad {what}")
    return value


def _ring_id(value: object) -> RingId:
    seq, rep = _list(value, 2, "ring id", exact=2)
    return RingId(seq=_seq(seq, "ring seq"), rep=_node(rep, "ring rep"))


def _node_set(value: object, what: str) -> tuple[int, ...]:
    nodes = tuple(_node(n, what) for n in _list(value, MAX_MEMBERS, what))
    if list(nodes) != sorted(set(nodes)):
        raise ProtocolError(f"{what} not sorted and unique")
    return nodes


def _fragment(value: object) -> Fragment:
    msg_id, index, count, data = _list(value, 4, "fragment", exact=4)
    if type(data) is not bytes or len(data) > MAX_FRAGMENT_BYTES:
        raise ProtocolError("bad fragment data")
    count = _int(count, 1, MAX_SEQ, "fragment count")
    return Fragment(
        msg_id=_seq(msg_id, "msg id"),
        index=_int(index, 0, count - 1, "fragment index"),
        count=count,
        data=data,
    )


def _decode_mcast(fields: list[Any]) -> Mcast:
    ring, seq, sender, frags, origin = _list(fields, 5, "mcast", exact=5)
    parsed_origin = None
    if origin is not None:
        o_ring, o_seq = _list(origin, 2, "origin", exact=2)
        parsed_origin = FrameOrigin(ring_id=_ring_id(o_ring), seq=_int(o_seq, 1, MAX_SEQ, "seq"))
    return Mcast(
        ring_id=_ring_id(ring),
        seq=_int(seq, 1, MAX_SEQ, "seq"),
        sender=_node(sender, "sender"),
        fragments=tuple(_fragment(f) for f in _list(frags, MAX_FRAGMENTS_PER_FRAME, "fragments")),
        origin=parsed_origin,
    )


def _decode_token(fields: list[Any]) -> Token:
    ring, token_seq, seq, aru, aru_addr, fcc, backlog, rtr, flg, phase, durable = _list(
        fields, 11, "token", exact=11
    )
    seq = _seq(seq, "seq")
    phase = _int(phase, 0, max(TokenPhase), "phase")
    return Token(
        ring_id=_ring_id(ring),
        token_seq=_seq(token_seq, "token seq"),
        seq=seq,
        aru=_int(aru, 0, seq, "aru"),
        aru_addr=_int(aru_addr, 0, MAX_NODE_ID, "aru addr"),
        fcc=_seq(fcc, "fcc"),
        backlog=_seq(backlog, "backlog"),
        rtr=tuple(_int(s, 1, seq, "rtr entry") for s in _list(rtr, MAX_RTR_ENTRIES, "rtr")),
        retrans_flg=_bool(flg, "retrans flag"),
        phase=TokenPhase(phase),
        durable=tuple(_int(s, 0, seq, "durable seq")
                      for s in _list(durable, MAX_MEMBERS, "durable")),
    )


def _decode_join(fields: list[Any]) -> Join:
    sender, ring_seq, proc, fail = _list(fields, 4, "join", exact=4)
    return Join(
        sender=_node(sender, "sender"),
        ring_seq=_seq(ring_seq, "ring seq"),
        proc=_node_set(proc, "proc set"),
        fail=_node_set(fail, "fail set"),
    )


def _member_info(value: object) -> MemberInfo | None:
    if value is None:
        return None
    node_id, old_ring, aru, high_seq = _list(value, 4, "member info", exact=4)
    high_seq = _seq(high_seq, "high seq")
    return MemberInfo(
        node_id=_node(node_id, "member"),
        old_ring_id=_ring_id(old_ring),
        aru=_int(aru, 0, high_seq, "aru"),
        high_seq=high_seq,
    )


def _decode_commit(fields: list[Any]) -> CommitToken:
    ring, hop, members, infos = _list(fields, 4, "commit token", exact=4)
    member_ids = _node_set(members, "members")
    info_list = _list(infos, MAX_MEMBERS, "member infos", exact=len(member_ids))
    parsed = tuple(_member_info(i) for i in info_list)
    for member, info in zip(member_ids, parsed, strict=True):
        if info is not None and info.node_id != member:
            raise ProtocolError("member info for the wrong node")
    if not member_ids:
        raise ProtocolError("commit token without members")
    return CommitToken(
        ring_id=_ring_id(ring), hop=_seq(hop, "hop"), members=member_ids, infos=parsed
    )


def _decode_merge(fields: list[Any]) -> MergeDetect:
    sender, ring = _list(fields, 2, "merge detect", exact=2)
    return MergeDetect(sender=_node(sender, "sender"), ring_id=_ring_id(ring))


def _decode_hold_cancel(fields: list[Any]) -> TokenHoldCancel:
    sender, ring = _list(fields, 2, "token hold cancel", exact=2)
    return TokenHoldCancel(sender=_node(sender, "sender"), ring_id=_ring_id(ring))


_DECODERS: dict[MessageType, Callable[[list[Any]], Message]] = {
    MessageType.MCAST: _decode_mcast,
    MessageType.TOKEN: _decode_token,
    MessageType.JOIN: _decode_join,
    MessageType.COMMIT_TOKEN: _decode_commit,
    MessageType.MERGE_DETECT: _decode_merge,
    MessageType.TOKEN_HOLD_CANCEL: _decode_hold_cancel,
}


UNICAST_ONLY = frozenset({MessageType.TOKEN, MessageType.COMMIT_TOKEN})
_KIND_PREFIX_BYTES = 5 + 9 + 9  # the longest array header and two longest msgpack integers


def unicast_only(data: bytes) -> bool:
    """Would `decode` read `data` as a message that is only sent to one node (a token)?

    Reads just the array header and the first two elements, the way `decode` reads them (when
    they are integers they fit in the first `_KIND_PREFIX_BYTES`), so every frame that decodes
    to a `Token` or `CommitToken` answers True; anything else (other kinds, garbage) answers
    False and is left to `decode`. The shortest encodings, which `encode` writes, are read
    from the first three bytes directly; any other goes through msgpack's own reader."""
    if len(data) >= 3 and 0x92 <= data[0] <= 0x9F and data[1] == PROTOCOL_VERSION \
            and data[2] < 0x80:  # fixarray, then two positive fixints: what `encode` writes
        return data[2] in UNICAST_ONLY
    unpacker = msgpack.Unpacker(raw=False)
    try:
        unpacker.feed(data[:_KIND_PREFIX_BYTES])
        if unpacker.read_array_header() < 2:
            return False
        version, kind = unpacker.unpack(), unpacker.unpack()
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        return False
    return (type(version) is int and version == PROTOCOL_VERSION
            and type(kind) is int and kind in UNICAST_ONLY)


def decode(data: bytes) -> Message:
    """Parse one frame; raises ProtocolError for anything but a valid message."""
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError("frame too large")
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, max_bin_len=MAX_FRAGMENT_BYTES
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError("not a message")
    if obj[0] != PROTOCOL_VERSION or type(obj[0]) is not int:
        raise ProtocolError("unsupported protocol version")
    kind = obj[1]
    if type(kind) is not int or kind not in _DECODERS:
        raise ProtocolError("unknown message type")
    return _DECODERS[MessageType(kind)](obj[2:])
