"""The messages between a node's quorum-device client and qnetd -- pure, one definition for both.

How it travels
--------------
Over TLS on TCP (qnetd's port, `QNETD_PORT`): each message is one frame, a 4-byte big-endian
length then a msgpack array `[kind, field, ...]` of at most `MAX_FRAME_BYTES`. Both ends decode
with `decode`, which accepts exactly the shapes below and raises `ProtocolError` (one line) for
anything else; the receiver then closes the connection. Nothing here trusts the peer: sizes,
integer ranges, string lengths and lists are bounded before they are used.

Two kinds of connection
-----------------------
* Enrollment (`qdevice setup`): TLS that authenticates qnetd only -- the client pins the CA
  fingerprint from the enrollment token. The client sends one `Enroll` (the token's secret, the
  cluster's name and id, a certificate signing request in PEM); qnetd answers `Enrolled` (the
  client certificate it signed and its CA certificate, PEM) or `Refused`, and closes.
* Voting (every node, all the time): mutual TLS, the client presenting the cluster's
  certificate (its subject names the cluster, `cluster_subject`). The client sends `Hello` once,
  then `Membership` after every change of its ring or of its tree's stamp (the seq of the newest
  quorate ring its tree comes from: the arbiter's proof of who holds the newest acknowledged
  writes), and `Heartbeat` every
  `heartbeat_interval_ms(timeout)`. qnetd answers `Hello` with `Welcome` or `Refused`, each
  `Heartbeat` with a `Heartbeat` of the same number, and sends `VoteReply` for the ring the
  client last reported whenever its decision for it changes (also unasked).

Votes (corosync-qnetd's ACK/NACK, and "wait" while it cannot decide yet) are always for one
ring: a vote for any other ring than the node's current one means nothing.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias

import msgpack

from pmxfs.core.errors import ProtocolError

QNETD_PORT = 5403  # corosync-qnetd's port
MAX_FRAME_BYTES = 64 * 1024
MAX_NODES = 1024  # node ids in one list
MAX_NODE_ID = 2**32 - 1
MAX_SEQ = 2**64 - 1
MAX_TEXT = 255
MAX_PEM_BYTES = 16 * 1024
SECRET_BYTES = 32
CLUSTER_ID_RE = re.compile(r"[0-9a-f]{16}\Z")  # 8 random bytes, hex
CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
ALGORITHMS = ("ffsplit", "lms")
DEFAULT_TIMEOUT_MS = 10_000  # quorum.device.timeout
DEFAULT_SYNC_TIMEOUT_MS = 30_000  # quorum.device.sync_timeout
MIN_TIMEOUT_MS = 1_000
MAX_TIMEOUT_MS = 600_000
LENGTH = struct.Struct(">I")


class Vote(Enum):
    ACK = "ack"  # this ring has the device's vote
    NACK = "nack"  # it has not
    WAIT = "wait"  # qnetd cannot decide yet (memberships still settling)


@dataclass(frozen=True, slots=True, order=True)
class Ring:
    """A ring as a node reports it: its seq first, so a newer ring compares greater."""

    seq: int
    rep: int

    def __str__(self) -> str:
        return f"{self.rep}.{self.seq}"


@dataclass(frozen=True, slots=True)
class Enroll:
    secret: bytes  # SECRET_BYTES, from the enrollment token
    cluster_name: str
    cluster_id: str  # CLUSTER_ID_RE
    csr_pem: bytes


@dataclass(frozen=True, slots=True)
class Enrolled:
    cert_pem: bytes  # the client certificate qnetd signed
    ca_pem: bytes  # qnetd's CA certificate


@dataclass(frozen=True, slots=True)
class Hello:
    cluster_name: str
    cluster_id: str
    node_id: int
    algorithm: str  # one of ALGORITHMS
    tie_breaker: str  # "lowest", "highest" or a node id in decimal
    keep_active: bool  # keep_active_partition_tie_breaker
    timeout_ms: int  # quorum.device.timeout
    sync_timeout_ms: int  # quorum.device.sync_timeout
    nodes: tuple[int, ...]  # the nodelist's node ids, sorted


@dataclass(frozen=True, slots=True)
class Welcome:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class Membership:
    ring: Ring
    members: tuple[int, ...]  # sorted
    quorate: bool  # whether the node's ring is quorate (votequorum's view, for the log)
    stamp: int = 0  # the seq of the newest quorate ring the node's tree comes from


@dataclass(frozen=True, slots=True)
class Heartbeat:
    seq: int


@dataclass(frozen=True, slots=True)
class VoteReply:
    ring: Ring
    vote: Vote


Message: TypeAlias = (Enroll | Enrolled | Hello | Welcome | Refused | Membership | Heartbeat
                      | VoteReply)


def heartbeat_interval_ms(timeout_ms: int) -> int:
    """How often a client sends a heartbeat: a quarter of the device timeout."""
    return max(100, timeout_ms // 4)


def silence_limit_ms(timeout_ms: int) -> int:
    """After how long without any message from qnetd a client takes itself for cut off and
    stops casting the vote: three quarters of the timeout, so the vote is gone within it."""
    return timeout_ms * 3 // 4


def cluster_subject(cluster_name: str, cluster_id: str) -> str:
    """The common name of a cluster's client certificate: qnetd keys a connection by it."""
    return f"{cluster_name}/{cluster_id}"


