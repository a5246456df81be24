"""pmxfs.runtime.frame_crypto: sealing, opening, every drop reason, receiver binding, run keys
and counter nonces, the replay window."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core.wire import MergeDetect, RingId, Token, TokenPhase, encode, unicast_only
from pmxfs.runtime import frame_crypto
from pmxfs.runtime.frame_crypto import (
    AUTH_FAILED,
    BAD_MAGIC,
    BAD_VERSION,
    DROP_REASONS,
    EVERY_NODE,
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
    WRONG_RECEIVER,
    FrameCrypto,
    FrameDropped,
    FrameTooLarge,
    derive_key,
    derive_run_key,
    nonce,
)

KEY = bytes(range(256))
OTHER_KEY = bytes(255 - b for b in range(256))
NODES = (1, 2, 3)


def node(node_id: int, boot: int = 1, key: bytes = KEY, cluster: str = "lab",
         nodes: tuple[int, ...] = NODES) -> FrameCrypto:
    return FrameCrypto(key, cluster, node_id, nodes, boot_id=boot.to_bytes(8, "big"))


def pair() -> tuple[FrameCrypto, FrameCrypto]:
    """Node 1 (sender, boot id 0x0101...) and node 2 (receiver) of cluster "lab"."""
    return node(1, int.from_bytes(b"\x01" * 8, "big")), node(2, 77)


def token(seq: int = 5) -> bytes:
    return encode(Token(ring_id=RingId(seq=4, rep=1), token_seq=seq, seq=0, aru=0, aru_addr=0,
                        fcc=0, backlog=0, rtr=(), retrans_flg=False,
                        phase=TokenPhase.OPERATIONAL))


def dropped(crypto: FrameCrypto, data: bytes) -> str:
    """Open `data` (tokens are unicast-only), expecting a drop; the reason, after checking it was
    counted exactly once."""
    before = dict(crypto.counters)
    with pytest.raises(FrameDropped) as info:
        crypto.open(data, unicast_only)
    reason = info.value.reason
    assert reason in DROP_REASONS
    diff = {k: v - before.get(k, 0) for k, v in crypto.counters.items() if v != before.get(k, 0)}
    assert diff == {reason: 1}
    return reason


def test_round_trip_and_layout() -> None:
    sender, receiver = pair()
    for payload in (b"", b"hello", bytes(range(256)) * 4, b"x" * MAX_PAYLOAD_BYTES):
        frame = sender.seal(payload, 2)
        assert len(frame) == len(payload) + OVERHEAD_BYTES
        assert receiver.open(frame) == (1, payload)
    fields = struct.unpack(">2sBII8sQ", frame[:HEADER_BYTES])
    assert fields == (b"PX", 2, 1, 2, b"\x01" * 8, 3)
    assert HEADER_BYTES == 27
    assert sender.seal(b"to all", EVERY_NODE)[7:11] == bytes(4)
    assert sender.counters[SEALED] == 5
    assert receiver.counters[OPENED] == 4
    assert all(receiver.counters[r] == 0 for r in DROP_REASONS)


def test_payload_is_encrypted_under_the_run_key_with_the_counter_as_nonce() -> None:
    sender, _ = pair()
    payload = b"secret corosync.conf contents" * 4
    frames = [sender.seal(payload, 2) for _ in range(3)]
    assert payload not in frames[2]
    assert b"secret" not in frames[2]
    # key: HKDF(cluster key, sender || boot id); nonce: 4 zero bytes || counter
    boot = int.from_bytes(b"\x01" * 8, "big")
    aead = ChaCha20Poly1305(derive_run_key(derive_key(KEY, "lab"), 1, boot))
    assert nonce(2) == bytes(4) + (2).to_bytes(8, "big")
    assert aead.decrypt(nonce(2), frames[2][HEADER_BYTES:], frames[2][:HEADER_BYTES]) == payload


def test_each_run_of_each_node_has_its_own_key() -> None:
    """The same (counter, header but sender/boot) under another run or node: other keystream."""
    runs = [node(1, 5), node(1, 6), node(3, 5)]
    frames = [run.seal(b"same payload", 2) for run in runs]
    bodies = {frame[HEADER_BYTES:] for frame in frames}
    assert len(bodies) == 3
    # and every one of them opens: the receiver derives the right key per (sender, boot id)
    receiver = node(2, 9)
    assert [receiver.open(f)[0] for f in frames] == [1, 1, 3]


def test_same_payload_never_gives_the_same_frame() -> None:
    sender, _ = pair()
    frames = {sender.seal(b"same", 2) for _ in range(100)}
    assert len(frames) == 100
    restarted = node(1, 2)  # a later run, counter from 0 again
    assert restarted.seal(b"same", 2)[HEADER_BYTES:] != pair()[0].seal(b"same", 2)[HEADER_BYTES:]


def test_too_large_payload_is_refused_locally() -> None:
    sender, _ = pair()
    with pytest.raises(FrameTooLarge):
        sender.seal(b"x" * (MAX_PAYLOAD_BYTES + 1), 2)


def test_constructor_and_seal_checks() -> None:
    with pytest.raises(ValueError, match="authkey"):
        node(1, key=b"short")
    with pytest.raises(ValueError, match="node id"):
        node(0)
    with pytest.raises(ValueError, match="boot id"):
        FrameCrypto(KEY, "lab", 1, NODES, boot_id=b"123")
    with pytest.raises(ValueError, match="node id"):
        node(1, nodes=(1, 2**32))
    with pytest.raises(ValueError, match="receiver"):
        node(1).seal(b"x", 2**32)


def test_there_is_no_boot_id_fallback() -> None:
    """A boot id is required: a made-up one (the wall clock) could repeat and reuse nonces."""
    with pytest.raises(TypeError, match="boot_id"):
        FrameCrypto(KEY, "lab", 1, NODES)  # type: ignore[call-arg]


def test_tampered_header_fails_authentication() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"payload", 2)
    for offset in range(11, HEADER_BYTES):  # boot id and counter (sender, receiver: below)
        tampered = bytearray(frame)
        tampered[offset] ^= 0x01
        assert dropped(receiver, bytes(tampered)) == AUTH_FAILED
    assert receiver.open(frame) == (1, b"payload")  # the failures did not touch the window


def test_tampered_receiver_is_wrong_or_fails_authentication() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"payload", 2)
    for offset in range(7, 11):
        for bit in range(8):
            tampered = bytearray(frame)
            tampered[offset] ^= 1 << bit
            named = int.from_bytes(tampered[7:11], "big")
            expected = AUTH_FAILED if named == EVERY_NODE else WRONG_RECEIVER
            assert dropped(receiver, bytes(tampered)) == expected
    assert receiver.open(frame) == (1, b"payload")


def test_tampered_sender_is_unknown_self_or_fails_authentication() -> None:
    sender, receiver = pair()
    frame = bytearray(sender.seal(b"payload", 2))
    frame[3:7] = (3).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == AUTH_FAILED
    frame[3:7] = (2).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == SELF_SENDER
    frame[3:7] = (99).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == UNKNOWN_SENDER


def test_tampered_ciphertext_and_tag_fail_authentication() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"some payload bytes", 2)
    for offset in range(HEADER_BYTES, len(frame)):
        tampered = bytearray(frame)
        tampered[offset] ^= 0x80
        assert dropped(receiver, bytes(tampered)) == AUTH_FAILED
    assert dropped(receiver, frame + b"\0") == AUTH_FAILED


@pytest.mark.parametrize(("key", "cluster"), [(OTHER_KEY, "lab"), (KEY, "lab2"), (KEY, "Lab")])
def test_wrong_key_or_cluster_name_fails_authentication(key: bytes, cluster: str) -> None:
    stranger = node(1, key=key, cluster=cluster)
    _, receiver = pair()
    assert dropped(receiver, stranger.seal(b"hello", 2)) == AUTH_FAILED


def test_truncated_frames_are_short() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"", 2)
    assert len(frame) == OVERHEAD_BYTES
    for length in range(OVERHEAD_BYTES):
        assert dropped(receiver, frame[:length]) == SHORT
    longer = sender.seal(b"0123456789", 2)
    for length in range(OVERHEAD_BYTES, len(longer)):
        assert dropped(receiver, longer[:length]) == AUTH_FAILED


def test_wrong_magic_and_version() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"x", 2)
    assert dropped(receiver, b"XX" + frame[2:]) == BAD_MAGIC
    assert dropped(receiver, b"hello world") == BAD_MAGIC
    assert dropped(receiver, frame[:2] + b"\x01" + frame[3:]) == BAD_VERSION  # the old format
    assert dropped(receiver, frame[:2] + b"\x03" + frame[3:]) == BAD_VERSION
    assert dropped(receiver, frame[:2] + b"\x00") == BAD_VERSION


def test_unknown_sender() -> None:
    outsider = node(7, nodes=(1, 2, 3, 7))
    _, receiver = pair()
    assert dropped(receiver, outsider.seal(b"x", 2)) == UNKNOWN_SENDER
    receiver.set_nodes((1, 2, 3, 7))  # a run-time nodelist change adds node 7
    assert receiver.open(outsider.seal(b"y", 2)) == (7, b"y")


# ---------------------------------------------------------------------- receiver binding

def test_a_frame_for_another_node_is_wrong_receiver() -> None:
    """A's token for B delivered to C (with A's address spoofed) must not run at C."""
    sender, receiver = pair()
    assert dropped(receiver, sender.seal(token(), 3)) == WRONG_RECEIVER
    assert receiver.open(sender.seal(token(6), 2)) == (1, token(6))
    assert receiver.open(sender.seal(b"to all", EVERY_NODE)) == (1, b"to all")


def test_a_frame_cannot_be_readdressed() -> None:
    sender, receiver = pair()
    frame = bytearray(sender.seal(token(), 3))
    frame[7:11] = (2).to_bytes(4, "big")
    assert dropped(receiver, bytes(frame)) == AUTH_FAILED
    frame[7:11] = bytes(4)
    assert dropped(receiver, bytes(frame)) == AUTH_FAILED


def test_a_unicast_only_payload_sealed_for_every_node_is_wrong_receiver() -> None:
    """A token sealed with receiver 0 would be taken by every node: refused although authentic."""
    sender, receiver = pair()
    assert dropped(receiver, sender.seal(token(), EVERY_NODE)) == WRONG_RECEIVER
    merge = encode(MergeDetect(sender=1, ring_id=RingId(seq=4, rep=1)))
    assert receiver.open(sender.seal(merge, EVERY_NODE), unicast_only) == (1, merge)
    assert receiver.open(sender.seal(token(7), 2), unicast_only) == (1, token(7))


def test_frames_for_other_receivers_do_not_touch_the_window() -> None:
    """Frames for node 3 carry counters node 2 never gets; delivered to node 2 anyway, they must
    neither use up a counter nor move the window (which would make node 2 refuse its own)."""
    sender, receiver = pair()
    mine = [sender.seal(f"for 2: {i}".encode(), 2) for i in range(3)]
    theirs = [sender.seal(b"for 3", 3) for _ in range(5 * REPLAY_WINDOW)]
    broadcast_token = sender.seal(token(), EVERY_NODE)
    assert receiver.open(mine[2]) == (1, b"for 2: 2")
    for frame in theirs[::97]:
        assert dropped(receiver, frame) == WRONG_RECEIVER
    assert dropped(receiver, broadcast_token) == WRONG_RECEIVER
    assert receiver.open(mine[0]) == (1, b"for 2: 0")  # the window did not move past them
    assert receiver.open(mine[1]) == (1, b"for 2: 1")
    assert receiver.open(sender.seal(b"later", 2)) == (1, b"later")


# ---------------------------------------------------------------------- run keys

def test_older_runs_are_refused_without_deriving_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    current, receiver = node(1, 100), node(2, 5)
    olds = [node(1, boot).seal(b"old", 2) for boot in (1, 50, 99)]
    derived: list[tuple[int, int]] = []
    real = frame_crypto.derive_run_key

    def counting(cluster_key: bytes, sender: int, boot_id: int) -> bytes:
        derived.append((sender, boot_id))
        return real(cluster_key, sender, boot_id)

    monkeypatch.setattr(frame_crypto, "derive_run_key", counting)
    assert receiver.open(current.seal(b"a", 2)) == (1, b"a")
    assert receiver.open(current.seal(b"b", 2)) == (1, b"b")
    assert derived == [(1, 100)]  # once per run, not per frame
    for old in olds:
        assert dropped(receiver, old) == REPLAY
    assert derived == [(1, 100)]


def test_made_up_boot_ids_keep_two_keys_per_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of frames with ever new boot ids (an attacker without the key) costs one
    derivation each and evicts nothing: the current run still opens without a derivation."""
    current, receiver = node(1, 100), node(2, 5)
    assert receiver.open(current.seal(b"a", 2)) == (1, b"a")
    template = node(1, 0, key=OTHER_KEY).seal(b"forged", 2)
    derived: list[int] = []
    real = frame_crypto.derive_run_key

    def counting(cluster_key: bytes, sender: int, boot_id: int) -> bytes:
        derived.append(boot_id)
        return real(cluster_key, sender, boot_id)

    monkeypatch.setattr(frame_crypto, "derive_run_key", counting)
    for boot in range(101, 1101):
        forged = template[:11] + boot.to_bytes(8, "big") + template[19:]
        assert dropped(receiver, forged) == AUTH_FAILED
    assert derived == list(range(101, 1101))
    peer = receiver._peers[1]  # white box: what is kept is the current key and one candidate
    assert peer.key is not None
    assert peer.key.boot_id == 100
    assert peer.candidate is not None
    assert peer.candidate.boot_id == 1100
    assert receiver.open(current.seal(b"b", 2)) == (1, b"b")
    assert len(derived) == 1000


