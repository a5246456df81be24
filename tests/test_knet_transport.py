"""pmxfs.runtime.knet_transport: real UDP sockets on loopback only (127.0.0.0/8): node N has
127.0.1.N on link 0 and 127.0.2.N on link 1, each link on its own port. A link is cut with the
transport's fault hook (`block_link`), as if its cable were pulled on both nodes."""

from __future__ import annotations

import errno
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from pmxfs.commands.status import check_status_shape
from pmxfs.core import conf
from pmxfs.core.fsop import WriteFile
from pmxfs.core.link_health import LinkMode
from pmxfs.runtime import attachments
from pmxfs.runtime.database import Database
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.knet_transport import _BEAT, PONG, KnetTransport, LinkSpec, LinkStatus
from pmxfs.runtime.replica_node import ReplicaNode
from pmxfs.runtime.transport import TransportError

KEY = bytes(range(256))
CLUSTER = "lab"
INTERVAL_MS = 40
TIMEOUT_MS = 200
WAIT_S = 5.0  # every wait below is bounded by this

_boot_ids = itertools.count(1)


def addr(link: int, node: int) -> str:
    return f"127.0.{link + 1}.{node}"


def crypto(nid: int, nodes: tuple[int, ...], key: bytes = KEY,
           cluster: str = CLUSTER) -> FrameCrypto:
    return FrameCrypto(key, cluster, nid, nodes, boot_id=next(_boot_ids).to_bytes(8, "big"))


def specs(port: int, nodes: tuple[int, ...], links: tuple[int, ...] = (0, 1),
          priorities: Mapping[int, int] | None = None) -> list[LinkSpec]:
    prio = priorities or {0: 2, 1: 1}  # link 0 preferred
    return [LinkSpec(number=n, port=port + n, priority=prio.get(n, 1),
                     ping_interval_ms=INTERVAL_MS, ping_timeout_ms=TIMEOUT_MS, pong_count=2,
                     addresses={nid: addr(n, nid) for nid in nodes}) for n in links]


@asynccontextmanager
async def pair(mode: LinkMode = "passive", nodes: tuple[int, ...] = (1, 2)
               ) -> AsyncIterator[tuple[int, dict[int, KnetTransport]]]:
    """Transports of `nodes` on two links, on a random free pair of ports."""
    rng = random.Random()
    for _attempt in range(30):
        port = rng.randrange(20000, 32000, 2)
        opened: dict[int, KnetTransport] = {}
        try:
            for nid in nodes:
                opened[nid] = await KnetTransport.open(
                    node_id=nid, links=specs(port, nodes), mode=mode, crypto=crypto(nid, nodes))
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
    pytest.fail("no free ports found in 30 attempts")