def parse_subject(common_name: str) -> tuple[str, str] | None:
    """(cluster name, cluster id) from a client certificate's common name, or None."""
    name, sep, cluster_id = common_name.rpartition("/")
    if not sep or not CLUSTER_NAME_RE.match(name) or not CLUSTER_ID_RE.match(cluster_id):
        return None
    return name, cluster_id


def valid_tie_breaker(value: str) -> bool:
    return value in ("lowest", "highest") or (value.isdecimal() and value.isascii()
                                               and 1 <= int(value) <= MAX_NODE_ID)


# ---------------------------------------------------------------------------------- encoding


def encode(msg: Message) -> bytes:
    """One frame: length and body."""
    body: bytes = msgpack.packb(_fields(msg), use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"a {type(msg).__name__} of {len(body)} bytes is too big to send")
    return LENGTH.pack(len(body)) + body


def _fields(msg: Message) -> list[Any]:
    match msg:
        case Enroll():
            return ["enroll", msg.secret, msg.cluster_name, msg.cluster_id, msg.csr_pem]
        case Enrolled():
            return ["enrolled", msg.cert_pem, msg.ca_pem]
        case Hello():
            return ["hello", msg.cluster_name, msg.cluster_id, msg.node_id, msg.algorithm,
                    msg.tie_breaker, msg.keep_active, msg.timeout_ms, msg.sync_timeout_ms,
                    list(msg.nodes)]
        case Welcome():
            return ["welcome"]
        case Refused():
            return ["refused", msg.reason[:1000]]
        case Membership():
            return ["membership", msg.ring.seq, msg.ring.rep, list(msg.members), msg.quorate,
                    msg.stamp]
        case Heartbeat():
            return ["heartbeat", msg.seq]
        case VoteReply():
            return ["vote", msg.ring.seq, msg.ring.rep, msg.vote.value]


def frame_length(header: bytes) -> int:
    """The body length a 4-byte header announces; ProtocolError when over the limit."""
    size: int = LENGTH.unpack(header)[0]
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes is over the limit of {MAX_FRAME_BYTES}")
    return size


def decode(body: bytes) -> Message:
    """A frame's body as a message; ProtocolError for anything that is not exactly one."""
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError("frame too big")
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES,
                                 max_str_len=MAX_FRAME_BYTES, max_array_len=MAX_NODES + 16,
                                 max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(fields, list) or not fields or not isinstance(fields[0], str):
        raise ProtocolError("a message is a list that starts with its kind")
    kind, rest = fields[0], fields[1:]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"unknown message kind {kind[:30]!r}")
    arity, build = decoder
    if len(rest) != arity:
        raise ProtocolError(f"{kind} has {len(rest)} fields, not {arity}")
    return build(rest)


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what} is not an integer in {lo}..{hi}")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} is not a boolean")
    return value


