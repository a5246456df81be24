"""Messages the replicas exchange through totem, and their strict msgpack codec.

Every payload a replica multicasts is `[REPLICA_PROTOCOL, kind, ...]`:
* `OpMsg`       — a file-system operation with its id (proposer, proposer's boot, counter).
* `ExpectedMsg` — `pmxfs expected N`, applied by every member at its place in the order.
* `LmsMsg`      — a last-man-standing step (quorum.LastManStanding).
* `LogMsg`      — one cluster log entry.
* `StateMsg`    — a member's state at the start of a sync: quorum announcement, tree version,
                  checksum, per-entry digests, history and its cluster log.
* `EntriesMsg`  — a chunk of the sync leader's rows; `DoneMsg` ends the leader's transfer with
                  the history and applied-operation table every member adopts.
* `VerifyMsg`   — periodic verification: `request` opens a round, the others carry checksums.
* `ResyncMsg`   — a member failed to verify a sync: everyone starts again with the next epoch.
Kind 10 is retired (a durability announcement, now carried by the totem token).
`decode_msg` raises `ProtocolError` (only) for anything malformed; members drop and count it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from pmxfs.core.clusterlog import (
    Key,
    LogEntry,
    decode_cutoff,
    decode_entries,
    encode_cutoff,
    encode_entries,
)
from pmxfs.core.entry import DIGEST_BYTES, Entry, EntryType
from pmxfs.core.errors import ProtocolError
from pmxfs.core.fsop import FsOp, decode_op, encode_op
from pmxfs.core.quorum import Announcement
from pmxfs.core.wire import MAX_NODE_ID, MAX_SEQ, RingId

REPLICA_PROTOCOL = 1
MAX_LIST = 1 << 20


@dataclass(frozen=True, slots=True, order=True)
class OpId:
    """Unique per operation: boot ids are ordered, so (incarnation, counter) only grows."""

    node: int  # the proposer
    incarnation: int  # the proposer's boot id
    counter: int  # the proposer's running number within the boot


@dataclass(frozen=True, slots=True)
class HistorySpan:
    """Versions first..last of a tree were made by operations applied in ring `ring`."""

    ring: RingId
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class OpMsg:
    """A proposed file-system operation; applied by every member where it is delivered."""

    op_id: OpId
    op: FsOp


@dataclass(frozen=True, slots=True)
class ExpectedMsg:
    """`pmxfs expected N`, proposed like an operation."""

    op_id: OpId
    expected: int  # N


@dataclass(frozen=True, slots=True)
class LmsMsg:
    """A last-man-standing step: while the members are `members`, E becomes `expected`."""

    members: tuple[int, ...]
    expected: int


@dataclass(frozen=True, slots=True)
class LogMsg:
    """One cluster log entry, for every member's log."""

    entry: LogEntry


@dataclass(frozen=True, slots=True)
class StateMsg:
    """A member's state at the start of sync `epoch` of `ring`."""

    ring: RingId
    epoch: int
    announcement: Announcement  # its quorum inputs
    version: int  # its tree's global version
    checksum: bytes  # of the whole state: tree, history, applied table
    last_ring_seq: int  # ring seq of the newest history span (0 for none)
    digests: tuple[tuple[int, bytes], ...]  # (inode, `Entry.digest()`) of every row
    log: tuple[LogEntry, ...]  # its cluster log
    log_cutoff: Key | None  # the newest entry its bounded log has dropped


@dataclass(frozen=True, slots=True)
class EntriesMsg:
    """A chunk of the sync leader's rows that some member lacks."""

    ring: RingId
    epoch: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class DoneMsg:
    """The end of the sync leader's transfer: what every member adopts with its rows."""

    ring: RingId
    epoch: int
    version: int  # the leader's tree version
    history: tuple[HistorySpan, ...]
    applied: tuple[tuple[OpId, int], ...]  # the applied table: (operation id, errno)


@dataclass(frozen=True, slots=True)
class VerifyMsg:
    """Periodic verification: a request opens round `round`, every member answers with its
    state checksum at that point of the order."""

    ring: RingId
    epoch: int
    round: int
    request: bool  # True: opens the round (and carries no checksum)
    checksum: bytes


@dataclass(frozen=True, slots=True)
class ResyncMsg:
    """Start sync number `epoch` of `ring`: the previous one failed, or a verification differed."""

    ring: RingId
    epoch: int


@dataclass(frozen=True, slots=True)
class QdeviceMsg:
    """The sender's quorum-device client got (`vote`) or lost the device's vote for `ring`;
    counted only in that ring."""

    ring: RingId
    vote: bool


