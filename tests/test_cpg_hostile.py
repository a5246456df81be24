"""Hostile input against a real `pmxfs debug cpg` process on loopback.

A three-node udpu ring (127.0.0.11-13) carries application traffic while the test fires at least
100,000 bad datagrams at node n2: random bytes, truncated and bit-flipped real frames, frames under
a wrong key or for another cluster, frames claiming an unknown sender or the target itself, real
frames from the wrong address, authentic frames sealed for another node or a token sealed for
every node, and authentic frames plus exact replays of them. The ring must not notice (no
configuration change, same delivery order everywhere, process alive, no traceback) and the
target's drop counters must account for every bad frame, reason by reason.

Where the frames come from. No sniffing: the test builds real frames itself with
`pmxfs.runtime.frame_crypto.FrameCrypto` around real totem messages from `pmxfs.core.wire`, with
the cluster's authkey (or a wrong one). Authentic frames that the target will accept are sent only
as node n4, which is in the nodelist (127.0.0.14) but never started: an authentic frame of a live
node with a fresh boot id would legitimately move that node's replay window (see "Residual limits"
in frame_crypto) and cut the live node off, which is what holding the key allows, not an attack
the transport can stop. Every first copy of an n4 frame carries a totem message that totem drops
and counts (`dropped_*`); its exact re-sends are `replay`s.

Every datagram is classified in advance by the documented order of checks (magic, version,
length, self, nodelist, receiver, source address, a run older than the sender's current one,
authentication, token sealed for every node, replay window, then totem's checks), so the expected
counter of each reason is known exactly; the boot ids of the live senders are read from their
data directories for that. Sending is paced by the target socket's
receive queue in /proc/net/udp, so the kernel drops nothing (its drop counter is checked too).
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cpg_harness import (
    CLUSTER_NAME,
    CpgProcess,
    ProcessGroup,
    all_delivered,
    assert_exactly_once,
    check_agreement,
    loopback_nodes,
    start_ring,
    wait_until,
)

from pmxfs.core.errors import ProtocolError
from pmxfs.core.wire import (
    Fragment,
    Join,
    Mcast,
    MergeDetect,
    RingId,
    Token,
    TokenHoldCancel,
    TokenPhase,
    decode,
    encode,
    unicast_only,
)
from pmxfs.runtime.frame_crypto import (
    AUTH_FAILED,
    BAD_MAGIC,
    BAD_VERSION,
    DROP_REASONS,
    EVERY_NODE,
    MAGIC,
    OVERHEAD_BYTES,
    REPLAY,
    SELF_SENDER,
    SHORT,
    UNKNOWN_SENDER,
    VERSION,
    WRONG_RECEIVER,
    FrameCrypto,
)
from pmxfs.runtime.transport import ADDRESS_MISMATCH

NODES = loopback_nodes(4)  # n4 (127.0.0.14) is configured but never started
RUNNING = ["n1", "n2", "n3"]
TARGET = "n2"
TOKEN_MS = 3000  # the corosync default: a busy target is not mistaken for a dead one
FRAMES = 100_000
BURST = 500
MAX_QUEUED_BYTES = 512 << 10  # wait before the next burst while the target has this much queued
ATTACK_TIME_LIMIT_S = 40.0
OUTSIDER = "127.0.0.99"  # an address of 127/8 that is not in the nodelist

TRANSPORT_DROPS = (*DROP_REASONS, ADDRESS_MISMATCH)
TOTEM_MALFORMED = "dropped_malformed"
TOTEM_FOREIGN_TOKEN = "dropped_foreign_token"
TOTEM_UNKNOWN_NODE = "dropped_unknown_node"
TOTEM_SENDER_MISMATCH = "dropped_sender_mismatch"
TOTEM_DROPS = (TOTEM_MALFORMED, TOTEM_FOREIGN_TOKEN, TOTEM_UNKNOWN_NODE, TOTEM_SENDER_MISMATCH)
# the ring's own token retransmissions show up here when the busy target forwards a token late
GENUINE_TOTEM_DROPS = ("dropped_duplicate_token",)




def udp_socket_stats(addr: str, port: int) -> tuple[int, int]:
    """(bytes queued for reading, datagrams dropped) of the UDP socket bound to addr:port."""
    local = f"{socket.inet_aton(addr)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    raise AssertionError(f"no UDP socket on {addr}:{port}")


@dataclass(frozen=True)
class Shot:
    sock: socket.socket
    frame: bytes
    reason: str  # the counter that must account for it


class Attacker:
    """Builds bad datagrams for node `target` and knows which counter each one lands in."""

    def __init__(self, authkey: bytes, target: int, addresses: dict[int, str], ghost: int,
                 boot_ids: dict[int, int], rng: random.Random) -> None:
        self.rng = rng
        self.target = target
        self.addresses = addresses
        self.ghost = ghost
        self.boot_ids = dict(boot_ids)  # the run the target knows of each sender, once it does
        ids = list(addresses)
        boot = rng.randbytes  # fixed boot ids from the seeded rng keep a failure reproducible
        self.real1 = FrameCrypto(authkey, CLUSTER_NAME, 1, ids, boot_id=boot(8))
        self.ghost_crypto = FrameCrypto(authkey, CLUSTER_NAME, ghost, ids, boot_id=boot(8))
        self.wrong_key = FrameCrypto(rng.randbytes(256), CLUSTER_NAME, 1, ids, boot_id=boot(8))
        self.other_cluster = FrameCrypto(authkey, "elsewhere", 1, ids, boot_id=boot(8))
        self.stranger = FrameCrypto(authkey, CLUSTER_NAME, 77, ids, boot_id=boot(8))
        self.impostor = FrameCrypto(authkey, CLUSTER_NAME, target, ids, boot_id=boot(8))
        self.socks: dict[str, socket.socket] = {}
        for ip in (addresses[1], addresses[ghost], OUTSIDER):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, 0))  # another port: the transport compares IPs only
            self.socks[ip] = sock
        self.ghost_sent: list[bytes] = []
        self.sent: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.makers: list[Callable[[], Shot]] = [
            self.random_bytes, self.truncated, self.bit_flipped, self.wrong_key_frame,
            self.other_cluster_frame, self.from_outsider, self.unknown_sender,
            self.claims_target, self.ghost_first, self.ghost_replay, self.ghost_elsewhere,
            self.ghost_bit_flipped, self.ghost_for_another_node, self.ghost_token_for_all,
        ]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()

    # -- classification: the transport's documented order of checks

    def classify(self, frame: bytes, src_ip: str) -> str:
        if len(frame) >= 2 and frame[:2] != MAGIC:
            return BAD_MAGIC
        if len(frame) >= 3 and frame[2] != VERSION:
            return BAD_VERSION
        if len(frame) < OVERHEAD_BYTES:
            return SHORT
        sender, receiver, boot_id = struct.unpack_from(">IIQ", frame, 3)
        if sender == self.target:
            return SELF_SENDER
        if sender not in self.addresses:
            return UNKNOWN_SENDER
        if receiver not in (self.target, EVERY_NODE):
            return WRONG_RECEIVER
        if self.addresses[sender] != src_ip:
            return ADDRESS_MISMATCH
        if boot_id < self.boot_ids.get(sender, 0):
            return REPLAY  # an earlier run: refused before authentication
        return AUTH_FAILED  # only ever called for frames that cannot be authentic

    def _mangled(self, frame: bytes, src_ip: str) -> Shot:
        return Shot(self.socks[src_ip], frame, self.classify(frame, src_ip))

    # -- real totem messages

    def _message(self) -> bytes:
        foreign = RingId(seq=self.rng.randrange(1, 1 << 40), rep=self.ghost)
        choice = self.rng.randrange(4)
        if choice == 0:
            frags = (Fragment(msg_id=self.rng.randrange(1, 1000), index=0, count=1,
                              data=self.rng.randbytes(self.rng.randrange(0, 200))),)
            return encode(Mcast(ring_id=foreign, seq=self.rng.randrange(1, 100), sender=1,
                                fragments=frags))
        if choice == 1:
            return encode(Token(ring_id=foreign, token_seq=5, seq=9, aru=9, aru_addr=1, fcc=0,
                                backlog=0, rtr=(), retrans_flg=False,
                                phase=TokenPhase.OPERATIONAL))
        if choice == 2:
            return encode(Join(sender=1, ring_seq=foreign.seq, proc=(1, 2, 3), fail=()))
        return encode(MergeDetect(sender=1, ring_id=foreign))

    def _receiver(self, payload: bytes) -> int:
        """The target for a token, else the target or every node."""
        if unicast_only(payload):
            return self.target
        return self.rng.choice((self.target, EVERY_NODE))

    def _real1_frame(self) -> bytes:
        """A frame as node 1 would seal it (but with a boot id node 1 never had)."""
        message = self._message()
        return self.real1.seal(message, self._receiver(message))

    # -- the kinds of shots

    def random_bytes(self) -> Shot:
        frame = self.rng.randbytes(self.rng.choice((0, 1, 2, 3, 10, 38, 39, 40, 100, 300)))
        if self.rng.random() < 0.3:  # sometimes a plausible header in front of the noise
            frame = MAGIC + bytes([VERSION]) + self.rng.randrange(0, 6).to_bytes(4, "big") + frame
        return self._mangled(frame, self.rng.choice((self.addresses[1], OUTSIDER)))

    def truncated(self) -> Shot:
        frame = self._real1_frame()
        return self._mangled(frame[:self.rng.randrange(0, len(frame))], self.addresses[1])

    def bit_flipped(self) -> Shot:
        frame = bytearray(self._real1_frame())
        # distinct bits: flipping one bit twice would give back the authentic frame
        for bit in self.rng.sample(range(len(frame) * 8), self.rng.choice((1, 1, 1, 2, 3))):
            frame[bit // 8] ^= 1 << (bit % 8)
        return self._mangled(bytes(frame), self.addresses[1])

    def wrong_key_frame(self) -> Shot:
        message = self._message()
        frame = self.wrong_key.seal(message, self._receiver(message))
        return self._mangled(frame, self.addresses[1])  # fails authentication (or is older)

    def other_cluster_frame(self) -> Shot:
        message = self._message()
        frame = self.other_cluster.seal(message, self._receiver(message))
        return self._mangled(frame, self.addresses[1])

    def from_outsider(self) -> Shot:
        """Authentic-looking node-1 frame, from an address outside the nodelist."""
        return Shot(self.socks[OUTSIDER], self._real1_frame(), ADDRESS_MISMATCH)

    def unknown_sender(self) -> Shot:
        message = self._message()
        return Shot(self.socks[self.addresses[1]],
                    self.stranger.seal(message, self._receiver(message)), UNKNOWN_SENDER)

    def claims_target(self) -> Shot:
        return Shot(self.socks[self.addresses[1]],
                    self.impostor.seal(self._message(), EVERY_NODE), SELF_SENDER)

    def _ghost_token(self, ring_id: RingId) -> bytes:
        return encode(Token(ring_id=ring_id, token_seq=7, seq=3, aru=3, aru_addr=self.ghost,
                            fcc=0, backlog=0, rtr=(), retrans_flg=False,
                            phase=TokenPhase.OPERATIONAL))

    def _ghost_payload(self) -> tuple[bytes, str]:
        """A payload authentic n4 frames carry and the totem counter that drops it."""
        choice = self.rng.randrange(5)
        foreign = RingId(seq=self.rng.randrange(1, 1 << 40), rep=self.ghost)
        if choice == 0:
            payload = b"\xc1" + self.rng.randbytes(self.rng.randrange(0, 100))
            with pytest.raises(ProtocolError):  # 0xc1 is never valid msgpack
                decode(payload)
            return payload, TOTEM_MALFORMED
        if choice == 1:
            return self._ghost_token(foreign), TOTEM_FOREIGN_TOKEN
        if choice == 2:
            frags = (Fragment(msg_id=1, index=0, count=1, data=b"not from the nodelist"),)
            return encode(Mcast(ring_id=foreign, seq=1, sender=99, fragments=frags)), \
                TOTEM_UNKNOWN_NODE
        if choice == 3:  # n4 speaking for node 1
            return encode(Join(sender=1, ring_seq=foreign.seq, proc=(1, self.ghost),
                               fail=())), TOTEM_SENDER_MISMATCH
        return encode(TokenHoldCancel(sender=3, ring_id=foreign)), TOTEM_SENDER_MISMATCH

    def ghost_first(self) -> Shot:
        """An authentic n4 frame: the transport accepts it once, totem drops and counts it."""
        payload, reason = self._ghost_payload()
        frame = self.ghost_crypto.seal(payload, self._receiver(payload))
        self.ghost_sent.append(frame)
        self.boot_ids[self.ghost] = int.from_bytes(self.ghost_crypto.boot_id, "big")
        return Shot(self.socks[self.addresses[self.ghost]], frame, reason)

    def ghost_replay(self) -> Shot:
        """An exact copy of an n4 frame sent before (from n4's address, so after the first)."""
        if not self.ghost_sent:
            return self.ghost_first()
        frame = self.rng.choice(self.ghost_sent[-2000:])
        return Shot(self.socks[self.addresses[self.ghost]], frame, REPLAY)

    def ghost_elsewhere(self) -> Shot:
        """A copy of an authentic n4 frame from another address: refused before the window."""
        if not self.ghost_sent:
            return self.ghost_first()
        frame = self.rng.choice(self.ghost_sent[-2000:])
        return Shot(self.socks[self.rng.choice((self.addresses[1], OUTSIDER))], frame,
                    ADDRESS_MISMATCH)

    def ghost_bit_flipped(self) -> Shot:
        message = self._message()
        frame = bytearray(self.ghost_crypto.seal(message, self._receiver(message)))
        frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
        return self._mangled(bytes(frame), self.addresses[self.ghost])

    def ghost_for_another_node(self) -> Shot:
        """An authentic n4 frame sealed for node 1 or 3, delivered to the target: refused before
        authentication, and it must not use up a counter of the target's window."""
        other = self.rng.choice([n for n in (1, 3) if n != self.target])
        frame = self.ghost_crypto.seal(self._message(), other)
        return Shot(self.socks[self.addresses[self.ghost]], frame, WRONG_RECEIVER)

    def ghost_token_for_all(self) -> Shot:
        """An authentic n4 token sealed for every node: a token is only ever for one node."""
        payload = self._ghost_token(RingId(seq=self.rng.randrange(1, 1 << 40), rep=self.ghost))
        frame = self.ghost_crypto.seal(payload, EVERY_NODE)
        return Shot(self.socks[self.addresses[self.ghost]], frame, WRONG_RECEIVER)

    def fire(self, count: int, port: int) -> None:
        target = (self.addresses[self.target], port)
        for _ in range(count):
            maker = self.rng.choice(self.makers)
            shot = maker()
            shot.sock.sendto(shot.frame, target)
            self.sent[shot.reason] += 1
            self.kinds[maker.__name__] += 1


def _drop_counters(counters: dict[str, dict[str, int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for reason in TRANSPORT_DROPS:
        out[reason] = counters["transport"].get(reason, 0)
    for key, value in counters["totem"].items():
        if key.startswith("dropped_"):
            out[key] = value
    return out


def test_hostile_frames_are_dropped_and_counted(group: ProcessGroup, tmp_path: Path) -> None:
    ring = start_ring(group, tmp_path, NODES, run=RUNNING, token=TOKEN_MS)
    procs: list[CpgProcess] = [ring.procs[n] for n in RUNNING]
    target = ring.procs[TARGET]
    port = ring.port
    formed = {p.name: p.count() for p in procs}  # no configuration change from here on
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    addresses = {n.nodeid: n.addr for n in NODES}
    boot_ids = {p.nodeid: int(ring.data_dir(ring.node(p.name)).joinpath(
        f"bootid_{p.nodeid}").read_text()) for p in procs}
    attacker = Attacker(tmp_path.joinpath("authkey").read_bytes(), target.nodeid, addresses,
                        ghost=4, boot_ids=boot_ids, rng=rng)
    try:
        before = _drop_counters(target.counters())
        kernel_drops_before = udp_socket_stats(addresses[target.nodeid], port)[1]
        messages: list[str] = []
        started = time.monotonic()
        bursts = 0
        while attacker.sent.total() < FRAMES:
            attacker.fire(BURST, port)
            bursts += 1
            if bursts % 10 == 0:  # the ring keeps carrying application traffic meanwhile
                for p in procs:
                    text = f"h-{p.name}-{bursts}"
                    p.send(text)
                    messages.append(text)
            wait_until(lambda: udp_socket_stats(addresses[target.nodeid], port)[0]
                       < MAX_QUEUED_BYTES, 10, "the target to work off its receive queue")
            assert time.monotonic() - started < ATTACK_TIME_LIMIT_S, (
                f"only {attacker.sent.total()} frames sent in {ATTACK_TIME_LIMIT_S} s")
        attack_s = time.monotonic() - started
        wait_until(lambda: udp_socket_stats(addresses[target.nodeid], port)[0] == 0, 10,
                   "the target's receive queue to drain")
        sent = attacker.sent
        reasons = set(sent) | set(TRANSPORT_DROPS) | set(TOTEM_DROPS)

        def accounted() -> Counter[str] | None:
            delta = _drop_counters(target.counters()) - before
            return delta if all(delta[r] == sent[r] for r in reasons) else None

        try:
            wait_until(accounted, 10, "the drop counters to account for every bad frame")
        except AssertionError:
            delta = _drop_counters(target.counters()) - before
            table = {r: (sent[r], delta[r]) for r in sorted(reasons | set(delta))}
            raise AssertionError(f"(sent, counted) by reason differ (seed {seed}): {table}; "
                                 f"kinds {dict(attacker.kinds)}") from None
    finally:
        attacker.close()

    # exact accounting, and nothing was lost in the kernel's socket buffer on the way
    assert sent.total() >= FRAMES
    assert udp_socket_stats(addresses[target.nodeid], port)[1] == kernel_drops_before
    delta = _drop_counters(target.counters()) - before
    unexplained = {k: v for k, v in delta.items()
                   if k not in reasons and k not in GENUINE_TOTEM_DROPS and v}
    assert not unexplained, unexplained
    assert sum(delta[r] for r in reasons) == sent.total()
    assert all(attacker.kinds[m.__name__] > 0 for m in attacker.makers), attacker.kinds

    # the ring did not notice: same membership, process alive, traffic delivered in one order
    wait_until(all_delivered(procs, messages), 30, "delivery of the messages sent meanwhile",
               ring.describe)
    assert_exactly_once(procs, messages)
    orders = [p.delivered_data(prefix="h-") for p in procs]
    assert orders[0] == orders[1] == orders[2]
    for p in procs:
        assert p.alive(), p.describe()
        assert not p.confchgs(formed[p.name]), f"membership changed on {p.name}:\n{p.describe()}"
    for p in procs:
        p.signal(signal.SIGTERM)
    for p in procs:
        assert p.wait_exit(15) == 0, p.describe()
        assert "Traceback" not in p.stderr(), p.stderr()
    check_agreement(procs)
    assert attack_s < ATTACK_TIME_LIMIT_S
