"""The cluster network: totem frames over UDP, sealed by `frame_crypto`, with drop counters.

What goes on the wire
---------------------
Each `Send` of the totem core becomes one UDP datagram per destination carrying one sealed frame
(layout, keys, nonce, receiver binding and replay window: see `pmxfs.runtime.frame_crypto`). A
frame names its receiver: `send(to=N)` seals it for node N, `send(to=None)` seals it once for
every node (receiver 0), so "to all" costs one encryption whatever the number of nodes.

* `udpu` (the default): every node binds one socket to its nodelist address and the cluster port.
  `send(to=None)` ("every configured node except me") loops over the nodelist with one unicast
  each, all carrying the same frame; `send(to=N)` is one unicast.
* `udp`: the same unicast socket sends the token (`send(to=N)`) and sends `send(to=None)` as ONE
  datagram to `totem.mcastaddr:port`, out of the interface that holds the node's own address
  (IP_MULTICAST_IF), TTL/hop limit 1 (the ring never leaves the segment) and with
  IP_MULTICAST_LOOP off (totem never needs its own frames back; a frame claiming our own node id is
  dropped as `self_sender`). A second socket, bound to the group address and port, joins the group
  on that same interface and receives the multicast; binding it to the group (and turning
  IP_MULTICAST_ALL off) keeps frames of other groups joined on the host away from it.

In both modes totem's tokens and commit tokens are always `send(to=N)`, so they are bound to
their one receiver; `recv` refuses a token sealed for every node (`wire.unicast_only`), so a
token can never be taken by a node it was not sent to.

Receiving (`recv`) drops every datagram that is not an authentic, fresh frame for this node from
the nodelist address of the node it claims to come from, and counts why. The checks run cheapest
first: header (magic, version, length), claimed sender in the nodelist, receiver this node or
all, source IP equal to that sender's nodelist address (the source port is not compared), then
a run older than the sender's current one (`replay`, before any key is derived), authentication,
the token-for-all check and the replay window. The address check runs before
authentication on purpose: a copy of a real frame re-sent from elsewhere must not consume the
counter in the replay window, or the genuine frame arriving a moment later would be refused as a
replay.

Nothing from the network raises out of `recv` or `send`: `send` counts `send_failed` (ENOBUFS,
EAGAIN, EHOSTUNREACH, ...) and `recv` counts and keeps waiting. Each drop reason is logged at
WARNING at most once per `LOG_INTERVAL_S` (with how many were not logged), never per packet.

`counters` (a fresh dict on each read; `pmxfs debug transport` shows it) merges the crypto
counters (`frames_sealed`, `frames_opened`, `bad_magic`, `bad_version`, `short`,
`unknown_sender`, `self_sender`, `wrong_receiver`, `auth_failed`, `replay`) with the transport's
own (`datagrams_sent`, `datagrams_received`, `address_mismatch`, `send_failed`, `recv_failed`).

Local misuse raises: `ValueError` for inconsistent arguments (a node id missing from the address
map, mixed address families, `send` to itself), `TransportError` (an OSError with a one-line
message and `errno`) when a socket cannot be bound or the group joined, `FrameTooLarge` for a
payload over `MAX_PAYLOAD_BYTES`, `trio.ClosedResourceError` after `close`. Nodes added or removed
at run time are taken with `set_addresses` (this node's own address needs a restart).

Sockets are stdlib sockets in non-blocking mode: `send` calls `sendto` directly (synchronous,
never blocks) and `recv` waits for readability with `trio.lowlevel.wait_readable`, so one fd
serves both directions without touching trio's private socket internals. `recv` must be called
by one task at a time (a second concurrent call raises `trio.BusyResourceError`).

Each trip through trio's scheduler costs about as much as opening a frame (an epoll call and a
task switch), so `recv` makes one per datagram, as trio's own sockets do: a cancellation is
checked before a datagram is taken (it is never lost), then the call either waits for
readability -- the one trip -- or, when a datagram was already queued, yields once without
being cancellable. `recv_batch` takes the datagrams queued behind the first without yielding.
That loop is `FrameReceiver`, which the knet transport shares. A datagram from the sender's
nodelist address is recognised by comparing the source text recvfrom gives with that address's
canonical text; only a different spelling of the address (an IPv6 `%scope`, say) is parsed and
compared as bytes.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

import trio

from pmxfs.core.errors import StoredStateError
from pmxfs.core.wire import unicast_only
from pmxfs.runtime.frame_crypto import (
    AUTHKEY_BYTES,
    EVERY_NODE,
    MAX_AUTHKEY_BYTES,
    MIN_AUTHKEY_BYTES,
    FrameCrypto,
    FrameDropped,
    FrameTooLarge,
)

__all__ = [
    "ADDRESS_MISMATCH",
    "DATAGRAMS_RECEIVED",
    "DATAGRAMS_SENT",
    "RECV_FAILED",
    "SEND_FAILED",
    "AuthkeyError",
    "FrameCrypto",
    "FrameDropped",
    "FrameTooLarge",
    "TransportError",
    "UdpTransport",
    "load_authkey",
]

logger = logging.getLogger("pmxfs.transport")

RECV_BUFFER_BYTES: Final = 65536
SOCKET_BUFFER_BYTES: Final = 4 << 20
LOG_INTERVAL_S: Final = 60.0
MAX_CONSECUTIVE_RECV_ERRORS: Final = 1000

ADDRESS_MISMATCH: Final = "address_mismatch"
SEND_FAILED: Final = "send_failed"
RECV_FAILED: Final = "recv_failed"
DATAGRAMS_SENT: Final = "datagrams_sent"
DATAGRAMS_RECEIVED: Final = "datagrams_received"
TRANSPORT_COUNTERS: Final = (DATAGRAMS_SENT, DATAGRAMS_RECEIVED, ADDRESS_MISMATCH, SEND_FAILED,
                             RECV_FAILED)

# Linux values the socket module does not export.
_SO_RCVBUFFORCE: Final = 33
_SO_SNDBUFFORCE: Final = 32
_IP_MULTICAST_ALL: Final = 49
_IPV6_MULTICAST_ALL: Final = 29

Mode = Literal["udpu", "udp"]
SockAddr = tuple[Any, ...]


class TransportError(OSError):
    """The transport cannot be set up (bind, resolve, join): an OSError whose str() is one line
    without the "[Errno N]" prefix; `errno` is set when the system gave one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AuthkeyError(StoredStateError):
    """The authkey file is missing, unreadable or of the wrong size; one-line message."""


