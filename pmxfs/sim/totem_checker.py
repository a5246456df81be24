"""Checkers for totem's guarantees, fed with every delivery and configuration change as it happens.

Each application payload made by the simulator starts with `<sender>:<counter>:`, so a delivery
can be traced back to exactly one `mcast` call, and inside one frame a sender's messages are in
counter order. The checks:

* nothing invented: every delivered payload was accepted by `mcast`, byte for byte, from its
  sender;
* nothing twice: a node incarnation delivers each message at most once;
* agreed order: a message is delivered at the same (ring, seq) everywhere, and each node delivers
  a ring's messages in increasing (seq, counter) order — together, one total order per ring;
* virtual synchrony: members that move together from ring A to ring B delivered exactly the same
  set of ring-A messages and report the same transitional membership; every member that installs
  ring B reports the same regular membership; the transitional set lies within ring A and names
  the rest of A as left, and the regular configuration names B minus that set as joined;
* stability: once any member reports `Stable(ring, s)`, every member that moves on from that ring
  (rather than crashing) has delivered every message of the ring at seq <= s;
* self-delivery: (checked at the end) every message accepted by a node that never crashed was
  delivered by that node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pmxfs.core.totem import ConfChange, ConfChangeKind, Deliver, Stable
from pmxfs.core.wire import RingId

NodeKey = tuple[int, int]  # (node id, incarnation)


class Violation(Exception):
    """A guarantee of the ordered broadcast was broken."""


def payload_id(payload: bytes) -> tuple[int, int]:
    sender, counter, _ = payload.split(b":", 2)
    return int(sender), int(counter)


@dataclass
class _NodeView:
    ring: RingId
    delivered: set[bytes] = field(default_factory=set)
    in_ring: set[bytes] = field(default_factory=set)
    last_position: tuple[int, int] = (0, -1)
    pending_transitional: ConfChange | None = None


class TotemChecker:
    def __init__(self) -> None:
        self.sent: dict[tuple[int, int], bytes] = {}
        self.position: dict[bytes, tuple[RingId, int]] = {}
        self.views: dict[NodeKey, _NodeView] = {}
        self.moves: dict[tuple[RingId, RingId], tuple[frozenset[bytes], tuple[int, ...]]] = {}
        self.regular: dict[RingId, tuple[int, ...]] = {}
        self.stable: dict[RingId, int] = {}
        self.ring_messages: dict[RingId, dict[bytes, int]] = {}
        self.left_ring: dict[RingId, list[tuple[NodeKey, frozenset[bytes]]]] = {}
        self.delivered_count = 0
        self.confchg_count = 0

    def node_started(self, key: NodeKey) -> None:
        self.views[key] = _NodeView(ring=RingId(seq=0, rep=key[0]))

    def accepted(self, payload: bytes) -> None:
        self.sent[payload_id(payload)] = payload

    def on_deliver(self, key: NodeKey, d: Deliver) -> None:
        view = self.views[key]
        ident = payload_id(d.payload)
        if ident[0] != d.sender or self.sent.get(ident) != d.payload:
            raise Violation(f"n{key[0]} delivered a message nobody sent: {ident} from {d.sender}")
        if d.payload in view.delivered:
            raise Violation(f"n{key[0]} delivered {ident} twice")
        if view.pending_transitional is not None:
            raise Violation(f"n{key[0]} delivered {ident} between transitional and regular")
        if d.ring_id != view.ring:
            raise Violation(f"n{key[0]} delivered {ident} of ring {d.ring_id} while in {view.ring}")
        if d.seq <= self.stable.get(d.ring_id, 0):
            for mover, had in self.left_ring.get(d.ring_id, []):
                if d.payload not in had:
                    raise Violation(f"n{mover[0]} left ring {d.ring_id} without {ident}, which "
                                    f"is at seq {d.seq}, within the stable point")
        self.ring_messages.setdefault(d.ring_id, {})[d.payload] = d.seq
        where = self.position.setdefault(d.payload, (d.ring_id, d.seq))
        if where != (d.ring_id, d.seq):
            raise Violation(
                f"n{key[0]} delivered {ident} at {d.ring_id}/{d.seq}, elsewhere at {where}"
            )
        pos = (d.seq, ident[1])
        if pos <= view.last_position:
            raise Violation(f"n{key[0]} delivered {ident} at {pos} after {view.last_position}")
        view.last_position = pos
        view.delivered.add(d.payload)
        view.in_ring.add(d.payload)
        self.delivered_count += 1

    def on_confchg(self, key: NodeKey, c: ConfChange) -> None:
        view = self.views[key]
        self.confchg_count += 1
        if key[0] not in c.members:
            raise Violation(f"n{key[0]} got a configuration without itself: {c}")
        if c.kind is ConfChangeKind.TRANSITIONAL:
            if view.pending_transitional is not None:
                raise Violation(f"n{key[0]} got two transitional configurations in a row")
            view.pending_transitional = c
            return
        trans = view.pending_transitional
        if trans is None or trans.ring_id != c.ring_id:
            raise Violation(f"n{key[0]} got a regular configuration without a transitional one")
        if not set(trans.members) <= set(c.members):
            raise Violation(f"n{key[0]}: transitional {trans.members} not within {c.members}")
        old_members = self.regular.get(view.ring, (key[0],))
        if set(trans.left) != set(old_members) - set(trans.members) or not set(
                trans.members) <= set(old_members):
            raise Violation(f"n{key[0]}: transitional {trans.members} left={trans.left} does "
                            f"not match the old ring {old_members}")
        if set(c.joined) != set(c.members) - set(trans.members) or c.left:
            raise Violation(f"n{key[0]}: regular {c.members} joined={c.joined} left={c.left} "
                            f"does not match the transitional {trans.members}")
        known = self.regular.setdefault(c.ring_id, c.members)
        if known != c.members:
            raise Violation(f"ring {c.ring_id}: members {c.members} on n{key[0]}, else {known}")
        move = (view.ring, c.ring_id)
        record = (frozenset(view.in_ring), trans.members)
        first = self.moves.setdefault(move, record)
        if first[1] != record[1]:
            raise Violation(
                f"n{key[0]} moved {move[0]}->{move[1]} with transitional {record[1]}, "
                f"others with {first[1]}"
            )
        if first[0] != record[0]:
            missing = sorted(payload_id(p) for p in first[0] ^ record[0])[:5]
            raise Violation(
                f"n{key[0]} moved {move[0]}->{move[1]} having delivered a different set of "
                f"old-ring messages than others (differences, first five: {missing})"
            )
        had = frozenset(view.in_ring)
        self.left_ring.setdefault(view.ring, []).append((key, had))
        self._check_left_with_stable(view.ring, key, had, self.stable.get(view.ring, 0))
        view.ring = c.ring_id
        view.in_ring = set()
        view.last_position = (0, -1)
        view.pending_transitional = None

    def on_stable(self, key: NodeKey, st: Stable) -> None:
        if st.ring_id != self.views[key].ring:
            raise Violation(f"n{key[0]} reported stable {st} outside its ring")
        if st.seq <= self.stable.get(st.ring_id, 0):
            return
        self.stable[st.ring_id] = st.seq
        for mover, had in self.left_ring.get(st.ring_id, []):
            self._check_left_with_stable(st.ring_id, mover, had, st.seq)

    def _check_left_with_stable(self, ring: RingId, key: NodeKey, had: frozenset[bytes],
                                stable: int) -> None:
        missing = [payload_id(p) for p, seq in self.ring_messages.get(ring, {}).items()
                   if seq <= stable and p not in had]
        if missing:
            raise Violation(f"n{key[0]} left ring {ring} without {len(missing)} messages within "
                            f"its stable point {stable}: {sorted(missing)[:5]}")

    def check_self_delivery(self, key: NodeKey, accepted: list[bytes]) -> None:
        view = self.views[key]
        lost = [payload_id(p) for p in accepted if p not in view.delivered]
        if lost:
            raise Violation(f"n{key[0]} never delivered {len(lost)} own messages: {lost[:5]}")
