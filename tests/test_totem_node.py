"""The trio totem node: several nodes in one process over the in-memory transport.

The autojump clock makes trio's clock jump to the next deadline whenever every task sleeps, so
these tests run token timeouts of seconds in milliseconds of real time, and they also prove the
node sleeps exactly until its next deadline (a polling loop would never let the clock jump).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from pmxfs.core.totem import ConfChange, ConfChangeKind, Deliver, State
from pmxfs.core.totem_params import derive_params
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.ring_seq import RingSeqFileError, RingSeqStore
from pmxfs.runtime.totem_node import TotemNode

NODES = (1, 2, 3)
WAIT_S = 60.0


class Cluster:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.hub = MemoryHub()
        self.params = derive_params(len(NODES), token=1000)
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.nodes: dict[int, TotemNode] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.events: dict[int, list[Deliver | ConfChange]] = {}

    def start(self, node_id: int) -> TotemNode:
        node = TotemNode(node_id, NODES, self.params, self.hub.transport(node_id),
                         RingSeqStore(self.tmp_path / f"n{node_id}", node_id))
        self.nodes[node_id] = node
        self.events[node_id] = []
        scope = trio.CancelScope()
        self.scopes[node_id] = scope

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(node.run)
                    async for batch in node.events():
                        self.events[node_id].extend(batch)

        self.nursery.start_soon(run)
        return node

    def kill(self, node_id: int) -> None:
        self.scopes[node_id].cancel()
        del self.hub.transports[node_id]

    def in_one_ring(self, members: tuple[int, ...]) -> bool:
        rings = {self.nodes[n].totem.status().ring_id for n in members}
        return len(rings) == 1 and all(
            self.nodes[n].totem.status().state is State.OPERATIONAL
            and self.nodes[n].totem.status().members == members
            for n in members
        )

    def delivered(self, node_id: int) -> list[bytes]:
        return [e.payload for e in self.events[node_id] if isinstance(e, Deliver)]


async def wait_for(condition: object) -> None:
    """Until `condition()` holds, at most WAIT_S of the (usually autojumping) clock."""
    assert callable(condition)
    with trio.fail_after(WAIT_S):
        while not condition():  # noqa: ASYNC110 polls state that has no event; bounded by fail_after
            await trio.sleep(0.01)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp_path, nursery)
        for n in NODES:
            c.start(n)
        yield c
        nursery.cancel_scope.cancel()


async def test_three_nodes_form_a_ring_and_order_messages(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await wait_for(lambda: cluster.in_one_ring(NODES))
    for round_ in range(20):
        for n in NODES:
            await cluster.nodes[n].mcast(b"%d:%d" % (n, round_))
    await wait_for(lambda: all(len(cluster.delivered(n)) == 60 for n in NODES))
    assert cluster.delivered(1) == cluster.delivered(2) == cluster.delivered(3)
    regular = [e for e in cluster.events[1]
               if isinstance(e, ConfChange) and e.kind is ConfChangeKind.REGULAR]
    assert regular[-1].members == NODES


async def test_killed_node_is_noticed_within_token_plus_consensus(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await wait_for(lambda: cluster.in_one_ring(NODES))
    cluster.kill(3)
    killed_at = trio.current_time()
    await wait_for(lambda: cluster.in_one_ring((1, 2)))
    elapsed_ms = (trio.current_time() - killed_at) * 1000
    assert elapsed_ms <= cluster.params.token + cluster.params.consensus + 500
    trans = [e for e in cluster.events[1]
             if isinstance(e, ConfChange) and e.kind is ConfChangeKind.TRANSITIONAL]
    assert trans[-1].members == (1, 2)
    assert trans[-1].left == (3,)


async def test_ring_seq_is_persisted_before_use(
    cluster: Cluster, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    await wait_for(lambda: cluster.in_one_ring(NODES))
    ring_seq = cluster.nodes[2].totem.status().ring_id.seq
    for n in NODES:
        assert RingSeqStore(tmp_path / f"n{n}", n).load() >= ring_seq


async def test_isolated_node_rejoins(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await wait_for(lambda: cluster.in_one_ring(NODES))
    cluster.hub.isolate(2)
    await wait_for(lambda: cluster.in_one_ring((1, 3)) and cluster.in_one_ring((2,)))
    cluster.hub.heal()
    await wait_for(lambda: cluster.in_one_ring(NODES))
    await cluster.nodes[2].mcast(b"back")
    await wait_for(lambda: all(b"back" in cluster.delivered(n) for n in NODES))


async def test_idle_ring_sleeps(cluster: Cluster, autojump_clock: trio.testing.MockClock) -> None:
    """An idle ring holds the token: few frames per second once it has settled."""
    await wait_for(lambda: cluster.in_one_ring(NODES))
    await trio.sleep(30)
    before = sum(cluster.hub.transports[n].counters["frames_sent"] for n in NODES)
    await trio.sleep(60)
    sent = sum(cluster.hub.transports[n].counters["frames_sent"] for n in NODES) - before
    # one rotation (3 token hops) per `hold` ms, plus a merge detect to each of the 2 others
    # every `merge` ms; a ring that does not hold the token rotates hundreds of times a second
    hops = len(NODES) * 1000 / cluster.params.hold
    merge_detects = (len(NODES) - 1) * 1000 / cluster.params.merge
    assert sent / 60 < hops + merge_detects + 1


async def test_mcast_waits_when_the_send_queue_is_full(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await wait_for(lambda: cluster.in_one_ring(NODES))
    node = cluster.nodes[1]
    total = node.totem.send_queue_messages * 3
    for i in range(total):
        await node.mcast(b"m%d" % i)
        assert len(node.totem.pending) <= node.totem.send_queue_messages
    await wait_for(lambda: len(cluster.delivered(3)) == total)
    assert cluster.delivered(3) == [b"m%d" % i for i in range(total)]


def test_ring_seq_store_refuses_garbage(tmp_path: Path) -> None:
    store = RingSeqStore(tmp_path, 1)
    assert store.load() == 0
    store.store(40)
    assert store.load() == 40
    store.path.write_text("forty\n")
    with pytest.raises(RingSeqFileError, match="does not hold a ring seq"):
        store.load()
