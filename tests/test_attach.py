"""`ReplicaNode.attach` and run-time reconfiguration, in one process over the memory transport:
a standalone node becomes a member of a running cluster without a restart (what `pmxfs add`
does after the member's answer), and a corosync.conf taken by the cluster changes the ring's
node set (on trio's real clock: the node commits in a worker thread)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from pmxfs.core import conf
from pmxfs.core.conf.edit import with_node, without_node
from pmxfs.core.fsop import WriteFile
from pmxfs.runtime import attachments
from pmxfs.runtime.database import Database
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.replica_node import ATTACH_DRAIN_TIMEOUT_S, Attachment, ReplicaNode
from pmxfs.runtime.ring_seq import RingSeqStore

FIRST = conf.render(conf.parse("""totem {
  version: 2
  cluster_name: lab
  config_version: 1
  token: 1000
}
nodelist {
  node {
    name: node1
    nodeid: 1
    ring0_addr: 127.0.0.1
  }
}
quorum {
  provider: corosync_votequorum
}
"""))


class Nodes:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.hub = MemoryHub()
        self.nodes: dict[str, ReplicaNode] = {}
        self.failures: list[BaseException] = []

    def start(self, name: str, attachment: Attachment) -> ReplicaNode:
        data_dir = self.tmp_path / name / "data"
        node = ReplicaNode(
            node_id=attachment.node_id, config=attachment.config,
            config_path=attachment.config_path, params=conf.totem_params(attachment.config),
            transport=attachment.transport, database=Database.open(data_dir),
            ring_seq_store=attachment.ring_seq_store, incarnation=attachment.incarnation,
            data_dir=data_dir)
        self.nodes[name] = node
        self.nursery.start_soon(self._run, node)
        return node

    async def _run(self, node: ReplicaNode) -> None:
        try:
            await node.run()
        except Exception as exc:
            self.failures.append(exc)

    def member(self, name: str, node_id: int, text: str) -> Attachment:
        """Node `name` as member `node_id` of the cluster `text` describes, on the hub."""
        home = self.tmp_path / name
        (home / "data").mkdir(parents=True, exist_ok=True)
        (home / "corosync.conf").write_text(text)
        return Attachment(node_id=node_id, config=conf.parse(text),
                          config_path=home / "corosync.conf",
                          transport=self.hub.transport(node_id),
                          ring_seq_store=RingSeqStore(home / "data", node_id),
                          incarnation=node_id * 1000 + len(self.nodes))

    def standalone(self, name: str) -> Attachment:
        data_dir = self.tmp_path / name / "data"
        data_dir.mkdir(parents=True)
        return attachments.standalone(name, data_dir)

    def close(self) -> None:
        for node in self.nodes.values():
            node.database.close()


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    """The nodes run in a nursery of their own, which is left -- every node's run() ended, its
    persister thread joined -- before the databases close: a database closed under a commit
    of the persister thread crashes the process."""
    async with trio.open_nursery() as nursery:
        n = Nodes(tmp_path, nursery)
        yield n
        nursery.cancel_scope.cancel()
    n.close()
    assert n.failures == []


async def settled(node: ReplicaNode, members: int) -> None:
    while not (node.quorate() and node.replica.synced()  # noqa: ASYNC110 no event; bounded
               and len(node.replica.members) == members):
        await trio.sleep(0.05)


async def test_a_standalone_node_joins_a_running_cluster_without_a_restart(
        nodes: Nodes) -> None:
    with trio.fail_after(60):
        first = nodes.start("node1", nodes.member("node1", 1, FIRST))
        await settled(first, 1)
        while first.memdb.lookup("corosync.conf") is None:  # noqa: ASYNC110 bounded
            await trio.sleep(0.05)
        assert (await first.write(WriteFile("cluster.txt", b"of the cluster", 1,
                                            create=True))).errno == 0

        joiner = nodes.start("node2", nodes.standalone("node2"))
        await settled(joiner, 1)
        assert (await joiner.write(WriteFile("mine.txt", b"standalone", 1,
                                             create=True))).errno == 0

        text, nodeid = with_node(FIRST, "node2", "127.0.0.2")
        assert (await first.write(WriteFile("corosync.conf", text.encode(), 2))).errno == 0
        assert first.replica.totem.nodes == {1, nodeid}  # the ring hears node 2 from now on
        # nothing is in flight: the attach must not wait out the bound on draining writes
        with trio.fail_after(ATTACH_DRAIN_TIMEOUT_S / 2):
            await joiner.attach(nodes.member("node2", nodeid, text), wipe=True)

        assert not joiner.standalone
        assert joiner.node_id == nodeid
        await settled(joiner, 2)
        await settled(first, 2)
    assert joiner.memdb.lookup("mine.txt") is None  # the joiner took the cluster's tree
    entry = joiner.memdb.lookup("cluster.txt")
    assert entry is not None
    assert entry.data == b"of the cluster"
    assert joiner.memdb.checksum() == first.memdb.checksum()
    assert joiner.status()["cluster"] == {"name": "lab", "config_version": 2,
                                          "transport": "knet"}  # no transport line: knet
    with trio.fail_after(30):
        assert (await joiner.write(WriteFile("from2.txt", b"2", 1, create=True))).errno == 0
    from_two = first.memdb.lookup("from2.txt")
    assert from_two is not None
    assert from_two.data == b"2"


async def test_a_removed_node_leaves_the_ring_and_its_frames_are_dropped(nodes: Nodes) -> None:
    two, _ = with_node(FIRST, "node2", "127.0.0.2")
    three, _ = with_node(two, "node3", "127.0.0.3")
    with trio.fail_after(60):
        members = [nodes.start(f"node{i}", nodes.member(f"node{i}", i, three))
                   for i in (1, 2, 3)]
        for node in members:
            await settled(node, 3)
        while members[0].memdb.lookup("corosync.conf") is None:  # noqa: ASYNC110 bounded
            await trio.sleep(0.05)
        # node 3 stays up but is cut off, as a node powered off would be
        nodes.hub.isolate(3)
        for node in members[:2]:
            await settled(node, 2)
        text, _ = without_node(three, "node3")
        assert (await members[0].write(WriteFile("corosync.conf", text.encode(), 2))).errno == 0
        nodes.hub.heal()
        dropped = members[0].replica.totem.counters.get("dropped_unknown_node", 0)
        while members[0].replica.totem.counters.get(  # noqa: ASYNC110 bounded
                "dropped_unknown_node", 0) <= dropped:
            await trio.sleep(0.05)
    for node in members[:2]:
        status = node.status()
        assert [m["nodeid"] for m in status["membership"]["members"]] == [1, 2]
        assert status["quorum"]["expected_votes"] == 2
        assert status["quorum"]["quorate"]
        assert node.replica.totem.nodes == {1, 2}


async def test_a_write_racing_an_attach_is_answered(nodes: Nodes) -> None:
    """A write started in the same scheduler batch as an attach (a FUSE write at the moment of
    `pmxfs create`) is answered, whichever of the two runs first: it waits for the attach or is
    drained by it. Before, a write past its check could land in the replica the attach tore
    down and wait for ever. trio runs one batch's tasks in random order, so a few rounds try
    both orders."""
    node = nodes.start("node1", nodes.standalone("node1"))
    with trio.fail_after(60):
        await settled(node, 1)
        replies: list[int] = []

        async def write(name: str) -> None:
            replies.append((await node.write(WriteFile(name, b"x", 1, create=True))).errno)

        for attempt in range(6):
            member = nodes.member("node1", 1, FIRST)
            async with trio.open_nursery() as race:
                race.start_soon(write, f"f{attempt}")
                race.start_soon(functools.partial(node.attach, member, wipe=False))
            assert len(replies) == attempt + 1
            await settled(node, 1)