ReplicaMsg: TypeAlias = (OpMsg | ExpectedMsg | LmsMsg | LogMsg | StateMsg | EntriesMsg | DoneMsg
                         | VerifyMsg | ResyncMsg | QdeviceMsg)


# ------------------------------------------------------------------------------ encoding


def _ring(r: RingId) -> list[int]:
    return [r.seq, r.rep]


def _op_id(o: OpId) -> list[int]:
    return [o.node, o.incarnation, o.counter]


def encode_entry(e: Entry) -> list[Any]:
    return [e.inode, e.parent, e.version, e.writer, e.mtime, int(e.type), e.name, e.data]


def encode_history(history: tuple[HistorySpan, ...]) -> list[Any]:
    return [[_ring(h.ring), h.first, h.last] for h in history]


def encode_applied(applied: tuple[tuple[OpId, int], ...]) -> list[Any]:
    return [[_op_id(o), errno] for o, errno in applied]


def encode_msg(msg: ReplicaMsg) -> bytes:
    body: list[Any]
    match msg:
        case OpMsg():
            body = [1, _op_id(msg.op_id), encode_op(msg.op)]
        case ExpectedMsg():
            body = [2, _op_id(msg.op_id), msg.expected]
        case LmsMsg():
            body = [3, list(msg.members), msg.expected]
        case LogMsg():
            body = [4, encode_entries([msg.entry])]
        case StateMsg():
            a = msg.announcement
            body = [5, _ring(msg.ring), msg.epoch,
                    [a.votes, a.expected_votes, a.quorate, a.qdevice_vote, list(a.ring_members)],
                    msg.version, msg.checksum, msg.last_ring_seq,
                    _encode_digests(msg.digests), encode_entries(list(msg.log)),
                    encode_cutoff(msg.log_cutoff)]
        case EntriesMsg():
            body = [6, _ring(msg.ring), msg.epoch, [encode_entry(e) for e in msg.entries]]
        case DoneMsg():
            body = [7, _ring(msg.ring), msg.epoch, msg.version, encode_history(msg.history),
                    encode_applied(msg.applied)]
        case VerifyMsg():
            body = [8, _ring(msg.ring), msg.epoch, msg.round, msg.request, msg.checksum]
        case ResyncMsg():
            body = [9, _ring(msg.ring), msg.epoch]
        case QdeviceMsg():
            body = [10, _ring(msg.ring), msg.vote]
    packed: bytes = msgpack.packb([REPLICA_PROTOCOL, *body], use_bin_type=True)
    return packed


# ------------------------------------------------------------------------------ decoding


def _int(value: object, lo: int = 0, hi: int = MAX_SEQ) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError("bad integer")
    return value


def _list(value: object, exact: int | None = None) -> list[Any]:
    if type(value) is not list or len(value) > MAX_LIST or (exact is not None
                                                             and len(value) != exact):
        raise ProtocolError("bad list")
    return value


def _bytes(value: object, size: int | None = None) -> bytes:
    if type(value) is not bytes or (size is not None and len(value) != size):
        raise ProtocolError("bad bytes")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ProtocolError("bad flag")
    return value


def _ring_of(value: object) -> RingId:
    seq, rep = _list(value, 2)
    return RingId(seq=_int(seq), rep=_int(rep, 1, MAX_NODE_ID))


def _op_id_of(value: object) -> OpId:
    node, incarnation, counter = _list(value, 3)
    return OpId(_int(node, 1, MAX_NODE_ID), _int(incarnation), _int(counter))


def _members(value: object) -> tuple[int, ...]:
    members = tuple(_int(m, 1, MAX_NODE_ID) for m in _list(value))
    if list(members) != sorted(set(members)):
        raise ProtocolError("members not sorted and unique")
    return members


def decode_entry(value: object) -> Entry:
    inode, parent, version, writer, mtime, kind, name, data = _list(value, 8)
    if type(name) is not str:
        raise ProtocolError("bad entry name")
    entry_type = _ENTRY_TYPES.get(kind) if type(kind) is int else None
    if entry_type is None:
        raise ProtocolError("bad entry type")
    return Entry(_int(inode), _int(parent), _int(version), _int(writer), _int(mtime),
                 entry_type, name, _bytes(data))


def decode_history(value: object) -> tuple[HistorySpan, ...]:
    spans = []
    for item in _list(value):
        ring, first, last = _list(item, 3)
        spans.append(HistorySpan(_ring_of(ring), _int(first), _int(last)))
    return tuple(spans)


