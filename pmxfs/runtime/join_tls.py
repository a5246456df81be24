"""The join channel: one TLS exchange between a node that wants in and a cluster member.

Trust
-----
The cluster has one self-signed join certificate (`make_certificate`: an ECDSA P-256 key and
its certificate in one PEM). No CA vouches for it; the join token carries its SHA-256
fingerprint (`fingerprint`) instead, and the joiner pins that: `request_join` completes the TLS
handshake without CA or host name checks, then compares the fingerprint of the certificate the
server presented with the token's. On a mismatch it closes the connection having sent no
application byte -- so a wrong host or a man in the middle never sees the token's secret -- and
raises `JoinError` naming both fingerprints. TLS 1.2 is the oldest version either side speaks.

The server's key is handed to OpenSSL through an anonymous memory file (memfd), so it never
lands on a disk.

Exchange
--------
One request and one answer per connection, each one frame: a 4-byte big-endian length, then a
UTF-8 JSON object of at most `MAX_MESSAGE_BYTES`. `serve_join` runs, per connection in a task of
its own: the TLS handshake and reading the request (within `EXCHANGE_TIMEOUT_S`, the handshake
within `HANDSHAKE_TIMEOUT_S`), `answer = await handler(request, peer_ip)`, sending the answer
and closing (within `SEND_TIMEOUT_S`). The handler's own work is not cut short -- it may have
changed the cluster, and its answer must go out -- so the handler bounds it. At most
`MAX_CONNECTIONS` connections are served at once; more are closed as soon as they are
accepted, before any TLS.

What never stops the server: a client that sends nothing (dropped at the deadline), one that
fails the handshake, an oversized frame (dropped without an answer), a frame that is not a JSON
object (answered {"ok": false, "error": "malformed request"}), a handler that raises or returns
something that is not JSON (answered {"ok": false, "error": "internal error"} and one warning
in the log). Misbehaving clients are logged at debug level only: the caller decides what a
failed join attempt is (a bad or spent token) and logs and rate-limits those.

`request_join` bounds the whole exchange by its `timeout`; every failure -- no route, refused,
timeout, TLS, a closed connection, a bad answer -- is a `JoinError` whose text is one line
naming the server as host:port.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pmxfs.core.errors import LocalError
from pmxfs.core.join_token import format_host_port
from pmxfs.runtime.net_errors import one_line, reason

MAX_MESSAGE_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0
EXCHANGE_TIMEOUT_S = HANDSHAKE_TIMEOUT_S + 5.0  # server side: handshake and request
SEND_TIMEOUT_S = 10.0  # server side: the client takes the answer
MAX_CONNECTIONS = 32  # served at once; more are closed at once
ACCEPT_RETRY_S = 0.1  # after a failed accept (no descriptors left, say)
CERT_VALID_DAYS = 20 * 365 + 5  # 20 years, leap days included

HEADER = struct.Struct(">I")
JoinHandler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]

log = logging.getLogger("pmxfs.join")


class JoinError(LocalError):
    """A join exchange that failed; str() is one line for the admin."""


class _Dropped(Exception):
    """The peer broke the exchange (an oversized or truncated frame, no handshake in time):
    the connection ends without an answer."""


def make_certificate(common_name: str) -> bytes:
    """A new PEM: an ECDSA P-256 private key (unencrypted PKCS8), then a self-signed
    certificate for `common_name`, valid from a day ago for 20 years, with a random serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem + certificate.public_bytes(serialization.Encoding.PEM)