class Receiver:
    """Keeps a task in `recv_batch` of a transport (which also drives its heartbeats)."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []

    async def run(self, transport: KnetTransport) -> None:
        try:
            while True:
                self.frames.extend(await transport.recv_batch())
        except trio.ClosedResourceError:
            return


async def wait_for(condition: Callable[[], object], what: str, limit_s: float = WAIT_S) -> float:
    """Wait (bounded) until `condition()` is true; the seconds it took."""
    start = trio.current_time()
    with trio.move_on_after(limit_s):
        while not condition():  # noqa: ASYNC110 polls state that has no event; bounded
            await trio.sleep(0.005)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {limit_s} s waiting for {what}")


def state(t: KnetTransport, peer: int, link: int) -> LinkStatus:
    return next(s for s in t.links_status() if s.peer == peer and s.link == link)


def all_connected(*ts: KnetTransport) -> bool:
    return all(s.connected for t in ts for s in t.links_status())


@asynccontextmanager
async def running(ts: dict[int, KnetTransport]) -> AsyncIterator[dict[int, Receiver]]:
    receivers = {nid: Receiver() for nid in ts}
    async with trio.open_nursery() as nursery:
        for nid, t in ts.items():
            nursery.start_soon(receivers[nid].run, t)
        yield receivers
        nursery.cancel_scope.cancel()


async def test_passive_fails_over_to_link_1_and_back() -> None:
    async with pair() as (_port, ts), running(ts) as rx:
        one, two = ts[1], ts[2]
        await wait_for(lambda: all_connected(one, two), "both links up")
        assert [s.link for s in one.links_status() if s.active] == [0]
        sent = 0

        def send(count: int = 1) -> None:
            nonlocal sent
            for _ in range(count):
                sent += 1
                one.send(2, b"frame %d" % sent)

        send(5)
        await wait_for(lambda: len(rx[2].frames) == sent, "frames on link 0")
        assert one.counters["link0_sent"] == 5
        assert one.counters["link1_sent"] == 0

        for t in ts.values():
            t.block_link(0)

        async def keep_sending() -> None:
            while True:
                send()
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            took = await wait_for(lambda: one.counters["link1_sent"] > 0
                                  and not state(one, 2, 0).connected, "traffic on link 1")
            assert took < (TIMEOUT_MS + 3 * INTERVAL_MS) / 1000 + 0.2
            assert state(one, 2, 1).active
            assert not state(one, 2, 0).active
            for t in ts.values():
                t.block_link(0, False)
            await wait_for(lambda: state(one, 2, 0).active, "traffic back on link 0")
            back = one.counters["link0_sent"]
            await wait_for(lambda: one.counters["link0_sent"] > back + 3, "frames on link 0")
            nursery.cancel_scope.cancel()
        # every frame sent on a working path arrived, in order
        await wait_for(lambda: rx[2].frames[-1:] == [(1, b"frame %d" % sent)], "the last frame")
        payloads = [int(p.split()[1]) for _src, p in rx[2].frames]
        assert payloads == sorted(payloads)
        assert one.counters["link1_sent"] > 0
        assert two.counters["duplicate_frames"] == 0
        assert two.counters["replay"] == 0


async def test_active_sends_on_both_links_and_drops_the_copies() -> None:
    async with pair("active") as (_port, ts), running(ts) as rx:
        one, two = ts[1], ts[2]
        await wait_for(lambda: all_connected(one, two), "both links up")
        assert all(s.active for s in one.links_status())
        for i in range(50):
            one.send(None if i % 2 else 2, b"%d" % i)
        await wait_for(lambda: two.counters["duplicate_frames"] == 50, "50 copies dropped")
        assert [p for _src, p in rx[2].frames] == [b"%d" % i for i in range(50)]
        assert one.counters["link0_sent"] == one.counters["link1_sent"] == 50
        assert two.counters["replay"] == 0
        # one link cut: frames keep coming, without copies
        for t in ts.values():
            t.block_link(1)
        await wait_for(lambda: not state(one, 2, 1).connected, "link 1 down")
        before = two.counters["duplicate_frames"]
        for i in range(50, 60):
            one.send(2, b"%d" % i)
        await wait_for(lambda: len(rx[2].frames) == 60, "10 more frames")
        assert two.counters["duplicate_frames"] == before


async def test_a_forged_or_foreign_pong_does_not_bring_a_link_up() -> None:
    async with pair() as (port, ts), running(ts):
        one, two = ts[1], ts[2]
        two.block_link(0)  # node 2 never answers on link 0
        await wait_for(lambda: state(one, 2, 1).connected, "link 1 up")
        foreign = crypto(2, (1, 2), key=bytes(reversed(KEY)))  # another cluster's key
        other_cluster = crypto(2, (1, 2), cluster="elsewhere")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof0, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof1:
            spoof0.bind((addr(0, 2), 0))  # node 2's link-0 address, another port
            spoof1.bind((addr(1, 2), 0))
            for seq in range(1, 60):
                beat = PONG + _BEAT.pack(0, seq)
                spoof0.sendto(foreign.seal(beat, 1), (addr(0, 1), port))
                spoof0.sendto(other_cluster.seal(beat, 1), (addr(0, 1), port))
                # node 2's own pong for link 0, re-sent on link 1
                spoof1.sendto(two.crypto.seal(beat, 1), (addr(1, 1), port + 1))
                spoof0.sendto(b"PX garbage" * seq, (addr(0, 1), port))
            await wait_for(lambda: one.counters["link_mismatch"] >= 59, "mismatched pongs")
        await trio.sleep(3 * INTERVAL_MS / 1000)
        assert not state(one, 2, 0).connected
        assert one.counters["auth_failed"] >= 2 * 59
        assert state(one, 2, 1).active


async def test_no_bytes_from_a_peer_address_stop_the_transport() -> None:
    rng = random.Random(15)
    async with pair("active") as (port, ts), running(ts) as rx:
        one, two = ts[1], ts[2]
        await wait_for(lambda: all_connected(one, two), "both links up")
        real = two.crypto.seal(b"\x00real", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof0, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof1:
            spoof0.bind((addr(0, 2), 0))
            spoof1.bind((addr(1, 2), 0))
            for i in range(600):
                kind = i % 4
                if kind == 0:  # noise
                    data = rng.randbytes(rng.randrange(0, 200))
                elif kind == 1:  # a real frame cut short or with a bit flipped
                    cut = bytearray(real[:rng.randrange(len(real) + 1)])
                    if cut:
                        cut[rng.randrange(len(cut))] ^= 1 << rng.randrange(8)
                    data = bytes(cut)
                elif kind == 2:  # authentic frames of every kind with odd bodies
                    body = rng.choice([b"", b"\x01", b"\x02", b"\x07zz"]) + rng.randbytes(
                        rng.randrange(0, 12))
                    data = two.crypto.seal(body, rng.choice([0, 1]))
                else:  # a header of a known sender, then noise
                    data = b"PX\x02" + (2).to_bytes(4, "big") + rng.randbytes(60)
                (spoof0 if i % 2 else spoof1).sendto(data, (addr(i % 2 == 0, 1),
                                                            port + (i % 2 == 0)))
            await wait_for(lambda: one.counters["datagrams_received"] >= 600, "the noise")
        two.send(1, b"still here")
        await wait_for(lambda: rx[1].frames[-1:] == [(2, b"still here")], "a real frame")
        assert all(s.connected for s in one.links_status())


async def test_runtime_priority_change_moves_traffic() -> None:
    async with pair() as (port, ts), running(ts) as rx:
        one, two = ts[1], ts[2]
        await wait_for(lambda: all_connected(one, two), "both links up")
        await one.set_links(specs(port, (1, 2), priorities={0: 1, 1: 5}), "passive")
        assert state(one, 2, 1).active
        assert not state(one, 2, 0).active
        one.send(2, b"on link 1")
        await wait_for(lambda: rx[2].frames == [(1, b"on link 1")], "the frame")
        assert one.counters["link1_sent"] == 1
        assert one.counters["link0_sent"] == 0
        # a link removed and given back at run time: its socket is bound again
        await one.set_links(specs(port, (1, 2), links=(0,)), "passive")
        assert {s.link for s in one.links_status()} == {0}
        await one.set_links(specs(port, (1, 2)), "passive")
        await wait_for(lambda: state(one, 2, 1).connected, "link 1 up again")


async def test_unresolvable_host_name_is_one_line() -> None:
    nodes = (1, 2)
    links = specs(24000, nodes, links=(0,))
    bad = [LinkSpec(**{**links[0].__dict__, "addresses": {1: addr(0, 1),
                                                          2: "no-such-node.invalid"}})]
    with trio.fail_after(30), pytest.raises(TransportError) as caught:
        await KnetTransport.open(node_id=1, links=bad, mode="passive", crypto=crypto(1, nodes))
    assert "no-such-node.invalid" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("link 0: cannot resolve")


async def test_inconsistent_links_are_refused() -> None:
    nodes = (1, 2)
    links = specs(24000, nodes)
    lopsided = [links[0], LinkSpec(**{**links[1].__dict__, "addresses": {1: addr(1, 1)}})]
    with pytest.raises(ValueError, match="same nodes"):
        await KnetTransport.open(node_id=1, links=lopsided, mode="passive",
                                 crypto=crypto(1, nodes))
    with pytest.raises(ValueError, match="not in the address map"):
        await KnetTransport.open(node_id=3, links=links, mode="passive", crypto=crypto(3, nodes))


# ---------------------------------------------------------------------------- two real nodes

NODE_CONFIG = """totem {
  version: 2
  cluster_name: lab
  config_version: 1
  token: 3000
  interface {
    linknumber: 0
    mcastport: %(port0)d
    knet_ping_interval: 50
    knet_ping_timeout: 250
  }
  interface {
    linknumber: 1
    mcastport: %(port1)d
    knet_ping_interval: 50
    knet_ping_timeout: 250
  }
}
nodelist {
  node {
    name: node1
    nodeid: 1
    ring0_addr: 127.0.1.1
    ring1_addr: 127.0.2.1
  }
  node {
    name: node2
    nodeid: 2
    ring0_addr: 127.0.1.2
    ring1_addr: 127.0.2.2
  }
}
quorum {
  provider: corosync_votequorum
  two_node: 1
}
"""


async def node_pair(tmp_path: Path, nursery: trio.Nursery) -> dict[int, ReplicaNode]:
    """Two nodes of a two-link knet cluster (no transport line: knet), on free ports."""
    rng = random.Random()
    for _attempt in range(30):
        port = rng.randrange(20000, 32000, 2)
        text = NODE_CONFIG % {"port0": port, "port1": port + 1}
        config = conf.parse(text)
        nodes: dict[int, ReplicaNode] = {}
        try:
            for nid in (1, 2):
                home = tmp_path / f"{port}-node{nid}"
                home.mkdir()
                (home / "corosync.conf").write_text(text)
                attachment = await attachments.cluster_member(
                    config, nid, config_path=home / "corosync.conf", authkey=KEY,
                    data_dir=home)
                nodes[nid] = ReplicaNode(
                    node_id=nid, config=config, config_path=attachment.config_path,
                    params=conf.totem_params(config), transport=attachment.transport,
                    database=Database.open(home), ring_seq_store=attachment.ring_seq_store,
                    incarnation=attachment.incarnation, data_dir=home)
        except attachments.AttachmentError as exc:
            for node in nodes.values():
                node.transport.close()
                node.database.close()
            if "in use" in str(exc):
                continue
            raise
        for node in nodes.values():
            nursery.start_soon(node.run)
        return nodes
    pytest.fail("no free ports found in 30 attempts")


def settled(nodes: dict[int, ReplicaNode]) -> bool:
    return all(n.quorate() and n.replica.synced() and len(n.replica.members) == 2
               and n.memdb.lookup(f"nodes/{n.node_name}/priv") is not None
               for n in nodes.values())


def knet(node: ReplicaNode) -> KnetTransport:
    assert isinstance(node.transport, KnetTransport)
    return node.transport


def link_entry(node: ReplicaNode, link: int) -> dict[str, object]:
    return next(e for e in node.status()["links"] if e["link"] == link)


def clusterlog(node: ReplicaNode) -> list[str]:
    return [e.msg for e in node.replica.status().recent_log]


async def test_two_nodes_keep_their_ring_when_link_0_is_cut(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await node_pair(tmp_path, nursery)
        one, two = nodes[1], nodes[2]
        try:
            await wait_for(lambda: settled(nodes), "a synced two-node ring", 30)
            await wait_for(lambda: all(e["connected"] for n in nodes.values()
                                       for e in n.status()["links"]), "both links up")
            status = one.status()
            assert status["cluster"]["transport"] == "knet"
            assert check_status_shape(status) == []
            assert status["links"] == [
                {"nodeid": 2, "name": "node2", "link": 0, "address": "127.0.1.2",
                 "connected": True, "active": True},
                {"nodeid": 2, "name": "node2", "link": 1, "address": "127.0.2.2",
                 "connected": True, "active": False}]
            ring = one.replica.ring
            for node in nodes.values():
                knet(node).block_link(0)
            with trio.fail_after(10):
                for i in range(10):
                    reply = await one.write(WriteFile(f"during{i}", b"x", 1, create=True))
                    assert reply.errno == 0
            await wait_for(lambda: link_entry(one, 1)["active"]
                           and not link_entry(one, 0)["connected"], "traffic on link 1")
            await wait_for(lambda: "link 0 to node node2 (nodeid 2) is down" in clusterlog(two)
                           and "link 0 to node node1 (nodeid 1) is down" in clusterlog(one),
                           "the link-down lines in the cluster log")
            assert knet(one).counters["link1_sent"] > 0
            for node in nodes.values():
                knet(node).block_link(0, False)
            await wait_for(lambda: link_entry(one, 0)["active"], "traffic back on link 0")
            with trio.fail_after(10):
                assert (await two.write(WriteFile("after", b"y", 1, create=True))).errno == 0
            assert one.replica.ring == ring
            assert two.replica.ring == ring
            down = [m for m in clusterlog(one) if m.startswith("link 0 to node node2")]
            assert down.count("link 0 to node node2 (nodeid 2) is down") == 1
        finally:
            nursery.cancel_scope.cancel()
    for node in nodes.values():
        node.transport.close()
        node.database.close()