def decode_applied(value: object) -> tuple[tuple[OpId, int], ...]:
    out = []
    for item in _list(value):
        op_id, errno = _list(item, 2)
        out.append((_op_id_of(op_id), _int(errno, 0, 4096)))
    return tuple(out)


# A StateMsg's digests travel as one byte string of fixed records (inode, digest): a tree of
# ten thousand rows decodes in a few milliseconds, where a list of pairs took a fifth of a second.
_DIGEST_RECORD = struct.Struct(f">Q{DIGEST_BYTES}s")
_ENTRY_TYPES = {t.value: t for t in EntryType}


def _encode_digests(digests: tuple[tuple[int, bytes], ...]) -> bytes:
    return b"".join(_DIGEST_RECORD.pack(inode, digest) for inode, digest in digests)


def _decode_digests(value: object) -> tuple[tuple[int, bytes], ...]:
    blob = _bytes(value)
    if len(blob) % _DIGEST_RECORD.size:
        raise ProtocolError("bad digest records")
    pairs = tuple(_DIGEST_RECORD.iter_unpack(blob))
    if any(inode > MAX_SEQ for inode, _ in pairs):
        raise ProtocolError("bad inode in digest records")
    return pairs


def is_entries_msg(data: bytes) -> bool:
    """Does `data` look like an `EntriesMsg`? Only its first two fields are read, so a member
    that needs none of the sync's rows skips decoding megabytes of them."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data[:16])
    try:
        return bool(unpacker.read_array_header() >= 2
                    and unpacker.unpack() == REPLICA_PROTOCOL
                    and unpacker.unpack() == _ENTRIES_KIND)
    except (ValueError, msgpack.UnpackException):
        return False


def _decode_state(f: list[Any]) -> StateMsg:
    ring, epoch, ann, version, checksum, last_ring_seq, digests, log, cutoff = f
    votes, expected, quorate, qdevice, ring_members = _list(ann, 5)
    announcement = Announcement(votes=_int(votes), expected_votes=_int(expected),
                                quorate=_bool(quorate), qdevice_vote=_bool(qdevice),
                                ring_members=_members(ring_members))
    return StateMsg(_ring_of(ring), _int(epoch), announcement, _int(version),
                    _bytes(checksum, 32), _int(last_ring_seq), _decode_digests(digests),
                    tuple(decode_entries(log)), decode_cutoff(cutoff))


_ARITY = {1: 2, 2: 2, 3: 2, 4: 1, 5: 9, 6: 3, 7: 5, 8: 5, 9: 2, 10: 2}
_ENTRIES_KIND = 6


def decode_msg(data: bytes) -> ReplicaMsg:
    """The message in `data`; `ProtocolError` for anything else."""
    try:
        value = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:  # every decoding error of msgpack
        raise ProtocolError(f"not msgpack: {type(exc).__name__}") from None
    fields = _list(value)
    if len(fields) < 2 or fields[0] != REPLICA_PROTOCOL or type(fields[1]) is not int:
        raise ProtocolError("not a replica message of this protocol")
    kind, f = fields[1], fields[2:]
    if _ARITY.get(kind) != len(f):
        raise ProtocolError("bad message kind or arity")
    match kind:
        case 1:
            return OpMsg(_op_id_of(f[0]), decode_op(f[1]))
        case 2:
            return ExpectedMsg(_op_id_of(f[0]), _int(f[1], 0, 1 << 20))
        case 3:
            return LmsMsg(_members(f[0]), _int(f[1], 0, 1 << 20))
        case 4:
            entries = decode_entries(f[0])
            if len(entries) != 1:
                raise ProtocolError("a log message holds one entry")
            return LogMsg(entries[0])
        case 5:
            return _decode_state(f)
        case 6:
            return EntriesMsg(_ring_of(f[0]), _int(f[1]),
                              tuple(decode_entry(e) for e in _list(f[2])))
        case 7:
            return DoneMsg(_ring_of(f[0]), _int(f[1]), _int(f[2]), decode_history(f[3]),
                           decode_applied(f[4]))
        case 8:
            return VerifyMsg(_ring_of(f[0]), _int(f[1]), _int(f[2]), _bool(f[3]),
                             _bytes(f[4]))
        case 9:
            return ResyncMsg(_ring_of(f[0]), _int(f[1]))
        case _:
            return QdeviceMsg(_ring_of(f[0]), _bool(f[1]))
