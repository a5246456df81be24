"""An in-process transport for runtime tests and benchmarks: frames travel through trio memory
channels between nodes of one `MemoryHub`, which can also cut nodes off from each other."""

from __future__ import annotations

import math
from collections.abc import Mapping

import trio


class MemoryHub:
    def __init__(self) -> None:
        self.transports: dict[int, MemoryTransport] = {}
        self.blocked: set[tuple[int, int]] = set()

    def transport(self, node_id: int) -> MemoryTransport:
        t = MemoryTransport(self, node_id)
        self.transports[node_id] = t
        return t

    def isolate(self, node_id: int) -> None:
        for other in self.transports:
            if other != node_id:
                self.blocked |= {(node_id, other), (other, node_id)}

    def heal(self) -> None:
        self.blocked.clear()

    def deliver(self, src: int, dst: int, payload: bytes) -> None:
        target = self.transports.get(dst)
        if target is None or (src, dst) in self.blocked:
            return
        target.inbox_send.send_nowait((src, payload))


class MemoryTransport:
    def __init__(self, hub: MemoryHub, node_id: int) -> None:
        self.hub = hub
        self.node_id = node_id
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[tuple[int, bytes]](math.inf)
        self._counters: dict[str, int] = {"frames_sent": 0, "frames_received": 0}

    @property
    def counters(self) -> dict[str, int]:
        return self._counters

    def send(self, to: int | None, payload: bytes) -> None:
        targets = [to] if to is not None else [n for n in self.hub.transports if n != self.node_id]
        for dst in targets:
            self._counters["frames_sent"] += 1
            self.hub.deliver(self.node_id, dst, payload)

    async def recv_batch(self, limit: int = 64) -> list[tuple[int, bytes]]:
        batch = [await self.inbox_recv.receive()]
        while len(batch) < limit:
            try:
                batch.append(self.inbox_recv.receive_nowait())
            except trio.WouldBlock:
                break
        self._counters["frames_received"] += len(batch)
        return batch

    async def set_addresses(self, addresses: Mapping[int, str]) -> None:
        """A run-time nodelist change: a hub reaches every node on it, so there is nothing to
        learn."""

    def close(self) -> None:
        """Leave the hub (unless a newer transport of this node took the place): frames sent to
        this node from now on are dropped."""
        if self.hub.transports.get(self.node_id) is self:
            del self.hub.transports[self.node_id]
