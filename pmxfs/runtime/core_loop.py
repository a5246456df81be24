"""Drives a pure core (`Totem`, `Replica`) with real time and real frames.

`CoreLoop.run(core)` is two cooperating tasks in one trio thread, so the core is only ever called
from one place at a time:
* the receive task awaits the next authenticated frames from the transport (all that are already
  queued, so a busy node does its bookkeeping once per batch) and feeds them to the core. With a
  `digest` (a core that splits taking frames in from the application's work on them, as the
  replica does), the frames the core wants sent -- the token above all -- leave first, and the
  application's work comes after: the token never waits for it;
* the timer task sleeps until the core's `next_deadline()` and then calls `on_timer`. An input
  that moves the deadline earlier wakes it; one that moves it later does not (every token hop
  moves the token-loss deadline later, and waking per hop costs more than one early wake-up):
  the task wakes at the old time, finds the deadline later and sleeps again. An idle node
  sleeps; there is no polling.
After every core call the owner's `flush` carries out the outputs and ends with
`deadline_changed`.
Time 0 of the core is when the loop was created.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import trio


class FrameTransport(Protocol):
    """What a node needs from a transport: authenticated frames in, frames out."""

    def send(self, to: int | None, payload: bytes) -> None: ...

    async def recv_batch(self, limit: int = 64) -> list[tuple[int, bytes]]: ...

    @property
    def counters(self) -> dict[str, int]: ...

    async def set_addresses(self, addresses: Mapping[int, str]) -> None: ...

    def close(self) -> None: ...


class Core(Protocol):
    def receive(self, now: int, src: int, data: bytes) -> None: ...

    def on_timer(self, now: int) -> None: ...

    def next_deadline(self) -> int | None: ...


class CoreLoop:
    def __init__(self, transport: FrameTransport, flush: Callable[[], None]) -> None:
        self._transport = transport
        self._flush = flush
        self._epoch = trio.current_time()
        self._sleeping_until: int | None = None
        self._wakeup = trio.Event()

    def now(self) -> int:
        """Milliseconds since the loop was created: the core's clock."""
        return int((trio.current_time() - self._epoch) * 1000)

    def deadline_changed(self, deadline: int | None) -> None:
        """Called by `flush` with the core's next deadline after every core call."""
        if deadline is not None and (self._sleeping_until is None
                                     or deadline < self._sleeping_until):
            self._wakeup.set()

    async def run(self, core: Core, digest: Callable[[int], None] | None = None) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop, core, digest)
            nursery.start_soon(self._timer_loop, core)

    async def _receive_loop(self, core: Core, digest: Callable[[int], None] | None) -> None:
        while True:
            batch = await self._transport.recv_batch()
            now = self.now()
            for src, data in batch:
                core.receive(now, src, data)
            if digest is not None:
                self._flush()
                digest(now)
            self._flush()

    async def _timer_loop(self, core: Core) -> None:
        while True:
            deadline = core.next_deadline()
            self._sleeping_until = deadline
            self._wakeup = trio.Event()
            if deadline is None:
                await self._wakeup.wait()
                continue
            with trio.move_on_at(self._epoch + deadline / 1000) as sleep:
                await self._wakeup.wait()
            due = core.next_deadline()
            if sleep.cancelled_caught and due is not None and due <= deadline:
                # trio woke us at or after the deadline; millisecond rounding must not make
                # the core see an earlier time and leave us spinning until the clock moves.
                core.on_timer(max(self.now(), due))
                self._flush()
