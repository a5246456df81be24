"""pmxfs.runtime.qnetd_server over TLS on 127.0.0.1: enrollment (pinned CA, expired and used
tokens, a CSR for another cluster, the rate limit), voting connections (a certificate of another
cluster refused and logged, Hello/Welcome, heartbeat echo, a vote from the real arbiter, a new
connection replacing the old, a silent client dropped) and misbehaving peers that never stop the
server."""

from __future__ import annotations

import functools
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pmxfs.core.join_limit import FailureLimiter
from pmxfs.core.qdevice_wire import (
    Enroll,
    Heartbeat,
    Hello,
    Membership,
    Message,
    Refused,
    Ring,
    Vote,
    VoteReply,
    Welcome,
)
from pmxfs.core.qnetd_token import QnetdToken
from pmxfs.runtime.qdevice_frames import receive_message, send_message
from pmxfs.runtime.qnetd_pki import (
    ENROLL_SERVER_NAME,
    EnrollError,
    client_context,
    enroll,
    init,
    issue_token,
    load,
    make_csr,
)
from pmxfs.runtime.qnetd_server import QnetdServer
from pmxfs.runtime.qnetd_state import ClusterState, StateError, load_state, state_path

HOST = "127.0.0.1"
NAME, ID = "alpha", "0123456789abcdef"
WAIT_S = 10.0


