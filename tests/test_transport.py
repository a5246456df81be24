"""pmxfs.runtime.transport: real UDP sockets on loopback (127.0.0.0/8 only) and, for multicast
and IPv6, inside network namespaces that the test creates and deletes itself."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from pmxfs.core.wire import RingId, Token, TokenPhase, encode
from pmxfs.runtime.frame_crypto import EVERY_NODE, HEADER_BYTES, FrameCrypto
from pmxfs.runtime.transport import (
    AuthkeyError,
    TransportError,
    UdpTransport,
    load_authkey,
)

KEY = bytes(range(256))
CLUSTER = "lab"
BASE = "127.0.0.2"  # node i lives on 127.0.0.2i
REPO = Path(__file__).resolve().parent.parent


def addr(node: int) -> str:
    return f"{BASE}{node}"


_boot_ids = itertools.count(1)


def crypto(nid: int, nodes: Mapping[int, str] | tuple[int, ...], key: bytes = KEY,
           cluster: str = CLUSTER) -> FrameCrypto:
    """Node `nid`'s frame crypto, each one a new run (a greater boot id than all before)."""
    return FrameCrypto(key, cluster, nid, nodes, boot_id=next(_boot_ids).to_bytes(8, "big"))


@asynccontextmanager
async def cluster(nodes: Mapping[int, str], *, listening: tuple[int, ...] | None = None
                  ) -> AsyncIterator[tuple[int, dict[int, UdpTransport]]]:
    """Transports for the `listening` nodes (default: all) of `nodes`, on one random free port
    (all nodes share the cluster port, so port 0 cannot be used: retry on EADDRINUSE)."""
    rng = random.Random()
    for _attempt in range(30):
        port = rng.randrange(20000, 32000)  # below the ephemeral range
        opened: dict[int, UdpTransport] = {}
        try:
            for nid in listening or tuple(nodes):
                opened[nid] = await UdpTransport.open(
                    node_id=nid, addresses=nodes, port=port, mode="udpu", mcastaddr=None,
                    crypto=crypto(nid, nodes))
        except TransportError as exc:
            for t in opened.values():
                t.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        try:
            yield port, opened
        finally:
            for t in opened.values():
                t.close()
        return
    pytest.fail("no free port found in 30 attempts")


