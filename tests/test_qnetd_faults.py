"""qnetd under faults of its own (found in review): a holder whose nodes left is forgotten, a
failed or unreadable state file never leads to a vote a restart could contradict and does not
hold votes back for good, one source cannot take every connection slot, a busy port is one
line, a stamp newer than its ring is ignored."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from cpg_harness import PMXFS
from test_qnetd_server import (
    HOST,
    enrolled,
    eventually,
    exchange,
    hello,
    logged,
    running_qnetd,
    voting_stream,
)

from pmxfs.core.qdevice_wire import (
    Heartbeat,
    Hello,
    Membership,
    Refused,
    Ring,
    Vote,
    VoteReply,
    Welcome,
)
from pmxfs.core.qnetd_arbiter import ClusterArbiter
from pmxfs.runtime import qnetd_server
from pmxfs.runtime.qdevice_frames import receive_message, send_message
from pmxfs.runtime.qnetd_pki import init
from pmxfs.runtime.qnetd_state import ClusterState, StateError, state_path

TIMEOUT = 10_000
GRACE = TIMEOUT * 3 // 2


def _hello(node: int, nodes: tuple[int, ...]) -> Hello:
    return Hello("pmx", "0123456789abcdef", node, "ffsplit", "lowest", False, TIMEOUT, 30_000,
                 nodes)


# A holder whose nodes all left is released after the grace, so the arbiter turns idle and
# qnetd forgets the cluster (every cluster after `pmxfs qdevice remove`).
def test_arbiter_with_a_holder_whose_nodes_all_left_becomes_idle() -> None:
    arbiter = ClusterArbiter(0)
    ring = Ring(8, 1)
    for node in (1, 2):
        arbiter.hello(0, _hello(node, (1, 2)))
        arbiter.membership(0, node, Membership(ring, (1, 2), True))
    assert {n: r.vote for n, r in arbiter.decisions(0).items()} == {1: Vote.ACK, 2: Vote.ACK}
    arbiter.gone(100, 1)
    arbiter.gone(100, 2)
    arbiter.decisions(100)
    deadline = arbiter.next_deadline()
    assert deadline is not None
    assert deadline <= 100 + GRACE
    arbiter.decisions(deadline)
    assert arbiter.idle(), "the holder's nodes are gone for the grace: nothing left to remember"


async def test_qnetd_forgets_a_cluster_whose_holder_left(tmp_path: Path) -> None:
    async with running_qnetd(tmp_path) as qnetd:
        stream = await voting_stream(qnetd, await enrolled(qnetd))
        assert await exchange(stream, hello(timeout_ms=1000)) == Welcome()
        ring = Ring(8, 1)
        assert await exchange(stream, Membership(ring, (1,), True)) == VoteReply(ring, Vote.ACK)
        await stream.aclose()
        with trio.move_on_after(6):  # grace is 1.5 s here
            while qnetd.server.clusters:  # noqa: ASYNC110 polls server state; bounded
                await trio.sleep(0.05)
        assert not qnetd.server.clusters, "the cluster is never forgotten"


async def test_a_vote_held_back_by_a_failed_state_write_is_sent_once_it_can_be(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient write failure (ENOSPC, say) holds the grant back, and it goes out once the
    state can be saved, without waiting for another event: heartbeats alone do not decide."""
    caplog.set_level(logging.INFO, logger="pmxfs.qnetd")
    disk_full = [True]
    real_save = qnetd_server.save_state

    def save(path: Path, state: ClusterState) -> None:
        if disk_full[0]:
            raise StateError(f"cannot write {path}: No space left on device")
        real_save(path, state)

    monkeypatch.setattr(qnetd_server, "save_state", save)
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello(timeout_ms=1000)) == Welcome()
        ring = Ring(8, 1)
        with trio.fail_after(5):
            await send_message(stream, Membership(ring, (1,), True))
        await eventually(lambda: logged(caplog, "votes not sent"), "the failed save")
        disk_full[0] = False
        got_vote = False
        with trio.move_on_after(5):
            beat = 0
            while not got_vote:
                beat += 1
                await send_message(stream, Heartbeat(beat))  # keeps the connection alive
                with trio.move_on_after(0.25):
                    while True:
                        message = await receive_message(stream)
                        if isinstance(message, VoteReply):
                            got_vote = message == VoteReply(ring, Vote.ACK)
                            break
        assert got_vote, "the ACK is never sent although the state can now be saved"