def load_authkey(path: str | os.PathLike[str]) -> bytes:
    """The contents of the authkey file: 128 to 4096 bytes (`pmxfs keygen` writes 256)."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AuthkeyError(f"authkey {name} is not a regular file")
            data = file.read(MAX_AUTHKEY_BYTES + 1)
    except OSError as exc:
        hint = " (create one with `pmxfs keygen`)" if exc.errno == errno.ENOENT else ""
        raise AuthkeyError(f"cannot read authkey {name}: {exc.strerror or exc}{hint}") from None
    if len(data) > MAX_AUTHKEY_BYTES:
        raise AuthkeyError(f"authkey {name} has more than {MAX_AUTHKEY_BYTES} bytes; expected "
                           f"{MIN_AUTHKEY_BYTES} to {MAX_AUTHKEY_BYTES} ({AUTHKEY_BYTES} from "
                           "`pmxfs keygen`)")
    if len(data) < MIN_AUTHKEY_BYTES:
        raise AuthkeyError(f"authkey {name} has {len(data)} bytes; expected {MIN_AUTHKEY_BYTES} "
                           f"to {MAX_AUTHKEY_BYTES} ({AUTHKEY_BYTES} from `pmxfs keygen`)")
    if info.st_mode & 0o077:
        logger.warning("authkey %s can be read by group or others (mode %04o); it should be 0400",
                       name, stat.S_IMODE(info.st_mode))
    return data


@dataclass(frozen=True, slots=True)
class _Addr:
    family: int
    sockaddr: SockAddr
    packed: bytes  # the IP alone (no port, no scope): what source addresses are compared with
    host: str  # `packed` as text, as recvfrom names a source without a scope (the fast check)


async def _resolve(host: str, port: int, family: int) -> _Addr:
    """An IP literal or host name as a socket address of `family` (0: whatever it resolves to)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise TransportError(f"cannot resolve {host}: {exc}") from None
    for fam, _type, _proto, _canon, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6):
            packed = _packed(fam, str(sockaddr[0]))
            return _Addr(fam, tuple(sockaddr), packed, socket.inet_ntop(fam, packed))
    wanted = {int(socket.AF_INET): "an IPv4", int(socket.AF_INET6): "an IPv6"}.get(family, "an IP")
    raise TransportError(f"{host} has no {wanted} address")