async def collect(t: UdpTransport, count: int, seconds: float = 5.0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    with trio.fail_after(seconds):
        for _ in range(count):
            out.append(await t.recv())
    return out


def raw_socket(host: str) -> socket.socket:
    """A plain UDP socket on an ephemeral port of a loopback address, for forged traffic."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


THREE = {1: addr(1), 2: addr(2), 3: addr(3)}
TOKEN = encode(Token(ring_id=RingId(seq=4, rep=1), token_seq=5, seq=0, aru=0, aru_addr=0, fcc=0,
                     backlog=0, rtr=(), retrans_flg=False, phase=TokenPhase.OPERATIONAL))


async def test_three_nodes_exchange_unicast_and_to_all() -> None:
    async with cluster(THREE) as (_, ts):
        for nid, t in ts.items():
            t.send(None, f"all from {nid}".encode())
            for other in ts:
                if other != nid:
                    t.send(other, f"{nid} to {other}".encode())
        for nid, t in ts.items():
            got = await collect(t, 4)
            others = [o for o in ts if o != nid]
            assert sorted(got) == sorted(
                [(o, f"all from {o}".encode()) for o in others]
                + [(o, f"{o} to {nid}".encode()) for o in others])
        for t in ts.values():
            c = t.counters
            assert c["datagrams_sent"] == 4  # to-all: one unicast per other node; then 2 more
            assert c["frames_sealed"] == 3
            assert c["datagrams_received"] == c["frames_opened"] == 4
            assert all(c[k] == 0 for k in ("address_mismatch", "send_failed", "recv_failed",
                                           "auth_failed", "replay", "bad_magic"))


async def test_large_frames_and_many_frames() -> None:
    async with cluster({1: addr(1), 2: addr(2)}) as (_, ts):
        big = os.urandom(60000)  # recovery frames can be up to about netmtu (max 65507)
        ts[1].send(2, big)
        assert await collect(ts[2], 1) == [(1, big)]
        for i in range(500):  # well inside the 4 MiB receive buffer
            ts[1].send(None, i.to_bytes(4, "big"))
        got = await collect(ts[2], 500)
        assert [p for _, p in got] == [i.to_bytes(4, "big") for i in range(500)]


async def test_frame_from_another_address_is_address_mismatch() -> None:
    async with cluster(THREE, listening=(1, 3)) as (port, ts):
        forger = crypto(2, THREE)  # has the key, claims to be node 2
        frame = forger.seal(b"claims node 2", 1)
        with raw_socket(addr(3)) as wrong, raw_socket("127.0.0.29") as stranger, \
                raw_socket(addr(2)) as right:
            wrong.sendto(frame, (addr(1), port))  # node 3's address
            stranger.sendto(frame, (addr(1), port))  # nobody's address
            # The same frame from node 2's IP (another source port: only IPs are compared) is
            # taken: the mis-addressed copies did not use up its counter in the replay window.
            right.sendto(frame, (addr(1), port))
            assert await collect(ts[1], 1) == [(2, b"claims node 2")]
        c = ts[1].counters
        assert c["address_mismatch"] == 2
        assert c["datagrams_received"] == 3
        assert c["replay"] == 0


async def test_frames_name_their_receiver() -> None:
    """`send(to=N)` seals for N, `send(None)` for every node (0); a copy of node 2's frame for
    node 3, spoofed from node 2's address to node 1, is `wrong_receiver` there, and a token
    sealed for every node is refused too."""
    async with cluster(THREE, listening=(1,)) as (port, ts):
        with raw_socket(addr(2)) as node2_ip, socket.socket(socket.AF_INET,
                                                            socket.SOCK_DGRAM) as at2:
            at2.bind((addr(2), port))  # node 2's place in the ring, to see what node 1 sends
            ts[1].send(2, b"for 2")
            ts[1].send(None, b"for all")
            heads = [at2.recvfrom(65536)[0][:HEADER_BYTES] for _ in range(2)]
            assert [int.from_bytes(h[7:11], "big") for h in heads] == [2, EVERY_NODE]
            node2 = crypto(2, THREE)
            for frame in (node2.seal(TOKEN, 3), node2.seal(TOKEN, EVERY_NODE),
                          node2.seal(TOKEN, 1)):
                node2_ip.sendto(frame, (addr(1), port))
            assert await collect(ts[1], 1) == [(2, TOKEN)]
        c = ts[1].counters
        assert (c["wrong_receiver"], c["frames_opened"], c["replay"]) == (2, 1, 0)


async def test_garbage_is_dropped_and_counted_by_reason() -> None:
    async with cluster(THREE, listening=(1,)) as (port, ts):
        node2 = crypto(2, THREE)
        stranger_key = crypto(2, THREE, key=bytes(256))
        other_cluster = crypto(2, THREE, cluster="other")
        unknown = crypto(9, (*THREE, 9))
        replayed = node2.seal(b"first", 1)
        tampered = bytearray(node2.seal(b"tampered", 1))
        tampered[HEADER_BYTES] ^= 1
        garbage = [
            (b"", "short"),
            (b"hello, is this corosync?", "bad_magic"),
            (b"PX\x07" + bytes(60), "bad_version"),
            (b"PX\x02\x00\x00\x00\x02", "short"),
            (b"PX\x01" + bytes(60), "bad_version"),  # the format before receivers
            (unknown.seal(b"x", 1), "unknown_sender"),
            (crypto(1, THREE).seal(b"me?", EVERY_NODE), "self_sender"),
            (node2.seal(b"for node 3", 3), "wrong_receiver"),
            (node2.seal(TOKEN, EVERY_NODE), "wrong_receiver"),
            (stranger_key.seal(b"x", 1), "auth_failed"),
            (other_cluster.seal(b"x", 1), "auth_failed"),
            (bytes(tampered), "auth_failed"),
            (replayed, None),
            (replayed, "replay"),
            (os.urandom(1000), "bad_magic"),
        ]
        with raw_socket(addr(2)) as s:
            for data, _ in garbage:
                s.sendto(data, (addr(1), port))
            s.sendto(node2.seal(b"the real one", 1), (addr(1), port))
            got = await collect(ts[1], 2)
        assert got == [(2, b"first"), (2, b"the real one")]
        c = ts[1].counters
        expected: dict[str, int] = {}
        for _, reason in garbage:
            if reason is not None:
                expected[reason] = expected.get(reason, 0) + 1
        for reason, count in expected.items():
            assert c[reason] == count, reason
        assert c["datagrams_received"] == len(garbage) + 1


async def test_drops_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(THREE, listening=(1,)) as (port, ts):
        node2 = crypto(2, THREE)
        with caplog.at_level(logging.DEBUG, logger="pmxfs.transport"), \
                raw_socket(addr(2)) as s:
            for _ in range(200):
                s.sendto(b"garbage", (addr(1), port))
            s.sendto(node2.seal(b"ok", 1), (addr(1), port))
            await collect(ts[1], 1)
        assert ts[1].counters["bad_magic"] == 200
        records = [r for r in caplog.records if "bad_magic" in r.getMessage()]
        assert len(records) == 1
        assert all(r.levelno < logging.ERROR for r in caplog.records)


async def test_send_to_nowhere_does_not_raise() -> None:
    nodes = {**THREE, 4: addr(4), 5: "127.255.255.255", 6: addr(6)}
    async with cluster(nodes, listening=(1, 2)) as (_, ts):
        t = ts[1]
        t.send(4, b"nobody listens on 127.0.0.24")  # silently lost, like on a real network
        t.send(5, b"broadcast without SO_BROADCAST")  # EACCES from the kernel: counted
        c = t.counters
        assert (c["datagrams_sent"], c["send_failed"]) == (1, 1)
        t.send(None, b"to all")  # 2, 3, 4, 6 sent; 5 fails
        c = t.counters
        assert (c["datagrams_sent"], c["send_failed"]) == (5, 2)
        assert await collect(ts[2], 1) == [(1, b"to all")]
        t.send(77, b"not configured")  # counted, not raised
        assert t.counters["send_failed"] == 3
        with pytest.raises(ValueError, match="itself"):
            t.send(1, b"me")


async def test_send_errors_such_as_enobufs_are_counted() -> None:
    class Failing:
        def __init__(self, exc: OSError) -> None:
            self.exc = exc

        def sendto(self, data: bytes, address: object) -> int:
            raise self.exc

    async with cluster(THREE, listening=(1,)) as (_, ts):
        t = ts[1]
        real = t._tx  # white box: the only way to make the kernel refuse at will
        try:
            for exc in (BlockingIOError(errno.EAGAIN, "again"), OSError(errno.ENOBUFS, "nobufs"),
                        OSError(errno.EHOSTUNREACH, "unreachable")):
                t._tx = Failing(exc)  # type: ignore[assignment]
                t.send(2, b"x")
                t.send(None, b"y")
        finally:
            t._tx = real
        assert t.counters["send_failed"] == 9
        assert t.counters["datagrams_sent"] == 0


async def test_close_wakes_a_blocked_recv_and_refuses_send() -> None:
    async with cluster({1: addr(1), 2: addr(2)}, listening=(1,)) as (_, ts):
        t = ts[1]
        result: list[BaseException] = []

        async def receiver() -> None:
            try:
                await t.recv()
            except trio.ClosedResourceError as exc:
                result.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.sleep(0.05)
                t.close()
        assert len(result) == 1
        with pytest.raises(trio.ClosedResourceError):
            t.send(2, b"x")
        with pytest.raises(trio.ClosedResourceError):
            await t.recv()
        t.close()  # idempotent


async def test_recv_is_cancellable_and_single_consumer() -> None:
    async with cluster({1: addr(1), 2: addr(2)}) as (_, ts):
        with trio.move_on_after(0.05) as scope:
            await ts[2].recv()
        assert scope.cancelled_caught
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ts[2].recv)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ts[2].recv()
            nursery.cancel_scope.cancel()
        ts[1].send(2, b"after cancel")
        assert await collect(ts[2], 1) == [(1, b"after cancel")]


async def test_a_cancelled_recv_loses_no_queued_datagram() -> None:
    async with cluster({1: addr(1), 2: addr(2)}) as (_, ts):
        ts[1].send(2, b"first")
        ts[1].send(2, b"second")
        with trio.CancelScope() as scope:
            scope.cancel()
            await ts[2].recv()
        assert scope.cancelled_caught
        assert await collect(ts[2], 2) == [(1, b"first"), (1, b"second")]


class _TaskSteps(trio.abc.Instrument):
    """Counts the times trio runs one task: each is one trip through the scheduler."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_recv_waits_in_one_trip_through_the_scheduler() -> None:
    """Once a recv waits, trio runs it once more: when the datagram is there (each trip costs
    about as much as opening the frame, see the transport's header)."""
    async with cluster({1: addr(1), 2: addr(2)}) as (_, ts):
        steps = _TaskSteps()
        got: list[tuple[int, bytes]] = []

        async def receive() -> None:
            steps.task = trio.lowlevel.current_task()
            got.append(await ts[2].recv())

        trio.lowlevel.add_instrument(steps)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                ts[1].send(2, b"wake up")
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert got == [(1, b"wake up")]
        assert steps.steps == 1  # the first step, which set steps.task, is not counted


async def test_a_restarted_node_is_accepted_at_once() -> None:
    two = {1: addr(1), 2: addr(2)}
    async with cluster(two, listening=(1,)) as (port, ts):
        for _run in range(3):
            node2 = await UdpTransport.open(node_id=2, addresses=two, port=port, mode="udpu",
                                            mcastaddr=None,
                                            crypto=crypto(2, two))
            with node2:
                node2.send(1, b"hello")
            assert await collect(ts[1], 1) == [(2, b"hello")]
        assert ts[1].counters["replay"] == 0


async def test_nodes_added_at_run_time() -> None:
    async with cluster(THREE, listening=(1, 2)) as (port, ts):
        t1 = ts[1]
        newcomer = crypto(4, (*THREE, 4))
        with raw_socket(addr(4)) as s:
            s.sendto(newcomer.seal(b"early", 1), (addr(1), port))
            with trio.move_on_after(0.2):  # recv drops it (not in the nodelist yet) and waits on
                await t1.recv()
            await t1.set_addresses({**THREE, 4: addr(4)})
            s.sendto(newcomer.seal(b"welcome", 1), (addr(1), port))
            assert await collect(t1, 1) == [(4, b"welcome")]
        assert t1.counters["unknown_sender"] == 1
        with pytest.raises(ValueError, match="own address"):
            await t1.set_addresses({1: "127.0.0.99", 2: addr(2)})


async def test_open_checks_its_arguments() -> None:
    node1 = crypto(1, THREE)
    common = {"addresses": THREE, "port": 25405, "mcastaddr": None}
    with pytest.raises(ValueError, match="not in the address map"):
        await UdpTransport.open(node_id=9, mode="udpu", crypto=node1, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="belongs to node"):
        await UdpTransport.open(node_id=2, mode="udpu", crypto=node1, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown transport"):
        await UdpTransport.open(node_id=1, mode="knet", crypto=node1, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multicast address"):
        await UdpTransport.open(node_id=1, mode="udp", crypto=node1, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multicast address"):
        await UdpTransport.open(node_id=1, addresses=THREE, port=25405, mode="udp",
                                mcastaddr="127.0.0.1", crypto=node1)
    with pytest.raises(ValueError, match=r"is IPv6 but this node's address is IPv4"):
        await UdpTransport.open(node_id=1, addresses={1: addr(1), 2: "::1"}, port=25405,
                                mode="udpu", mcastaddr=None, crypto=node1)
    with pytest.raises(TransportError, match="cannot bind") as info:  # not an address of ours
        await UdpTransport.open(node_id=1, addresses={1: "192.0.2.1", 2: addr(2)}, port=25405,
                                mode="udpu", mcastaddr=None, crypto=node1)
    assert info.value.errno == errno.EADDRNOTAVAIL


async def test_bind_conflict_is_a_transport_error_with_errno() -> None:
    async with cluster({1: addr(1), 2: addr(2)}, listening=(1,)) as (port, _):
        with pytest.raises(TransportError) as info:
            await UdpTransport.open(node_id=1, addresses={1: addr(1), 2: addr(2)}, port=port,
                                    mode="udpu", mcastaddr=None,
                                    crypto=crypto(1, (1, 2)))
        assert info.value.errno == errno.EADDRINUSE
        assert str(info.value) == (f"cannot bind node address {addr(1)}:{port}: Address already "
                                   "in use")
        assert isinstance(info.value, OSError)  # callers catching OSError see it too


async def test_host_names_are_resolved() -> None:
    nodes = {1: "localhost", 2: addr(2)}
    async with cluster(nodes) as (_, ts):
        assert ts[1].local_address[0] == "127.0.0.1"
        ts[2].send(1, b"to localhost")
        assert await collect(ts[1], 1) == [(2, b"to localhost")]


# ---------------------------------------------------------------------- load_authkey

def test_load_authkey(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "authkey"
    key.write_bytes(KEY)
    key.chmod(0o400)
    with caplog.at_level(logging.WARNING, logger="pmxfs.transport"):
        assert load_authkey(key) == KEY
        assert load_authkey(str(key)) == KEY
    assert not caplog.records
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pmxfs.transport"):
        assert load_authkey(key) == KEY
    assert "mode 0644" in caplog.records[0].getMessage()
    for size in (128, 4096):
        key.write_bytes(bytes(size))
        assert len(load_authkey(key)) == size


@pytest.mark.parametrize(("content", "message"), [
    (bytes(127), "has 127 bytes; expected 128 to 4096 (256 from `pmxfs keygen`)"),
    (b"", "has 0 bytes"),
    (bytes(4097), "has more than 4096 bytes"),
    (bytes(1 << 20), "has more than 4096 bytes"),
])
def test_load_authkey_refuses_wrong_sizes(tmp_path: Path, content: bytes, message: str) -> None:
    key = tmp_path / "authkey"
    key.write_bytes(content)
    with pytest.raises(AuthkeyError, match=re.escape(message)) as info:
        load_authkey(key)
    assert "\n" not in str(info.value)


def test_load_authkey_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(AuthkeyError) as info:
        load_authkey(tmp_path / "nope")
    assert str(info.value) == (f"cannot read authkey {tmp_path / 'nope'}: No such file or "
                               "directory (create one with `pmxfs keygen`)")
    with pytest.raises(AuthkeyError, match=r"not a regular file|Is a directory"):
        load_authkey(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(AuthkeyError, match="not a regular file"):  # and it does not hang
        load_authkey(fifo)


# ---------------------------------------------------------------------- network namespaces

NODE_SCRIPT = r"""
import json, secrets, sys, trio
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.transport import UdpTransport

me = int(sys.argv[1])
cfg = json.loads(sys.argv[2])
nodes = {int(k): v for k, v in cfg["addresses"].items()}
ring = sorted(nodes)
nxt = ring[(ring.index(me) + 1) % len(ring)]
prv = ring[(ring.index(me) - 1) % len(ring)]
want = {f"all:{n}" for n in ring if n != me} | {f"token:{prv}"}

async def main():
    crypto = FrameCrypto(bytes.fromhex(cfg["key"]), "nstest", me, nodes,
                         boot_id=secrets.token_bytes(8))
    t = await UdpTransport.open(node_id=me, addresses=nodes, port=cfg["port"], mode=cfg["mode"],
                                mcastaddr=cfg["mcastaddr"], crypto=crypto)
    got, wrong, opts = set(), [], {}
    with t:
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                async def sender():
                    for _ in range(400):  # bounded: 40 s at most, cancelled much sooner
                        t.send(None, f"all:{me}".encode())
                        t.send(nxt, f"token:{me}".encode())
                        await trio.sleep(0.1)
                nursery.start_soon(sender)
                while not want <= got:
                    sender_id, payload = await t.recv()
                    text = payload.decode()
                    if int(text.split(":")[1]) != sender_id:
                        wrong.append(text)
                    got.add(text)
                await trio.sleep(1.0)  # keep sending a little so slower peers finish too
                nursery.cancel_scope.cancel()
        if cfg["mode"] == "udp":
            import socket
            v6 = ":" in nodes[me]
            level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
            ttl = socket.IPV6_MULTICAST_HOPS if v6 else socket.IP_MULTICAST_TTL
            loop = socket.IPV6_MULTICAST_LOOP if v6 else socket.IP_MULTICAST_LOOP
            opts = {"ttl": t._tx.getsockopt(level, ttl), "loop": t._tx.getsockopt(level, loop)}
    print(json.dumps({"got": sorted(got), "want": sorted(want), "wrong": wrong,
                      "counters": t.counters, "opts": opts}))

trio.run(main)
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextmanager
def bridged_namespaces(count: int, family: int) -> Iterator[tuple[list[str], dict[int, str]]]:
    """`count` fresh node namespaces, each with eth0 on one bridge in a further fresh namespace,
    addresses 10.77.0.i/24 or fd77::i/64; every namespace is deleted on the way out."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2 (`ip`)")
    tag = secrets.token_hex(3)
    bridge = f"pmxfs-test-{tag}-br"
    names = [f"pmxfs-test-{tag}-n{i}" for i in range(1, count + 1)]
    created: list[str] = []
    try:
        for ns in (bridge, *names):
            result = _ip("netns", "add", ns, check=False)
            if result.returncode != 0:
                pytest.skip(f"`ip netns add` failed: {result.stderr.strip()}")
            created.append(ns)
        result = _ip("-n", bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0",
                     check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot create a bridge in a namespace: {result.stderr.strip()}")
        _ip("-n", bridge, "link", "set", "br0", "up")
        addresses: dict[int, str] = {}
        for i, ns in enumerate(names, 1):
            result = _ip("-n", bridge, "link", "add", f"p{i}", "type", "veth", "peer", "name",
                         "eth0", "netns", ns, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create veth pairs: {result.stderr.strip()}")
            _ip("-n", bridge, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", bridge, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if family == 6:
                addresses[i] = f"fd77::{i}"
                _ip("-n", ns, "-6", "addr", "add", f"fd77::{i}/64", "dev", "eth0", "nodad")
            else:
                addresses[i] = f"10.77.0.{i}"
                _ip("-n", ns, "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield names, addresses
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)


@pytest.mark.netns
@pytest.mark.parametrize(("mode", "family", "group"), [
    ("udp", 4, "239.192.77.5"),
    ("udp", 6, "ff15::77:5"),
    ("udpu", 6, None),
])
def test_in_network_namespaces(mode: str, family: int, group: str | None) -> None:
    """Three nodes, each in its own namespace on one bridge: to-all frames (one multicast for
    `udp`) and unicast "tokens" around the ring arrive; nothing loops back to the sender."""
    with bridged_namespaces(3, family) as (names, addresses):
        cfg = {"addresses": addresses, "port": 5405, "mode": mode, "mcastaddr": group,
               "key": KEY.hex()}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", NODE_SCRIPT,
                                   str(i), json.dumps(cfg)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, cwd=REPO)
                 for i, ns in enumerate(names, 1)]
        results = []
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                results.append(json.loads(out))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for result in results:
        assert result["got"] == result["want"]
        assert result["wrong"] == []
        c = result["counters"]
        assert c["self_sender"] == 0  # IP_MULTICAST_LOOP is off
        assert all(c[k] == 0 for k in ("auth_failed", "address_mismatch", "unknown_sender",
                                       "send_failed", "bad_magic"))
        if mode == "udp":
            assert c["datagrams_sent"] == c["frames_sealed"]  # one multicast per to-all frame
            assert result["opts"] == {"ttl": 1, "loop": 0}
        else:
            assert c["datagrams_sent"] == c["frames_sealed"] // 2 * 3  # 2 per to-all, 1 token
