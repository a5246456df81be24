"""pmxfs.core.wire.unicast_only: tells tokens (only ever sent to one node) from raw bytes, and
never says False for bytes that `decode` turns into a token -- the frame layer relies on it to
refuse a token sealed for every node."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import frame_like, messages, structures

from pmxfs.core.errors import ProtocolError
from pmxfs.core.wire import (
    CommitToken,
    Message,
    Token,
    decode,
    encode,
    unicast_only,
)


def decodes_to_token(data: bytes) -> bool:
    try:
        return isinstance(decode(data), Token | CommitToken)
    except ProtocolError:
        return False


@settings(max_examples=500, deadline=None)
@given(messages)
def test_every_message_kind(msg: Message) -> None:
    assert unicast_only(encode(msg)) == isinstance(msg, Token | CommitToken)


def test_other_encodings_of_the_same_integers() -> None:
    """msgpack has several encodings of one integer and of an array header; decode accepts all,
    so unicast_only must too."""
    for prefix in (b"\x92\x01\x02", b"\x92\xcc\x01\xcc\x02", b"\x92\x01\xcc\x02",
                   b"\x9c\x01\xd0\x04", b"\x92\xd0\x01\xd3" + bytes(7) + b"\x04",
                   b"\xdc\x00\x02\x01\x02",
                   b"\xdd\x00\x00\x00\x02\xcf" + bytes(7) + b"\x01\x04"):
        assert unicast_only(prefix), prefix
    for other in (b"", b"\x90", b"\x91\x01", b"\x92\x01\x03", b"\x92\x02\x02", b"\x92\xc3\x02",
                  b"\x92\x01\xc3", b"\x92\x01\xcb" + bytes(8), b"\xc1", b"token"):
        assert not unicast_only(other), other


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures | frame_like)
def test_never_false_for_what_decodes_to_a_token(obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    if decodes_to_token(data):
        assert unicast_only(data)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_never_false_for_a_mangled_token(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if decodes_to_token(bytes(raw)):
        assert unicast_only(bytes(raw))