def _literal_family(hosts: Iterable[str]) -> int:
    """The family of the first IP literal among `hosts` (0 if all are names): a node that is
    named resolves in the family the nodelist uses (the config allows only one)."""
    for host in hosts:
        try:
            version = ipaddress.ip_address(host.split("%", 1)[0]).version
        except ValueError:
            continue
        return socket.AF_INET6 if version == 6 else socket.AF_INET
    return 0


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host.split("%", 1)[0])


def _ipv6_ifindex(packed: bytes) -> int:
    """Index of the interface holding an IPv6 address (Linux: /proc/net/if_inet6)."""
    try:
        with open("/proc/net/if_inet6") as table:
            lines = table.read().splitlines()
    except OSError as exc:
        raise TransportError(f"cannot list IPv6 interfaces: {exc.strerror or exc}") from None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == packed.hex():
            return int(fields[1], 16)
    raise TransportError(f"{socket.inet_ntop(socket.AF_INET6, packed)} is not an address of "
                         "this host", errno.EADDRNOTAVAIL)


def _set_buffer(sock: socket.socket, force: int, plain: int) -> None:
    """Ask for SOCKET_BUFFER_BYTES; beyond net.core.[rw]mem_max only root's *FORCE works."""
    for option in ((force, plain) if sys.platform == "linux" else (plain,)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            return
        except OSError:
            continue


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF)
        _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, sockaddr: SockAddr, what: str) -> None:
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        raise TransportError(f"cannot bind {what} {_show(sockaddr)}: {exc.strerror or exc}",
                             exc.errno) from None


def _show(sockaddr: SockAddr) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _setup_multicast(tx: socket.socket, rx: socket.socket, own: _Addr, group: _Addr) -> SockAddr:
    """Point `tx`'s multicast at own's interface (TTL 1, no loop), bind `rx` to the group and join
    it on that interface. Returns the address to multicast to."""
    try:
        if own.family == socket.AF_INET:
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, own.packed)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(rx, group.sockaddr, "multicast group")
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group.packed + own.packed)
            if sys.platform == "linux":
                rx.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            return group.sockaddr
        ifindex = own.sockaddr[3] or _ipv6_ifindex(own.packed)
        index = struct.pack("@I", ifindex)
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        # Interface- and link-local-scope groups (ffx1::, ffx2::) only exist with an interface.
        scope = ifindex if group.packed[1] & 0x0F <= 2 else 0
        target = (group.sockaddr[0].split("%", 1)[0], group.sockaddr[1], 0, scope)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(rx, target, "multicast group")
        rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group.packed + index)
        if sys.platform == "linux":
            rx.setsockopt(socket.IPPROTO_IPV6, _IPV6_MULTICAST_ALL, 0)
        return target
    except OSError as exc:
        raise TransportError(f"cannot set up multicast group {_show(group.sockaddr)} on "
                             f"{_show(own.sockaddr)}: {exc.strerror or exc}", exc.errno) from None


