"""What the lab's switch does with one packet: the pure part of the user-space switch.

`Rules` is an immutable description of the network's faults between named nodes: ordered pairs
(src, dst) whose packets are dropped (partitions, isolation, a bridge node, one-way loss) and, per
ordered pair, a `LinkFault` with netem's knobs: loss and duplication probabilities, a delay and
a jitter (each copy is delayed independently by delay ± jitter, so a jitter larger than the gap
between packets reorders them). `Rules.fate` answers, for one packet, after how many seconds each
copy of it is delivered (an empty list: dropped), drawing every chance from the random
generator it is given, so a seeded generator replays the same decisions for the same packets.

The constructors build the nemesis's shapes: `split` (groups that do not see each other),
`bridge` (two sides that see a middle node but not each other), `one_way` (a node's packets out
or in are dropped) and `everywhere` (one LinkFault on every pair). `merged` combines two rule
sets (a combination of faults): drops add up, and per pair the stronger of each knob wins.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

Pair = tuple[str, str]


@dataclass(frozen=True)
class LinkFault:
    """netem's knobs for one direction of one pair (probabilities in [0, 1], seconds)."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0

    def stronger(self, other: LinkFault) -> LinkFault:
        return LinkFault(max(self.loss, other.loss), max(self.duplicate, other.duplicate),
                         max(self.delay_s, other.delay_s), max(self.jitter_s, other.jitter_s))

    def describe(self) -> str:
        parts = []
        if self.loss:
            parts.append(f"loss {self.loss:.0%}")
        if self.duplicate:
            parts.append(f"dup {self.duplicate:.0%}")
        if self.delay_s or self.jitter_s:
            parts.append(f"delay {self.delay_s * 1000:.0f}±{self.jitter_s * 1000:.0f} ms")
        return ", ".join(parts) or "clean"


@dataclass(frozen=True)
class Rules:
    """The switch's faults (module header). The default is a clean network."""

    blocked: frozenset[Pair] = frozenset()
    faults: Mapping[Pair, LinkFault] = field(default_factory=lambda: MappingProxyType({}))

    def fate(self, src: str, dst: str, rng: random.Random) -> list[float]:
        """The delay in seconds of each copy of a packet from `src` to `dst` ([]: dropped)."""
        if (src, dst) in self.blocked:
            return []
        fault = self.faults.get((src, dst))
        if fault is None:
            return [0.0]
        if fault.loss and rng.random() < fault.loss:
            return []
        copies = 2 if fault.duplicate and rng.random() < fault.duplicate else 1
        return [_delay(fault, rng) for _ in range(copies)]

    def merged(self, other: Rules) -> Rules:
        faults = dict(self.faults)
        for pair, fault in other.faults.items():
            known = faults.get(pair)
            faults[pair] = fault if known is None else known.stronger(fault)
        return Rules(self.blocked | other.blocked, MappingProxyType(faults))

    def describe(self) -> str:
        if not self.blocked and not self.faults:
            return "clean network"
        parts = []
        if self.blocked:
            parts.append("blocked " + " ".join(f"{a}>{b}" for a, b in sorted(self.blocked)))
        shapes: dict[str, list[str]] = {}
        for (a, b), fault in sorted(self.faults.items()):
            shapes.setdefault(fault.describe(), []).append(f"{a}>{b}")
        parts += [f"{shape} on {len(pairs)} pairs" for shape, pairs in sorted(shapes.items())]
        return "; ".join(parts)


def _delay(fault: LinkFault, rng: random.Random) -> float:
    if not fault.delay_s and not fault.jitter_s:
        return 0.0
    return max(0.0, fault.delay_s + rng.uniform(-fault.jitter_s, fault.jitter_s))


def _between(left: Iterable[str], right: Iterable[str]) -> frozenset[Pair]:
    """Both directions of every pair with one end in `left` and the other in `right`."""
    right = list(right)
    return frozenset(pair for a, b in itertools.product(left, right) if a != b
                     for pair in ((a, b), (b, a)))


def split(groups: Sequence[Sequence[str]]) -> Rules:
    """Groups that do not see each other (a partition; one group of one node: isolation)."""
    blocked: frozenset[Pair] = frozenset()
    for first, second in itertools.combinations(groups, 2):
        blocked |= _between(first, second)
    return Rules(blocked)


def bridge(left: Sequence[str], middle: str, right: Sequence[str]) -> Rules:
    """`left` and `right` do not see each other; both see `middle` (in neither of them)."""
    if middle in left or middle in right:
        raise ValueError(f"the bridge node {middle} is on one side")
    return Rules(_between(left, right))


def one_way(node: str, others: Sequence[str], *, outgoing: bool) -> Rules:
    """`node`'s packets to `others` are dropped (outgoing) or theirs to it (not outgoing)."""
    pairs = [(node, o) if outgoing else (o, node) for o in others if o != node]
    return Rules(frozenset(pairs))


def everywhere(nodes: Sequence[str], fault: LinkFault,
               only: Sequence[str] | None = None) -> Rules:
    """`fault` on every ordered pair of `nodes` (or only on pairs from or to `only`)."""
    touched = set(nodes if only is None else only)
    pairs = [(a, b) for a, b in itertools.permutations(nodes, 2) if a in touched or b in touched]
    return Rules(frozenset(), MappingProxyType(dict.fromkeys(pairs, fault)))
