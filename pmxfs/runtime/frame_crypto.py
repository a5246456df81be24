"""Authenticated, encrypted totem frames with replay protection -- pure: no sockets, no files.

Frame layout
------------
Every datagram pmxfs sends on the cluster network is one frame:

    offset  size  field
    0       2     magic b"PX"           tells pmxfs traffic from anything else on the port
    2       1     format version (1)    lets a later format be refused cleanly
    3       4     sender node id        big-endian uint32: whose key stream and window to use
    7       8     boot id               big-endian uint64, greater for every new run of the sender
    15      8     counter               big-endian uint64, 0 for the sender's first frame, +1 each
    23      n     ciphertext            ChaCha20-Poly1305 encryption of the payload (a wire frame)
    23+n    16    tag                   Poly1305 tag over the header (as AAD) and the ciphertext

The 23-byte header is sent in clear because the receiver needs it before it can decrypt: it
names the sender (so the frame can be checked against the sender's nodelist address and replay
window) and carries the inputs of the nonce. It is authenticated as associated data, so a frame
whose header was changed fails authentication like one whose ciphertext was changed.

Key: HKDF-SHA256 over the authkey file contents, salt `HKDF_SALT`, info = "cluster " + cluster
name. Every node of a cluster derives the same 32-byte key; a node of another cluster that shares
the authkey file (a copied key) derives a different one, so their traffic never mixes.

Nonce: the first 12 bytes of SHA-256(sender id || boot id || counter), i.e. of header bytes
3..23. All nodes share one key, so the nonce must never repeat across nodes nor across restarts of
one node: the sender id separates nodes, the boot id separates a node's runs (its counter
starts at 0 again after a restart), and the counter separates the frames of one run. The 20
bytes of input do not fit the 12-byte nonce, hence the hash: a collision needs two
distinct (sender, boot, counter) triples whose hashes agree in 96 bits, which by the birthday bound
takes around 2**48 frames under one key -- far beyond the life of a cluster key. The nonce is
derived rather than sent, so it costs no bytes on the wire, and the receiver recomputes it from the
authenticated header fields, so a sender cannot be made to reuse one by anything a peer sends.

Replay protection
-----------------
Boot ids are ordered: every run of a node uses a boot id greater than all of its earlier runs
(the node persists its last one and takes max(last + 1, wall clock in µs); see
`pmxfs.runtime.boot_id`). Per sender the receiver keeps the current boot id, the highest counter
seen under it and a 1024-bit bitmap of the counters below it (`REPLAY_WINDOW`). An authentic
frame (the window is only touched after authentication succeeded) is refused as `replay` when its
boot id is older than the current one, or its counter was already seen or is 1024 or more below
the highest; reordering inside the window is accepted. A frame with a newer boot id starts a new
window at once, so a restarted node is accepted without waiting, and its earlier runs can never be
replayed to this receiver again.

Residual limits (documented, accepted):
* A receiver that itself restarted knows no boot ids yet: until the sender's current run reaches it,
  one frame per window position of one earlier run can be replayed to it once. The current run's
  first frame moves it on (newer boot id), so this cannot lock a sender out, and totem drops frames
  of old rings, so such a frame is never delivered as a message again.
* Frames older than the window are refused even if they were never seen: a sender's frames arrive
  in a burst of at most one token visit, far below 1024 frames, so this only costs a late duplicate.

Drops are counted by reason in `FrameCrypto.counters` (see `DROP_REASONS`); `open` raises
`FrameDropped(reason)` and never anything else for any input bytes.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC: Final = b"PX"
VERSION: Final = 1
BOOT_ID_BYTES: Final = 8
HEADER: Final = struct.Struct(">2sBI8sQ")  # magic, version, sender, boot id, counter
HEADER_BYTES: Final = HEADER.size  # 23
TAG_BYTES: Final = 16
OVERHEAD_BYTES: Final = HEADER_BYTES + TAG_BYTES  # 39
MAX_DATAGRAM_BYTES: Final = 65507  # largest IPv4 UDP payload
MAX_PAYLOAD_BYTES: Final = MAX_DATAGRAM_BYTES - OVERHEAD_BYTES
MAX_NODE_ID: Final = 0xFFFFFFFF
MAX_COUNTER: Final = 0xFFFFFFFFFFFFFFFF

REPLAY_WINDOW: Final = 1024
_WINDOW_MASK: Final = (1 << REPLAY_WINDOW) - 1

AUTHKEY_BYTES: Final = 256  # what `pmxfs keygen` writes
MIN_AUTHKEY_BYTES: Final = 128
MAX_AUTHKEY_BYTES: Final = 4096
HKDF_SALT: Final = b"pmxfs totem frame key v1"

# Why `open` refused a frame; each is a key of `FrameCrypto.counters`.
BAD_MAGIC: Final = "bad_magic"  # not a pmxfs frame
BAD_VERSION: Final = "bad_version"  # a pmxfs frame of another format version
SHORT: Final = "short"  # shorter than header + tag
UNKNOWN_SENDER: Final = "unknown_sender"  # the claimed sender is not in the nodelist
SELF_SENDER: Final = "self_sender"  # claims to come from this node: a reflection or a duplicate id
AUTH_FAILED: Final = "auth_failed"  # wrong key, other cluster, or changed in transit
REPLAY: Final = "replay"  # authentic but seen before, too old, or of an earlier run
DROP_REASONS: Final = (BAD_MAGIC, BAD_VERSION, SHORT, UNKNOWN_SENDER, SELF_SENDER, AUTH_FAILED,
                       REPLAY)
SEALED: Final = "frames_sealed"
OPENED: Final = "frames_opened"


class FrameDropped(Exception):
    """A received frame was refused; `reason` is one of `DROP_REASONS` (already counted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameTooLarge(ValueError):
    """A local caller tried to seal more than `MAX_PAYLOAD_BYTES`."""


def derive_key(authkey: bytes, cluster_name: str) -> bytes:
    """The 32-byte frame key of a cluster: HKDF-SHA256(authkey, salt, "cluster " + name)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT,
                info=b"cluster " + cluster_name.encode("utf-8"))
    return hkdf.derive(authkey)


def _nonce(header: bytes) -> bytes:
    """12-byte nonce from header bytes 3..23 (sender, boot id, counter); see the module header."""
    return hashlib.sha256(header[3:HEADER_BYTES]).digest()[:12]


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


class FrameCrypto:
    """Seals outgoing frames and opens incoming ones for one node of one cluster.

    `nodes` are the node ids whose frames are accepted (the nodelist; this node's own id is
    refused as a sender: we never receive our own frames). `boot_id` must be greater than the
    boot id of every earlier run of this node (`pmxfs.runtime.boot_id.next_boot_id`); without
    one, the wall clock in microseconds is used. `counters` holds `frames_sealed`,
    `frames_opened` and one entry per drop reason.
    """

    def __init__(self, authkey: bytes, cluster_name: str, node_id: int, nodes: Iterable[int], *,
                 boot_id: bytes | None = None) -> None:
        if not MIN_AUTHKEY_BYTES <= len(authkey) <= MAX_AUTHKEY_BYTES:
            raise ValueError(f"authkey has {len(authkey)} bytes; it must have "
                             f"{MIN_AUTHKEY_BYTES} to {MAX_AUTHKEY_BYTES}")
        if not 0 < node_id <= MAX_NODE_ID:
            raise ValueError(f"node id {node_id} is out of range (1-{MAX_NODE_ID})")
        if boot_id is None:
            boot_id = time.time_ns().__floordiv__(1000).to_bytes(BOOT_ID_BYTES, "big")
        if len(boot_id) != BOOT_ID_BYTES:
            raise ValueError(f"boot id must have {BOOT_ID_BYTES} bytes, not {len(boot_id)}")
        self.node_id = node_id
        self.boot_id = boot_id
        self.cluster_name = cluster_name
        self._aead = ChaCha20Poly1305(derive_key(authkey, cluster_name))
        self._nodes: frozenset[int] = frozenset()
        self.set_nodes(nodes)
        self._counter = 0
        self._windows: dict[int, _Window] = {}
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

    def seal(self, payload: bytes) -> bytes:
        """One frame carrying `payload`, under the next counter of this run."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise FrameTooLarge(f"frame payload of {len(payload)} bytes exceeds "
                                f"{MAX_PAYLOAD_BYTES}")
        counter = self._counter
        if counter > MAX_COUNTER:  # 2**64 frames: unreachable, but never reuse a nonce
            raise RuntimeError("frame counter exhausted; restart the node")
        self._counter = counter + 1
        header = HEADER.pack(MAGIC, VERSION, self.node_id, self.boot_id, counter)
        self.counters[SEALED] += 1
        return header + self._aead.encrypt(_nonce(header), payload, header)

    def claimed_sender(self, data: bytes) -> int:
        """The sender a frame claims, after the checks that need no key (magic, version, length,
        membership). Raises `FrameDropped` (counted) otherwise. The claim is not authenticated
        yet: the transport uses it to compare the source address before `open`."""
        if len(data) >= 2 and data[:2] != MAGIC:
            self._drop(BAD_MAGIC)
        if len(data) >= 3 and data[2] != VERSION:
            self._drop(BAD_VERSION)
        if len(data) < OVERHEAD_BYTES:
            self._drop(SHORT)
        sender: int = int.from_bytes(data[3:7], "big")
        if sender == self.node_id:
            self._drop(SELF_SENDER)
        if sender not in self._nodes:
            self._drop(UNKNOWN_SENDER)
        return sender

    def open(self, data: bytes) -> tuple[int, bytes]:
        """(sender node id, payload) of an authentic, fresh frame; `FrameDropped` otherwise."""
        sender = self.claimed_sender(data)
        header = data[:HEADER_BYTES]
        boot_id = int.from_bytes(header[7:15], "big")
        counter: int = int.from_bytes(header[15:23], "big")
        try:
            payload = self._aead.decrypt(_nonce(header), data[HEADER_BYTES:], header)
        except InvalidTag:
            self._drop(AUTH_FAILED)
        # Only an authentic frame may touch the window: a forged one must not move it.
        window = self._windows.get(sender)
        if window is None:
            self._windows[sender] = _Window(boot_id, counter, 1)
        elif window.check(boot_id, counter):
            window.accept(boot_id, counter)
        else:
            self._drop(REPLAY)
        self.counters[OPENED] += 1
        return sender, payload

    def _drop(self, reason: str) -> NoReturn:
        self.counters[reason] += 1
        raise FrameDropped(reason)