class _RateLimitedLog:
    """At most one WARNING per reason per LOG_INTERVAL_S, saying how many were not logged."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def note(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            return
        self._last[reason] = now
        skipped = self._skipped.pop(reason, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        logger.warning("%s: %s%s", reason, detail, more)


Datagram = TypeVar("Datagram")


class FrameReceiver(Generic[Datagram]):
    """`recv` and `recv_batch` over a transport's `_poll`, `_accept`, `_wait` and `_tick`, for
    both UDP transports (module header, "Receiving"): a transport supplies how to take one
    datagram (`_poll`: it, an OSError, or None when nothing is queued), how to judge it
    (`_accept`: the frame, or None when it was dropped and counted), how to wait (`_wait`) and
    what to do before each pass (`_tick`: knet sends its heartbeats there)."""

    _closed: bool
    _receiving: bool

    def _poll(self) -> Datagram | OSError | None:
        raise NotImplementedError

    def _accept(self, datagram: Datagram) -> tuple[int, bytes] | None:
        raise NotImplementedError

    async def _wait(self) -> None:
        raise NotImplementedError

    def _tick(self) -> None:
        """Before each pass of `recv` (nothing by default)."""

    async def recv(self) -> tuple[int, bytes]:
        """The next authentic, fresh frame: (sender node id, payload). Everything else is
        dropped, counted and waited past. Raises `trio.ClosedResourceError` once closed."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this transport")
        self._receiving = True
        try:
            errors = 0
            waited = False  # this pass follows a wait, which was a checkpoint already
            while True:  # each pass takes one datagram or waits, and yields to trio once
                if not waited:
                    await trio.lowlevel.checkpoint_if_cancelled()
                if self._closed:
                    raise trio.ClosedResourceError("the transport is closed")
                self._tick()
                got = self._poll()
                if got is None:
                    await self._wait()
                    waited = True
                    continue
                if not waited:  # a datagram taken must not be lost to a cancellation
                    await trio.lowlevel.cancel_shielded_checkpoint()
                waited = False
                if isinstance(got, OSError):
                    errors += 1
                    if errors >= MAX_CONSECUTIVE_RECV_ERRORS:
                        raise TransportError(f"receiving keeps failing: {got}", got.errno)
                    continue
                errors = 0
                frame = self._accept(got)
                if frame is not None:
                    return frame
        finally:
            self._receiving = False

    async def recv_batch(self, limit: int = 64) -> list[tuple[int, bytes]]:
        """At least one frame (waiting for it as `recv` does), plus those already queued in the
        socket buffers, up to `limit`: under load the caller handles them in one go."""
        batch = [await self.recv()]
        while len(batch) < limit and not self._closed:
            got = self._poll()
            if got is None or isinstance(got, OSError):
                break
            frame = self._accept(got)
            if frame is not None:
                batch.append(frame)
        return batch


