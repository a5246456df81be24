"""The trio side of one totem instance: real time, real frames, the ring seq on disk.

`TotemNode.run()` drives the pure `Totem` core with a `CoreLoop` (receive and timer tasks, see
runtime/core_loop.py). After every core call the outputs are carried out in order: a
`PersistRingSeq` is written and fsynced before any later `Send` leaves, `Send`s go to the
transport, and deliveries and configuration changes are queued, in order, for the layer above
(`events()`), as one batch per core call: a busy ring delivers thousands of messages a second,
and waking the consumer once per message would cost more than ordering them.

`mcast()` applies back-pressure: while the core's bounded send queue is full it waits until the
core has sent something, instead of growing a queue of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from pmxfs.core.totem import (
    ConfChange,
    Deliver,
    Durable,
    McastResult,
    PersistRingSeq,
    Send,
    Stable,
    Totem,
    TotemStatus,
)
from pmxfs.core.totem_params import TotemParams
from pmxfs.runtime.core_loop import CoreLoop, FrameTransport
from pmxfs.runtime.ring_seq import RingSeqStore

Event = Deliver | ConfChange | Stable


@dataclass(frozen=True)
class NodeStatus:
    totem: TotemStatus
    transport_counters: dict[str, int]


class TotemNode:
    """Runs a `Totem` core for `node_id` on `transport`; time 0 is when the node was created."""

    def __init__(
        self,
        node_id: int,
        nodes: Iterable[int],
        params: TotemParams,
        transport: FrameTransport,
        store: RingSeqStore,
    ) -> None:
        self.transport = transport
        self.store = store
        self.loop = CoreLoop(transport, self._flush)
        self.totem = Totem(node_id, nodes, params, 0, ring_seq=store.load())
        self._space = trio.Event()
        self._events_send, self._events_recv = trio.open_memory_channel[list[Event]](math.inf)
        self._flush()

    def now(self) -> int:
        return self.loop.now()

    # ------------------------------------------------------------------ interface

    def events(self) -> trio.MemoryReceiveChannel[list[Event]]:
        """Batches of deliveries and configuration changes, in the order totem produced them."""
        return self._events_recv

    async def mcast(self, payload: bytes) -> None:
        """Multicast one message; waits while the send queue is full."""
        while True:
            result = self.totem.mcast(self.now(), payload)
            self._flush()
            if result is McastResult.ACCEPTED:
                return
            self._space = trio.Event()
            await self._space.wait()

    def status(self) -> NodeStatus:
        return NodeStatus(self.totem.status(), dict(self.transport.counters))

    async def run(self) -> None:
        await self.loop.run(self.totem)

    def _flush(self) -> None:
        events: list[Event] = []
        for out in self.totem.drain():
            if isinstance(out, Send):
                self.transport.send(out.to, out.data)
            elif isinstance(out, PersistRingSeq):
                self.store.store(out.ring_seq)
            elif not isinstance(out, Durable):  # no application here reports a disk
                events.append(out)
        if events:
            self._events_send.send_nowait(events)
        self.loop.deadline_changed(self.totem.next_deadline())
        if len(self.totem.pending) < self.totem.send_queue_messages:
            self._space.set()

