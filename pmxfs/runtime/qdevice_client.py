"""The quorum-device client in the node daemon: one connection to qnetd, and the device's vote
cast into the ring only while qnetd grants it (corosync-qdevice's job).

When it runs
------------
`QdeviceClient.run` lasts as long as the daemon. It keeps a connection only while the node is
a cluster member whose running corosync.conf has a `model: net` quorum device
(core/qdevice_settings.py) and whose tree holds `priv/qdevice/ca.pem`, `client.pem` and
`client.key` (`pmxfs qdevice setup` puts them there). What it wants (`_Target`: settings, TLS
material, node id, nodelist) is worked out again after every change of those files, of
corosync.conf and after every attach (tree listener); when it differs from what the current
connection was made for, that connection is dropped and a new one made at once -- so setup and
remove take effect while the node runs.

One connection
--------------
Mutual TLS (`qnetd_pki.client_context`): the client presents the cluster's certificate, whose
subject names the cluster (`cluster_subject`: the cluster id comes from there), and checks
qnetd's certificate against the CA from the tree (no host name check: the CA is qnetd's own).
Connect and handshake are bounded (`CONNECT_TIMEOUT_S`, `HANDSHAKE_TIMEOUT_S`), the answer to
`Hello` by the device timeout. After `Welcome`, the client reports the current ring and the
tree's stamp (`Membership`: the seq of the newest quorate ring the tree comes from) and again
whenever either changes, sends a `Heartbeat` every `heartbeat_interval_ms(timeout)`, and takes
qnetd's `VoteReply`s. Any message from qnetd counts as a sign of life; after the device timeout
without one the connection is given up.

The vote
--------
The device's vote is cast (`set_qdevice_vote(ring, True)`) only while all of these hold:
connected and welcomed; the last `VoteReply` is ACK and names the node's current ring; qnetd
was heard from within `silence_limit_ms(timeout)`. When one stops holding -- NACK, WAIT, a new
ring, silence, a lost connection -- it is withdrawn at once (the replica drops a vote at every
ring change by itself, so only a vote for the current ring is withdrawn explicitly). Ring
changes arrive from the node inside its output handling, where nothing may call back into the
replica, so the listener only records them and wakes the client's task, which decides.

Never stopping the daemon
-------------------------
A failed connection (no route, refused, TLS, a protocol breach, a refusal by qnetd, silence) is
logged once per distinct reason and retried after a backoff of `BACKOFF_FIRST_S` doubling to
`BACKOFF_MAX_S` (back to the first after a welcomed connection). Anything unexpected is logged
with its traceback and retried the same way; only cancellation ends `run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from pmxfs.core.conf import ClusterConfig
from pmxfs.core.errors import LocalError, ProtocolError
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.core.qdevice_settings import DeviceSettings, device_settings
from pmxfs.core.qdevice_wire import (
    Heartbeat,
    Hello,
    Membership,
    Message,
    Refused,
    Ring,
    Vote,
    VoteReply,
    Welcome,
    heartbeat_interval_ms,
    parse_subject,
    silence_limit_ms,
)
from pmxfs.core.wire import RingId
from pmxfs.runtime.net_errors import reason
from pmxfs.runtime.node_api import Invalidator
from pmxfs.runtime.qdevice_frames import ConnectionClosed, receive_message, send_message
from pmxfs.runtime.qnetd_pki import PkiError, client_context
from pmxfs.runtime.replica_node import RingView

log = logging.getLogger("pmxfs.qdevice")

TREE_QDEVICE_DIR = "priv/qdevice"
TREE_CA = f"{TREE_QDEVICE_DIR}/ca.pem"
TREE_CERT = f"{TREE_QDEVICE_DIR}/client.pem"
TREE_KEY = f"{TREE_QDEVICE_DIR}/client.key"
TREE_FILES = (TREE_CA, TREE_CERT, TREE_KEY)
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 10.0


class DeviceNode(Protocol):
    """What the client needs of the node (`ReplicaNode`; tests give a fake)."""

    node_id: int
    config: ClusterConfig

    @property
    def standalone(self) -> bool: ...

    def tree_file(self, path: str) -> bytes | None: ...

    def add_tree_listener(self, listener: Invalidator) -> None: ...

    def add_ring_listener(self, listener: Callable[[RingView], None]) -> None: ...

    def ring_view(self) -> RingView: ...

    def set_qdevice_vote(self, ring: RingId, vote: bool) -> None: ...

    def set_qdevice_alive(self, alive: bool) -> None: ...


class _Lost(Exception):
    """The connection ended; the text says why (one line)."""


@dataclass(frozen=True)
class _Target:
    """What a connection is made for (module header)."""

    settings: DeviceSettings
    cluster_name: str
    cluster_id: str
    node_id: int
    nodes: tuple[int, ...]
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)


def ring_of(ring: RingId) -> Ring:
    return Ring(ring.seq, ring.rep)


class QdeviceClient:
    """The device client of one node (module header)."""

    def __init__(self, node: DeviceNode, *, backoff_first_s: float = BACKOFF_FIRST_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.node = node
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self._changed = trio.Event()  # the files or the attachment may have changed
        self._poke = trio.Event()  # something the vote depends on changed
        self._ring_changed = trio.Event()
        self._welcomed = False
        self._vote: VoteReply | None = None
        self._last_heard = -math.inf  # trio clock, seconds
        self._silence_s = math.inf
        self._casting: RingId | None = None
        self._problem: str | None = None  # the last reason logged, so that it is logged once
        node.add_tree_listener(self._on_tree)
        node.add_ring_listener(self._on_ring)

    @property
    def connected(self) -> bool:
        """Connected to qnetd and welcomed."""
        return self._welcomed

    @property
    def casting(self) -> bool:
        return self._casting is not None

    # ------------------------------------------------------------------ listeners

    def _on_tree(self, paths: tuple[str, ...], everything: bool) -> None:
        if everything or any(p == COROSYNC_CONF or p.startswith(TREE_QDEVICE_DIR)
                             for p in paths):
            self._changed.set()

    def _on_ring(self, view: RingView) -> None:
        self._ring_changed.set()
        self._poke.set()

    # ------------------------------------------------------------------ supervision

    async def run(self) -> None:
        """Until cancelled (module header); never raises anything else."""
        backoff = self.backoff_first_s
        while True:
            self._changed = trio.Event()
            target = self._target()
            if target is None:
                await self._changed.wait()
                continue
            welcomed = await self._connection(target)
            if welcomed:
                backoff = self.backoff_first_s
            if self._changed.is_set() and self._target() != target:
                continue  # made for what is no longer wanted: the new one at once
            with trio.move_on_after(backoff):
                await self._changed.wait()
            backoff = min(self.backoff_max_s, backoff * 2)

    async def _connection(self, target: _Target) -> bool:
        """One connection until it ends or `target` is no longer wanted; whether it was
        welcomed. The vote is withdrawn when it ends."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_changes, target, nursery.cancel_scope)
                await self._session(target)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            cause = _first(exc)
            if isinstance(cause, EXPECTED):
                self._note(f"qnetd at {target.settings.address}: {_reason(cause)}")
            else:  # a bug here must never stop the daemon
                log.error("the quorum device client failed; it starts again in a moment",
                          exc_info=exc)
                self._problem = None
        finally:
            welcomed = self._welcomed
            self._welcomed = False
            self.node.set_qdevice_alive(False)
            self._vote = None
            with contextlib.suppress(LocalError):  # the node stopped: no vote counts any more
                self._withdraw()
        return welcomed

    async def _follow_changes(self, target: _Target, scope: trio.CancelScope) -> None:
        while True:
            await self._changed.wait()  # woken once the node carried out the whole flush
            wanted = self._target()
            if wanted != target:
                if self._welcomed:
                    log.info("%s", "the quorum device is no longer configured here: "
                             "disconnecting from qnetd" if wanted is None else
                             "the quorum device's settings or certificates changed: "
                             "reconnecting to qnetd")
                scope.cancel()
                return
            self._changed = trio.Event()

    def _target(self) -> _Target | None:
        node = self.node
        settings = None if node.standalone else device_settings(node.config)
        if settings is None:
            self._problem = None
            return None
        files = [node.tree_file(path) for path in TREE_FILES]
        missing = [path for path, data in zip(TREE_FILES, files, strict=True) if not data]
        if missing:
            self._note(f"a quorum device is configured, but the tree lacks {', '.join(missing)} "
                       "(`pmxfs qdevice setup` puts them there)", level=logging.INFO)
            return None
        ca, cert, key = (data or b"" for data in files)
        subject = _cluster_of(cert)
        if subject is None:
            self._note(f"{TREE_CERT} is not a cluster's qdevice certificate")
            return None
        nodes = tuple(sorted(info.nodeid for info in node.config.node_infos()))
        if node.node_id not in nodes:
            return None
        return _Target(settings, subject[0], subject[1], node.node_id, nodes, ca, cert, key)

    def _note(self, problem: str, level: int = logging.WARNING) -> None:
        """Log `problem` unless it is the one logged last."""
        if problem != self._problem:
            log.log(level, "%s", problem)
            self._problem = problem

    # ------------------------------------------------------------------ the connection

    async def _session(self, target: _Target) -> None:
        settings = target.settings
        try:
            context = client_context(target.ca_pem, target.cert_pem, target.key_pem)
        except PkiError as exc:
            raise _Lost(f"cannot use the certificates in {TREE_QDEVICE_DIR}: {exc}") from None
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(settings.host, settings.port)
        stream = trio.SSLStream(tcp, context)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await stream.do_handshake()
            sender = _Sender(stream)
            await sender.send(Hello(
                target.cluster_name, target.cluster_id, target.node_id, settings.algorithm,
                settings.tie_breaker, settings.keep_active, settings.timeout_ms,
                settings.sync_timeout_ms, target.nodes))
            with trio.fail_after(settings.timeout_ms / 1000):
                answer = await receive_message(stream)
            if isinstance(answer, Refused):
                raise _Lost(f"refused: {answer.reason}")
            if not isinstance(answer, Welcome):
                raise ProtocolError(f"a {type(answer).__name__} instead of Welcome")
            self._welcome(settings)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, sender, settings)
                nursery.start_soon(self._report_rings, sender)
                nursery.start_soon(self._decide, settings)
                await self._receive(stream)
        finally:
            await trio.aclose_forcefully(stream)

    def _welcome(self, settings: DeviceSettings) -> None:
        self._welcomed = True
        self._last_heard = trio.current_time()
        self._silence_s = silence_limit_ms(settings.timeout_ms) / 1000
        self._problem = None
        self.node.set_qdevice_alive(True)
        log.info("connected to qnetd at %s (algorithm %s)", settings.address,
                 settings.algorithm)

    async def _receive(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        while True:
            message = await receive_message(stream)
            self._last_heard = trio.current_time()
            self._poke.set()
            if isinstance(message, VoteReply):
                self._vote = message
            elif isinstance(message, Refused):
                raise _Lost(f"refused: {message.reason}")
            elif not isinstance(message, Heartbeat):
                raise ProtocolError(f"an unexpected {type(message).__name__}")

    async def _heartbeats(self, sender: _Sender, settings: DeviceSettings) -> None:
        interval = heartbeat_interval_ms(settings.timeout_ms) / 1000
        seq = 0
        while True:
            await trio.sleep(interval)
            seq += 1
            await sender.send(Heartbeat(seq))

    async def _report_rings(self, sender: _Sender) -> None:
        """`Membership` now and after every change of the ring or of the tree's stamp."""
        reported: tuple[RingId, int] | None = None
        while True:
            self._ring_changed = trio.Event()
            view = self.node.ring_view()
            if (view.ring, view.stamp) != reported and view.members:
                await sender.send(Membership(ring_of(view.ring), tuple(sorted(view.members)),
                                             view.quorate, view.stamp))
                reported = (view.ring, view.stamp)
            await self._ring_changed.wait()

    async def _decide(self, settings: DeviceSettings) -> None:
        """Cast or withdraw the vote whenever something it depends on changed; give up the
        connection after the device timeout without a word from qnetd."""
        timeout_s = settings.timeout_ms / 1000
        while True:
            self._poke = trio.Event()
            self._update_vote()
            now = trio.current_time()
            if now - self._last_heard > timeout_s:
                raise _Lost(f"nothing heard for {settings.timeout_ms} ms")
            wake = self._last_heard + (self._silence_s if self.casting else timeout_s)
            with trio.move_on_at(max(wake, now) + 0.001):
                await self._poke.wait()

    def _update_vote(self) -> None:
        ring = self.node.ring_view().ring
        vote = self._vote
        cast = (self._welcomed and vote is not None and vote.vote is Vote.ACK
                and vote.ring == ring_of(ring)
                and trio.current_time() - self._last_heard <= self._silence_s)
        if cast and self._casting != ring:
            self.node.set_qdevice_vote(ring, True)
            self._casting = ring
            log.info("casting the quorum device's vote for ring %s", ring)
        elif not cast:
            self._withdraw()

    def _withdraw(self) -> None:
        """No vote from now on; one for an earlier ring the replica dropped by itself."""
        if self._casting is None:
            return
        old, self._casting = self._casting, None
        if self.node.ring_view().ring == old:
            self.node.set_qdevice_vote(old, False)
        log.info("withdrew the quorum device's vote (cast for ring %s)", old)


EXPECTED = (_Lost, ProtocolError, ConnectionClosed, OSError, ssl.SSLError,
            trio.BrokenResourceError, trio.TooSlowError)


def _first(exc: BaseException) -> BaseException:
    """The first exception inside the (nested) groups trio raised, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Sender:
    """Sends from several tasks, one frame at a time, each within `SEND_TIMEOUT_S`."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.lock = trio.Lock()

    async def send(self, message: Message) -> None:
        async with self.lock:
            with trio.fail_after(SEND_TIMEOUT_S):
                await send_message(self.stream, message)


def _cluster_of(cert_pem: bytes) -> tuple[str, str] | None:
    """(cluster name, cluster id) from the subject of the cluster's client certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return parse_subject(names[0].value)


def _reason(exc: BaseException) -> str:
    """One line for why the connection to qnetd failed."""
    if isinstance(exc, ConnectionClosed):
        return "qnetd closed the connection"
    tls = isinstance(exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc,
                     ssl.SSLError)
    return f"TLS: {reason(exc)}" if tls else reason(exc)
