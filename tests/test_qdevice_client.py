"""pmxfs.runtime.qdevice_client against a scripted qnetd on 127.0.0.1 (real mutual TLS with
certificates from runtime/qnetd_pki.py) and a fake node: the vote is cast only after an ACK for
the node's current ring and withdrawn on NACK, WAIT, a ring change, silence and a lost
connection; the client reconnects by itself, follows config and certificate changes, and a
refusal or a wrong CA is logged, never raised."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pmxfs.core import conf
from pmxfs.core.conf.edit import new_cluster, with_node, with_qdevice
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.core.qdevice_wire import (
    Heartbeat,
    Hello,
    Membership,
    Message,
    Refused,
    Vote,
    VoteReply,
    Welcome,
    silence_limit_ms,
)
from pmxfs.core.wire import RingId
from pmxfs.runtime import qnetd_pki
from pmxfs.runtime.qdevice_client import TREE_CA, TREE_CERT, TREE_KEY, QdeviceClient, ring_of
from pmxfs.runtime.qdevice_frames import ConnectionClosed, receive_message, send_message
from pmxfs.runtime.replica_node import RingView

HOST = "127.0.0.1"
CLUSTER_ID = "0123456789abcdef"
TIMEOUT_MS = 1000  # the shortest device timeout qnetd accepts: heartbeats every 250 ms
WAIT_S = 10.0
RING = RingId(seq=8, rep=1)


async def eventually(condition: Callable[[], object], what: str, limit_s: float = WAIT_S) -> None:
    """Poll `condition` until it holds; fail the test after `limit_s` seconds."""
    with trio.move_on_after(limit_s):
        while not condition():  # noqa: ASYNC110 polls state that has no event; bounded
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}")


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    pki: qnetd_pki.QnetdPki
    files: dict[str, bytes]  # the tree's priv/qdevice/ files


def make_pki(directory: Path, cluster: str = "lab") -> Pki:
    qnetd_pki.init(directory)
    pki = qnetd_pki.load(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_csr(qnetd_pki.make_csr(key, cluster, CLUSTER_ID), cluster, CLUSTER_ID)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Pki(pki, {TREE_CA: pki.ca_pem, TREE_CERT: cert, TREE_KEY: key_pem})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("qnetd"))


# ------------------------------------------------------------------------------ a scripted qnetd


@dataclass
class Connection:
    stream: trio.SSLStream[trio.SocketStream]
    hello: Hello
    received: list[Message] = field(default_factory=list)
    closed: bool = False

    def memberships(self) -> list[Membership]:
        return [m for m in self.received if isinstance(m, Membership)]

    def heartbeats(self) -> int:
        return sum(isinstance(m, Heartbeat) for m in self.received)


class FakeQnetd:
    """Welcomes (or refuses) every Hello, echoes heartbeats while `echo`, answers each
    Membership with `policy(membership)` when that is not None."""

    def __init__(self, pki: Pki) -> None:
        self.context = pki.pki.server_context()
        self.connections: list[Connection] = []
        self.echo = True
        self.refuse: str | None = None
        self.policy: Callable[[Membership], Vote | None] = lambda m: None
        self.port = 0

    @property
    def last(self) -> Connection:
        return self.connections[-1]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        connection: Connection | None = None
        try:
            await stream.do_handshake()
            hello = await receive_message(stream)
            assert isinstance(hello, Hello)
            connection = Connection(stream, hello)
            self.connections.append(connection)
            if self.refuse is not None:
                await send_message(stream, Refused(self.refuse))
                return
            await send_message(stream, Welcome())
            while True:
                message = await receive_message(stream)
                connection.received.append(message)
                if isinstance(message, Heartbeat) and self.echo:
                    await send_message(stream, message)
                elif isinstance(message, Membership):
                    vote = self.policy(message)
                    if vote is not None:
                        await send_message(stream, VoteReply(message.ring, vote))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        finally:
            if connection is not None:
                connection.closed = True
            await trio.aclose_forcefully(stream)

    async def vote(self, ring: RingId, vote: Vote) -> None:
        await send_message(self.last.stream, VoteReply(ring_of(ring), vote))


# ------------------------------------------------------------------------------ a fake node


def device_config(port: int, *, timeout_ms: int = TIMEOUT_MS) -> str:
    text, _ = with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), "pve2", "10.0.0.2")
    text = with_qdevice(text, HOST, port, None, "lowest", force=False)
    return text.replace("model: net\n", f"model: net\n    timeout: {timeout_ms}\n", 1)


def parsed(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    assert config is not None
    return config


class FakeNode:
    node_id = 1

    def __init__(self, text: str, files: dict[str, bytes]) -> None:
        self.config = parsed(text)
        self.standalone = False
        self.files = dict(files)
        self.view = RingView(RING, (1, 2), True)
        self.votes: list[tuple[RingId, bool]] = []
        self.alive = False
        self.tree_listeners: list[Callable[[tuple[str, ...], bool], None]] = []
        self.ring_listeners: list[Callable[[RingView], None]] = []

    def tree_file(self, path: str) -> bytes | None:
        return self.files.get(path)

    def add_tree_listener(self, listener: Callable[[tuple[str, ...], bool], None]) -> None:
        self.tree_listeners.append(listener)

    def add_ring_listener(self, listener: Callable[[RingView], None]) -> None:
        self.ring_listeners.append(listener)

    def ring_view(self) -> RingView:
        return self.view

    def set_qdevice_vote(self, ring: RingId, vote: bool) -> None:
        self.votes.append((ring, vote))

    def set_qdevice_alive(self, alive: bool) -> None:
        self.alive = alive

    @property
    def casting(self) -> bool:
        """What the replica would count: the last vote, when it names the current ring."""
        return bool(self.votes) and self.votes[-1] == (self.view.ring, True)

    def new_ring(self, ring: RingId, members: tuple[int, ...]) -> None:
        self.view = RingView(ring, members, False)
        for listener in self.ring_listeners:
            listener(self.view)

    def new_stamp(self, stamp: int) -> None:
        self.view = dataclasses.replace(self.view, stamp=stamp)
        for listener in self.ring_listeners:
            listener(self.view)

    def change_tree(self, text: str | None = None, files: dict[str, bytes] | None = None) -> None:
        paths: list[str] = []
        if text is not None:
            self.config = parsed(text)
            paths.append(COROSYNC_CONF)
        if files is not None:
            self.files = dict(files)
            paths += sorted(files)
        for listener in self.tree_listeners:
            listener(tuple(paths), False)


@asynccontextmanager
async def running(pki: Pki) -> AsyncIterator[tuple[FakeQnetd, FakeNode, QdeviceClient]]:
    qnetd = FakeQnetd(pki)
    async with trio.open_nursery() as nursery:
        await nursery.start(qnetd.serve)
        node = FakeNode(device_config(qnetd.port), pki.files)
        client = QdeviceClient(node, backoff_first_s=0.05, backoff_max_s=0.2)
        nursery.start_soon(client.run)
        yield qnetd, node, client
        nursery.cancel_scope.cancel()


def ack_current(node: FakeNode) -> Callable[[Membership], Vote | None]:
    return lambda m: Vote.ACK if m.ring == ring_of(node.view.ring) else Vote.NACK


# ------------------------------------------------------------------------------ tests


async def test_hello_names_the_cluster_and_the_settings(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, client):
        await eventually(lambda: qnetd.connections and qnetd.last.memberships(), "a Membership")
        hello = qnetd.last.hello
        assert (hello.cluster_name, hello.cluster_id, hello.node_id, hello.nodes) == (
            "lab", CLUSTER_ID, 1, (1, 2))
        assert (hello.algorithm, hello.tie_breaker, hello.keep_active) == (
            "ffsplit", "lowest", False)
        assert (hello.timeout_ms, hello.sync_timeout_ms) == (TIMEOUT_MS, 30_000)
        assert qnetd.last.memberships()[0] == Membership(ring_of(RING), (1, 2), True)
        assert client.connected
        assert node.alive
        await eventually(lambda: qnetd.last.heartbeats() >= 2, "heartbeats")
        assert node.votes == []  # no vote without an ACK


async def test_the_vote_is_cast_only_after_an_ack_for_the_current_ring(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, client):
        await eventually(lambda: qnetd.connections and qnetd.last.memberships(), "a Membership")
        await qnetd.vote(RingId(seq=7, rep=1), Vote.ACK)  # an older ring: means nothing
        await qnetd.vote(RING, Vote.WAIT)
        seen = qnetd.last.heartbeats()
        await eventually(lambda: qnetd.last.heartbeats() >= seen + 2, "two more heartbeats")
        assert node.votes == []
        await qnetd.vote(RING, Vote.ACK)
        await eventually(lambda: node.casting, "the vote cast")
        assert node.votes == [(RING, True)]
        assert client.casting


async def test_nack_and_wait_withdraw_the_vote(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, _):
        await eventually(lambda: qnetd.connections and qnetd.last.memberships(), "a Membership")
        for answer in (Vote.NACK, Vote.WAIT):
            await qnetd.vote(RING, Vote.ACK)
            await eventually(lambda: node.casting, "the vote cast")
            await qnetd.vote(RING, answer)
            await eventually(lambda: not node.casting, f"the vote withdrawn on {answer.value}")
            assert node.votes[-1] == (RING, False)


async def test_a_ring_change_ends_the_vote_and_reports_the_new_ring(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, _):
        qnetd.policy = ack_current(node)
        await eventually(lambda: node.casting, "the vote cast for the first ring")
        new = RingId(seq=12, rep=2)
        node.new_ring(new, (2,))
        assert not node.casting  # the replica drops the vote with the ring
        await eventually(lambda: node.votes[-1] == (new, True),
                         "the vote cast for the new ring after its ACK")
        assert node.votes == [(RING, True), (new, True)]  # nothing sent for the dead ring
        assert qnetd.last.memberships()[-1] == Membership(ring_of(new), (2,), False)
        assert len(qnetd.connections) == 1  # the connection was kept


async def test_a_new_stamp_is_reported_in_the_same_ring(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, _):
        qnetd.policy = ack_current(node)
        await eventually(lambda: node.casting, "the vote cast")
        node.new_stamp(RING.seq)  # the ring turned quorate with the device's vote
        await eventually(lambda: len(qnetd.last.memberships()) == 2, "a second Membership")
        assert qnetd.last.memberships()[-1] == Membership(ring_of(RING), (1, 2), True, RING.seq)
        node.new_stamp(RING.seq)  # nothing new: nothing sent
        await eventually(lambda: node.votes[-1] == (RING, True) and node.casting,
                         "the vote still cast")
        seen = qnetd.last.heartbeats()
        await eventually(lambda: qnetd.last.heartbeats() >= seen + 2, "two more heartbeats")
        assert len(qnetd.last.memberships()) == 2


async def test_silence_withdraws_within_the_silence_limit_then_reconnects(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, client):
        qnetd.policy = ack_current(node)
        await eventually(lambda: node.casting, "the vote cast")
        qnetd.echo = False
        silent_since = trio.current_time()
        await eventually(lambda: not node.casting, "the vote withdrawn")
        assert trio.current_time() - silent_since < TIMEOUT_MS / 1000
        # heard last at most one heartbeat interval before the echo stopped
        assert trio.current_time() - silent_since >= silence_limit_ms(TIMEOUT_MS) / 1000 - 0.3
        await eventually(lambda: len(qnetd.connections) >= 2, "a new connection")
        assert qnetd.connections[0].closed
        qnetd.echo = True
        await eventually(lambda: client.connected and node.alive, "welcomed again")


async def test_a_lost_connection_withdraws_and_reconnects(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, client):
        qnetd.policy = ack_current(node)
        await eventually(lambda: node.casting, "the vote cast")
        await qnetd.last.stream.aclose()
        await eventually(lambda: not node.casting, "the vote withdrawn")
        await eventually(lambda: len(qnetd.connections) == 2 and node.casting,
                         "reconnected and casting again")
        assert client.connected


async def test_a_refusal_is_logged_and_retried(pki: Pki,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pmxfs.qdevice")
    async with running(pki) as (qnetd, node, client):
        qnetd.refuse = "a client certificate of another cluster"
        await eventually(lambda: len(qnetd.connections) >= 3, "three attempts")
        assert not client.connected
        assert not node.alive
        assert node.votes == []
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1  # once per distinct reason
        assert "a client certificate of another cluster" in refusals[0].getMessage()
        qnetd.refuse = None
        await eventually(lambda: client.connected, "welcomed once qnetd accepts")


async def test_a_wrong_ca_is_refused_in_the_handshake(pki: Pki, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pmxfs.qdevice")
    other = make_pki(tmp_path / "other")
    async with running(pki) as (qnetd, node, client):
        await eventually(lambda: client.connected, "connected")
        node.change_tree(files={**pki.files, TREE_CA: other.files[TREE_CA]})
        await eventually(lambda: not client.connected, "disconnected")
        await eventually(lambda: any("TLS" in r.getMessage() for r in caplog.records),
                         "a TLS failure logged")
        assert len(qnetd.connections) == 1


async def test_the_client_follows_the_config_and_the_files(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, _):
        qnetd.policy = ack_current(node)
        await eventually(lambda: node.casting, "the vote cast")
        with_device = device_config(qnetd.port)
        node.change_tree(text=new_cluster("lab", "pve1", 1, 1, "10.0.0.1"))
        await eventually(lambda: not node.casting and not node.alive, "stopped")
        await eventually(lambda: qnetd.connections[0].closed, "the connection closed")
        node.change_tree(text=with_device, files={})  # a device, but no certificates
        seen = len(qnetd.connections)
        node.change_tree(files=pki.files)
        await eventually(lambda: len(qnetd.connections) == seen + 1 and node.casting,
                         "connected again once the files are back")
        # a changed timeout is a new Hello
        node.change_tree(text=device_config(qnetd.port, timeout_ms=2000))
        await eventually(lambda: qnetd.last.hello.timeout_ms == 2000, "a new Hello")
        assert sum(not c.closed for c in qnetd.connections) == 1


async def test_an_unreachable_qnetd_is_retried_without_ever_voting(pki: Pki) -> None:
    async with running(pki) as (qnetd, node, client):
        await eventually(lambda: client.connected, "connected")
        with trio.socket.socket() as probe:  # a port nobody listens on
            await probe.bind((HOST, 0))
            closed_port = probe.getsockname()[1]
        node.change_tree(text=device_config(closed_port))
        await eventually(lambda: not client.connected, "disconnected")
        attempts = len(qnetd.connections)
        node.change_tree(text=device_config(qnetd.port))
        await eventually(lambda: len(qnetd.connections) > attempts, "back at the open port")
        assert node.votes == []
