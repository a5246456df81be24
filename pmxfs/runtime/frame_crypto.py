"""Authenticated, encrypted totem frames with replay protection -- pure: no sockets, no files.

Frame layout
------------
Every datagram pmxfs sends on the cluster network is one frame:

    offset  size  field
    0       2     magic b"PX"           tells pmxfs traffic from anything else on the port
    2       1     format version (2)    lets a later format be refused cleanly
    3       4     sender node id        big-endian uint32: whose run key and window to use
    7       4     receiver node id      big-endian uint32: the one node it is for, 0 for every node
    11      8     boot id               big-endian uint64, greater for every new run of the sender
    19      8     counter               big-endian uint64, 0 for the run's first frame, +1 each
    27      n     ciphertext            ChaCha20-Poly1305 encryption of the payload (a wire frame)
    27+n    16    tag                   Poly1305 tag over the header (as AAD) and the ciphertext

The 27-byte header is sent in clear because the receiver needs it before it can decrypt: it
names the sender (so the frame can be checked against the sender's nodelist address, run key and
replay window) and the receiver, and carries the boot id and counter that select key and nonce.
It is authenticated as associated data, so a frame whose header was changed fails
authentication like one whose ciphertext was changed.

Receiver binding
----------------
A frame sent to one node (`seal(payload, receiver=N)`: totem's tokens and commit tokens, and
their retransmissions) names that node; a frame for every node (a multicast, or the copies of
one "to all" frame in udpu) names 0. A node accepts only frames naming itself or 0, before it
spends anything on authentication, and counts the others as `wrong_receiver`; the field is
authenticated, so a frame cannot be re-addressed. Without it, an attacker who can spoof A's
source address could deliver A's token for B to C as well: C has never seen that counter, so it
would run a token visit and two tokens would circulate in one ring.

Receiver 0 must not become the loophole: a payload that may only ever travel to one node (the
caller says which with `open(..., unicast_only=...)`; the transport passes
`pmxfs.core.wire.unicast_only`, true for tokens and commit tokens) is refused as
`wrong_receiver` when it names 0, even though it is authentic. Totem never sends a token to
all, so only a bug could seal one that way, and this check keeps such a bug from reopening the
fork above.

A frame for another node is refused before the replay window is consulted, so it can neither
use up a counter nor move the window: the window only ever sees frames for this node or for
all, which share the sender's one counter sequence.

Keys and nonces
---------------
Cluster key: HKDF-SHA256 over the authkey file contents, salt `HKDF_SALT`, info = "cluster " +
cluster name. Every node of a cluster derives the same 32 bytes; a node of another cluster that
shares the authkey file (a copied key) derives different ones, so their traffic never mixes.

Run key: HKDF-SHA256 over the cluster key, salt `RUN_KEY_SALT`, info = sender id || boot id
(4 + 8 bytes, big-endian). Each run of each node encrypts under its own key; the nonce is
4 zero bytes || the counter (8 bytes, big-endian). Within one run the counter never repeats
(`seal` increments it and refuses to wrap), so a nonce can only repeat under one key if a sender
reuses a boot id: `pmxfs.runtime.boot_id` makes every boot id greater than the last one stored
(fsynced with its directory before use, so a power loss cannot forget it) and gives it 20 fresh
random low bits (so two runs started from one rolled-back snapshot differ). The nonce is
derived rather than sent, so it costs no bytes on the wire, and the receiver takes it from the
authenticated header, so a sender cannot be made to reuse one by anything a peer sends.

A receiver keeps, per sender, the key of the run its window is at and at most one candidate
key: that of the newest boot id it has been shown but not yet authenticated. A frame with an
older boot id is refused as `replay` at once, without deriving anything; a newer boot id costs one
derivation (a few µs, like a failed decryption) and replaces the candidate. So memory stays at two
keys per configured node whatever arrives, and a flood of made-up boot ids costs CPU in proportion
to the frames, no more than a flood of bad tags; the frame must already have passed every cheaper
check (nodelist, receiver, source address).

Replay protection
-----------------
Boot ids are ordered: every run of a node uses a boot id greater than all of its earlier runs
(see `pmxfs.runtime.boot_id`). Per sender the receiver keeps the current boot id, the highest
counter seen under it and a 1024-bit bitmap of the counters below it (`REPLAY_WINDOW`). A frame
of an older run is refused as `replay` before authentication; an authentic frame (the window is
only touched after authentication succeeded) is refused as `replay` when its counter was already
seen or is 1024 or more below the highest; reordering inside the window is accepted. A frame with
a newer boot id starts a new window at once, so a restarted node is accepted without waiting, and
its earlier runs can never be replayed to this receiver again.

Residual limits (documented, accepted):
* A receiver that itself restarted knows no boot ids yet: until the sender's current run reaches it,
  one frame per window position of one earlier run can be replayed to it once. The current run's
  first frame moves it on (newer boot id), so this cannot lock a sender out, and totem drops frames
  of old rings, so such a frame is never delivered as a message again.
* Frames older than the window are refused even if they were never seen: a sender's frames arrive
  in a burst of at most one token visit, far below 1024 frames, so this only costs a late duplicate.
* A copy of a frame for every node (receiver 0) may reach a node before the genuine copy does; the
  genuine one is then the `replay`. Both carry the same bytes, so nothing changes.

Drops are counted by reason in `FrameCrypto.counters` (see `DROP_REASONS`); `open` raises
`FrameDropped(reason)` and never anything else for any input bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pmxfs.core.errors import LocalError, RemoteError

MAGIC: Final = b"PX"
VERSION: Final = 2
BOOT_ID_BYTES: Final = 8
HEADER: Final = struct.Struct(">2sBII8sQ")  # magic, version, sender, receiver, boot id, counter
HEADER_BYTES: Final = HEADER.size  # 27
_ROUTE: Final = struct.Struct(">IIQQ")  # sender, receiver, boot id, counter at offset 3
TAG_BYTES: Final = 16
OVERHEAD_BYTES: Final = HEADER_BYTES + TAG_BYTES  # 43
MAX_DATAGRAM_BYTES: Final = 65507  # largest IPv4 UDP payload
MAX_PAYLOAD_BYTES: Final = MAX_DATAGRAM_BYTES - OVERHEAD_BYTES
MAX_NODE_ID: Final = 0xFFFFFFFF
MAX_COUNTER: Final = 0xFFFFFFFFFFFFFFFF
EVERY_NODE: Final = 0  # the receiver field of a frame for all nodes

REPLAY_WINDOW: Final = 1024
_WINDOW_MASK: Final = (1 << REPLAY_WINDOW) - 1

AUTHKEY_BYTES: Final = 256  # what `pmxfs keygen` writes
MIN_AUTHKEY_BYTES: Final = 128
MAX_AUTHKEY_BYTES: Final = 4096
HKDF_SALT: Final = b"pmxfs totem frame key v1"
RUN_KEY_SALT: Final = b"pmxfs totem run key v2"
_NONCE_PREFIX: Final = bytes(4)

# Why `open` refused a frame; each is a key of `FrameCrypto.counters`.
BAD_MAGIC: Final = "bad_magic"  # not a pmxfs frame
BAD_VERSION: Final = "bad_version"  # a pmxfs frame of another format version
SHORT: Final = "short"  # shorter than header + tag
UNKNOWN_SENDER: Final = "unknown_sender"  # the claimed sender is not in the nodelist
SELF_SENDER: Final = "self_sender"  # claims to come from this node: a reflection or a duplicate id
WRONG_RECEIVER: Final = "wrong_receiver"  # for another node, or a unicast-only payload for all
AUTH_FAILED: Final = "auth_failed"  # wrong key, other cluster, or changed in transit
REPLAY: Final = "replay"  # seen before, too old, or of an earlier run
DROP_REASONS: Final = (BAD_MAGIC, BAD_VERSION, SHORT, UNKNOWN_SENDER, SELF_SENDER,
                       WRONG_RECEIVER, AUTH_FAILED, REPLAY)
SEALED: Final = "frames_sealed"
OPENED: Final = "frames_opened"


class FrameDropped(RemoteError):
    """A received frame was refused; `reason` is one of `DROP_REASONS` (already counted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameTooLarge(LocalError, ValueError):
    """A local caller tried to seal more than `MAX_PAYLOAD_BYTES`."""


def derive_key(authkey: bytes, cluster_name: str) -> bytes:
    """The 32-byte cluster key: HKDF-SHA256(authkey, salt, "cluster " + name)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT,
                info=b"cluster " + cluster_name.encode("utf-8"))
    return hkdf.derive(authkey)


def derive_run_key(cluster_key: bytes, sender: int, boot_id: int) -> bytes:
    """The 32-byte key of one run of `sender`: HKDF-SHA256(cluster key, salt, sender || boot)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=RUN_KEY_SALT,
                info=struct.pack(">IQ", sender, boot_id))
    return hkdf.derive(cluster_key)