@dataclass
class Qnetd:
    directory: Path
    server: QnetdServer
    port: int
    streams: list[trio.abc.Stream] = field(default_factory=list)  # closed at the end

    async def connect(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(HOST, self.port)
        self.streams.append(stream)
        return stream

    def token(self, ttl_s: int = 3600, now: float | None = None) -> QnetdToken:
        return issue_token(self.directory, HOST, self.port, ttl_s,
                           time.time() if now is None else now)


@asynccontextmanager
async def running_qnetd(tmp_path: Path, **kwargs: object) -> AsyncIterator[Qnetd]:
    directory = tmp_path / "qnetd"
    init(directory)
    server = QnetdServer(load(directory), **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(server.serve, HOST, 0))
        qnetd = Qnetd(directory, server, port)
        try:
            yield qnetd
        finally:
            for stream in qnetd.streams:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


@dataclass
class Credentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


async def enrolled(qnetd: Qnetd, name: str = NAME, cluster_id: str = ID) -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, ca_pem = await enroll(HOST, qnetd.port, qnetd.token(), name, cluster_id, key,
                                    timeout=WAIT_S)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Credentials(ca_pem, cert_pem, key_pem)


async def voting_stream(qnetd: Qnetd,
                        credentials: Credentials) -> trio.SSLStream[trio.SocketStream]:
    context = client_context(credentials.ca_pem, credentials.cert_pem, credentials.key_pem)
    stream = trio.SSLStream(await qnetd.connect(), context)
    await stream.do_handshake()
    return stream


def hello(node_id: int = 1, nodes: tuple[int, ...] = (1,), name: str = NAME,
          cluster_id: str = ID, timeout_ms: int = 10_000) -> Hello:
    return Hello(name, cluster_id, node_id, "ffsplit", "lowest", False, timeout_ms, 30_000,
                 nodes)


async def exchange(stream: trio.SSLStream[trio.SocketStream], message: Message) -> Message:
    with trio.fail_after(WAIT_S):
        await send_message(stream, message)
        return await receive_message(stream)


async def closed_by_server(stream: trio.abc.ReceiveStream, within: float = WAIT_S) -> bool:
    """Whether the server closes `stream` within `within` (messages before are skipped)."""
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def handshake_and_read(stream: trio.SSLStream[trio.SocketStream]) -> None:
    await stream.do_handshake()
    await stream.receive_some(1)


def enrolling_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def raw_enroll(qnetd: Qnetd, message: Message) -> Message:
    stream = trio.SSLStream(await qnetd.connect(), enrolling_context(),
                            server_hostname=ENROLL_SERVER_NAME)
    try:
        return await exchange(stream, message)
    finally:
        await trio.aclose_forcefully(stream)


async def eventually(condition: Callable[[], object], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not condition():  # noqa: ASYNC110 polls state that has no event; bounded
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {WAIT_S:g} s waiting for {what}")


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pmxfs.qnetd" and text in r.getMessage()]


@pytest.fixture(autouse=True)
def _log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pmxfs.qnetd")


# ---------------------------------------------------------------------------------- enrollment


async def test_enroll(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        assert credentials.ca_pem == (qnetd.directory / "ca.pem").read_bytes()
        assert logged(caplog, f"cluster {NAME}/{ID} enrolled")


async def test_a_wrong_ca_fingerprint_sends_nothing(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        token = qnetd.token()
        wrong = QnetdToken(token.host, token.port, "00" * 32, token.secret)
        key = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(EnrollError, match="nothing was sent"):
            await enroll(HOST, qnetd.port, wrong, NAME, ID, key, timeout=WAIT_S)
        await eventually(lambda: logged(caplog, "127.0.0.1: closed"),
                         "the server to see the connection end with no request")
        assert not logged(caplog, "enroll")
        # the token was not spent: the right fingerprint still enrolls with it
        await enroll(HOST, qnetd.port, token, NAME, ID, key, timeout=WAIT_S)


async def test_an_expired_token_is_refused_and_logged(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        token = qnetd.token(ttl_s=60, now=time.time() - 120)
        key = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(EnrollError, match="refused the enrollment: the token has expired"):
            await enroll(HOST, qnetd.port, token, NAME, ID, key, timeout=WAIT_S)
        assert logged(caplog, "refused: the token has expired")


async def test_a_used_token_is_refused_and_of_two_concurrent_uses_one_wins(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        token = qnetd.token()
        outcomes: list[str] = []

        async def use() -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                await enroll(HOST, qnetd.port, token, NAME, ID, key, timeout=WAIT_S)
                outcomes.append("won")
            except EnrollError as exc:
                outcomes.append(str(exc))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(use)
        assert outcomes.count("won") == 1, outcomes
        assert any("unknown or already used token" in o for o in outcomes), outcomes
        with pytest.raises(EnrollError, match="unknown or already used token"):
            await enroll(HOST, qnetd.port, token, NAME, ID,
                         ec.generate_private_key(ec.SECP256R1()), timeout=WAIT_S)
        assert logged(caplog, "unknown or already used token")


async def test_a_csr_for_another_cluster_is_refused(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        token = qnetd.token()
        key = ec.generate_private_key(ec.SECP256R1())
        answer = await raw_enroll(qnetd, Enroll(token.secret, NAME, ID,
                                                make_csr(key, "beta", ID)))
        assert isinstance(answer, Refused)
        assert "another cluster" in answer.reason
        assert logged(caplog, "another cluster")


async def test_failed_enrollments_are_rate_limited_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limiter = FailureLimiter(max_failures=2, window_s=60.0, max_total=100)
    async with running_qnetd(tmp_path, limiter=limiter) as qnetd:
        key = ec.generate_private_key(ec.SECP256R1())
        bad = Enroll(b"\x01" * 32, NAME, ID, make_csr(key, NAME, ID))
        for _ in range(2):
            answer = await raw_enroll(qnetd, bad)
            assert isinstance(answer, Refused)
            assert "unknown" in answer.reason
        for _ in range(3):
            answer = await raw_enroll(qnetd, bad)
            assert isinstance(answer, Refused)
            assert "too many failed" in answer.reason
        # a good token is refused as well while the source is limited
        good = Enroll(qnetd.token().secret, NAME, ID, make_csr(key, NAME, ID))
        answer = await raw_enroll(qnetd, good)
        assert isinstance(answer, Refused)
        assert "too many failed" in answer.reason
        assert len(logged(caplog, "too many failed")) == 1


async def test_an_enrollment_connection_may_only_enroll(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        answer = await raw_enroll(qnetd, hello())
        assert isinstance(answer, Refused)
        assert "may only enroll" in answer.reason


# ---------------------------------------------------------------------------------- voting


async def test_hello_welcome_heartbeat_and_a_vote(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        stream = await voting_stream(qnetd, await enrolled(qnetd))
        assert await exchange(stream, hello()) == Welcome()
        assert await exchange(stream, Heartbeat(41)) == Heartbeat(41)
        ring = Ring(8, 1)
        # the only node of the nodelist is connected: the arbiter grants it the vote
        reply = await exchange(stream, Membership(ring, (1,), True))
        assert reply == VoteReply(ring, Vote.ACK)
        assert await exchange(stream, Heartbeat(42)) == Heartbeat(42)
        assert logged(caplog, f"{NAME}/{ID} node 1 (127.0.0.1): connected")
        assert logged(caplog, "ring 1.8, members 1, quorate")
        assert logged(caplog, "vote ack for ring 1.8")


async def test_a_cluster_without_connections_and_holder_is_forgotten(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        stream = await voting_stream(qnetd, await enrolled(qnetd))
        assert await exchange(stream, hello(nodes=(1, 2))) == Welcome()
        assert list(qnetd.server.clusters) == [(NAME, ID)]
        await stream.aclose()
        await eventually(lambda: not qnetd.server.clusters, "the cluster to be forgotten")


async def test_a_certificate_of_another_cluster_is_refused_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd, "beta", "fedcba9876543210")
        stream = await voting_stream(qnetd, credentials)
        answer = await exchange(stream, hello())
        assert isinstance(answer, Refused)
        assert "a client certificate of another cluster" in answer.reason
        assert await closed_by_server(stream)
        assert logged(caplog, "a client certificate of another cluster")
        assert not qnetd.server.clusters


async def test_a_certificate_of_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path / "one") as qnetd, \
            running_qnetd(tmp_path / "two") as other:
        foreign = await enrolled(other)
        context = client_context(qnetd.server.pki.ca_pem, foreign.cert_pem, foreign.key_pem)
        stream = trio.SSLStream(await qnetd.connect(), context)
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(WAIT_S):
            await handshake_and_read(stream)  # TLS 1.3: the refusal arrives after it
        # and the server goes on
        assert await exchange(await voting_stream(qnetd, await enrolled(qnetd)),
                              hello()) == Welcome()


async def test_a_new_connection_replaces_the_old(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        first = await voting_stream(qnetd, credentials)
        assert await exchange(first, hello()) == Welcome()
        second = await voting_stream(qnetd, credentials)
        assert await exchange(second, hello()) == Welcome()
        assert await closed_by_server(first)
        assert await exchange(second, Heartbeat(1)) == Heartbeat(1)
        assert logged(caplog, "replaced by a new connection")


async def test_a_silent_client_is_dropped(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        stream = await voting_stream(qnetd, await enrolled(qnetd))
        assert await exchange(stream, hello(timeout_ms=1000)) == Welcome()
        started = trio.current_time()
        assert await closed_by_server(stream)
        assert trio.current_time() - started >= 0.9
        assert logged(caplog, "silent for 1000 ms")


@pytest.mark.parametrize("frame", [
    struct.pack(">I", 1 << 30),  # oversized
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
    struct.pack(">I", 2) + b"\x91\x01",  # a list that does not start with a kind
])
async def test_malformed_frames_close_the_connection_not_the_server(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, frame: bytes) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello()) == Welcome()
        await stream.send_all(frame)
        assert await closed_by_server(stream)
        assert logged(caplog, "malformed frame")
        # as first message, on a new connection
        stream = await voting_stream(qnetd, credentials)
        await stream.send_all(frame)
        assert await closed_by_server(stream)
        # and the server goes on
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello()) == Welcome()


async def test_plain_tcp_garbage_and_silence_do_not_stop_the_server(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path, max_connections=3) as qnetd:
        garbage = await qnetd.connect()
        await garbage.send_all(b"GET / HTTP/1.0\r\n\r\n")
        assert await closed_by_server(garbage)
        silent = [await qnetd.connect() for _ in range(3)]
        extra = await qnetd.connect()
        assert await closed_by_server(extra)  # over the limit: closed at once
        for stream in silent:
            await stream.aclose()
        await eventually(lambda: not qnetd.server.open, "every connection to close")
        credentials = await enrolled(qnetd)
        assert await exchange(await voting_stream(qnetd, credentials), hello()) == Welcome()


async def test_a_client_that_leaves_mid_frame(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello(nodes=(1, 2))) == Welcome()
        await stream.send_all(struct.pack(">I", 100) + b"\x93")
        await stream.aclose()
        await eventually(lambda: logged(caplog, "disconnected"), "the disconnection")
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello(nodes=(1, 2))) == Welcome()


async def test_the_vote_holder_is_kept_on_disk_across_restarts(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello()) == Welcome()
        ring = Ring(8, 1)
        assert await exchange(stream, Membership(ring, (1,), True, 5)) == VoteReply(ring,
                                                                                   Vote.ACK)
        path = state_path(qnetd.directory, NAME, ID)
        assert load_state(path) == ClusterState(frozenset({1}), 5)
    restarted = QnetdServer(load(qnetd.directory))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(restarted.serve, HOST, 0))
        again = Qnetd(qnetd.directory, restarted, port)
        try:
            stream = await voting_stream(again, credentials)
            assert await exchange(stream, hello(nodes=(1, 2))) == Welcome()
            arbiter = restarted.clusters[(NAME, ID)].arbiter
            assert (arbiter.last_holder, arbiter.newest_stamp) == (frozenset({1}), 5)
        finally:
            for opened in again.streams:
                await trio.aclose_forcefully(opened)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("content", [b"[]", b"{", b'{"last_holder": [0]}',
                                     b'{"newest_stamp": -1}'])
def test_an_unusable_state_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateError):
        load_state(path)
    assert load_state(tmp_path / "missing.json") == ClusterState()
