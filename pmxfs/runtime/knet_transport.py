"""The knet transport: totem frames over up to 8 redundant links, each its own UDP path.

corosync 3's knet, as pmxfs runs it. Every link (`ring0_addr` ... `ring7_addr`) is one UDP
socket bound to this node's address on that link and the link's port; a peer is reached on a
link at its own address of that link. Heartbeats per peer and link (pings answered by pongs)
tell which links work; `pmxfs.core.link_health.LinkHealth` (pure) keeps that state and says on
which links a frame to a peer goes:
* `passive` (default): on the highest-priority connected link; when it dies, on the next one,
  within the link's ping timeout and without a membership change (totem never notices);
* `active`: on every connected link; the copies after the first are dropped here.
When no link to a peer is connected, frames go on every link (so totem, not the transport,
decides that the peer is gone).

What goes on the wire
---------------------
Each datagram is one frame sealed by `frame_crypto` exactly as for udpu (receiver binding, run
keys, replay window). The sealed payload starts with one kind byte: `DATA` (a totem frame
follows), `PING` or `PONG` (link number, 1 byte, and sequence number, 8 bytes, big-endian).
Pings and pongs are thus encrypted and authenticated like totem frames and sealed for one peer:
a forged, foreign or replayed pong is refused by the crypto and cannot keep a dead link up, and
one whose link number is not the link it arrived on is dropped (`link_mismatch`).

Receiving checks, in order: the frame's claimed sender, then that the source IP is the sender's
address ON THE LINK the datagram arrived on (`address_mismatch` otherwise, before any crypto, as
in `transport`), then whether it is a copy of a totem frame already accepted on another link
(`duplicate_frames`: active mode sends one sealed frame on several links; the crypto's replay
window would refuse the second copy as a replay, which it is not), then authentication and
freshness. Nothing from the network raises; drops are counted and logged at most once per
minute per reason.

Heartbeats run inside `recv`: the receiving task waits for a datagram on any link (one epoll
descriptor holding every link's socket, so one wait serves all links) or for the link health's
next deadline, whichever comes first, then sends the pings that are due and notes timeouts. The
core loop always has a task in `recv`, so no extra task is needed and the interface stays that
of `UdpTransport` (`send`, `recv`, `recv_batch`, `counters`, `close`). A link going up or down
is told to the listener set with `set_link_listener` (the node logs it in the daemon log and the
cluster log) once per change.

`set_links` takes a run-time change of the links (added, removed, other addresses, ports,
priorities or timers): sockets of changed links are bound anew before anything is swapped, so a
failure leaves the transport as it was. `links_status` is what `pmxfs links` shows.
`block_link` is fault injection (tests): a blocked link neither sends nor takes datagrams, as if
its cable were pulled.

Counters: those of `UdpTransport` plus `duplicate_frames`, `link_mismatch`, `pings_sent`,
`pongs_sent`, `pongs_received`, `bad_payload`, and per link `link<N>_sent` /
`link<N>_received` (totem frames).

Limits (documented, not bugs): heartbeats run only while a task is in `recv`, so a core loop
that stalls longer than the ping timeout marks links down until it resumes (traffic then goes on
every link; nothing is lost). All links share the sender's one replay window: a frame overtaken
by more than the window on a slow link is refused as a replay, and an active-mode copy that
arrives after `RECENT_FRAMES` newer frames counts as a replay rather than a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from pmxfs.core import conf
from pmxfs.core.link_health import LinkConfig, LinkEvent, LinkHealth, LinkMode
from pmxfs.core.wire import unicast_only
from pmxfs.runtime.frame_crypto import EVERY_NODE, TAG_BYTES, FrameCrypto, FrameDropped
from pmxfs.runtime.transport import (
    ADDRESS_MISMATCH,
    DATAGRAMS_RECEIVED,
    DATAGRAMS_SENT,
    RECV_BUFFER_BYTES,
    RECV_FAILED,
    SEND_FAILED,
    TRANSPORT_COUNTERS,
    FrameReceiver,
    SockAddr,
    TransportError,
    _Addr,
    _bind,
    _literal_family,
    _packed,
    _RateLimitedLog,
    _resolve,
    _show,
    _udp_socket,
)

__all__ = ["DUPLICATE_FRAMES", "KnetTransport", "LinkMode", "LinkSpec", "LinkStatus",
           "link_mode", "link_specs"]

logger = logging.getLogger("pmxfs.transport")

MAX_LINKS: Final = 8
DATA: Final = b"\x00"
PING: Final = b"\x01"
PONG: Final = b"\x02"
_BEAT: Final = struct.Struct(">BQ")  # link number, sequence number
RECENT_FRAMES: Final = 4096  # totem frames remembered to tell a copy from another link

DUPLICATE_FRAMES: Final = "duplicate_frames"
LINK_MISMATCH: Final = "link_mismatch"
PINGS_SENT: Final = "pings_sent"
PONGS_SENT: Final = "pongs_sent"
PONGS_RECEIVED: Final = "pongs_received"
BAD_PAYLOAD: Final = "bad_payload"  # authentic, but neither a totem frame nor a heartbeat
KNET_COUNTERS: Final = (*TRANSPORT_COUNTERS, DUPLICATE_FRAMES, LINK_MISMATCH, PINGS_SENT,
                        PONGS_SENT, PONGS_RECEIVED, BAD_PAYLOAD)
MAX_NODE_ID: Final = 2**32 - 1

LinkListener = Callable[[LinkEvent], None]


@dataclass(frozen=True)
class LinkSpec:
    """One link as configured: its number, port, heartbeat settings and every node's address
    on it (node id -> IP literal or host name; this node's included)."""

    number: int
    port: int
    priority: int
    ping_interval_ms: int
    ping_timeout_ms: int
    pong_count: int
    addresses: Mapping[int, str]
    families: tuple[int, ...] = (0,)  # address families to try for host names, in order

    def health(self) -> LinkConfig:
        return LinkConfig(number=self.number, priority=self.priority,
                          ping_interval_ms=self.ping_interval_ms,
                          ping_timeout_ms=self.ping_timeout_ms, pong_count=self.pong_count)


@dataclass(frozen=True)
class LinkStatus:
    """One peer's link as `pmxfs links` shows it."""

    peer: int
    link: int
    address: str  # the peer's address on the link
    connected: bool
    active: bool  # carries traffic to the peer now


def link_specs(config: conf.ClusterConfig) -> tuple[LinkSpec, ...]:
    """The links of a (validated) knet config, with every node's address on each."""
    specs = []
    families = tuple(socket.AF_INET6 if v == 6 else socket.AF_INET
                     for v in conf.ip_versions(config))
    for s in conf.link_settings(config):
        addresses = {}
        for node in config.nodes:
            addr = node.addr(s.number)
            if node.nodeid is not None and addr is not None:
                addresses[node.nodeid] = addr
        specs.append(LinkSpec(number=s.number, port=s.port, priority=s.priority,
                              ping_interval_ms=s.ping_interval_ms,
                              ping_timeout_ms=s.ping_timeout_ms, pong_count=s.pong_count,
                              addresses=addresses, families=families))
    return tuple(specs)


def link_mode(config: conf.ClusterConfig) -> LinkMode:
    """`totem.link_mode`: `active` (and `rr`, which pmxfs runs as active) or `passive`."""
    return conf.effective_link_mode(config)


@dataclass
class _Link:
    spec: LinkSpec
    sock: socket.socket
    own: _Addr
    peers: dict[int, _Addr]  # every node but this one
    sent: str  # counter names
    received: str

    def from_address_of(self, sender: int, src: SockAddr) -> bool:
        peer = self.peers.get(sender)
        if peer is None:
            return False
        if src[0] == peer.host:
            return True
        try:  # another spelling of the same address, e.g. with a %scope suffix
            return _packed(peer.family, str(src[0])) == peer.packed
        except (OSError, ValueError):
            return False


def _check_specs(node_id: int, specs: Sequence[LinkSpec]) -> frozenset[int]:
    """The node ids of `specs` (every link must list the same ones, this node among them)."""
    if not 0 < len(specs) <= MAX_LINKS:
        raise ValueError(f"knet needs 1 to {MAX_LINKS} links, not {len(specs)}")
    numbers = [s.number for s in specs]
    if len(set(numbers)) != len(numbers) or not all(0 <= n < MAX_LINKS for n in numbers):
        raise ValueError(f"link numbers must be distinct and 0-{MAX_LINKS - 1}: {numbers}")
    nodes = frozenset(specs[0].addresses)
    for s in specs:
        if frozenset(s.addresses) != nodes:
            raise ValueError(f"link {s.number} does not list the same nodes as link "
                             f"{specs[0].number}")
        if not 0 < s.port < 65536:
            raise ValueError(f"link {s.number}: port {s.port} is out of range (1-65535)")
    if node_id not in nodes:
        raise ValueError(f"node {node_id} is not in the address map")
    bad = sorted(n for n in nodes if not 1 <= n <= MAX_NODE_ID)
    if bad:
        raise ValueError(f"node id(s) {bad} out of range (1-{MAX_NODE_ID})")
    return nodes


async def _resolve_link(node_id: int, spec: LinkSpec) -> tuple[_Addr, dict[int, _Addr]]:
    """This node's and the peers' addresses on one link, in one address family; host names are
    resolved here (a one-line `TransportError` when one cannot be)."""
    literal = _literal_family(spec.addresses.values())
    try:
        own = await _resolve_first(spec.addresses[node_id], spec.port,
                                   (literal,) if literal else spec.families)
        peers = {}
        for nid, host in sorted(spec.addresses.items()):
            if nid != node_id:
                peers[nid] = await _resolve(host, spec.port, own.family)
    except TransportError as exc:
        raise TransportError(f"link {spec.number}: {exc}", exc.errno) from None
    return own, peers


async def _resolve_first(host: str, port: int, families: tuple[int, ...]) -> _Addr:
    """`host` in the first of `families` (totem.ip_version's order) it resolves in."""
    error: TransportError | None = None
    for family in families:
        try:
            return await _resolve(host, port, family)
        except TransportError as exc:
            error = error or exc
    assert error is not None
    raise error


class KnetTransport(FrameReceiver[tuple["_Link", bytes, SockAddr]]):
    """One node's end of a knet cluster network; create with `await KnetTransport.open(...)`."""

    def __init__(self, *, node_id: int, crypto: FrameCrypto, links: dict[int, _Link],
                 health: LinkHealth, mode: LinkMode) -> None:
        self.node_id = node_id
        self.crypto = crypto
        self.mode: LinkMode = mode
        self._links = links
        self._health = health
        self._others = sorted(next(iter(links.values())).peers)
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Link] = {}
        for link in links.values():
            self._watch(link)
        self._order = sorted(links)
        self._next_rx = 0
        self._closed = False
        self._receiving = False
        self._blocked: set[int] = set()
        self._recent: dict[bytes, tuple[int, bytes]] = {}
        self._listener: LinkListener | None = None
        self._log = _RateLimitedLog()
        self._counters: dict[str, int] = dict.fromkeys(KNET_COUNTERS, 0)
        for number in links:
            self._link_counters(number)
        self._epoch = trio.current_time()
        self._due: int | None = health.next_deadline()
        self._waiting: trio.CancelScope | None = None  # the receiving task's wait, if any
        self._routes: dict[int, tuple[int, ...]] = {}
        self._find_routes()

    # ------------------------------------------------------------------ setup

    @classmethod
    async def open(cls, *, node_id: int, links: Sequence[LinkSpec], mode: LinkMode,
                   crypto: FrameCrypto) -> KnetTransport:
        """Bind one socket per link to this node's address and the link's port.

        The crypto's accepted senders are set to the links' node ids. Raises `TransportError`
        (one line) when an address cannot be resolved or a socket bound, `ValueError` on
        inconsistent arguments.
        """
        nodes = _check_specs(node_id, links)
        if crypto.node_id != node_id:
            raise ValueError(f"the crypto belongs to node {crypto.node_id}, not {node_id}")
        opened = await _open_links(node_id, links, {})
        crypto.set_nodes(nodes)
        now = 0
        health = LinkHealth(now, node_id, sorted(nodes - {node_id}),
                            [s.health() for s in links], mode)
        for link in opened.values():
            logger.debug("node %d: knet link %d on %s", node_id, link.spec.number,
                         _show(link.own.sockaddr))
        return cls(node_id=node_id, crypto=crypto, links=opened, health=health, mode=mode)

    async def set_links(self, links: Sequence[LinkSpec], mode: LinkMode) -> None:
        """Take a run-time change of the links (module header). On an error (`TransportError`,
        `ValueError`) nothing changed."""
        if self._closed:
            raise trio.ClosedResourceError("the transport is closed")
        nodes = _check_specs(self.node_id, links)
        new = await _open_links(self.node_id, links, self._links)
        if self._closed:  # closed while resolving
            _close_new(new, self._links)
            raise trio.ClosedResourceError("the transport is closed")
        old, self._links = self._links, new
        for number, link in old.items():
            if new.get(number) is None or new[number].sock is not link.sock:
                self._unwatch(link)
                trio.lowlevel.notify_closing(link.sock)
                link.sock.close()
        for link in new.values():
            if link.sock.fileno() not in self._by_fd:
                self._watch(link)
            self._link_counters(link.spec.number)
        self._order = sorted(new)
        self._others = sorted(nodes - {self.node_id})
        self.mode = mode
        self.crypto.set_nodes(nodes)
        self._health.reconfigure(self._now(), self._others, [s.health() for s in links], mode)
        self._find_routes()
        self._after_health()

    async def set_addresses(self, addresses: Mapping[int, str]) -> None:
        """A nodelist change given as link-0 addresses only (the `UdpTransport` interface):
        link 0 takes them, the other links keep theirs for the nodes they list."""
        specs = []
        for number in self._order:
            spec = self._links[number].spec
            if number == self._order[0]:
                spec = LinkSpec(spec.number, spec.port, spec.priority, spec.ping_interval_ms,
                                spec.ping_timeout_ms, spec.pong_count, dict(addresses))
            specs.append(spec)
        await self.set_links(specs, self.mode)

    def set_link_listener(self, listener: LinkListener | None) -> None:
        """`listener` is told every link going up or down (called from `recv`; must not block)."""
        self._listener = listener

    def block_link(self, number: int, blocked: bool = True) -> None:
        """Fault injection: a blocked link sends nothing and discards what arrives."""
        if blocked:
            self._blocked.add(number)
        else:
            self._blocked.discard(number)

    @property
    def counters(self) -> dict[str, int]:
        """Crypto and transport counters merged (a new dict each time)."""
        return {**self.crypto.counters, **self._counters}

    def links_status(self) -> list[LinkStatus]:
        """Per peer and link: its address, connected, carrying traffic (sorted)."""
        shown = []
        for state in self._health.status():
            link = self._links.get(state.link)
            peer = None if link is None else link.peers.get(state.peer)
            if peer is None:
                continue
            shown.append(LinkStatus(state.peer, state.link, peer.host, state.connected,
                                    state.active))
        return sorted(shown, key=lambda s: (s.peer, s.link))

    @property
    def local_addresses(self) -> dict[int, SockAddr]:
        """This node's bound address per link."""
        return {n: link.sock.getsockname() for n, link in self._links.items()}

    # ------------------------------------------------------------------ sending

    def send(self, to: int | None, payload: bytes) -> None:
        """Send a totem frame to node `to`, or to every other node when `to` is None, on the
        links the link health chooses. Never raises for network errors (`send_failed`); raises
        `trio.ClosedResourceError` after `close`, `ValueError` for `to` == this node and
        `FrameTooLarge` for a payload beyond `MAX_PAYLOAD_BYTES` (less the kind byte)."""
        if self._closed:
            raise trio.ClosedResourceError("the transport is closed")
        if to == self.node_id:
            raise ValueError("a node does not send frames to itself")
        if to is not None and to not in self._others:
            self._counters[SEND_FAILED] += 1
            self._log.note(SEND_FAILED, f"node {to} is not in the nodelist")
            return
        frame = self.crypto.seal(DATA + payload, EVERY_NODE if to is None else to)
        for peer in (self._others if to is None else (to,)):
            for number in self._routes.get(peer, ()):
                link = self._links.get(number)
                if link is not None and self._sendto(link, frame, peer):
                    self._counters[link.sent] += 1

    def _sendto(self, link: _Link, frame: bytes, peer: int) -> bool:
        if link.spec.number in self._blocked:
            return False
        addr = link.peers.get(peer)
        if addr is None:
            return False
        try:
            link.sock.sendto(frame, addr.sockaddr)
        except OSError as exc:  # BlockingIOError (EAGAIN), ENOBUFS, EHOSTUNREACH, EPERM, ...
            self._counters[SEND_FAILED] += 1
            self._log.note(SEND_FAILED, f"link {link.spec.number} to {_show(addr.sockaddr)}: "
                                        f"{exc.strerror or exc}")
            return False
        self._counters[DATAGRAMS_SENT] += 1
        return True

    # ------------------------------------------------------------------ receiving

    def _deadline(self) -> float:
        """The next heartbeat deadline on trio's clock (inf: none)."""
        return float("inf") if self._due is None else self._epoch + self._due / 1000

    async def _wait(self) -> None:
        """Until a link's socket is readable or the next heartbeat deadline, which a change of
        the links or of the health may bring forward while waiting (`_after_health`)."""
        with trio.move_on_at(self._deadline()) as self._waiting, \
                contextlib.suppress(trio.ClosedResourceError):
            await trio.lowlevel.wait_readable(self._epoll)
        self._waiting = None

    def _poll(self) -> tuple[_Link, bytes, SockAddr] | OSError | None:
        """One datagram from whichever link has one (round robin), an error, or None."""
        count = len(self._order)
        for i in range(count):
            index = (self._next_rx + i) % count
            link = self._links[self._order[index]]
            try:
                data, src = link.sock.recvfrom(RECV_BUFFER_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._counters[RECV_FAILED] += 1
                self._log.note(RECV_FAILED, f"link {link.spec.number}: {exc.strerror or exc}")
                return exc
            self._next_rx = (index + 1) % count
            if link.spec.number in self._blocked:
                continue
            return link, data, tuple(src)
        return None

    def _accept(self, datagram: tuple[_Link, bytes, SockAddr]) -> tuple[int, bytes] | None:
        link, data, src = datagram
        self._counters[DATAGRAMS_RECEIVED] += 1
        try:
            sender = self.crypto.claimed_sender(data)
            if not link.from_address_of(sender, src):
                self._counters[ADDRESS_MISMATCH] += 1
                self._log.note(ADDRESS_MISMATCH, f"a frame claiming node {sender} came from "
                                                 f"{_show(src)} on link {link.spec.number}")
                return None
            key, tag = data[3:27], data[-TAG_BYTES:]
            seen = self._recent.get(key)
            if seen is not None and seen[0] != link.spec.number and seen[1] == tag:
                self._counters[DUPLICATE_FRAMES] += 1
                return None
            sender, payload = self.crypto.open(data, _unicast_only)
        except FrameDropped as exc:
            self._log.note(exc.reason, f"frame from {_show(src)} on link {link.spec.number} "
                                       "dropped")
            return None
        kind = payload[:1]
        if kind == DATA:
            self._remember(key, link.spec.number, tag)
            self._counters[link.received] += 1
            return sender, payload[1:]
        self._heartbeat(link, sender, kind, payload)
        return None

    def _remember(self, key: bytes, number: int, tag: bytes) -> None:
        recent = self._recent
        recent[key] = (number, tag)
        if len(recent) > RECENT_FRAMES:
            del recent[next(iter(recent))]

    def _heartbeat(self, link: _Link, sender: int, kind: bytes, payload: bytes) -> None:
        """A ping (answered with a pong on the same link) or a pong (to the link health)."""
        if len(payload) != 1 + _BEAT.size or kind not in (PING, PONG):
            self._counters[BAD_PAYLOAD] += 1
            self._log.note(BAD_PAYLOAD, f"node {sender} sent an unknown kind of frame")
            return
        number, seq = _BEAT.unpack_from(payload, 1)
        if number != link.spec.number:
            self._counters[LINK_MISMATCH] += 1
            self._log.note(LINK_MISMATCH, f"node {sender}'s heartbeat for link {number} came "
                                          f"on link {link.spec.number}")
            return
        now = self._now()
        if kind == PING:
            self._health.on_ping(now, sender, number, seq)
            if self._sendto(link, self.crypto.seal(PONG + _BEAT.pack(number, seq), sender),
                            sender):
                self._counters[PONGS_SENT] += 1
        else:
            self._counters[PONGS_RECEIVED] += 1
            self._health.on_pong(now, sender, number, seq)
        self._after_health()

    # ------------------------------------------------------------------ heartbeats

    def _now(self) -> int:
        return int((trio.current_time() - self._epoch) * 1000)

    def _tick(self) -> None:
        """Timeouts and the pings that are due, when the health's deadline has come."""
        if self._due is None or trio.current_time() < self._deadline():
            return
        now = max(self._now(), self._due)  # the wait ends at the deadline, ms floor may not
        self._health.on_timer(now)
        for ping in self._health.pings_due(now):
            link = self._links.get(ping.link)
            if link is None:
                continue
            frame = self.crypto.seal(PING + _BEAT.pack(ping.link, ping.seq), ping.peer)
            if self._sendto(link, frame, ping.peer):
                self._counters[PINGS_SENT] += 1
        self._after_health()

    def _find_routes(self) -> None:
        """Each peer's route, kept until the link health changes (not asked per frame)."""
        self._routes = {peer: self._health.routes(peer) for peer in self._others}

    def _after_health(self) -> None:
        self._due = self._health.next_deadline()
        if self._waiting is not None:
            self._waiting.deadline = self._deadline()
        events = self._health.events()
        if events:
            self._find_routes()
        for event in events:
            if self._listener is not None:
                self._listener(event)
            else:
                logger.info("link %d to node %d %s", event.link, event.peer,
                            "up" if event.up else "down")

    # ------------------------------------------------------------------ sockets

    def _link_counters(self, number: int) -> None:
        for name in (f"link{number}_sent", f"link{number}_received"):
            self._counters.setdefault(name, 0)

    def _watch(self, link: _Link) -> None:
        fd = link.sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = link

    def _unwatch(self, link: _Link) -> None:
        fd = link.sock.fileno()
        if self._by_fd.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        """Close the sockets; a task blocked in `recv` gets `trio.ClosedResourceError`."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._epoll)
        self._epoll.close()
        for link in self._links.values():
            link.sock.close()

    def __enter__(self) -> KnetTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _unicast_only(payload: bytes) -> bool:
    """Heartbeats and tokens are only ever sealed for one node."""
    return payload[:1] != DATA or unicast_only(payload[1:])


async def _open_links(node_id: int, specs: Iterable[LinkSpec],
                      current: Mapping[int, _Link]) -> dict[int, _Link]:
    """The links of `specs`: a current link whose own address and port stay keeps its socket,
    every other one is bound anew. On an error the new sockets are closed again."""
    opened: dict[int, _Link] = {}
    try:
        for spec in specs:
            own, peers = await _resolve_link(node_id, spec)
            old = current.get(spec.number)
            if old is not None and old.own.sockaddr == own.sockaddr:
                sock = old.sock
            else:
                sock = _udp_socket(own.family)
                try:
                    _bind(sock, own.sockaddr, f"link {spec.number} address")
                except BaseException:
                    sock.close()
                    raise
            opened[spec.number] = _Link(spec, sock, own, peers, f"link{spec.number}_sent",
                                        f"link{spec.number}_received")
    except BaseException:
        _close_new(opened, current)
        raise
    return opened


def _close_new(opened: Mapping[int, _Link], current: Mapping[int, _Link]) -> None:
    kept = {link.sock for link in current.values()}
    for link in opened.values():
        if link.sock not in kept:
            link.sock.close()