def test_a_new_run_becomes_current_once_authentic() -> None:
    receiver = node(2, 5)
    first, second = node(1, 10), node(1, 20)
    assert receiver.open(first.seal(b"1", 2)) == (1, b"1")
    assert receiver.open(second.seal(b"2", 2)) == (1, b"2")
    peer = receiver._peers[1]
    assert peer.key is not None
    assert peer.key.boot_id == 20
    assert peer.candidate is None
    assert dropped(receiver, first.seal(b"late", 2)) == REPLAY


# ---------------------------------------------------------------------- replay window

def test_replay_of_the_same_frame_is_refused() -> None:
    sender, receiver = pair()
    frame = sender.seal(b"once", 2)
    assert receiver.open(frame) == (1, b"once")
    assert dropped(receiver, frame) == REPLAY
    assert dropped(receiver, frame) == REPLAY


def test_reordering_inside_the_window_is_accepted() -> None:
    sender, receiver = pair()
    frames = [sender.seal(str(i).encode(), 2) for i in range(REPLAY_WINDOW)]
    top = REPLAY_WINDOW - 1  # newest first, then the evens backwards, then the odds forwards
    order = [top, *range(top - 1, -1, -2), *range(1, top, 2)]
    assert sorted(order) == list(range(REPLAY_WINDOW))
    for i in order:
        assert receiver.open(frames[i]) == (1, str(i).encode())
    for i in (0, REPLAY_WINDOW // 2, REPLAY_WINDOW - 1):
        assert dropped(receiver, frames[i]) == REPLAY


def test_frames_older_than_the_window_are_refused() -> None:
    sender, receiver = pair()
    old = sender.seal(b"old", 2)
    frames = [sender.seal(b"n", 2) for _ in range(REPLAY_WINDOW)]
    assert receiver.open(frames[-1]) == (1, b"n")  # counter REPLAY_WINDOW
    assert dropped(receiver, old) == REPLAY  # counter 0: never seen, but 1024 behind
    assert receiver.open(frames[0]) == (1, b"n")  # counter 1: 1023 behind, still inside


def test_big_jump_forward_resets_the_window() -> None:
    sender, receiver = pair()
    first = sender.seal(b"a", 2)
    assert receiver.open(first) == (1, b"a")
    skipped = [sender.seal(b"s", 2) for _ in range(5 * REPLAY_WINDOW)]
    late = sender.seal(b"late", 2)
    assert receiver.open(late) == (1, b"late")
    assert receiver.open(skipped[-1]) == (1, b"s")
    assert dropped(receiver, skipped[0]) == REPLAY
    assert dropped(receiver, first) == REPLAY


def test_restarted_sender_is_accepted_and_its_old_boot_refused() -> None:
    sender, receiver = pair()
    old_frames = [sender.seal(f"old{i}".encode(), 2) for i in range(4)]
    assert receiver.open(old_frames[0]) == (1, b"old0")
    restarted = node(1, int.from_bytes(b"\x02" * 8, "big"))
    first = restarted.seal(b"new0", 2)
    assert first[19:27] == bytes(8)  # its counter starts at 0 again
    assert receiver.open(first) == (1, b"new0")  # accepted at once
    # Frames of the previous run are refused from now on, seen or not.
    for frame in old_frames:
        assert dropped(receiver, frame) == REPLAY
    assert receiver.open(restarted.seal(b"new1", 2)) == (1, b"new1")
    assert dropped(receiver, first) == REPLAY


def test_every_earlier_run_is_refused() -> None:
    _, receiver = pair()
    runs = [node(1, int.from_bytes(bytes([i]) * 8, "big")) for i in range(2, 20)]
    kept = [run.seal(b"spare", 2) for run in runs]  # one unseen frame per run, for later
    for run in runs:
        assert receiver.open(run.seal(b"hi", 2))[0] == 1
    for frame in kept[:-1]:
        assert dropped(receiver, frame) == REPLAY


def test_replayed_old_run_cannot_lock_a_sender_out() -> None:
    """A receiver that knows only an old run (it restarted, or an attacker replays a captured
    frame of an earlier run first) moves on as soon as the current run's frames arrive."""
    old, current = node(1, 5), node(1, 9)
    captured = old.seal(b"captured", 2)
    receiver = node(2, 3)
    assert receiver.open(captured) == (1, b"captured")
    assert receiver.open(current.seal(b"live", 2)) == (1, b"live")
    assert receiver.open(current.seal(b"live again", 2)) == (1, b"live again")
    assert dropped(receiver, old.seal(b"more old", 2)) == REPLAY


def test_windows_are_per_sender() -> None:
    one, three = node(1, 1), node(3, 1)  # same boot id, other node
    _, receiver = pair()
    a, b = one.seal(b"1", 2), three.seal(b"3", 2)
    assert a[HEADER_BYTES:] != b[HEADER_BYTES:]  # same counter and boot id, other key
    assert receiver.open(a) == (1, b"1")
    assert receiver.open(b) == (3, b"3")


def test_self_sender() -> None:
    me = node(2)
    assert dropped(me, me.seal(b"reflected", EVERY_NODE)) == SELF_SENDER


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
    data = sender.seal(b"", 2)[:7] + tail  # right magic, version and a known sender
    assert dropped(receiver, data) in (SHORT, WRONG_RECEIVER, AUTH_FAILED)


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
@given(st.binary(max_size=300), st.sampled_from([2, EVERY_NODE]),
       st.lists(mutation, min_size=1, max_size=4))
def test_mutated_real_frames_are_dropped_never_raise(payload: bytes, to: int,
                                                     mutations: list[tuple[str, int, int]]) -> None:
    sender, receiver = pair()
    frame = sender.seal(payload, to)
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
