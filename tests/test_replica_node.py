"""The trio runtime of the replica (`ReplicaNode`): several nodes in one process over the memory
transport, each with its own SQLite database, on trio's real clock (the ring's timers are the
demo's short ones; every wait is bounded with fail_after)."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from pmxfs.core import conf
from pmxfs.core.fsop import Mkdir, WriteFile
from pmxfs.core.replica import MAX_PENDING
from pmxfs.runtime import replica_node
from pmxfs.runtime.database import Database, DatabaseError
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.replica_node import NODE_DIRS, ROOM_TIMEOUT_S, NodeStopped, ReplicaNode
from pmxfs.runtime.ring_seq import RingSeqStore

CONFIG = """totem {
  version: 2
  cluster_name: lab
  config_version: 1
  token: 1000
}
nodelist {
%s}
quorum {
  provider: corosync_votequorum
}
"""


def config(count: int) -> conf.ClusterConfig:
    nodes = "".join(f"  node {{\n    name: node{i}\n    nodeid: {i}\n"
                    f"    ring0_addr: 127.0.0.{i}\n  }}\n" for i in range(1, count + 1))
    return conf.parse(CONFIG % nodes)


class Cluster:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery, count: int) -> None:
        self.hub = MemoryHub()
        self.config = config(count)
        self.nodes: dict[int, ReplicaNode] = {}
        self.databases: list[Database] = []
        self.failures: dict[int, BaseException] = {}  # what a node's run() raised
        self.failed = trio.Event()  # set when a node's run() raised
        for node_id in range(1, count + 1):
            data_dir = tmp_path / f"node{node_id}"
            data_dir.mkdir()
            database = Database.open(data_dir)
            self.databases.append(database)
            node = ReplicaNode(
                node_id=node_id, config=self.config, config_path=None,
                params=conf.totem_params(self.config), transport=self.hub.transport(node_id),
                database=database, ring_seq_store=RingSeqStore(data_dir, node_id),
                incarnation=node_id, data_dir=data_dir)
            self.nodes[node_id] = node
            nursery.start_soon(self._run, node_id, node)

    async def _run(self, node_id: int, node: ReplicaNode) -> None:
        try:
            await node.run()
        except Exception as exc:
            self.failures[node_id] = exc
            self.failed.set()

    def is_settled(self) -> bool:
        setup = [f"nodes/{n.node_name}/{d}" for n in self.nodes.values() for d in NODE_DIRS]
        return all(n.quorate() and n.replica.synced() and len(n.replica.members) == len(self.nodes)
                   and all(n.memdb.lookup(path) is not None for path in setup)
                   and n.pending_writes() == 0  # their answers too (metrics count them)
                   for n in self.nodes.values())

    async def settled(self) -> None:
        """Until every node is in one synced, quorate ring and every node's first-start
        directories are committed everywhere, so a test's writes are the only ones in flight
        (bounded by the caller's clock)."""
        while not self.is_settled():  # noqa: ASYNC110 polls state that has no event; bounded by fail_after
            await trio.sleep(0.05)

    def close(self) -> None:
        for database in self.databases:
            database.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """The nodes run in a nursery of their own, left (every persister thread joined) before the
    databases close: closing one under a commit of its persister crashes the process."""
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp_path, nursery, 3)
        with trio.fail_after(60):
            await c.settled()
        yield c
        nursery.cancel_scope.cancel()
    c.close()
    assert c.failures == {}


async def test_a_write_beyond_the_pending_limit_waits_for_room_instead_of_failing(
        cluster: Cluster) -> None:
    node = cluster.nodes[1]
    for i in range(MAX_PENDING):  # fill every slot before the ring can answer any
        node.replica.propose(node.now(), 10_000 + i, Mkdir(f"d{i}", 1))
    assert node.replica.full()
    with trio.fail_after(ROOM_TIMEOUT_S):
        reply = await node.write(WriteFile("after", b"waited", 1, create=True))
    assert reply.errno == 0
    for other in cluster.nodes.values():
        entry = other.memdb.lookup("after")
        assert entry is not None
        assert entry.data == b"waited"


async def test_back_pressure_is_bounded(cluster: Cluster,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    node = cluster.nodes[1]
    monkeypatch.setattr(node.replica, "full", lambda: True)
    monkeypatch.setattr(replica_node, "ROOM_TIMEOUT_S", 2.0)
    start = trio.current_time()
    reply = await node.write(Mkdir("never", 1))
    assert reply.errno == errno.EAGAIN
    assert trio.current_time() - start >= 2.0
    assert node.memdb.lookup("never") is None


async def test_an_invalid_name_is_refused_at_once_and_the_node_goes_on(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    with trio.fail_after(1):
        assert (await node.write(Mkdir("bad\udcffname", 1))).errno == errno.EINVAL
        assert (await node.write(Mkdir("x" * 4097, 1))).errno == errno.ENAMETOOLONG
        reply = await node.set_expected(-1)
    assert reply.errno == errno.EINVAL
    assert "between 1 and 3" in reply.message
    assert (await node.write(Mkdir("good", 1))).errno == 0
    assert all(n.replica.counters.get("bad_messages", 0) == 0 for n in cluster.nodes.values())


async def test_a_commit_that_fails_stops_the_node_and_nothing_after_it_happens(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database error in the persister (the worker thread's commit): the waiting request
    fails, the node stops for good, and the write is acknowledged nowhere on this node."""
    node = cluster.nodes[1]

    def full(_: object) -> None:
        raise DatabaseError(Path("config.db"), ["database or disk is full"])

    monkeypatch.setattr(node.database, "commit_many", full)
    # The request waits for a reply that needs this node's disk: it ends with NodeStopped, it
    # never waits for a reply that cannot come.
    with trio.fail_after(5), pytest.raises(NodeStopped):
        await node.write(Mkdir("unwritten", 1))
    with trio.fail_after(5):
        await cluster.failed.wait()
    assert isinstance(cluster.failures.pop(1), DatabaseError)
    with pytest.raises(NodeStopped):
        await node.write(Mkdir("after", 1))
    assert node.memdb.lookup("after") is None


async def test_a_write_is_on_every_members_disk_before_its_reply(cluster: Cluster) -> None:
    reply = await cluster.nodes[2].write(WriteFile("durable", b"on disk", 1, create=True))
    assert reply.errno == 0
    for database in cluster.databases:  # what each node would load after a power loss
        rows = database.load().entries
        assert any(e.name == "durable" and e.data == b"on disk" for e in rows)


async def test_the_writers_cache_is_invalidated_before_its_write_returns(
        cluster: Cluster) -> None:
    """`echo new > f; cat f` on the writing node: the kernel's cache of f must be queued for
    invalidation before the write is answered."""
    node = cluster.nodes[1]
    seen: list[tuple[str, ...]] = []
    node.set_invalidator(lambda paths, everything: seen.append(paths))
    assert (await node.write(WriteFile("cached", b"new", 1, create=True))).errno == 0
    assert any("cached" in paths for paths in seen), seen
