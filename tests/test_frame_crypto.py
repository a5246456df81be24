"""pmxfs.runtime.frame_crypto: sealing, opening, every drop reason, the replay window."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.runtime.frame_crypto import (
    AUTH_FAILED,
    BAD_MAGIC,
    BAD_VERSION,
    DROP_REASONS,
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    OPENED,
    OVERHEAD_BYTES,
    REPLAY,
    REPLAY_WINDOW,
    SEALED,
    SELF_SENDER,
    SHORT,
    UNKNOWN_SENDER,
    FrameCrypto,
    FrameDropped,
    FrameTooLarge,
    derive_key,
)

KEY = bytes(range(256))
OTHER_KEY = bytes(255 - b for b in range(256))
NODES = (1, 2, 3)


def pair() -> tuple[FrameCrypto, FrameCrypto]:
    """Node 1 (sender) and node 2 (receiver) of cluster "lab"."""
    sender = FrameCrypto(KEY, "lab", 1, NODES, boot_id=b"\x01" * 8)
    receiver = FrameCrypto(KEY, "lab", 2, NODES)
    return sender, receiver


def dropped(crypto: FrameCrypto, data: bytes) -> str:
    """Open `data`, expecting a drop; the reason, after checking it was counted exactly once."""
    before = dict(crypto.counters)
    with pytest.raises(FrameDropped) as info:
        crypto.open(data)
    reason = info.value.reason
    assert reason in DROP_REASONS
    diff = {k: v - before.get(k, 0) for k, v in crypto.counters.items() if v != before.get(k, 0)}
    assert diff == {reason: 1}
    return reason


def test_round_trip_and_layout() -> None:
    sender, receiver = pair()
    for payload in (b"", b"hello", bytes(range(256)) * 4, b"x" * MAX_PAYLOAD_BYTES):
        frame = sender.seal(payload)
        assert len(frame) == len(payload) + OVERHEAD_BYTES
        assert receiver.open(frame) == (1, payload)
    magic, version, node, boot, counter = struct.unpack(">2sBI8sQ", frame[:HEADER_BYTES])
    assert (magic, version, node, boot, counter) == (b"PX", 1, 1, b"\x01" * 8, 3)
    assert sender.counters[SEALED] == 4
    assert receiver.counters[OPENED] == 4
    assert all(receiver.counters[r] == 0 for r in DROP_REASONS)


def test_payload_is_encrypted_and_nonce_is_derived_from_the_header() -> None:
    sender, _ = pair()
    payload = b"secret corosync.conf contents" * 4
    frame = sender.seal(payload)
    assert payload not in frame and b"secret" not in frame
    # The nonce is SHA-256(sender || boot id || counter)[:12]: decrypting with it by hand works.
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    nonce = hashlib.sha256(frame[3:HEADER_BYTES]).digest()[:12]
    aead = ChaCha20Poly1305(derive_key(KEY, "lab"))
    assert aead.decrypt(nonce, frame[HEADER_BYTES:], frame[:HEADER_BYTES]) == payload


def test_same_payload_never_gives_the_same_frame() -> None:
    sender, _ = pair()
    frames = {sender.seal(b"same") for _ in range(100)}
    assert len(frames) == 100
    restarted = FrameCrypto(KEY, "lab", 1, NODES)  # random boot id, counter from 0 again
    assert restarted.seal(b"same")[HEADER_BYTES:] != pair()[0].seal(b"same")[HEADER_BYTES:]


def test_too_large_payload_is_refused_locally() -> None:
    sender, _ = pair()
    with pytest.raises(FrameTooLarge):
        sender.seal(b"x" * (MAX_PAYLOAD_BYTES + 1))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="authkey"):
        FrameCrypto(b"short", "lab", 1, NODES)
    with pytest.raises(ValueError, match="node id"):
        FrameCrypto(KEY, "lab", 0, NODES)
    with pytest.raises(ValueError, match="boot id"):
        FrameCrypto(KEY, "lab", 1, NODES, boot_id=b"123")
    with pytest.raises(ValueError, match="node id"):
        FrameCrypto(KEY, "lab", 1, (1, 2**32))


def test_tampered_header_fails_authentication() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"payload")
    for offset in range(7, HEADER_BYTES):  # boot id and counter (sender: next test)
        tampered = bytearray(frame)
        tampered[offset] ^= 0x01
        assert dropped(receiver, bytes(tampered)) == AUTH_FAILED
    assert receiver.open(frame) == (1, b"payload")  # the failures did not touch the window


def test_tampered_sender_is_unknown_self_or_fails_authentication() -> None:
    sender, receiver = pair()
    frame = bytearray(sender.seal(b"payload"))
    frame[3:7] = (3).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == AUTH_FAILED
    frame[3:7] = (2).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == SELF_SENDER
    frame[3:7] = (99).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == UNKNOWN_SENDER


def test_tampered_ciphertext_and_tag_fail_authentication() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"some payload bytes")
    for offset in range(HEADER_BYTES, len(frame)):
        tampered = bytearray(frame)
        tampered[offset] ^= 0x80
        assert dropped(receiver, bytes(tampered)) == AUTH_FAILED
    assert dropped(receiver, frame + b"\0") == AUTH_FAILED


@pytest.mark.parametrize(("key", "cluster"), [(OTHER_KEY, "lab"), (KEY, "lab2"), (KEY, "Lab")])
def test_wrong_key_or_cluster_name_fails_authentication(key: bytes, cluster: str) -> None:
    stranger = FrameCrypto(key, cluster, 1, NODES)
    _, receiver = pair()
    assert dropped(receiver, stranger.seal(b"hello")) == AUTH_FAILED


def test_truncated_frames_are_short() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"")
    assert len(frame) == OVERHEAD_BYTES
    for length in range(OVERHEAD_BYTES):
        assert dropped(receiver, frame[:length]) == SHORT
    longer = sender.seal(b"0123456789")
    for length in range(OVERHEAD_BYTES, len(longer)):
        assert dropped(receiver, longer[:length]) == AUTH_FAILED


def test_wrong_magic_and_version() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"x")
    assert dropped(receiver, b"XX" + frame[2:]) == BAD_MAGIC
    assert dropped(receiver, b"hello world") == BAD_MAGIC
    assert dropped(receiver, frame[:2] + b"\x02" + frame[3:]) == BAD_VERSION
    assert dropped(receiver, frame[:2] + b"\x00") == BAD_VERSION


def test_unknown_sender() -> None:
    outsider = FrameCrypto(KEY, "lab", 7, (1, 2, 3, 7))
    _, receiver = pair()
    assert dropped(receiver, outsider.seal(b"x")) == UNKNOWN_SENDER
    receiver.set_nodes((1, 2, 3, 7))  # a run-time nodelist change adds node 7
    assert receiver.open(outsider.seal(b"y")) == (7, b"y")


def test_replay_of_the_same_frame_is_refused() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"once")
    assert receiver.open(frame) == (1, b"once")
    assert dropped(receiver, frame) == REPLAY
    assert dropped(receiver, frame) == REPLAY


def test_reordering_inside_the_window_is_accepted() -> None:
    sender, receiver = pair()
    frames = [sender.seal(str(i).encode()) for i in range(REPLAY_WINDOW)]
    top = REPLAY_WINDOW - 1  # newest first, then the evens backwards, then the odds forwards
    order = [top, *range(top - 1, -1, -2), *range(1, top, 2)]
    assert sorted(order) == list(range(REPLAY_WINDOW))
    for i in order:
        assert receiver.open(frames[i]) == (1, str(i).encode())
    for i in (0, REPLAY_WINDOW // 2, REPLAY_WINDOW - 1):
        assert dropped(receiver, frames[i]) == REPLAY


def test_frames_older_than_the_window_are_refused() -> None:
    sender, receiver = pair()
    old = sender.seal(b"old")
    frames = [sender.seal(b"n") for _ in range(REPLAY_WINDOW)]
    assert receiver.open(frames[-1]) == (1, b"n")  # counter REPLAY_WINDOW
    assert dropped(receiver, old) == REPLAY  # counter 0: never seen, but 1024 behind
    assert receiver.open(frames[0]) == (1, b"n")  # counter 1: 1023 behind, still inside


def test_big_jump_forward_resets_the_window() -> None:
    sender, receiver = pair()
    first = sender.seal(b"a")
    assert receiver.open(first) == (1, b"a")
    skipped = [sender.seal(b"s") for _ in range(5 * REPLAY_WINDOW)]
    late = sender.seal(b"late")
    assert receiver.open(late) == (1, b"late")
    assert receiver.open(skipped[-1]) == (1, b"s")
    assert dropped(receiver, skipped[0]) == REPLAY
    assert dropped(receiver, first) == REPLAY


def test_restarted_sender_is_accepted_and_its_old_boot_refused() -> None:
    sender, receiver = pair()
    old_frames = [sender.seal(f"old{i}".encode()) for i in range(4)]
    assert receiver.open(old_frames[0]) == (1, b"old0")
    restarted = FrameCrypto(KEY, "lab", 1, NODES, boot_id=b"\x02" * 8)
    first = restarted.seal(b"new0")
    assert first[15:23] == bytes(8)  # its counter starts at 0 again
    assert receiver.open(first) == (1, b"new0")  # accepted at once
    # Frames of the previous run are refused from now on, seen or not.
    for frame in old_frames:
        assert dropped(receiver, frame) == REPLAY
    assert receiver.open(restarted.seal(b"new1")) == (1, b"new1")
    assert dropped(receiver, first) == REPLAY


def test_every_earlier_run_is_refused() -> None:
    _, receiver = pair()
    runs = [FrameCrypto(KEY, "lab", 1, NODES, boot_id=bytes([i]) * 8) for i in range(2, 20)]
    kept = [run.seal(b"spare") for run in runs]  # one unseen frame per run, for later
    for run in runs:
        assert receiver.open(run.seal(b"hi"))[0] == 1
    for frame in kept[:-1]:
        assert dropped(receiver, frame) == REPLAY


def test_replayed_old_run_cannot_lock_a_sender_out() -> None:
    """A receiver that knows only an old run (it restarted, or an attacker replays a captured
    frame of an earlier run first) moves on as soon as the current run's frames arrive."""
    old = FrameCrypto(KEY, "lab", 1, NODES, boot_id=(5).to_bytes(8, "big"))
    current = FrameCrypto(KEY, "lab", 1, NODES, boot_id=(9).to_bytes(8, "big"))
    captured = old.seal(b"captured")
    receiver = FrameCrypto(KEY, "lab", 2, NODES)
    assert receiver.open(captured) == (1, b"captured")
    assert receiver.open(current.seal(b"live")) == (1, b"live")
    assert receiver.open(current.seal(b"live again")) == (1, b"live again")
    assert dropped(receiver, old.seal(b"more old")) == REPLAY


