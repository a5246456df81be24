"""What a totem instance hands back to its caller: the outputs it queues and the counters it keeps.

Totem is pure, so every effect is an output value appended to one list in the order it must be
carried out (`Totem.drain` hands the list over): a `Send` queued before a `Deliver` must be on
the wire before the application sees the message, and a `PersistRingSeq` must be on disk before
the commit token that follows it leaves the node. Counters name what happened (frames dropped and
why, retransmissions, rings installed) for status reports and tests; they never steer the
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .wire import RingId


class ConfChangeKind(Enum):
    """TRANSITIONAL: the members that came with me from my old ring (its messages end here).
    REGULAR: the members of the new ring (its messages follow)."""

    TRANSITIONAL = "transitional"
    REGULAR = "regular"


@dataclass(frozen=True, slots=True)
class Send:
    """Send `data` to node `to`, or to every configured node when `to` is None."""

    to: int | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """An application message, in agreed order. `seq` is its last frame's position in `ring_id`."""

    sender: int
    ring_id: RingId
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A configuration change of ring `ring_id`: its `members`, who `left` since the previous
    configuration and who `joined` (each configuration names only one of the two)."""

    kind: ConfChangeKind
    ring_id: RingId
    members: tuple[int, ...]
    left: tuple[int, ...]
    joined: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Stable:
    """Every member of `ring_id` has received every frame up to `seq` (totem's "safe" point):
    a message delivered with a seq at or below it survives any later partition of the ring,
    because every transitional configuration that follows holds it."""

    ring_id: RingId
    seq: int


@dataclass(frozen=True, slots=True)
class Durable:
    """Every member of `ring_id` has reported (`Totem.set_durable`) that what was delivered to
    it up to `seq` is on its disk. Reported at most once per visit of the token, only upwards."""

    ring_id: RingId
    seq: int


@dataclass(frozen=True, slots=True)
class PersistRingSeq:
    """Store the highest ring seq seen; hand it back as `ring_seq` when the node restarts."""

    ring_seq: int


Output = Send | Deliver | ConfChange | Stable | Durable | PersistRingSeq


class Counters(dict[str, int]):
    """How often each named thing happened (a name appears once it first happens)."""

    def add(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n
