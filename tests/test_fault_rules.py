"""The pure part of the fault harness's user-space switch (tools/faultlab/rules.py): which packets
a partition, a bridge node and one-way loss drop, and netem's knobs (loss, duplication, delay
with jitter) drawn from a seeded generator."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from faultlab import rules
from faultlab.rules import LinkFault, Rules

NODES = ["n1", "n2", "n3", "n4", "n5"]


def passes(r: Rules, src: str, dst: str) -> bool:
    return bool(r.fate(src, dst, random.Random(0)))


def test_clean_network_delivers_one_copy_at_once() -> None:
    assert Rules().fate("n1", "n2", random.Random(0)) == [0.0]


def test_split_cuts_exactly_the_pairs_across_groups() -> None:
    r = rules.split([["n1", "n2"], ["n3", "n4", "n5"]])
    for a in NODES:
        for b in NODES:
            if a != b:
                same = (a in ("n1", "n2")) == (b in ("n1", "n2"))
                assert passes(r, a, b) == same, (a, b)


def test_bridge_node_sees_both_sides_which_do_not_see_each_other() -> None:
    r = rules.bridge(["n1", "n2"], "n3", ["n4", "n5"])
    for a, b in (("n1", "n3"), ("n3", "n5"), ("n5", "n3"), ("n1", "n2"), ("n4", "n5")):
        assert passes(r, a, b), (a, b)
    for a, b in (("n1", "n4"), ("n5", "n2"), ("n2", "n5")):
        assert not passes(r, a, b), (a, b)
    with pytest.raises(ValueError, match="on one side"):
        rules.bridge(["n1", "n3"], "n3", ["n4"])


@pytest.mark.parametrize("outgoing", [True, False])
def test_one_way_drops_one_direction_only(outgoing: bool) -> None:
    r = rules.one_way("n2", NODES, outgoing=outgoing)
    for other in ("n1", "n3"):
        assert passes(r, "n2", other) is not outgoing
        assert passes(r, other, "n2") is outgoing
    assert passes(r, "n1", "n3")


def test_loss_and_duplication_rates_follow_the_knobs() -> None:
    rng = random.Random(42)
    lossy = rules.everywhere(NODES, LinkFault(loss=0.3))
    dropped = sum(not lossy.fate("n1", "n2", rng) for _ in range(10000))
    assert 2700 < dropped < 3300
    doubled = rules.everywhere(NODES, LinkFault(duplicate=0.2))
    copies = [len(doubled.fate("n1", "n2", rng)) for _ in range(10000)]
    assert set(copies) == {1, 2}
    assert 1800 < copies.count(2) < 2200


def test_delay_with_jitter_stays_in_range_and_reorders() -> None:
    rng = random.Random(7)
    r = rules.everywhere(NODES, LinkFault(delay_s=0.1, jitter_s=0.05))
    delays = [r.fate("n1", "n2", rng)[0] for _ in range(1000)]
    assert all(0.05 <= d <= 0.15 for d in delays)
    arrivals = [i * 0.001 + d for i, d in enumerate(delays)]  # one packet every ms
    assert arrivals != sorted(arrivals)


def test_everywhere_only_touches_the_named_node() -> None:
    r = rules.everywhere(NODES, LinkFault(loss=1.0), only=["n3"])
    assert not passes(r, "n3", "n1")
    assert not passes(r, "n1", "n3")
    assert passes(r, "n1", "n2")


def test_same_seed_same_decisions() -> None:
    r = rules.everywhere(NODES, LinkFault(loss=0.5, duplicate=0.5, delay_s=0.01, jitter_s=0.01))
    first = [r.fate("n1", "n2", rng) for rng in [random.Random(3)] for _ in range(200)]
    again = [r.fate("n1", "n2", rng) for rng in [random.Random(3)] for _ in range(200)]
    assert first == again


def test_merged_adds_drops_and_keeps_the_stronger_knob() -> None:
    cut = rules.split([["n1"], ["n2", "n3"]])
    slow = rules.everywhere(["n2", "n3"], LinkFault(loss=0.1, delay_s=0.2))
    lossy = rules.everywhere(["n2", "n3"], LinkFault(loss=0.4, delay_s=0.05))
    both = cut.merged(slow).merged(lossy)
    assert not passes(both, "n1", "n2")
    assert both.faults[("n2", "n3")] == LinkFault(loss=0.4, delay_s=0.2)
