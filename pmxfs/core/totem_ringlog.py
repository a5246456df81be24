"""The frames of one ring as one member holds them: receive buffer, retransmit store and delivery
point in one.

Frames arrive out of order, duplicated and with holes. `aru` (all received up to) is the highest
seq with nothing missing at or below it; frames above it wait for the holes to be filled, and
only frames up to `aru` can be delivered, in seq order. A frame stays after delivery until the
token shows that every member holds it (`free_upto`), so any member can retransmit it to one that
missed it. A hole is only asked for after several token visits found it (`overdue`): a frame that
is merely late must not cost a retransmission.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .wire import Mcast, RingId


@dataclass(slots=True, eq=False)
class RingLog:
    """The frames of ring `ring_id` this member has received and not yet freed."""

    ring_id: RingId
    members: tuple[int, ...]  # ascending; the first is the ring's representative
    frames: dict[int, Mcast] = field(default_factory=dict)  # held frames by seq
    aru: int = 0  # every frame up to here has been received
    high_seq: int = 0  # the highest seq received
    delivered: int = 0  # frames up to here have been delivered (or skipped)
    freed: int = 0  # frames up to here have been dropped from `frames`
    miss_counts: dict[int, int] = field(default_factory=dict)  # seq -> visits that found it missing

    def add(self, frame: Mcast, seq: int) -> bool:
        """Keep `frame` at `seq`; False if it is a duplicate (held, or at or below `aru`)."""
        if seq <= self.aru or seq in self.frames:
            return False
        self.frames[seq] = frame
        self.miss_counts.pop(seq, None)
        if seq > self.high_seq:
            self.high_seq = seq
        while self.aru + 1 in self.frames:
            self.aru += 1
        return True

    def free_upto(self, seq: int) -> None:
        """Drop the frames up to `seq`: every member holds them and this one delivered them."""
        for s in range(self.freed + 1, seq + 1):
            self.frames.pop(s, None)
        self.freed = max(self.freed, seq)

    def overdue(self, upto: int, skip: set[int], room: int, miss_count_const: int) -> list[int]:
        """Count one more miss for every seq above `aru` up to `upto` this member lacks (but not
        those in `skip`, already asked for); return those now missed `miss_count_const` times,
        in seq order, at most `room` of them (the scan stops there)."""
        overdue: list[int] = []
        for s in range(self.aru + 1, upto + 1):
            if len(overdue) >= room:
                break
            if s in self.frames or s in skip:
                continue
            misses = self.miss_counts.get(s, 0) + 1
            self.miss_counts[s] = misses
            if misses >= miss_count_const:
                overdue.append(s)
        return overdue