def _bytes(value: object, what: str, hi: int, exact: int | None = None) -> bytes:
    if type(value) is not bytes or len(value) > hi or (exact is not None
                                                        and len(value) != exact):
        raise ProtocolError(f"{what} is not a byte string of the right size")
    return value


def _text(value: object, what: str, pattern: re.Pattern[str] | None = None) -> str:
    if type(value) is not str or len(value) > MAX_TEXT or (pattern is not None
                                                            and not pattern.match(value)):
        raise ProtocolError(f"{what} is not valid")
    return value


def _nodes(value: object, what: str) -> tuple[int, ...]:
    if type(value) is not list or not 1 <= len(value) <= MAX_NODES:
        raise ProtocolError(f"{what} is not a list of 1..{MAX_NODES} node ids")
    ids = tuple(_int(v, 1, MAX_NODE_ID, what) for v in value)
    if list(ids) != sorted(set(ids)):
        raise ProtocolError(f"{what} is not sorted without repeats")
    return ids


def _ring(seq: object, rep: object) -> Ring:
    return Ring(_int(seq, 0, MAX_SEQ, "ring seq"), _int(rep, 1, MAX_NODE_ID, "ring representative"))


def _enroll(f: list[Any]) -> Enroll:
    return Enroll(_bytes(f[0], "secret", SECRET_BYTES, SECRET_BYTES),
                  _text(f[1], "cluster name", CLUSTER_NAME_RE),
                  _text(f[2], "cluster id", CLUSTER_ID_RE), _bytes(f[3], "csr", MAX_PEM_BYTES))


def _enrolled(f: list[Any]) -> Enrolled:
    return Enrolled(_bytes(f[0], "certificate", MAX_PEM_BYTES),
                    _bytes(f[1], "CA certificate", MAX_PEM_BYTES))


def _hello(f: list[Any]) -> Hello:
    algorithm = _text(f[3], "algorithm")
    if algorithm not in ALGORITHMS:
        raise ProtocolError(f"algorithm {algorithm[:30]!r} is not one of {', '.join(ALGORITHMS)}")
    tie_breaker = _text(f[4], "tie breaker")
    if not valid_tie_breaker(tie_breaker):
        raise ProtocolError(f"tie breaker {tie_breaker[:30]!r} is not lowest, highest or a "
                            "node id")
    node_id = _int(f[2], 1, MAX_NODE_ID, "node id")
    nodes = _nodes(f[8], "nodelist")
    if node_id not in nodes:
        raise ProtocolError(f"node {node_id} is not in its own nodelist")
    return Hello(_text(f[0], "cluster name", CLUSTER_NAME_RE),
                 _text(f[1], "cluster id", CLUSTER_ID_RE), node_id, algorithm, tie_breaker,
                 _bool(f[5], "keep_active"),
                 _int(f[6], MIN_TIMEOUT_MS, MAX_TIMEOUT_MS, "timeout"),
                 _int(f[7], MIN_TIMEOUT_MS, MAX_TIMEOUT_MS, "sync timeout"), nodes)


def _refused(f: list[Any]) -> Refused:
    if type(f[0]) is not str or len(f[0]) > 1000:
        raise ProtocolError("reason is not valid")
    return Refused(f[0])


def _membership(f: list[Any]) -> Membership:
    return Membership(_ring(f[0], f[1]), _nodes(f[2], "members"), _bool(f[3], "quorate"),
                      _int(f[4], 0, MAX_SEQ, "stamp"))


def _vote(f: list[Any]) -> VoteReply:
    try:
        vote = Vote(f[2])
    except ValueError:
        raise ProtocolError("vote is not ack, nack or wait") from None
    return VoteReply(_ring(f[0], f[1]), vote)


_DECODERS: dict[str, tuple[int, Callable[[list[Any]], Message]]] = {
    "enroll": (4, _enroll),
    "enrolled": (2, _enrolled),
    "hello": (9, _hello),
    "welcome": (0, lambda f: Welcome()),
    "refused": (1, _refused),
    "membership": (5, _membership),
    "heartbeat": (1, lambda f: Heartbeat(_int(f[0], 0, MAX_SEQ, "heartbeat seq"))),
    "vote": (3, _vote),
}