class UdpTransport(FrameReceiver[tuple[bytes, SockAddr]]):
    """One node's end of the cluster network; create with `await UdpTransport.open(...)`."""

    def __init__(self, *, node_id: int, mode: Mode, port: int, family: int,
                 peers: dict[int, _Addr], crypto: FrameCrypto, tx: socket.socket,
                 mcast_rx: socket.socket | None, mcast_to: SockAddr | None) -> None:
        self.node_id = node_id
        self.mode: Mode = mode
        self.port = port
        self.crypto = crypto
        self._family = family
        self._peers = peers
        self._others = [addr for nid, addr in sorted(peers.items()) if nid != node_id]
        self._tx = tx
        self._rx = [tx] if mcast_rx is None else [tx, mcast_rx]
        self._next_rx = 0
        self._mcast_to = mcast_to
        self._closed = False
        self._receiving = False
        self._log = _RateLimitedLog()
        self._counters: dict[str, int] = dict.fromkeys(TRANSPORT_COUNTERS, 0)

    # ------------------------------------------------------------------ setup

    @classmethod
    async def open(cls, *, node_id: int, addresses: Mapping[int, str], port: int,
                   mode: Mode | str, mcastaddr: str | None, crypto: FrameCrypto) -> UdpTransport:
        """Bind to addresses[node_id]:port (for `udp` also join mcastaddr on that interface).

        `addresses` maps every configured node id (this one included) to its nodelist address,
        an IP literal or a host name resolved once here. The crypto's accepted senders are set to
        the same node ids. Raises `TransportError` if a socket cannot be set up, `ValueError` on
        inconsistent arguments.
        """
        if mode not in ("udpu", "udp"):  # a plain str is accepted: ClusterConfig.transport is one
            raise ValueError(f"unknown transport {mode!r} (udpu or udp)")
        kind: Mode = "udp" if mode == "udp" else "udpu"
        if node_id not in addresses:
            raise ValueError(f"node {node_id} is not in the address map")
        if crypto.node_id != node_id:
            raise ValueError(f"the crypto belongs to node {crypto.node_id}, not {node_id}")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range (1-65535)")
        if mode == "udp" and not mcastaddr:
            raise ValueError("transport udp needs a multicast address")
        own = await _resolve(addresses[node_id], port, _literal_family(addresses.values()))
        peers = await cls._resolve_peers(addresses, port, own)
        group: _Addr | None = None
        if mode == "udp":
            assert mcastaddr is not None
            group = await _resolve(mcastaddr, port, own.family)
            if not ipaddress.ip_address(socket.inet_ntop(group.family, group.packed)).is_multicast:
                raise ValueError(f"{mcastaddr} is not a multicast address")
        tx = _udp_socket(own.family)
        mcast_rx: socket.socket | None = None
        try:
            _bind(tx, own.sockaddr, "node address")
            mcast_to: SockAddr | None = None
            if group is not None:
                mcast_rx = _udp_socket(own.family)
                mcast_to = _setup_multicast(tx, mcast_rx, own, group)
        except BaseException:
            tx.close()
            if mcast_rx is not None:
                mcast_rx.close()
            raise
        crypto.set_nodes(peers)
        logger.debug("node %d: %s transport on %s", node_id, mode, _show(own.sockaddr))
        return cls(node_id=node_id, mode=kind, port=port, family=own.family, peers=peers,
                   crypto=crypto, tx=tx, mcast_rx=mcast_rx, mcast_to=mcast_to)

    @staticmethod
    async def _resolve_peers(addresses: Mapping[int, str], port: int,
                             own: _Addr) -> dict[int, _Addr]:
        peers: dict[int, _Addr] = {}
        own_version: int = 6 if own.family == socket.AF_INET6 else 4
        for nid, host in sorted(addresses.items()):
            try:
                version: int = ipaddress.ip_address(host.split("%", 1)[0]).version
            except ValueError:  # a host name: resolved in own's family below
                version = own_version
            if version != own_version:
                raise ValueError(f"node {nid}'s address {host} is IPv{version} but this node's "
                                 f"address is IPv{own_version}")
            peers[nid] = await _resolve(host, port, own.family)
        return peers

    async def set_addresses(self, addresses: Mapping[int, str]) -> None:
        """Take a run-time nodelist change (nodes added or removed). This node's own address
        cannot change (that needs a restart): `ValueError`."""
        if self.node_id not in addresses:
            raise ValueError(f"node {self.node_id} is not in the address map")
        own = self._peers[self.node_id]
        peers = await self._resolve_peers(addresses, self.port, own)
        if peers[self.node_id].packed != own.packed:
            raise ValueError("this node's own address cannot change at run time")
        self._peers = peers
        self._others = [addr for nid, addr in sorted(peers.items()) if nid != self.node_id]
        self.crypto.set_nodes(peers)

    @property
    def local_address(self) -> SockAddr:
        return self._peers[self.node_id].sockaddr

    @property
    def counters(self) -> dict[str, int]:
        """Crypto and transport counters merged (a new dict each time)."""
        return {**self.crypto.counters, **self._counters}

    # ------------------------------------------------------------------ sending

    def send(self, to: int | None, payload: bytes) -> None:
        """Send a frame to node `to`, or to every configured node but this one when `to` is None.

        Never blocks and never raises for network errors (counted as `send_failed`). Raises
        `trio.ClosedResourceError` after `close`, `ValueError` for `to` == this node and
        `FrameTooLarge` for a payload beyond `MAX_PAYLOAD_BYTES`. A `to` that is not configured
        (a nodelist change racing the ring) is counted as `send_failed`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the transport is closed")
        if to is None:
            if self._mcast_to is not None:
                self._sendto(self.crypto.seal(payload, EVERY_NODE), self._mcast_to)
            elif self._others:
                frame = self.crypto.seal(payload, EVERY_NODE)
                for addr in self._others:
                    self._sendto(frame, addr.sockaddr)
            return
        if to == self.node_id:
            raise ValueError("a node does not send frames to itself")
        peer = self._peers.get(to)
        if peer is None:
            self._counters[SEND_FAILED] += 1
            self._log.note(SEND_FAILED, f"node {to} is not in the nodelist")
            return
        self._sendto(self.crypto.seal(payload, to), peer.sockaddr)

    def _sendto(self, frame: bytes, sockaddr: SockAddr) -> None:
        try:
            self._tx.sendto(frame, sockaddr)
        except OSError as exc:  # BlockingIOError (EAGAIN), ENOBUFS, EHOSTUNREACH, EPERM, ...
            self._counters[SEND_FAILED] += 1
            self._log.note(SEND_FAILED, f"to {_show(sockaddr)}: {exc.strerror or exc}")
            return
        self._counters[DATAGRAMS_SENT] += 1

    # ------------------------------------------------------------------ receiving

    def _poll(self) -> tuple[bytes, SockAddr] | OSError | None:
        """One datagram from whichever socket has one (round robin), an error, or None."""
        count = len(self._rx)
        for i in range(count):
            index = (self._next_rx + i) % count
            try:
                data, src = self._rx[index].recvfrom(RECV_BUFFER_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._counters[RECV_FAILED] += 1
                self._log.note(RECV_FAILED, exc.strerror or str(exc))
                return exc
            self._next_rx = (index + 1) % count
            return data, tuple(src)
        return None

    def _accept(self, datagram: tuple[bytes, SockAddr]) -> tuple[int, bytes] | None:
        data, src = datagram
        self._counters[DATAGRAMS_RECEIVED] += 1
        try:
            sender = self.crypto.claimed_sender(data)
            if not self._from_address_of(sender, src):
                self._counters[ADDRESS_MISMATCH] += 1
                self._log.note(ADDRESS_MISMATCH, f"a frame claiming node {sender} came from "
                                                 f"{_show(src)}")
                return None
            return self.crypto.open(data, unicast_only)
        except FrameDropped as exc:
            self._log.note(exc.reason, f"frame from {_show(src)} dropped")
            return None

    def _from_address_of(self, sender: int, src: SockAddr) -> bool:
        peer = self._peers.get(sender)
        if peer is None:
            return False
        if src[0] == peer.host:  # the usual case, without parsing the text (inet_pton)
            return True
        try:  # another spelling of the same address, e.g. with a %scope suffix
            return _packed(self._family, str(src[0])) == peer.packed
        except (OSError, ValueError):
            return False

    async def _wait(self) -> None:
        if len(self._rx) == 1:
            await trio.lowlevel.wait_readable(self._rx[0])
            return
        async with trio.open_nursery() as nursery:
            for sock in self._rx:
                nursery.start_soon(self._wait_one, sock, nursery.cancel_scope)

    @staticmethod
    async def _wait_one(sock: socket.socket, done: trio.CancelScope) -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # recv sees `_closed` next pass
            await trio.lowlevel.wait_readable(sock)
        done.cancel()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Close the sockets; a task blocked in `recv` gets `trio.ClosedResourceError`."""
        if self._closed:
            return
        self._closed = True
        for sock in self._rx:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def __enter__(self) -> UdpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