def test_windows_are_per_sender() -> None:
    one = FrameCrypto(KEY, "lab", 1, NODES, boot_id=b"\x01" * 8)
    three = FrameCrypto(KEY, "lab", 3, NODES, boot_id=b"\x01" * 8)  # same boot id, other node
    _, receiver = pair()
    a, b = one.seal(b"1"), three.seal(b"3")
    assert a[15:] != b[15:]  # same counter and boot id, but another nonce: other ciphertext
    assert receiver.open(a) == (1, b"1")
    assert receiver.open(b) == (3, b"3")


def test_self_sender() -> None:
    me = FrameCrypto(KEY, "lab", 2, NODES)
    assert dropped(me, me.seal(b"reflected")) == SELF_SENDER


# ---------------------------------------------------------------------- hypothesis

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_dropped_never_raise(data: bytes) -> None:
    _, receiver = pair()
    assert dropped(receiver, data) in DROP_REASONS


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_random_bytes_after_a_valid_header_prefix(tail: bytes) -> None:
    sender, receiver = pair()
    data = sender.seal(b"")[:7] + tail  # right magic, version and a known sender
    assert dropped(receiver, data) in (SHORT, AUTH_FAILED)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def mutate(frame: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(frame)
    for kind, where, value in mutations:
        pos = where % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= value
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data.insert(pos, value)
        elif kind == "delete" and pos < len(data):
            del data[pos]
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(mutation, min_size=1, max_size=4))
def test_mutated_real_frames_are_dropped_never_raise(payload: bytes,
                                                     mutations: list[tuple[str, int, int]]) -> None:
    sender, receiver = pair()
    frame = sender.seal(payload)
    data = mutate(frame, mutations)
    if data == frame:
        assert receiver.open(data) == (1, payload)
        return
    reason = dropped(receiver, data)
    assert reason in DROP_REASONS
    # The original still opens: nothing a forged frame did moved the window.
    assert receiver.open(frame) == (1, payload)
    # And once seen, any mutation of it is refused too.
    assert dropped(receiver, data) in DROP_REASONS
