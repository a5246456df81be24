"""The totem wire codec: every message round-trips, and `decode` never raises anything but
`ProtocolError`, whatever bytes it is given.

The generators produce every message type with valid field values (including the extremes of each
range); the robustness tests feed `decode` arbitrary bytes, damaged encodings of valid messages,
msgpack-encoded random structures and a table of hand-picked malformed frames.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmxfs.core.errors import ProtocolError
from pmxfs.core.wire import (
    MAX_FRAGMENT_BYTES,
    MAX_FRAGMENTS_PER_FRAME,
    MAX_FRAME_BYTES,
    MAX_MEMBERS,
    MAX_NODE_ID,
    MAX_RTR_ENTRIES,
    MAX_SEQ,
    PROTOCOL_VERSION,
    CommitToken,
    Fragment,
    FrameOrigin,
    Join,
    Mcast,
    MemberInfo,
    MergeDetect,
    Message,
    MessageType,
    RingId,
    Token,
    TokenHoldCancel,
    TokenPhase,
    decode,
    encode,
)

# ---------------------------------------------------------------------------- valid messages

nodes = st.integers(1, MAX_NODE_ID)
# Small values are what real rings use; the full range checks the edges of the integer encoding.
seqs = st.integers(0, 1000) | st.integers(0, MAX_SEQ)
positive_seqs = st.integers(1, 1000) | st.integers(1, MAX_SEQ)
ring_ids = st.builds(RingId, seq=seqs, rep=nodes)
node_sets = st.lists(nodes, unique=True, max_size=12).map(lambda xs: tuple(sorted(xs)))


@st.composite
def fragments(draw: st.DrawFn) -> Fragment:
    count = draw(st.integers(1, 8) | st.integers(1, MAX_SEQ))
    index = draw(st.integers(0, count - 1))
    return Fragment(
        msg_id=draw(seqs), index=index, count=count, data=draw(st.binary(max_size=64))
    )


origins = st.builds(FrameOrigin, ring_id=ring_ids, seq=positive_seqs)

mcasts = st.builds(
    Mcast,
    ring_id=ring_ids,
    seq=positive_seqs,
    sender=nodes,
    fragments=st.lists(fragments(), max_size=5).map(tuple),
    origin=st.none() | origins,
)


@st.composite
def tokens(draw: st.DrawFn) -> Token:
    seq = draw(seqs)
    rtr: tuple[int, ...] = ()
    if seq >= 1:
        rtr = tuple(draw(st.lists(st.integers(1, seq), max_size=10)))
    return Token(
        ring_id=draw(ring_ids),
        token_seq=draw(seqs),
        seq=seq,
        aru=draw(st.integers(0, seq)),
        aru_addr=draw(st.integers(0, MAX_NODE_ID)),
        fcc=draw(seqs),
        backlog=draw(seqs),
        rtr=rtr,
        retrans_flg=draw(st.booleans()),
        phase=draw(st.sampled_from(TokenPhase)),
    )


joins = st.builds(Join, sender=nodes, ring_seq=seqs, proc=node_sets, fail=node_sets)


@st.composite
def member_infos(draw: st.DrawFn, node_id: int) -> MemberInfo:
    high_seq = draw(seqs)
    return MemberInfo(
        node_id=node_id,
        old_ring_id=draw(ring_ids),
        aru=draw(st.integers(0, high_seq)),
        high_seq=high_seq,
    )


@st.composite
def commit_tokens(draw: st.DrawFn) -> CommitToken:
    members = tuple(sorted(draw(st.lists(nodes, unique=True, min_size=1, max_size=8))))
    infos = tuple(draw(st.none() | member_infos(m)) for m in members)
    return CommitToken(ring_id=draw(ring_ids), hop=draw(seqs), members=members, infos=infos)


merge_detects = st.builds(MergeDetect, sender=nodes, ring_id=ring_ids)
hold_cancels = st.builds(TokenHoldCancel, sender=nodes, ring_id=ring_ids)

messages: st.SearchStrategy[Message] = st.one_of(
    mcasts, tokens(), joins, commit_tokens(), merge_detects, hold_cancels
)


def decode_or_reject(data: bytes) -> Message | None:
    """Decode `data`; only `ProtocolError` may escape `decode`, and what it accepts is sound."""
    try:
        msg = decode(data)
    except ProtocolError:
        return None
    assert isinstance(msg, Mcast | Token | Join | CommitToken | MergeDetect | TokenHoldCancel)
    # Anything accepted is a message that the codec itself would produce.
    assert decode(encode(msg)) == msg
    return msg


# ---------------------------------------------------------------------------- round trips


@settings(max_examples=400, deadline=None)
@given(messages)
def test_round_trip(msg: Message) -> None:
    """Every valid message of every type decodes back to an equal message."""
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "strategy",
    [mcasts, tokens(), joins, commit_tokens(), merge_detects, hold_cancels],
    ids=["mcast", "token", "join", "commit", "merge", "hold-cancel"],
)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_per_type(strategy: st.SearchStrategy[Message], data: st.DataObject) -> None:
    """Each message type on its own (so none is starved by `one_of`) round-trips, and the decoded
    message keeps its exact type and the enum type of its phase."""
    msg = data.draw(strategy)
    back = decode(encode(msg))
    assert back == msg
    assert type(back) is type(msg)
    if isinstance(back, Token):
        assert type(back.phase) is TokenPhase


def test_round_trip_extremes() -> None:
    """The largest values every range allows still round-trip."""
    big_ring = RingId(seq=MAX_SEQ, rep=MAX_NODE_ID)
    extremes: list[Message] = [
        Mcast(big_ring, MAX_SEQ, MAX_NODE_ID,
              (Fragment(MAX_SEQ, MAX_SEQ - 1, MAX_SEQ, b"\xff" * 100),),
              FrameOrigin(big_ring, MAX_SEQ)),
        Mcast(big_ring, 1, 1, (Fragment(0, 0, 1, b"x" * MAX_FRAGMENT_BYTES),)),
        Mcast(big_ring, 1, 1, tuple(Fragment(i, 0, 1, b"") for i in range(
            MAX_FRAGMENTS_PER_FRAME))),
        Token(big_ring, MAX_SEQ, MAX_SEQ, MAX_SEQ, MAX_NODE_ID, MAX_SEQ, MAX_SEQ,
              tuple(range(MAX_SEQ - MAX_RTR_ENTRIES + 1, MAX_SEQ + 1)), True,
              TokenPhase.OPERATIONAL, (MAX_SEQ,) * MAX_MEMBERS),
        Token(RingId(0, 1), 0, 0, 0, 0, 0, 0, (), False, TokenPhase.RECOVERY),
        Join(MAX_NODE_ID, MAX_SEQ, tuple(range(1, MAX_MEMBERS + 1)), ()),
        CommitToken(big_ring, MAX_SEQ, tuple(range(1, MAX_MEMBERS + 1)),
                    tuple(MemberInfo(n, big_ring, MAX_SEQ, MAX_SEQ)
                          for n in range(1, MAX_MEMBERS + 1))),
        MergeDetect(MAX_NODE_ID, big_ring),
        TokenHoldCancel(MAX_NODE_ID, big_ring),
    ]
    for msg in extremes:
        assert decode(encode(msg)) == msg


# ---------------------------------------------------------------------------- robustness


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    """Arbitrary bytes decode to a message or raise ProtocolError, nothing else."""
    decode_or_reject(data)


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_decode_truncated(msg: Message, data: st.DataObject) -> None:
    """Every proper prefix of a valid encoding is rejected with ProtocolError."""
    wire = encode(msg)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(ProtocolError):
        decode(wire[:cut])


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_decode_bit_flips(msg: Message, data: st.DataObject) -> None:
    """A valid encoding with flipped bits is decoded (to a sound message) or rejected cleanly."""
    wire = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] ^= 1 << data.draw(st.integers(0, 7))
    decode_or_reject(bytes(wire))


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_decode_byte_replacements(msg: Message, data: st.DataObject) -> None:
    """Replaced, inserted and appended bytes in a valid encoding never crash the decoder."""
    wire = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["replace", "insert", "delete", "append"]))
        pos = data.draw(st.integers(0, len(wire) - 1)) if wire else 0
        byte = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCC,
                                          0xCF, 0xD3, 0xD4, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF])
                         | st.integers(0, 255))
        if op == "replace" and wire:
            wire[pos] = byte
        elif op == "insert":
            wire.insert(pos, byte)
        elif op == "delete" and wire:
            del wire[pos]
        else:
            wire.append(byte)
    decode_or_reject(bytes(wire))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), children, max_size=4),
    max_leaves=30,
)
# Nested structures that look like frames: the right version and a known type first.
frame_like = st.builds(
    lambda version, kind, rest: [version, kind, *rest],
    st.sampled_from([PROTOCOL_VERSION, 0, 2, True, 1.0]) | structures,
    st.sampled_from([int(t) for t in MessageType] + [0, 7, True]) | structures,
    st.lists(structures, max_size=11),
)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(structures | frame_like)
def test_decode_random_msgpack(obj: Any) -> None:
    """Random msgpack structures (and frame-shaped ones) decode or raise ProtocolError."""
    decode_or_reject(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_decode_field_substitution(msg: Message, data: st.DataObject) -> None:
    """A valid frame with one field (at any depth) replaced by a random value is decoded to a
    sound message or rejected with ProtocolError."""
    obj = msgpack.unpackb(encode(msg), raw=False)

    def substitute(node: list[Any]) -> None:
        index = data.draw(st.integers(0, len(node) - 1))
        child = node[index]
        if isinstance(child, list) and child and data.draw(st.booleans()):
            substitute(child)
        else:
            node[index] = data.draw(structures)

    substitute(obj)
    decode_or_reject(msgpack.packb(obj, use_bin_type=True))


def _frame(*fields: Any) -> bytes:
    packed: bytes = msgpack.packb(list(fields), use_bin_type=True)
    return packed


RING = [4, 1]
GOOD_TOKEN = [RING, 1, 5, 3, 2, 0, 0, [4], False, 2, [5, 3]]
GOOD_FRAG = [1, 0, 1, b"x"]

NASTIES: dict[str, bytes] = {
    "empty": b"",
    "nil": _frame(None)[1:],
    "not a list": msgpack.packb({"v": 1}),
    "one element": _frame(PROTOCOL_VERSION),
    "wrong version": _frame(PROTOCOL_VERSION + 1, MessageType.MERGE_DETECT, 1, RING),
    "version 0": _frame(0, MessageType.MERGE_DETECT, 1, RING),
    "version as bool": _frame(True, MessageType.MERGE_DETECT, 1, RING),
    "version as float": _frame(1.0, MessageType.MERGE_DETECT, 1, RING),
    "version as str": _frame("1", MessageType.MERGE_DETECT, 1, RING),
    "unknown type 0": _frame(PROTOCOL_VERSION, 0, 1, RING),
    "unknown type 7": _frame(PROTOCOL_VERSION, 7, 1, RING),
    "type as bool": _frame(PROTOCOL_VERSION, True, [4, 1], 1, 1, [GOOD_FRAG], None),
    "type as float": _frame(PROTOCOL_VERSION, 5.0, 1, RING),
    "type negative": _frame(PROTOCOL_VERSION, -1, 1, RING),
    "merge arity short": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1),
    "merge arity long": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, RING, 0),
    "hold cancel arity": _frame(PROTOCOL_VERSION, MessageType.TOKEN_HOLD_CANCEL, 1, RING, 1),
    "token arity short": _frame(PROTOCOL_VERSION, MessageType.TOKEN, *GOOD_TOKEN[:-1]),
    "token arity long": _frame(PROTOCOL_VERSION, MessageType.TOKEN, *GOOD_TOKEN, 0),
    "mcast arity": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1, [GOOD_FRAG]),
    "join arity": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [1]),
    "commit arity": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1]),
    "ring id arity": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [4, 1, 0]),
    "ring id not list": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, 4),
    "ring rep 0": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [4, 0]),
    "ring seq negative": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [-4, 1]),
    "ring seq bool": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [True, 1]),
    "ring rep bool": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [4, True]),
    "ring seq too big": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, [2**63, 1]),
    "sender 0": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 0, RING),
    "sender too big": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 2**32, RING),
    "sender bool": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, True, RING),
    "sender float": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1.0, RING),
    "sender str": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, "1", RING),
    "sender None": _frame(PROTOCOL_VERSION, MessageType.TOKEN_HOLD_CANCEL, None, RING),
    "token negative seq": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, -5, 0, 0, 0, 0,
                                 [], False, 2, []),
    "token seq bool": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, True, 0, 0, 0, 0,
                             [], False, 2, []),
    "token aru > seq": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 6, 0, 0, 0,
                              [], False, 2, []),
    "token aru bool": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, True, 0, 0, 0,
                             [], False, 2, []),
    "token negative fcc": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, -1, 0,
                                 [], False, 2, []),
    "token rtr above seq": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                                  [6], False, 2, []),
    "token rtr zero": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                             [0], False, 2, []),
    "token rtr bool": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                             [True], False, 2, []),
    "token rtr not list": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                                 4, False, 2, []),
    "token rtr too long": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5000, 3, 0, 0, 0,
                                 list(range(1, MAX_RTR_ENTRIES + 2)), False, 2, []),
    "token flag as int": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                                [], 0, 2, []),
    "token flag None": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                              [], None, 2, []),
    "token phase 3": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                            [], False, 3, []),
    "token phase -1": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                             [], False, -1, []),
    "token phase bool": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                               [], False, True, []),
    "token aru addr too big": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 2**32,
                                     0, 0, [], False, 2, []),
    "token durable above seq": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0,
                                      0, [], False, 2, [5, 6]),
    "token durable negative": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                                     [], False, 2, [-1]),
    "token durable bool": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0, 0,
                                 [], False, 2, [True]),
    "token durable not list": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0,
                                     0, [], False, 2, 5),
    "token durable too long": _frame(PROTOCOL_VERSION, MessageType.TOKEN, RING, 1, 5, 3, 0, 0,
                                     0, [], False, 2, [1] * (MAX_MEMBERS + 1)),
    "mcast seq 0": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 0, 1, [GOOD_FRAG], None),
    "mcast seq negative": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, -1, 1, [GOOD_FRAG],
                                 None),
    "mcast seq bool": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, True, 1, [GOOD_FRAG],
                             None),
    "mcast fragments not list": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                       GOOD_FRAG[3], None),
    "fragment index == count": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                      [[1, 2, 2, b"x"]], None),
    "fragment index > count": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                     [[1, 5, 2, b"x"]], None),
    "fragment count 0": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                               [[1, 0, 0, b"x"]], None),
    "fragment index negative": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                      [[1, -1, 2, b"x"]], None),
    "fragment index bool": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                  [[1, True, 2, b"x"]], None),
    "fragment count bool": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                  [[1, 0, True, b"x"]], None),
    "fragment data str": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                [[1, 0, 1, "x"]], None),
    "fragment data None": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                 [[1, 0, 1, None]], None),
    "fragment arity": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                             [[1, 0, 1]], None),
    "fragment data too big": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                    [[1, 0, 1, b"x" * (MAX_FRAGMENT_BYTES + 1)]], None),
    "too many fragments": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                 [GOOD_FRAG] * (MAX_FRAGMENTS_PER_FRAME + 1), None),
    "origin arity": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1, [GOOD_FRAG],
                           [RING]),
    "origin seq 0": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1, [GOOD_FRAG],
                           [RING, 0]),
    "origin not list": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1, [GOOD_FRAG],
                              False),
    "join unsorted proc": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [2, 1], []),
    "join duplicate proc": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [1, 1, 2], []),
    "join unsorted fail": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [1], [3, 2]),
    "join duplicate fail": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [1], [2, 2]),
    "join node 0": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [0, 1], []),
    "join node bool": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [True], []),
    "join proc not list": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, 1, []),
    "join too many nodes": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4,
                                  list(range(1, MAX_MEMBERS + 2)), []),
    "join ring seq negative": _frame(PROTOCOL_VERSION, MessageType.JOIN, 1, -4, [1], []),
    "commit no members": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [], []),
    "commit unsorted members": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0,
                                      [2, 1], [None, None]),
    "commit duplicate members": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0,
                                       [1, 1], [None, None]),
    "commit infos short": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1, 2],
                                 [None]),
    "commit infos long": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1],
                                [None, None]),
    "commit info wrong node": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1, 2],
                                     [[2, RING, 0, 0], None]),
    "commit info aru > high": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1],
                                     [[1, RING, 5, 4]]),
    "commit info arity": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1],
                                [[1, RING, 0]]),
    "commit info not list": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1],
                                   [False]),
    "commit hop negative": _frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, -1, [1],
                                  [None]),
    "map body": msgpack.packb([PROTOCOL_VERSION, MessageType.MERGE_DETECT, {"sender": 1}, RING]),
    "int map key": b"\x93\x01\x05\x81\x01\x01",
    "ext type": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT,
                       msgpack.ExtType(5, b"\x01"), RING),
    "ext as whole frame": msgpack.packb(msgpack.ExtType(1, b"abc")),
    "timestamp field": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT,
                              msgpack.Timestamp(1, 0), RING),
    "timestamp as version": _frame(msgpack.Timestamp(1, 0), MessageType.MERGE_DETECT, 1, RING),
    "bad timestamp length": b"\x94\x01\x05\xc7\x05\xff\x00\x00\x00\x00\x00\x92\x04\x01",
    "timestamp nanoseconds too big": b"\x94\x01\x05\xd7\xff" + struct.pack(">Q", 0x3FFFFFFF << 34)
    + b"\x92\x04\x01",
    "invalid utf-8 str": b"\x94\x01\x05\xa2\xff\xfe\x92\x04\x01",
    "reserved byte 0xc1": b"\x94\x01\x05\xc1\x92\x04\x01",
    "trailing bytes": encode(MergeDetect(1, RingId(4, 1))) + b"\x00",
    "two frames": encode(MergeDetect(1, RingId(4, 1))) * 2,
    "huge array header": b"\xdd\xff\xff\xff\xff",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "huge bin header": b"\xc6\xff\xff\xff\xff",
    "huge str header": b"\xdb\xff\xff\xff\xff",
    "deeply nested lists": b"\x91" * 100_000 + b"\xc0",
    "deeply nested maps": b"\x81\xa1k" * 50_000 + b"\xc0",
    "nested field": _frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1,
                           [[[[[[[[[[4]]]]]]]]], 1]),
    "frame over MAX_FRAME_BYTES": _frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1,
                                         [[i, 0, 1, b"x" * MAX_FRAGMENT_BYTES] for i in range(5)],
                                         None),
    "zero bytes over MAX_FRAME_BYTES": b"\x00" * (MAX_FRAME_BYTES + 1),
}


@pytest.mark.parametrize("data", list(NASTIES.values()), ids=list(NASTIES))
def test_decode_rejects_nasties(data: bytes) -> None:
    """Each hand-picked malformed frame is rejected with ProtocolError (and nothing else)."""
    with pytest.raises(ProtocolError):
        decode(data)


def test_nasty_table_is_sharp() -> None:
    """The hand-picked frames are one defect away from valid: their repaired twins decode."""
    ok = _frame(PROTOCOL_VERSION, MessageType.TOKEN, *GOOD_TOKEN)
    assert decode(ok) == Token(RingId(4, 1), 1, 5, 3, 2, 0, 0, (4,), False, TokenPhase.OPERATIONAL,
                               (5, 3))
    assert decode(_frame(PROTOCOL_VERSION, MessageType.MCAST, RING, 1, 1, [[1, 1, 2, b"x"]],
                         [RING, 1])) == Mcast(RingId(4, 1), 1, 1, (Fragment(1, 1, 2, b"x"),),
                                              FrameOrigin(RingId(4, 1), 1))
    assert decode(_frame(PROTOCOL_VERSION, MessageType.JOIN, 1, 4, [1, 2], [3])) == Join(
        1, 4, (1, 2), (3,))
    assert decode(_frame(PROTOCOL_VERSION, MessageType.COMMIT_TOKEN, RING, 0, [1, 2],
                         [[1, RING, 4, 4], None])) == CommitToken(
        RingId(4, 1), 0, (1, 2), (MemberInfo(1, RingId(4, 1), 4, 4), None))
    assert decode(_frame(PROTOCOL_VERSION, MessageType.MERGE_DETECT, 1, RING)) == MergeDetect(
        1, RingId(4, 1))
    big = Mcast(RingId(4, 1), 1, 1, tuple(Fragment(i, 0, 1, b"x" * (MAX_FRAGMENT_BYTES - 64))
                                          for i in range(3)))
    assert len(encode(big)) <= MAX_FRAME_BYTES
    assert decode(encode(big)) == big


def test_bool_is_not_an_int() -> None:
    """`True`/`False` are rejected wherever an int is expected, in every message type."""
    valid = [
        encode(MergeDetect(1, RingId(4, 1))),
        encode(TokenHoldCancel(1, RingId(4, 1))),
        encode(Join(1, 4, (1,), ())),
        encode(Token(RingId(4, 1), 1, 5, 3, 1, 1, 1, (2,), False, TokenPhase.RECOVERY)),
        encode(CommitToken(RingId(4, 1), 1, (1,), (MemberInfo(1, RingId(4, 1), 1, 1),))),
        encode(Mcast(RingId(4, 1), 1, 1, (Fragment(1, 0, 1, b"x"),), FrameOrigin(RingId(4, 1),
                                                                                 1))),
    ]
    checked = 0
    for wire in valid:
        obj = msgpack.unpackb(wire, raw=False)

        def paths(node: list[Any], prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
            found = []
            for i, child in enumerate(node):
                if type(child) is int and child in (0, 1):
                    found.append((*prefix, i))
                elif isinstance(child, list):
                    found.extend(paths(child, (*prefix, i)))
            return found

        for path in paths(obj, ()):
            if path == (0,):
                continue  # the version; covered by the nasty table
            mutated = msgpack.unpackb(wire, raw=False)
            holder = mutated
            for step in path[:-1]:
                holder = holder[step]
            holder[path[-1]] = bool(holder[path[-1]])
            with pytest.raises(ProtocolError):
                decode(msgpack.packb(mutated, use_bin_type=True))
            checked += 1
    assert checked >= 20