def fingerprint(pem: bytes) -> str:
    """The lowercase hex SHA-256 of the DER of the (first) certificate in `pem`."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise JoinError(f"no usable certificate in the join certificate PEM: "
                        f"{one_line(str(exc))}") from None
    return hashlib.sha256(certificates[0].public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------------------------
# Server


async def serve_join(host: str, port: int, pem: bytes, handler: JoinHandler, *,
                     stop: trio.Event | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer join requests on TCP `host`:`port` with `handler` until `stop` is set (or the
    call is cancelled); an empty `host` listens on every address.

    Signals `task_status.started()` once listening. Raises `OSError` when the port cannot be
    bound and `JoinError` when `pem` holds no usable key and certificate. When `stop` is set the
    listeners close at once and the call returns once the exchanges under way are over (each
    bounded by `EXCHANGE_TIMEOUT_S`): a joiner whose request was taken gets its answer.
    """
    server = _JoinServer(_server_context(pem), handler)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    try:
        async with trio.open_nursery() as exchanges:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(_accept, listener, server, exchanges)
                task_status.started()
                await (trio.Event() if stop is None else stop).wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _accept(listener: trio.SocketListener, server: _JoinServer,
                  exchanges: trio.Nursery) -> None:
    """Hand every connection to `server` in `exchanges` until cancelled."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:  # out of descriptors, say: the server goes on after a pause
            log.warning("cannot accept a join connection: %s", exc)
            await trio.sleep(ACCEPT_RETRY_S)
            continue
        exchanges.start_soon(server.handle_and_close, stream)


def _server_context(pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("pmxfs-join-certificate", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise JoinError(f"cannot use the join certificate: {exc.reason or exc}") from None
    finally:
        os.close(fd)
    return context


class _JoinServer:
    def __init__(self, context: ssl.SSLContext, handler: JoinHandler) -> None:
        self.context = context
        self.handler = handler
        self.open = 0  # connections being served now

    async def handle_and_close(self, stream: trio.SocketStream) -> None:
        """One connection, closed at the end whatever happened."""
        try:
            await self.handle(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (the caller closes the stream after)."""
        if self.open >= MAX_CONNECTIONS:
            log.debug("join connection refused: %d connections open", self.open)
            return
        self.open += 1
        peer = "?"
        try:
            peer = _peer_ip(stream)
            await self._exchange(trio.SSLStream(stream, self.context, server_side=True), peer)
        except (trio.BrokenResourceError, _Dropped) as exc:
            log.debug("join connection from %s dropped: %s", peer, reason(exc))
        except Exception as exc:  # one connection must never stop the server
            log.warning("join connection from %s failed: %s: %s", peer, type(exc).__name__,
                        one_line(str(exc)))
        finally:
            self.open -= 1

    async def _exchange(self, stream: trio.SSLStream[trio.SocketStream], peer: str) -> None:
        """The client has `EXCHANGE_TIMEOUT_S` to shake hands and send its request and
        `SEND_TIMEOUT_S` to take the answer; the handler's work between is bounded by the
        handler (a join's writes by the ring), not cut short here: it may have changed the
        cluster, and its answer must go out."""
        with trio.move_on_after(EXCHANGE_TIMEOUT_S) as asking:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as handshake:
                await stream.do_handshake()
            if handshake.cancelled_caught:
                raise _Dropped(f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s")
            request = await _receive_frame(stream)
        if asking.cancelled_caught:
            raise _Dropped(f"no request within {EXCHANGE_TIMEOUT_S:g} s")
        if not isinstance(request, dict):
            answer: dict[str, Any] = {"ok": False, "error": "malformed request"}
        else:
            answer = await self._answer(request, peer)
        with trio.move_on_after(SEND_TIMEOUT_S) as sending:
            await stream.send_all(_frame_or_internal_error(answer, peer))
            await stream.aclose()
        if sending.cancelled_caught:
            raise _Dropped(f"the answer was not taken within {SEND_TIMEOUT_S:g} s")

    async def _answer(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        try:
            return await self.handler(request, peer)
        except Exception as exc:
            log.warning("join request from %s failed: %s: %s", peer, type(exc).__name__,
                        one_line(str(exc)))
            return {"ok": False, "error": "internal error"}


def _frame_or_internal_error(answer: dict[str, Any], peer: str) -> bytes:
    """The frame of the handler's `answer`, or of an internal error when it cannot be sent."""
    try:
        if not isinstance(answer, dict):
            raise TypeError(f"the handler answered a {type(answer).__name__}, not a dict")
        return _frame(answer)
    except (TypeError, ValueError) as exc:
        log.warning("join answer to %s not sent: %s", peer, one_line(str(exc)))
        return _frame({"ok": False, "error": "internal error"})


def _peer_ip(stream: trio.SocketStream) -> str:
    """The peer's IP address; an IPv4 peer of a dual-stack listener as plain IPv4. OSError when
    the peer is already gone."""
    address: str = stream.socket.getpeername()[0]
    return address.removeprefix("::ffff:") if "." in address else address


# --------------------------------------------------------------------------------------------
# Client


async def request_join(host: str, port: int, expected_fingerprint: str,
                       request: dict[str, Any], *,
                       timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
    """Send `request` to the join service at `host`:`port` whose certificate has the SHA-256
    fingerprint `expected_fingerprint`, and return its answer. JoinError for every failure.

    `timeout` bounds the whole exchange (connect, handshake, request, answer), a plain argument
    rather than a cancel scope of the caller's so that its expiry becomes a JoinError."""
    where = format_host_port(host, port)
    frame = _frame(request)
    with trio.move_on_after(timeout):
        try:
            transport = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise JoinError(f"cannot connect to the join service at {where}: "
                            f"{_connect_reason(exc)}") from None
        stream = trio.SSLStream(transport, _client_context())
        try:
            return await _client_exchange(stream, where, expected_fingerprint.lower(), frame)
        finally:
            await trio.aclose_forcefully(stream)
    raise JoinError(f"no answer from the join service at {where} within {timeout:g} s")


async def _client_exchange(stream: trio.SSLStream[trio.SocketStream], where: str,
                           expected_fingerprint: str, frame: bytes) -> dict[str, Any]:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise JoinError(f"TLS handshake with {where} failed: {reason(exc)}") from None
    der = stream.getpeercert(binary_form=True)
    presented = hashlib.sha256(der).hexdigest() if der else "(none)"
    if presented != expected_fingerprint:
        raise JoinError(f"the server at {where} presents certificate fingerprint {presented}, "
                        f"the token expects {expected_fingerprint}: wrong host or a man in the "
                        "middle; nothing was sent")
    try:
        await stream.send_all(frame)
        answer = await _receive_frame(stream)
    except (trio.BrokenResourceError, _Dropped) as exc:
        raise JoinError(f"the join service at {where} broke the exchange: {reason(exc)}"
                        ) from None
    if not isinstance(answer, dict):
        raise JoinError(f"bad answer from the join service at {where}: not a JSON object")
    return answer


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint is checked after the handshake
    return context


def _connect_reason(exc: OSError) -> str:
    """The operating system's words for a failed connect (trio wraps each attempt's error)."""
    causes = getattr(exc.__cause__, "exceptions", ())
    reasons = [os.strerror(c.errno) for c in causes if isinstance(c, OSError) and c.errno]
    if reasons:
        return ", ".join(dict.fromkeys(reasons))
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------------------------
# Frames


def _frame(message: dict[str, Any]) -> bytes:
    """The frame of `message`; TypeError or ValueError when it is not JSON or too large."""
    body = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(body)} bytes, more than {MAX_MESSAGE_BYTES}")
    return HEADER.pack(len(body)) + body


async def _receive_frame(stream: trio.SSLStream[trio.SocketStream]) -> Any:
    """The JSON value of the next frame (None when it is not JSON); _Dropped when the frame is
    too large or the peer closes the connection inside it."""
    (length,) = HEADER.unpack(await _receive_exactly(stream, HEADER.size))
    if length > MAX_MESSAGE_BYTES:
        raise _Dropped(f"frame of {length} bytes, more than {MAX_MESSAGE_BYTES}")
    body = await _receive_exactly(stream, length)
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


async def _receive_exactly(stream: trio.SSLStream[trio.SocketStream], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise _Dropped("connection closed before a whole frame arrived")
        data += chunk
    return bytes(data)

