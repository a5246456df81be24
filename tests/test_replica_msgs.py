"""The replica messages' codec: state digests as fixed records, and the EntriesMsg peek."""

from __future__ import annotations

import msgpack
import pytest

from pmxfs.core.entry import DIGEST_BYTES, Entry, EntryType
from pmxfs.core.errors import ProtocolError
from pmxfs.core.quorum import Announcement
from pmxfs.core.replica_msgs import (
    REPLICA_PROTOCOL,
    EntriesMsg,
    ResyncMsg,
    StateMsg,
    decode_msg,
    encode_msg,
    is_entries_msg,
)
from pmxfs.core.wire import MAX_SEQ, RingId

RING = RingId(seq=8, rep=2)


def state(digests: tuple[tuple[int, bytes], ...]) -> StateMsg:
    return StateMsg(RING, 0, Announcement(votes=1, expected_votes=3), 7, b"c" * 32, 8, digests,
                    (), None)


@pytest.mark.parametrize("digests", [(), ((0, b"\x00" * DIGEST_BYTES),),
                                     tuple((i * 7, bytes([i % 256]) * DIGEST_BYTES)
                                           for i in range(10_000)),
                                     ((MAX_SEQ, b"\xff" * DIGEST_BYTES),)])
def test_state_digests_round_trip(digests: tuple[tuple[int, bytes], ...]) -> None:
    msg = state(digests)
    assert decode_msg(encode_msg(msg)) == msg


def _state_with_raw_digests(raw: object) -> bytes:
    fields = msgpack.unpackb(encode_msg(state(())), raw=False)
    fields[8] = raw  # [protocol, kind, ring, epoch, announcement, version, checksum, seq, digests…
    return bytes(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("raw", [b"x" * (8 + DIGEST_BYTES - 1), [[1, b"x" * DIGEST_BYTES]], "s",
                                 (2**63).to_bytes(8, "big") + b"d" * DIGEST_BYTES])
def test_malformed_state_digests_are_refused(raw: object) -> None:
    with pytest.raises(ProtocolError):
        decode_msg(_state_with_raw_digests(raw))


def test_the_entries_peek_tells_entries_from_everything_else() -> None:
    entry = Entry(5, 0, 3, 1, 10, EntryType.FILE, "f", b"data")
    assert is_entries_msg(encode_msg(EntriesMsg(RING, 0, (entry,))))
    assert not is_entries_msg(encode_msg(ResyncMsg(RING, 1)))
    assert not is_entries_msg(encode_msg(state(())))
    for junk in (b"", b"\x92", b"\xc1\xc1", msgpack.packb([REPLICA_PROTOCOL + 1, 6]),
                 msgpack.packb({"a": 1})):
        assert not is_entries_msg(junk)