def nonce(counter: int) -> bytes:
    """The 12-byte nonce of frame `counter` of a run: 4 zero bytes, then the counter."""
    return _NONCE_PREFIX + counter.to_bytes(8, "big")


def _any_payload(_payload: bytes) -> bool:
    return False


@dataclass(slots=True)
class _Window:
    """Replay state of one sender: its current run (boot id) and which counters were seen."""

    boot_id: int
    top: int  # highest counter accepted under boot_id
    seen: int  # bit i set: counter top - i was accepted (bit 0 is `top` itself)

    def check(self, boot_id: int, counter: int) -> bool:
        """Would a frame (boot_id, counter) be fresh? Does not change the window."""
        if boot_id != self.boot_id:
            return boot_id > self.boot_id
        if counter > self.top:
            return True
        behind = self.top - counter
        return behind < REPLAY_WINDOW and not (self.seen >> behind) & 1

    def accept(self, boot_id: int, counter: int) -> None:
        """Record a fresh frame (after `check` said so and the frame authenticated)."""
        if boot_id != self.boot_id:
            self.boot_id, self.top, self.seen = boot_id, counter, 1
        elif counter > self.top:
            shift = counter - self.top
            if shift < REPLAY_WINDOW:
                self.seen = ((self.seen << shift) | 1) & _WINDOW_MASK
            else:
                self.seen = 1
            self.top = counter
        else:
            self.seen |= 1 << (self.top - counter)


