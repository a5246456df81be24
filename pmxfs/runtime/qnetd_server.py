"""qnetd: the quorum device's arbiter -- the TLS server that `pmxfs qnetd` runs.

One listener, two kinds of connection (runtime/qnetd_pki.py tells them apart by whether the
client presented a certificate, which the TLS handshake has then verified against qnetd's CA):

* Enrollment (no client certificate): one `Enroll` within `EXCHANGE_TIMEOUT_S`, answered with
  `Enrolled` or `Refused`, then closed. Failed enrollments are counted per source IP by
  core/join_limit.py's `FailureLimiter`; a source over the limit is refused before its token is
  looked at, and that refusal is logged once per source and window, so a client hammering qnetd
  cannot flood the log.
* Voting (the cluster's client certificate): `Hello` within `EXCHANGE_TIMEOUT_S`; it is refused
  (`Refused`, a log line, closed) when the certificate's common name is not
  `cluster_subject(hello.cluster_name, hello.cluster_id)` -- a client certificate of another
  cluster. Else `Welcome`, and the connection stays: `Membership` reports go to the cluster's
  arbiter, each `Heartbeat` is echoed, and a connection silent for the Hello's `timeout_ms` is
  closed. One connection per (cluster, node id): a new one replaces the old, which is closed.

Decisions
---------
qnetd keeps one `ClusterArbiter` (core/qnetd_arbiter.py, pure) per (cluster name, cluster id),
made when the cluster's first node connects and forgotten once the arbiter is idle. After every
event (hello, membership, a connection gone) and at the arbiter's `next_deadline()` (one timer
task for all clusters) the server asks for `decisions(now)` and sends each connection a
`VoteReply` when its decision differs from the last one sent on it. Times given to the arbiter
are milliseconds of trio's monotonic clock.

What the arbiter must remember across restarts (the last holder, the newest stamp:
runtime/qnetd_state.py) is on disk before any vote that follows from it goes out; a failed write
sends nothing and is tried again after `SAVE_RETRY_S`. A cluster whose state file exists but
cannot be read is not decided for at all: its nodes' Hellos are refused, saying why, until the
file can be read (or the operator removes it).

Each voting connection has a writer task fed by a bounded queue, so that a decision taken on one
connection's event is never blocked by another's slow peer: a peer that does not take its
messages within `SEND_TIMEOUT_S`, or lets `QUEUE_SIZE` pile up, is closed.

What never stops the server: a peer that never completes the handshake or never sends (dropped
at the deadline), a failed handshake (a certificate of another CA, say), a malformed or
oversized frame (the connection is closed), more than `max_connections` at once (closed as soon
as they are accepted, before any TLS), more than `MAX_UNPROVEN_PER_SOURCE` connections of one
address that have not yet sent their first message (closed at once, logged once per window), so
that one source cannot take every slot from the cluster's nodes. Every event is one line in the
log "pmxfs.qnetd": connections, refusals with their reason, memberships, vote changes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from pmxfs.core.errors import ProtocolError
from pmxfs.core.join_limit import FailureLimiter
from pmxfs.core.join_token import format_host_port
from pmxfs.core.qdevice_wire import (
    Enroll,
    Heartbeat,
    Hello,
    Membership,
    Message,
    Refused,
    VoteReply,
    Welcome,
    cluster_subject,
)
from pmxfs.core.qnetd_arbiter import ClusterArbiter
from pmxfs.runtime.net_errors import reason
from pmxfs.runtime.qdevice_frames import ConnectionClosed, receive_message, send_message
from pmxfs.runtime.qnetd_pki import EnrollRefused, QnetdPki
from pmxfs.runtime.qnetd_state import ClusterState, StateError, load_state, save_state, state_path
from pmxfs.runtime.quiet_log import QuietSources

HANDSHAKE_TIMEOUT_S = 10.0
EXCHANGE_TIMEOUT_S = 15.0  # the handshake and the first message (Enroll or Hello)
SEND_TIMEOUT_S = 10.0  # a peer takes a message within this, or is closed
MAX_CONNECTIONS = 1024  # served at once; more are closed at once
QUEUE_SIZE = 64  # messages waiting for one voting peer
ACCEPT_RETRY_S = 0.1
MAX_UNPROVEN_PER_SOURCE = 16  # connections of one address before their first message
SAVE_RETRY_S = 1.0  # a cluster's state that could not be saved is tried again after this

ClusterKey = tuple[str, str]  # (cluster name, cluster id)

log = logging.getLogger("pmxfs.qnetd")


def now_ms() -> int:
    return int(trio.current_time() * 1000)


@dataclass(eq=False)
class _Voter:
    """One welcomed voting connection."""

    node_id: int
    where: str  # "cluster name/id node N (peer ip)", for the log
    outbox: trio.MemorySendChannel[Message]
    scope: trio.CancelScope
    last_sent: VoteReply | None = None

    def send(self, message: Message) -> None:
        """Queue `message`; a peer with a full queue is closed."""
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            log.info("%s: closed: it does not take its messages", self.where)
            self.scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # its connection is ending


@dataclass(eq=False)
class _Cluster:
    key: ClusterKey
    arbiter: ClusterArbiter
    saved: ClusterState  # what its state file holds
    voters: dict[int, _Voter] = field(default_factory=dict)
    retry_at: int | None = None  # when to try again to save its state (ms), after a failure


class _Refuse(Exception):
    """A voting connection refused: the reason goes to the peer and the log."""


class QnetdServer:
    """The server (module header). `serve` runs it; the rest is per connection."""

    def __init__(self, pki: QnetdPki, *, max_connections: int = MAX_CONNECTIONS,
                 limiter: FailureLimiter | None = None) -> None:
        self.pki = pki
        self.context = pki.server_context()
        self.max_connections = max_connections
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.clusters: dict[ClusterKey, _Cluster] = {}
        self.open = 0
        self.unproven: Counter[str] = Counter()  # connections per source before a message
        self._timer_changed = trio.Event()
        self._full_logged = False
        self._quiet = QuietSources()

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `host`:`port` (an empty host: every address) until cancelled; signals
        `task_status.started(port)` with the port bound. OSError when it cannot listen."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        try:
            bound = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer)
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                log.info("listening on %s", format_host_port(host or "*", bound))
                task_status.started(bound)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors, say: go on after a pause
                log.warning("cannot accept a connection: %s", exc.strerror or exc)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            if self.open >= self.max_connections:
                if not self._full_logged:
                    log.warning("%d connections open: refusing more until one closes",
                                self.open)
                    self._full_logged = True
                await trio.aclose_forcefully(stream)
                continue
            self._full_logged = False
            self.open += 1
            nursery.start_soon(self._connection, stream)

    # ------------------------------------------------------------------------ one connection

    async def _connection(self, tcp: trio.SocketStream) -> None:
        peer = "?"
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        ticket: list[str] = []  # its source while it counts as unproven (`_proven`)
        try:
            peer = _peer_ip(tcp)
            if self.unproven[peer] >= MAX_UNPROVEN_PER_SOURCE:
                self._log_rate_limited(peer, f"{peer}: more than {MAX_UNPROVEN_PER_SOURCE} "
                                             "connections before their first message: closed",
                                       EXCHANGE_TIMEOUT_S)
                return
            self.unproven[peer] += 1
            ticket.append(peer)
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as handshake:
                await stream.do_handshake()
            if handshake.cancelled_caught:
                log.info("%s: closed: no TLS handshake within %g s", peer, HANDSHAKE_TIMEOUT_S)
                return
            certificate = stream.getpeercert()
            if certificate:
                await self._voting(stream, peer, _common_name(certificate), ticket)
            else:
                await self._enrollment(stream, peer, ticket)
        except trio.BrokenResourceError as exc:
            log.info("%s: closed: %s", peer, reason(exc))
        except OSError as exc:  # the peer left before its address was read
            log.debug("connection closed at once: %s", exc)
        except Exception as exc:  # one connection must never stop the server
            log.warning("%s: closed: %s: %s", peer, type(exc).__name__,
                        " ".join(str(exc).split()))
        finally:
            self._proven(ticket)
            self.open -= 1
            await trio.aclose_forcefully(stream)

    def _proven(self, ticket: list[str]) -> None:
        """A connection got past its first message, or ended: it counts no more against the
        per-source limit of connections that have proven nothing yet (once)."""
        if ticket:
            peer = ticket.pop()
            self.unproven[peer] -= 1
            if not self.unproven[peer]:
                del self.unproven[peer]

    async def _first_message(self, stream: trio.SSLStream[trio.SocketStream],
                             peer: str, ticket: list[str]) -> Message | None:
        """The first message, within the exchange deadline; None (logged) when there is
        none or it is malformed. After it the connection is no longer unproven."""
        try:
            with trio.move_on_after(EXCHANGE_TIMEOUT_S - HANDSHAKE_TIMEOUT_S):
                return await receive_message(stream)
            log.info("%s: closed: no request within %g s", peer, EXCHANGE_TIMEOUT_S)
        except ProtocolError as exc:
            log.info("%s: closed: malformed frame: %s", peer, exc)
        except ConnectionClosed as exc:
            log.info("%s: closed: %s before a request", peer, exc)
        finally:
            self._proven(ticket)
        return None

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream],
                      message: Message) -> None:
        """Send `message` and close, within `SEND_TIMEOUT_S`."""
        with trio.move_on_after(SEND_TIMEOUT_S):
            await send_message(stream, message)
            await stream.aclose()

    # ------------------------------------------------------------------------ enrollment

    async def _enrollment(self, stream: trio.SSLStream[trio.SocketStream], peer: str,
                          ticket: list[str]) -> None:
        request = await self._first_message(stream, peer, ticket)
        if request is None:
            return
        wait = self.limiter.retry_after(time.monotonic(), peer)
        if wait is not None:
            reason = (f"too many failed enrollments from {peer}: refused; try again in "
                      f"{math.ceil(wait)} s")
            self._log_rate_limited(peer, reason, wait)
            await self._answer(stream, Refused(reason))
            return
        if not isinstance(request, Enroll):
            answer: Message = Refused("a connection without a client certificate may only "
                                      "enroll (a voting client presents its cluster's "
                                      "certificate)")
            log.warning("%s: enrollment refused: it sent a %s", peer, type(request).__name__)
            self.limiter.failed(time.monotonic(), peer)
        else:
            cluster = cluster_subject(request.cluster_name, request.cluster_id)
            try:
                answer = self.pki.enroll(request, time.time())
            except EnrollRefused as exc:
                log.warning("%s: enrollment of cluster %s refused: %s", peer, cluster, exc)
                self.limiter.failed(time.monotonic(), peer)
                answer = Refused(str(exc))
            else:
                log.info("%s: cluster %s enrolled", peer, cluster)
        await self._answer(stream, answer)

    def _log_rate_limited(self, peer: str, reason: str, wait: float) -> None:
        """Once per source and window: the refusal itself is answered every time."""
        if not self._quiet.should_log(peer, time.monotonic(), wait):
            return
        log.warning("%s (logged once until then)", reason)

    # ------------------------------------------------------------------------ voting

    async def _voting(self, stream: trio.SSLStream[trio.SocketStream], peer: str,
                      common_name: str, ticket: list[str]) -> None:
        hello = await self._first_message(stream, peer, ticket)
        if hello is None:
            return
        try:
            if not isinstance(hello, Hello):
                raise _Refuse(f"a voting connection starts with Hello, not "
                              f"{type(hello).__name__}")
            subject = cluster_subject(hello.cluster_name, hello.cluster_id)
            if common_name != subject:
                raise _Refuse(f"a client certificate of another cluster ({common_name[:80]!r}, "
                              f"the Hello names {subject!r})")
            key = (hello.cluster_name, hello.cluster_id)
            cluster = self.clusters.get(key) or self._new_cluster(key)
        except _Refuse as exc:
            log.warning("%s: voting connection refused: %s", peer, exc)
            await self._answer(stream, Refused(str(exc)))
            return
        outbox, inbox = trio.open_memory_channel[Message](QUEUE_SIZE)
        with trio.CancelScope() as scope:
            voter = _Voter(hello.node_id, f"{subject} node {hello.node_id} ({peer})", outbox,
                           scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, inbox, voter)
                try:
                    await self._welcomed(stream, hello, voter, cluster)
                finally:
                    nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            log.info("%s: connection closed", voter.where)

    async def _welcomed(self, stream: trio.SSLStream[trio.SocketStream], hello: Hello,
                        voter: _Voter, cluster: _Cluster) -> None:
        cluster = self.clusters.setdefault(cluster.key, cluster)
        old = cluster.voters.get(voter.node_id)
        if old is not None:
            log.info("%s: replaced by a new connection", old.where)
            old.scope.cancel()
        cluster.voters[voter.node_id] = voter
        cluster.arbiter.hello(now_ms(), hello)
        voter.send(Welcome())
        log.info("%s: connected (%s, tie-breaker %s, timeout %d ms, nodes %s)", voter.where,
                 hello.algorithm, hello.tie_breaker, hello.timeout_ms,
                 ",".join(map(str, hello.nodes)))
        self._decide(cluster)
        try:
            await self._receive(stream, hello, voter, cluster)
        finally:
            if cluster.voters.get(voter.node_id) is voter:
                del cluster.voters[voter.node_id]
                cluster.arbiter.gone(now_ms(), voter.node_id)
                self._decide(cluster)

    async def _receive(self, stream: trio.SSLStream[trio.SocketStream], hello: Hello,
                       voter: _Voter, cluster: _Cluster) -> None:
        """Messages until the peer closes, breaks the protocol or falls silent."""
        while True:
            message: Message | None = None
            try:
                with trio.move_on_after(hello.timeout_ms / 1000):
                    message = await receive_message(stream)
            except ProtocolError as exc:
                log.info("%s: closed: malformed frame: %s", voter.where, exc)
                return
            except ConnectionClosed as exc:
                log.info("%s: disconnected%s", voter.where, "" if exc.clean else f" ({exc})")
                return
            except trio.BrokenResourceError as exc:
                log.info("%s: disconnected: %s", voter.where, reason(exc))
                return
            if message is None:
                log.info("%s: closed: silent for %d ms", voter.where, hello.timeout_ms)
                return
            if isinstance(message, Heartbeat):
                voter.send(message)
            elif isinstance(message, Membership):
                log.info("%s: ring %s, members %s, %s", voter.where, message.ring,
                         ",".join(map(str, message.members)),
                         "quorate" if message.quorate else "not quorate")
                cluster.arbiter.membership(now_ms(), voter.node_id, message)
                self._decide(cluster)
            else:
                log.info("%s: closed: unexpected %s", voter.where, type(message).__name__)
                return

    async def _writer(self, stream: trio.SSLStream[trio.SocketStream],
                      inbox: trio.MemoryReceiveChannel[Message], voter: _Voter) -> None:
        async for message in inbox:
            with trio.move_on_after(SEND_TIMEOUT_S) as sending:
                try:
                    await send_message(stream, message)
                except trio.BrokenResourceError as exc:
                    log.info("%s: cannot send: %s", voter.where, reason(exc))
                    voter.scope.cancel()
                    return
            if sending.cancelled_caught:
                log.info("%s: closed: it took no message within %g s", voter.where,
                         SEND_TIMEOUT_S)
                voter.scope.cancel()
                return

    # ------------------------------------------------------------------------ decisions

    def _new_cluster(self, key: ClusterKey) -> _Cluster:
        """A cluster's arbiter, knowing what the cluster's state file says (runtime/
        qnetd_state.py)."""
        try:
            state = load_state(state_path(self.pki.directory, *key))
        except StateError as exc:  # never decide without what the file says: refuse, retry
            log.error("%s: cannot read the cluster's state, no votes until it can: %s",
                      cluster_subject(*key), exc)
            raise _Refuse(f"qnetd cannot read this cluster's state ({exc}); it answers once "
                          "it can") from None
        arbiter = ClusterArbiter(now_ms(), state.last_holder, state.newest_stamp)
        return _Cluster(key, arbiter, state)

    def _decide(self, cluster: _Cluster) -> None:
        """Send every changed decision of `cluster`, once what the arbiter must remember is on
        disk; then the timer looks at its deadline. An idle cluster is forgotten."""
        decisions = cluster.arbiter.decisions(now_ms())
        state = ClusterState(cluster.arbiter.last_holder, cluster.arbiter.newest_stamp)
        if state != cluster.saved:
            try:
                save_state(state_path(self.pki.directory, *cluster.key), state)
            except StateError as exc:  # no vote goes out that a restart could contradict
                log.error("%s: votes not sent, trying again in %g s: %s",
                          cluster_subject(*cluster.key), SAVE_RETRY_S, exc)
                cluster.retry_at = now_ms() + int(SAVE_RETRY_S * 1000)
                self._timer_changed.set()
                return
            cluster.saved = state
        cluster.retry_at = None
        for node_id, voter in cluster.voters.items():
            reply = decisions.get(node_id)
            if reply is not None and reply != voter.last_sent:
                voter.last_sent = reply
                log.info("%s: vote %s for ring %s", voter.where, reply.vote.value, reply.ring)
                voter.send(reply)
        if cluster.arbiter.idle() and self.clusters.get(cluster.key) is cluster:
            del self.clusters[cluster.key]
        self._timer_changed.set()

    async def _timer(self) -> None:
        """Decide again for each cluster when its arbiter's next deadline comes."""
        while True:
            self._timer_changed = trio.Event()
            deadlines = {key: min(d) for key, c in self.clusters.items()
                         if (d := [t for t in (c.arbiter.next_deadline(), c.retry_at)
                                   if t is not None])}
            if not deadlines:
                await self._timer_changed.wait()
                continue
            first = min(deadlines.values())
            with trio.move_on_at(first / 1000):
                await self._timer_changed.wait()
            now = now_ms()
            for key, deadline in deadlines.items():
                cluster = self.clusters.get(key)
                if deadline <= now and cluster is not None:
                    self._decide(cluster)


def _common_name(certificate: dict[str, object]) -> str:
    """The subject's common name from `getpeercert()`'s dict ("" when it has none)."""
    subject = certificate.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def _peer_ip(stream: trio.SocketStream) -> str:
    """The peer's IP address; an IPv4 peer of a dual-stack listener as plain IPv4."""
    address: str = stream.socket.getpeername()[0]
    return address.removeprefix("::ffff:") if "." in address else address