async def test_an_unreadable_state_file_refuses_the_cluster_until_it_can_be_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Deciding without the last holder could give the vote to a partition with an older
    tree: the cluster's nodes are refused, saying why, until the file can be read."""
    caplog.set_level(logging.INFO, logger="pmxfs.qnetd")
    async with running_qnetd(tmp_path) as qnetd:
        credentials = await enrolled(qnetd)
        state = state_path(qnetd.directory, "alpha", "0123456789abcdef")
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_bytes(b"{not json")
        stream = await voting_stream(qnetd, credentials)
        reply = await exchange(stream, hello(timeout_ms=1000))
        assert isinstance(reply, Refused)
        assert "cannot read this cluster's state" in reply.reason
        assert not qnetd.server.clusters
        state.unlink()
        stream = await voting_stream(qnetd, credentials)
        assert await exchange(stream, hello(timeout_ms=1000)) == Welcome()


async def test_one_source_cannot_take_every_slot(tmp_path: Path) -> None:
    """Connections of one address that have sent nothing yet are capped: the next one is
    closed at once, and a node from that address gets in once one of them ends."""
    async with running_qnetd(tmp_path) as qnetd:
        silent = [await trio.open_tcp_stream(HOST, qnetd.port)
                  for _ in range(qnetd_server.MAX_UNPROVEN_PER_SOURCE)]
        try:
            await eventually(lambda: qnetd.server.unproven.get(HOST, 0)
                             == qnetd_server.MAX_UNPROVEN_PER_SOURCE, "the silent connections")
            async with await trio.open_tcp_stream(HOST, qnetd.port) as extra:
                with trio.fail_after(5):
                    assert await extra.receive_some(1) == b"", "over the cap, it stays open"
            await silent.pop().aclose()
            await eventually(lambda: qnetd.server.unproven.get(HOST, 0)
                             < qnetd_server.MAX_UNPROVEN_PER_SOURCE, "a slot to free")
            stream = await voting_stream(qnetd, await enrolled(qnetd))
            assert await exchange(stream, hello(timeout_ms=1000)) == Welcome()
            await stream.aclose()
        finally:
            for connection in silent:
                await connection.aclose()


def test_a_stamp_newer_than_its_ring_is_ignored() -> None:
    """A node's tree cannot come from a ring newer than the one it reports: such a report
    (a forged stamp would block every later grant) changes nothing."""
    arbiter = ClusterArbiter(0)
    arbiter.hello(0, _hello(1, (1, 2)))
    arbiter.hello(0, _hello(2, (1, 2)))
    arbiter.membership(0, 1, Membership(Ring(8, 1), (1, 2), True, 2**40))
    assert arbiter.newest_stamp == 0
    arbiter.membership(0, 1, Membership(Ring(8, 1), (1, 2), True, 8))
    arbiter.membership(0, 2, Membership(Ring(8, 1), (1, 2), True, 4))
    assert arbiter.newest_stamp == 8
    assert {n: r.vote for n, r in arbiter.decisions(0).items()} == {1: Vote.ACK, 2: Vote.ACK}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# A listen failure inside trio's nurseries arrives as an ExceptionGroup: still one line.
def test_qnetd_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "qnetd"
    init(directory)
    with socket.socket() as busy:
        busy.bind((HOST, _free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([str(PMXFS), "qnetd", "--dir", str(directory), "--listen",
                               f"{HOST}:{port}"], capture_output=True, text=True, timeout=30,
                              check=False)
    assert done.returncode == 1, done.stderr[-500:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("pmxfs: cannot listen")