@dataclass(slots=True)
class _RunKey:
    boot_id: int
    aead: ChaCha20Poly1305


@dataclass(slots=True)
class _Peer:
    """What a receiver keeps per sender: the replay window, the key of the window's run and at
    most one candidate key (the newest boot id shown, not yet authenticated)."""

    window: _Window | None = None
    key: _RunKey | None = None
    candidate: _RunKey | None = None


class FrameCrypto:
    """Seals outgoing frames and opens incoming ones for one node of one cluster.

    `nodes` are the node ids whose frames are accepted (the nodelist; this node's own id is
    refused as a sender: we never receive our own frames). `boot_id` must be greater than the
    boot id of every earlier run of this node and never repeat
    (`pmxfs.runtime.boot_id.next_boot_id`). `counters` holds `frames_sealed`, `frames_opened`
    and one entry per drop reason.
    """

    def __init__(self, authkey: bytes, cluster_name: str, node_id: int, nodes: Iterable[int], *,
                 boot_id: bytes) -> None:
        if not MIN_AUTHKEY_BYTES <= len(authkey) <= MAX_AUTHKEY_BYTES:
            raise ValueError(f"authkey has {len(authkey)} bytes; it must have "
                             f"{MIN_AUTHKEY_BYTES} to {MAX_AUTHKEY_BYTES}")
        if not 0 < node_id <= MAX_NODE_ID:
            raise ValueError(f"node id {node_id} is out of range (1-{MAX_NODE_ID})")
        if len(boot_id) != BOOT_ID_BYTES:
            raise ValueError(f"boot id must have {BOOT_ID_BYTES} bytes, not {len(boot_id)}")
        self.node_id = node_id
        self.boot_id = boot_id
        self.cluster_name = cluster_name
        self._cluster_key = derive_key(authkey, cluster_name)
        self._own = self._run_aead(node_id, int.from_bytes(boot_id, "big"))
        self._nodes: frozenset[int] = frozenset()
        self.set_nodes(nodes)
        self._counter = 0
        self._peers: dict[int, _Peer] = {}
        self.counters: dict[str, int] = dict.fromkeys((SEALED, OPENED, *DROP_REASONS), 0)

    @property
    def nodes(self) -> frozenset[int]:
        return self._nodes

    def set_nodes(self, nodes: Iterable[int]) -> None:
        """Replace the accepted senders (a run-time nodelist change). Replay state is kept, so a
        node that is removed and added again cannot have its old frames replayed."""
        new = frozenset(nodes)
        bad = [n for n in new if not 0 < n <= MAX_NODE_ID]
        if bad:
            raise ValueError(f"node id {bad[0]} is out of range (1-{MAX_NODE_ID})")
        self._nodes = new

    def seal(self, payload: bytes, receiver: int) -> bytes:
        """One frame carrying `payload` for node `receiver` (`EVERY_NODE`, 0: for all), under the
        next counter of this run."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise FrameTooLarge(f"frame payload of {len(payload)} bytes exceeds "
                                f"{MAX_PAYLOAD_BYTES}")
        if not 0 <= receiver <= MAX_NODE_ID:
            raise ValueError(f"receiver {receiver} is out of range (0-{MAX_NODE_ID})")
        counter = self._counter
        if counter > MAX_COUNTER:  # 2**64 frames: unreachable, but never reuse a nonce
            raise RuntimeError("frame counter exhausted; restart the node")
        self._counter = counter + 1
        header = HEADER.pack(MAGIC, VERSION, self.node_id, receiver, self.boot_id, counter)
        self.counters[SEALED] += 1
        return header + self._own.encrypt(nonce(counter), payload, header)

    def claimed_sender(self, data: bytes) -> int:
        """The sender a frame claims, after the checks that need no key (magic, version, length,
        sender in the nodelist, receiver this node or all). Raises `FrameDropped` (counted)
        otherwise. The claim is not authenticated yet: the transport uses it to compare the
        source address before `open`."""
        sender: int = self._route(data)[0]
        return sender

    def open(self, data: bytes,
             unicast_only: Callable[[bytes], bool] = _any_payload) -> tuple[int, bytes]:
        """(sender node id, payload) of an authentic, fresh frame for this node; `FrameDropped`
        otherwise. A payload for which `unicast_only` is true must name this node, not 0."""
        sender, receiver, boot_id, counter = self._route(data)
        peer = self._peers.get(sender)
        if peer is None:
            peer = self._peers[sender] = _Peer()
        if peer.window is not None and boot_id < peer.window.boot_id:
            self._drop(REPLAY)  # an earlier run: no key is derived for it
        key = self._key_for(peer, sender, boot_id)
        try:
            payload = key.aead.decrypt(nonce(counter), data[HEADER_BYTES:],
                                       data[:HEADER_BYTES])
        except InvalidTag:
            self._drop(AUTH_FAILED)
        if receiver == EVERY_NODE and unicast_only(payload):
            self._drop(WRONG_RECEIVER)
        # Only an authentic frame may touch the window: a forged one must not move it.
        if peer.window is None:
            peer.window = _Window(boot_id, counter, 1)
        elif peer.window.check(boot_id, counter):
            peer.window.accept(boot_id, counter)
        else:
            self._drop(REPLAY)
        if key is peer.candidate:
            peer.key, peer.candidate = key, None
        self.counters[OPENED] += 1
        return sender, payload

    def _route(self, data: bytes) -> tuple[int, int, int, int]:
        """(sender, receiver, boot id, counter) of a frame that passes the checks that need no
        key (`claimed_sender`); counted `FrameDropped` otherwise."""
        if len(data) >= 2 and data[:2] != MAGIC:
            self._drop(BAD_MAGIC)
        if len(data) >= 3 and data[2] != VERSION:
            self._drop(BAD_VERSION)
        if len(data) < OVERHEAD_BYTES:
            self._drop(SHORT)
        route: tuple[int, int, int, int] = _ROUTE.unpack_from(data, 3)
        sender, receiver = route[0], route[1]
        if sender == self.node_id:
            self._drop(SELF_SENDER)
        if sender not in self._nodes:
            self._drop(UNKNOWN_SENDER)
        if receiver != self.node_id and receiver != EVERY_NODE:
            self._drop(WRONG_RECEIVER)
        return route

    def _key_for(self, peer: _Peer, sender: int, boot_id: int) -> _RunKey:
        """The run key of (sender, boot_id): the current one, or the candidate (derived and
        kept when the boot id is new; it replaces an older candidate)."""
        if peer.key is not None and peer.key.boot_id == boot_id:
            return peer.key
        if peer.candidate is None or peer.candidate.boot_id != boot_id:
            peer.candidate = _RunKey(boot_id, self._run_aead(sender, boot_id))
        return peer.candidate

    def _run_aead(self, sender: int, boot_id: int) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(derive_run_key(self._cluster_key, sender, boot_id))

    def _drop(self, reason: str) -> NoReturn:
        self.counters[reason] += 1
        raise FrameDropped(reason)
