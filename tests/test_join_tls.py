"""pmxfs.runtime.join_tls: the join certificate, and the join exchange served and requested over
TLS on 127.0.0.1 -- the pinned fingerprint, and every way a client or a handler can misbehave
without stopping the server."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pmxfs.runtime.join_tls import (
    EXCHANGE_TIMEOUT_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_MESSAGE_BYTES,
    JoinError,
    fingerprint,
    make_certificate,
    request_join,
    serve_join,
)

HOST = "127.0.0.1"
PEM = make_certificate("pmxfs-test")
OTHER_PEM = make_certificate("pmxfs-test")
FRAME_HEADER = struct.Struct(">I")


class Handler:
    """A join handler that records its calls and answers with what it was given."""

    def __init__(self, fail: BaseException | None = None, answer: Any = None) -> None:
        self.calls: list[tuple[dict[str, Any], str]] = []
        self.fail = fail
        self.answer = answer

    async def __call__(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        self.calls.append((request, peer))
        if self.fail is not None:
            raise self.fail
        if self.answer is not None:
            return self.answer  # type: ignore[no-any-return]
        return {"ok": True, "result": {"request": request, "peer": peer}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def join_server(handler: Handler, pem: bytes = PEM) -> AsyncIterator[int]:
    """serve_join on a free port of 127.0.0.1 for the body of the `async with`; yields the
    port."""
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_join, HOST, port, pem, handler)
        yield port
        nursery.cancel_scope.cancel()


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def server_context(pem: bytes, directory: Path) -> ssl.SSLContext:
    """A TLS server context of a bare test server presenting `pem`'s certificate."""
    path = directory / "join.pem"
    path.write_bytes(pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(path)
    return context


async def bare_server(nursery: trio.Nursery,
                      handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """A TCP server of the test's own on a free port of 127.0.0.1, in `nursery`; its port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=HOST))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def tls_connect(port: int) -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(await trio.open_tcp_stream(HOST, port), client_context())
    await stream.do_handshake()
    return stream


async def until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the peer sends until it closes the connection."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


async def answer_of(stream: trio.SSLStream[trio.SocketStream]) -> Any:
    data = await until_closed(stream)
    (length,) = FRAME_HEADER.unpack(data[:4])
    assert len(data) == 4 + length
    return json.loads(data[4:])


# --------------------------------------------------------------------------------------------
# The certificate


def test_the_certificate_is_a_p256_key_and_a_self_signed_certificate() -> None:
    text = PEM.decode()
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS8, unencrypted
    assert "-----BEGIN CERTIFICATE-----" in text
    key = serialization.load_pem_private_key(PEM, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    (certificate,) = x509.load_pem_x509_certificates(PEM)
    assert certificate.subject == certificate.issuer
    assert certificate.subject.rfc4514_string() == "CN=pmxfs-test"
    assert certificate.public_key() == key.public_key()
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc <= now - datetime.timedelta(hours=23)
    assert certificate.not_valid_after_utc >= now + datetime.timedelta(days=20 * 365)
    (other,) = x509.load_pem_x509_certificates(OTHER_PEM)
    assert certificate.serial_number != other.serial_number


def test_the_fingerprint_is_the_sha256_of_the_certificate_der() -> None:
    (certificate,) = x509.load_pem_x509_certificates(PEM)
    expected = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert fingerprint(PEM) == expected
    assert len(expected) == 64
    assert expected == expected.lower()
    assert fingerprint(OTHER_PEM) != fingerprint(PEM)


@pytest.mark.parametrize("pem", [b"", b"garbage", PEM.split(b"-----BEGIN CERTIFICATE")[0]])
def test_a_pem_without_a_certificate_has_no_fingerprint(pem: bytes) -> None:
    with pytest.raises(JoinError, match="no usable certificate"):
        fingerprint(pem)


async def test_serving_without_a_usable_certificate_fails_before_listening() -> None:
    with pytest.raises(JoinError, match="cannot use the join certificate"):
        await serve_join(HOST, free_port(), PEM.split(b"-----BEGIN CERTIFICATE")[0], Handler())


async def test_serving_on_a_port_in_use_raises_oserror() -> None:
    with trio.socket.socket() as taken:
        await taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError):  # noqa: PT011 - whatever the kernel says
            await serve_join(HOST, port, PEM, Handler())


# --------------------------------------------------------------------------------------------
# The exchange


async def test_a_request_reaches_the_handler_and_its_answer_comes_back() -> None:
    handler = Handler()
    async with join_server(handler) as port:
        answer = await request_join(HOST, port, fingerprint(PEM), {"node": "pve4", "n": [1, 2]})
        assert handler.calls == [({"node": "pve4", "n": [1, 2]}, HOST)]
        assert answer == {"ok": True, "result": {"request": {"node": "pve4", "n": [1, 2]},
                                                 "peer": HOST}}
        # the fingerprint may be given in capitals
        assert (await request_join(HOST, port, fingerprint(PEM).upper(), {}))["ok"] is True


async def test_a_wrong_fingerprint_sends_nothing() -> None:
    handler = Handler()
    async with join_server(handler) as port:
        with pytest.raises(JoinError) as caught:
            await request_join(HOST, port, fingerprint(OTHER_PEM), {"secret": "s3cr3t"})
    message = str(caught.value)
    assert fingerprint(PEM) in message
    assert fingerprint(OTHER_PEM) in message
    assert f"{HOST}:{port}" in message
    assert "nothing was sent" in message
    assert "\n" not in message
    assert handler.calls == []


async def test_a_wrong_fingerprint_leaves_the_server_without_application_bytes(
        tmp_path: Path) -> None:
    """A bare TLS server records what arrives after its handshake: nothing."""
    context = server_context(OTHER_PEM, tmp_path)
    received: list[bytes] = []
    done = trio.Event()

    async def record(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, context, server_side=True)
        await stream.do_handshake()
        received.append(await until_closed(stream))
        done.set()

    async with trio.open_nursery() as nursery:
        port = await bare_server(nursery, record)
        with pytest.raises(JoinError, match="nothing was sent"):
            await request_join(HOST, port, fingerprint(PEM), {"secret": "s3cr3t"})
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert received == [b""]


@pytest.fixture
def jumping_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead once every task has waited 50 ms of real time: the
    server's deadlines pass at once, while loopback I/O (microseconds) is never overtaken."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_silent_client_is_dropped_at_the_deadline_and_the_server_keeps_serving(
        jumping_clock: trio.testing.MockClock) -> None:
    handler = Handler()
    async with join_server(handler) as port:
        silent = await trio.open_tcp_stream(HOST, port)
        start = trio.current_time()
        assert await until_closed(silent) == b""
        assert HANDSHAKE_TIMEOUT_S <= trio.current_time() - start <= EXCHANGE_TIMEOUT_S
        await silent.aclose()

        handshaken = await tls_connect(port)  # ... and one that sends no request
        start = trio.current_time()
        assert await until_closed(handshaken) == b""
        assert trio.current_time() - start <= EXCHANGE_TIMEOUT_S + 0.1
        await trio.aclose_forcefully(handshaken)

        assert (await request_join(HOST, port, fingerprint(PEM), {"after": 1}))["ok"] is True
    assert handler.calls == [({"after": 1}, HOST)]


@pytest.mark.parametrize("length", [MAX_MESSAGE_BYTES + 1, 2**32 - 1])
async def test_an_oversized_frame_is_dropped_without_an_answer(length: int) -> None:
    handler = Handler()
    async with join_server(handler) as port:
        stream = await tls_connect(port)
        await stream.send_all(FRAME_HEADER.pack(length) + b"{" * 1000)
        with trio.fail_after(10):
            assert await until_closed(stream) == b""
        await trio.aclose_forcefully(stream)
        assert (await request_join(HOST, port, fingerprint(PEM), {"after": 1}))["ok"] is True
    assert handler.calls == [({"after": 1}, HOST)]


async def test_a_frame_of_the_largest_size_is_read() -> None:
    handler = Handler(answer={"ok": True})
    big = {"pad": "x" * (MAX_MESSAGE_BYTES - len('{"pad":""}'))}
    async with join_server(handler) as port:
        assert await request_join(HOST, port, fingerprint(PEM), big) == {"ok": True}
    assert handler.calls == [(big, HOST)]


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"x"', b"\xff\xfe",
                                  b"[" * 100_000, b"9" * 5000])
async def test_a_request_that_is_no_json_object_is_answered_malformed(body: bytes) -> None:
    handler = Handler()
    async with join_server(handler) as port:
        stream = await tls_connect(port)
        await stream.send_all(FRAME_HEADER.pack(len(body)) + body)
        with trio.fail_after(10):
            assert await answer_of(stream) == {"ok": False, "error": "malformed request"}
        await trio.aclose_forcefully(stream)
    assert handler.calls == []


async def test_a_truncated_request_is_dropped() -> None:
    handler = Handler()
    async with join_server(handler) as port:
        stream = await tls_connect(port)
        await stream.send_all(FRAME_HEADER.pack(100) + b'{"a":')
        await stream.aclose()
        assert (await request_join(HOST, port, fingerprint(PEM), {"after": 1}))["ok"] is True
    assert handler.calls == [({"after": 1}, HOST)]


@pytest.mark.parametrize(("handler", "logged"), [
    (Handler(fail=RuntimeError("the tree\nis gone")), "RuntimeError: the tree"),
    (Handler(answer={"ok": True, "result": {1, 2}}), "not JSON serializable"),
    (Handler(answer={"ok": True, "result": float("nan")}), "Out of range float"),
    (Handler(answer={"pad": "x" * MAX_MESSAGE_BYTES}), "more than"),
    (Handler(answer=[1, 2]), "answered a list, not a dict"),
], ids=["raises", "set", "nan", "too-large", "list"])
async def test_a_failing_handler_is_answered_internal_error_and_the_server_keeps_serving(
        handler: Handler, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pmxfs.join")
    async with join_server(handler) as port:
        for _ in range(2):
            answer = await request_join(HOST, port, fingerprint(PEM), {"n": 1})
            assert answer == {"ok": False, "error": "internal error"}
    assert len(handler.calls) == 2
    warnings = [r for r in caplog.records if r.name == "pmxfs.join"]
    assert len(warnings) == 2
    for record in warnings:
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert logged in record.getMessage()
        assert HOST in record.getMessage()
        assert "\n" not in record.getMessage()


async def test_connections_past_the_limit_are_closed_at_once() -> None:
    handler = Handler()
    async with join_server(handler) as port:
        held = [await trio.open_tcp_stream(HOST, port) for _ in range(MAX_CONNECTIONS)]
        try:
            extra = await trio.open_tcp_stream(HOST, port)
            with trio.fail_after(5):  # the held ones wait for HANDSHAKE_TIMEOUT_S
                assert await until_closed(extra) == b""
            await extra.aclose()
        finally:
            for stream in held:
                await stream.aclose()
        with trio.fail_after(10):  # the server notices the closes in its own time
            while True:
                try:
                    answer = await request_join(HOST, port, fingerprint(PEM), {"after": 1})
                    break
                except JoinError:
                    await trio.sleep(0.05)
        assert answer["ok"] is True


# --------------------------------------------------------------------------------------------
# Client failures


async def test_connection_refused_is_a_join_error_naming_the_server() -> None:
    port = free_port()
    with pytest.raises(JoinError, match=rf"{HOST}:{port}: Connection refused$"):
        await request_join(HOST, port, fingerprint(PEM), {})


async def test_an_ipv6_server_is_named_in_brackets() -> None:
    port = free_port()
    with pytest.raises(JoinError, match=rf"\[::1\]:{port}"):
        await request_join("::1", port, fingerprint(PEM), {})


async def test_a_server_that_never_speaks_tls_times_out() -> None:
    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await bare_server(nursery, hold)
        start = trio.current_time()
        with pytest.raises(JoinError, match=rf"no answer from the join service at {HOST}:"
                                            rf"{port} within 0.3 s"):
            await request_join(HOST, port, fingerprint(PEM), {}, timeout=0.3)
        assert trio.current_time() - start < 5
        nursery.cancel_scope.cancel()


async def test_a_server_that_is_no_tls_server_fails_the_handshake() -> None:
    async def talk_plain(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        port = await bare_server(nursery, talk_plain)
        with pytest.raises(JoinError, match=rf"TLS handshake with {HOST}:{port} failed"):
            await request_join(HOST, port, fingerprint(PEM), {})
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("reply", "reason"), [
    (b"", "broke the exchange"),
    (FRAME_HEADER.pack(MAX_MESSAGE_BYTES + 1), "broke the exchange"),
    (FRAME_HEADER.pack(10) + b"{}", "broke the exchange"),
    (FRAME_HEADER.pack(3) + b"[1]", "not a JSON object"),
    (FRAME_HEADER.pack(4) + b"json", "not a JSON object"),
])
async def test_a_bad_answer_is_a_join_error(reply: bytes, reason: str, tmp_path: Path) -> None:
    context = server_context(PEM, tmp_path)

    async def answer_badly(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, context, server_side=True)
        await stream.do_handshake()
        await stream.receive_some()
        await stream.send_all(reply)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await bare_server(nursery, answer_badly)
        with pytest.raises(JoinError, match=reason) as caught:
            await request_join(HOST, port, fingerprint(PEM), {"n": 1})
        assert f"{HOST}:{port}" in str(caught.value)
        nursery.cancel_scope.cancel()


async def test_a_stop_closes_the_listener_and_the_exchange_under_way_gets_its_answer() -> None:
    """What the join service relies on when its last token is used: the joiner whose request
    used it must still get the answer (before, the stop cancelled the exchange mid-way)."""
    entered, release = trio.Event(), trio.Event()

    async def slow(request: dict[str, Any], peer: str) -> dict[str, Any]:
        entered.set()
        await release.wait()
        return {"ok": True, "request": request}

    port = free_port()
    stop = trio.Event()
    answers: list[dict[str, Any]] = []
    with trio.fail_after(EXCHANGE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_join, HOST, port, PEM, slow, stop=stop))

            async def ask() -> None:
                answers.append(await request_join(HOST, port, fingerprint(PEM), {"n": 1}))

            nursery.start_soon(ask)
            await entered.wait()
            stop.set()
            while True:  # the listener closes although an exchange is under way
                try:
                    await (await trio.open_tcp_stream(HOST, port)).aclose()
                except OSError:
                    break
                await trio.sleep(0.01)
            release.set()
    assert answers == [{"ok": True, "request": {"n": 1}}]
