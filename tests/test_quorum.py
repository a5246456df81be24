"""votequorum (pmxfs.core.quorum): one table row per situation, agreement, rendering.

A scenario drives a small simulated cluster: every node has its own `Quorum`; a step splits the
nodes into partitions (rings); in each ring every member announces and then every member computes.
Each step asserts that all members of a ring reached the same status (agreement), and the row
checks the final status of the ring that contains the row's `observer` node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core import conf
from pmxfs.core.quorum import (
    Announcement,
    ClusterInfo,
    LastManStanding,
    MemberInfo,
    Quorum,
    QuorumConfig,
    QuorumStatus,
    compute,
    member_infos,
    render_status,
)


class Sim:
    """Nodes with their own Quorum objects, regrouped into rings step by step."""

    def __init__(self, config: QuorumConfig) -> None:
        self.config = config
        self.nodes = {nid: Quorum(config, nid) for nid in config.node_votes}
        self.now = 0
        self.qdevice_owner: set[int] = set()

    def ring(self, members: Sequence[int]) -> QuorumStatus:
        announced = {m: self.nodes[m].announcement() for m in members}
        statuses = [self.nodes[m].on_membership(self.now, members, announced) for m in members]
        assert all(s == statuses[0] for s in statuses), statuses
        states = [self.nodes[m].state for m in members]
        assert all(s == states[0] for s in states), states
        return statuses[0]

    def split(self, *partitions: Sequence[int]) -> list[QuorumStatus]:
        return [self.ring(p) for p in partitions]

    def advance(self, ms: int, members: Sequence[int]) -> QuorumStatus:
        """Let time pass; deliver every LastManStanding proposal to the ring in order."""
        self.now += ms
        proposals: list[LastManStanding] = []
        for m in members:
            proposal = self.nodes[m].on_timer(self.now)
            if proposal is not None:
                proposals.append(proposal)
        for proposal in proposals:
            for m in members:
                self.nodes[m].apply_last_man_standing(proposal)
        return self.status(members)

    def expected(self, n: int, members: Sequence[int]) -> tuple[bool, QuorumStatus]:
        results = [self.nodes[m].set_expected(n) for m in members]
        assert all(r == results[0] for r in results), results
        return results[0].accepted, results[0].status

    def qdevice(self, owner: int, has_vote: bool, members: Sequence[int]) -> QuorumStatus:
        statuses = [self.nodes[m].update_qdevice_vote(owner, has_vote) for m in members]
        assert all(s == statuses[0] for s in statuses)
        return statuses[0]

    def status(self, members: Sequence[int]) -> QuorumStatus:
        statuses = [self.nodes[m].status() for m in members]
        assert all(s == statuses[0] for s in statuses), statuses
        return statuses[0]


def qc(n: int = 3, *, votes: dict[int, int] | None = None, **kwargs: object) -> QuorumConfig:
    node_votes = votes if votes is not None else {i: 1 for i in range(1, n + 1)}
    return QuorumConfig(node_votes=node_votes, **kwargs)  # type: ignore[arg-type]


Step = Callable[[Sim], QuorumStatus]


def ring(*members: int) -> Step:
    return lambda sim: sim.ring(members)


def split(*partitions: Sequence[int]) -> Step:
    def step(sim: Sim) -> QuorumStatus:
        return sim.split(*partitions)[0]
    return step


def restart(nid: int) -> Step:
    """The node's process restarts: fresh state, then it is alone until its next ring."""
    def step(sim: Sim) -> QuorumStatus:
        sim.nodes[nid] = Quorum(sim.config, nid)
        return sim.nodes[nid].status()
    return step


def wait(ms: int, *members: int) -> Step:
    return lambda sim: sim.advance(ms, members)


def expected(n: int, *members: int, accepted: bool = True) -> Step:
    def step(sim: Sim) -> QuorumStatus:
        ok, status = sim.expected(n, members)
        assert ok is accepted
        return status
    return step


def qdevice(owner: int, has_vote: bool, *members: int) -> Step:
    return lambda sim: sim.qdevice(owner, has_vote, members)


@dataclass
class Row:
    name: str
    config: QuorumConfig
    steps: list[Step]
    quorate: bool
    expected_votes: int | None = None
    quorum: int | None = None
    total_votes: int | None = None
    flags: tuple[str, ...] | None = None
    extra: dict[str, object] = field(default_factory=dict)


ROWS = [
    Row("3 nodes all up", qc(3), [ring(1, 2, 3)], True, 3, 2, 3, ("Quorate",)),
    Row("3 nodes lose 1", qc(3), [ring(1, 2, 3), ring(1, 2)], True, 3, 2, 2),
    Row("3 nodes lose 2 -> not quorate", qc(3), [ring(1, 2, 3), ring(1)], False, 3, 2, 1, ()),
    Row("3 nodes lose 2, expected 1 on the survivor -> quorate", qc(3),
        [ring(1, 2, 3), ring(1), expected(1, 1)], True, 1, 1, 1),
    Row("expected below current votes -> refused", qc(3),
        [ring(1, 2, 3), expected(2, 1, 2, 3, accepted=False)], True, 3, 2, 3),
    Row("expected that would lose quorum while quorate -> refused", qc(3),
        [ring(1, 2, 3), ring(1, 2), expected(5, 1, 2, accepted=False)], True, 3, 2, 2),
    Row("expected 0 -> refused", qc(3), [ring(1), expected(0, 1, accepted=False)], False, 3, 2),
    Row("expected raised within the votes that exist while quorate -> accepted",
        qc(4, expected_votes=3), [ring(1, 2, 3), expected(4, 1, 2, 3)], True, 4, 3, 3),
    Row("expected raised while not quorate -> accepted, still not quorate",
        qc(5, expected_votes=3), [ring(1), expected(5, 1)], False, 5, 3, 1),
    Row("expected above the votes that exist -> refused", qc(3),
        [ring(1, 2, 3), expected(4, 1, 2, 3, accepted=False)], True, 3, 2, 3),
    Row("expected above the votes that exist while not quorate -> refused", qc(3),
        [ring(1), expected(5, 1, accepted=False)], False, 3, 2, 1),
    Row("2 nodes without two_node lose one -> not quorate", qc(2),
        [ring(1, 2), ring(1)], False, 2, 2, 1),
    Row("two_node: both seen once, one lost -> survivor quorate", qc(2, two_node=True),
        [ring(1, 2), ring(1)], True, 2, 1, 1, ("TwoNode", "Quorate", "WaitForAll")),
    Row("two_node: a node that starts alone is not quorate (wait_for_all)",
        qc(2, two_node=True), [ring(1)], False, 2, 1, 1, ("TwoNode", "WaitForAll")),
    Row("two_node: alone, then the peer joins -> quorate", qc(2, two_node=True),
        [ring(1), ring(1, 2)], True, 2, 1, 2),
    Row("two_node with wait_for_all: 0 starts alone -> quorate",
        qc(2, two_node=True, wait_for_all=False), [ring(1)], True, 2, 1, 1,
        ("TwoNode", "Quorate")),
    Row("two_node: alone and waiting, expected 1 -> quorate", qc(2, two_node=True),
        [ring(1), expected(1, 1)], True, 1, 1, 1),
    Row("two_node split: both halves keep quorum (fencing decides, as corosync)",
        qc(2, two_node=True), [ring(1, 2), split([2], [1])], True, 2, 1, 1),
    Row("wait_for_all: 2 of 3 at start -> not quorate", qc(3, wait_for_all=True),
        [ring(1, 2)], False, 3, 2, 2, ("WaitForAll",)),
    Row("wait_for_all: all 3 seen, then 1 lost -> quorate", qc(3, wait_for_all=True),
        [ring(1, 2), ring(1, 2, 3), ring(1, 2)], True, 3, 2, 2),
    Row("wait_for_all re-armed after quorum loss: 2 of 3 back -> not quorate",
        qc(3, wait_for_all=True), [ring(1, 2, 3), split([1], [2], [3]), ring(1, 2)],
        False, 3, 2, 2),
    Row("wait_for_all re-armed, satisfied again when all are back", qc(3, wait_for_all=True),
        [ring(1, 2, 3), split([1], [2], [3]), ring(1, 2, 3)], True, 3, 2, 3),
    Row("wait_for_all: a restarted node alone with a node that lost quorum -> not quorate",
        qc(3, wait_for_all=True), [ring(1, 2, 3), split([1], [2, 3]), restart(2), ring(1, 2)],
        False, 3, 2, 2),
    Row("wait_for_all: a member from a quorate ring satisfies it for a rejoining node",
        qc(3, wait_for_all=True), [ring(1, 2, 3), split([1, 2], [3]), ring(1, 2, 3)],
        True, 3, 2, 3),
    Row("2 nodes + quorum device: one node plus the device -> quorate",
        qc(2, device_votes=1), [ring(1, 2), qdevice(1, True, 1, 2), ring(1)], True, 3, 2, 2,
        ("Quorate", "Qdevice", "QdeviceCastVote")),
    Row("2 nodes + quorum device: one node without the device vote -> not quorate",
        qc(2, device_votes=1), [ring(1, 2), ring(1)], False, 3, 2, 1, ("Qdevice",)),
    Row("2 nodes + quorum device: the device vote is lost inside the ring -> not quorate",
        qc(2, device_votes=1), [qdevice(1, True, 1), ring(1), qdevice(1, False, 1)],
        False, 3, 2, 1),
    Row("3 nodes + device with 2 votes (lms style): one node plus the device -> quorate",
        qc(3, device_votes=2), [qdevice(1, True, 1), ring(1)], True, 5, 3, 3),
    Row("4 nodes split 2|2 with auto_tie_breaker: the half with the lowest id is quorate",
        qc(4, auto_tie_breaker=True), [ring(1, 2, 3, 4), split([1, 2], [3, 4])], True, 4, 3, 2,
        ("Quorate", "AutoTieBreaker")),
    Row("4 nodes split 2|2 with auto_tie_breaker: the other half is not",
        qc(4, auto_tie_breaker=True), [ring(1, 2, 3, 4), split([3, 4], [1, 2])], False, 4, 3, 2,
        ("AutoTieBreaker",)),
    Row("auto_tie_breaker lowest, the split 1,4|2,3", qc(4, auto_tie_breaker=True),
        [ring(1, 2, 3, 4), split([1, 4], [2, 3])], True, 4, 3, 2),
    Row("auto_tie_breaker highest: the half with node 4", qc(4, auto_tie_breaker=True,
                                                            auto_tie_breaker_node="highest"),
        [ring(1, 2, 3, 4), split([3, 4], [1, 2])], True, 4, 3, 2),
    Row("auto_tie_breaker highest: the half without node 4 is not",
        qc(4, auto_tie_breaker=True, auto_tie_breaker_node="highest"),
        [ring(1, 2, 3, 4), split([1, 2], [3, 4])], False),
    Row("auto_tie_breaker list 3 1: the half with node 3", qc(4, auto_tie_breaker=True,
                                                              auto_tie_breaker_node=(3, 1)),
        [ring(1, 2, 3, 4), split([3, 4], [1, 2])], True),
    Row("auto_tie_breaker list 3 1: node 1's half loses, 3 may be on the other side",
        qc(4, auto_tie_breaker=True, auto_tie_breaker_node=(3, 1)),
        [ring(1, 2, 3, 4), split([1, 2], [3, 4])], False),
    Row("auto_tie_breaker list 3 1: node 3 was already gone, node 1's half wins",
        qc(4, auto_tie_breaker=True, auto_tie_breaker_node=(3, 1)),
        [ring(1, 2, 3, 4), ring(1, 2, 4), split([1, 2], [4])], True, 4, 3, 2),
    Row("auto_tie_breaker 3|1 split: the 3 side is quorate by votes",
        qc(4, auto_tie_breaker=True), [ring(1, 2, 3, 4), split([2, 3, 4], [1])], True, 4, 3, 3),
    Row("auto_tie_breaker 3|1 split: the lone lowest node is not",
        qc(4, auto_tie_breaker=True), [ring(1, 2, 3, 4), split([1], [2, 3, 4])], False),
    Row("auto_tie_breaker with an odd vote total and no wait_for_all is off",
        qc(5, auto_tie_breaker=True), [ring(1, 2, 3, 4, 5), split([1, 2], [3, 4, 5])], False,
        5, 3, 2, ()),
    Row("auto_tie_breaker odd total with wait_for_all: 2|2 after node 5 left is not an exact "
        "half (pmxfs)", qc(5, auto_tie_breaker=True, wait_for_all=True),
        [ring(1, 2, 3, 4, 5), split([1, 2, 3, 4], [5]), split([1, 2], [3, 4])], False, 5, 3, 2,
        ("WaitForAll", "AutoTieBreaker")),
    Row("auto_tie_breaker lowest is the nodelist's: node 1 dead, 2|1 split -> nobody",
        qc(4, auto_tie_breaker=True), [ring(1, 2, 3, 4), ring(2, 3, 4), split([2, 3], [4])],
        False),
    Row("auto_tie_breaker list 2 1: cold start 1|2 -> only the first listed node decides",
        qc(2, auto_tie_breaker=True, auto_tie_breaker_node=(2, 1)), [split([1], [2])], False),
    Row("auto_tie_breaker list 2 1: cold start, node 2's side wins",
        qc(2, auto_tie_breaker=True, auto_tie_breaker_node=(2, 1)), [split([2], [1])], True),
    Row("last_man_standing 5 -> 3: quorate, expected 3 after the window",
        qc(5, last_man_standing=True), [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(10000, 1, 2, 3)],
        True, 3, 2, 3, ("Quorate", "LastManStanding")),
    Row("last_man_standing 5 -> 3 -> 2 after the windows: quorate with expected 2",
        qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(10000, 1, 2, 3), ring(1, 2),
         wait(10000, 1, 2)], True, 2, 2, 2),
    Row("last_man_standing 5 -> 3 -> 2 -> 1: below 2 without auto_tie_breaker -> not quorate",
        qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(10000, 1, 2, 3), ring(1, 2),
         wait(10000, 1, 2), ring(1), wait(10000, 1)], False, 2, 2, 1),
    Row("last_man_standing: before the window ends expected stays", qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(9999, 1, 2, 3)], True, 5, 3, 3),
    Row("last_man_standing: 5 -> 3 -> 2 within the window -> not quorate",
        qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(5000, 1, 2, 3), ring(1, 2),
         wait(10000, 1, 2)], False, 5, 3, 2),
    Row("last_man_standing with a custom window", qc(5, last_man_standing=True,
                                                    last_man_standing_window=2000),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(2000, 1, 2, 3)], True, 3, 2, 3),
    Row("last_man_standing: a node rejoins a shrunk cluster -> expected rises with the votes",
        qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), split([1, 2, 3], [4], [5]), wait(10000, 1, 2, 3),
         ring(1, 2, 3, 4)], True, 4, 3, 4),
    Row("last_man_standing: a restarted node rejoins a shrunk cluster",
        qc(5, last_man_standing=True),
        [ring(1, 2, 3, 4, 5), ring(1, 2, 3), wait(10000, 1, 2, 3), restart(4),
         ring(1, 2, 3, 4)], True, 4, 3, 4),
    Row("last_man_standing + auto_tie_breaker: 4 -> 2 -> 1 stays quorate (lowest node)",
        qc(4, last_man_standing=True, auto_tie_breaker=True),
        [ring(1, 2, 3, 4), ring(1, 2), wait(10000, 1, 2), ring(1), wait(10000, 1)],
        True, 1, 1, 1),
    Row("weighted votes: the node with 3 of 5 votes alone is quorate",
        qc(votes={1: 3, 2: 1, 3: 1}), [ring(1, 2, 3), split([1], [2, 3])], True, 5, 3, 3),
    Row("weighted votes: the two single-vote nodes are not",
        qc(votes={1: 3, 2: 1, 3: 1}), [ring(1, 2, 3), split([2, 3], [1])], False, 5, 3, 2),
    Row("a node with 0 votes does not count", qc(votes={1: 1, 2: 1, 3: 0}),
        [ring(1, 2, 3), split([2, 3], [1])], False, 2, 2, 1),
    Row("quorum.expected_votes higher than the nodelist", qc(3, expected_votes=5),
        [ring(1, 2, 3)], True, 5, 3, 3),
    Row("votes above expected raise expected (E := V)", qc(3, expected_votes=2),
        [ring(1, 2, 3)], True, 3, 2, 3),
    Row("after expected 1 in a partition, healing restores expected from the quorate side",
        qc(3), [ring(1, 2, 3), split([1], [2, 3]), expected(1, 1), ring(1, 2, 3)],
        True, 3, 2, 3),
    Row("a partition with expected 1 keeps it when an unquorate node joins", qc(5),
        [ring(1, 2, 3, 4, 5), split([1], [2, 3], [4, 5]), expected(1, 1), ring(1, 2)],
        True, 2, 2, 2),
    Row("single-node cluster is quorate", qc(1), [ring(1)], True, 1, 1, 1),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_quorum_table(row: Row) -> None:
    sim = Sim(row.config)
    status: QuorumStatus | None = None
    for step in row.steps:
        status = step(sim)
    assert status is not None
    assert status.quorate is row.quorate
    if row.expected_votes is not None:
        assert status.expected_votes == row.expected_votes
    if row.quorum is not None:
        assert status.quorum == row.quorum
    if row.total_votes is not None:
        assert status.total_votes == row.total_votes
    if row.flags is not None:
        assert status.flags == row.flags


def test_expected_refusal_reasons() -> None:
    sim = Sim(qc(7, expected_votes=3))
    sim.ring([1, 2, 3])
    result = sim.nodes[1].set_expected(2)
    assert not result.accepted
    assert result.reason == "expected votes 2 is lower than the 3 votes present"
    sim.ring([1, 2])
    result = sim.nodes[1].set_expected(7)
    assert not result.accepted
    assert result.reason is not None
    assert "lose quorum" in result.reason
    for outside in (-1, 0, 8, 1 << 40):
        result = sim.nodes[1].set_expected(outside)
        assert not result.accepted
        assert result.reason == (f"expected votes must be between 1 and 7 (the votes that "
                                 f"exist), not {outside}")
    assert sim.nodes[1].status().expected_votes == 3  # nothing changed


def test_two_members_with_the_same_inputs_agree() -> None:
    """Members 1 and 2 each compute from the same agreed inputs and get the same answer,
    although their local histories differ (1 was isolated and set expected 1)."""
    config = qc(3)
    one, two, three = Quorum(config, 1), Quorum(config, 2), Quorum(config, 3)
    members = [1, 2, 3]
    ann = {1: one.announcement(), 2: two.announcement(), 3: three.announcement()}
    for q in (one, two, three):
        q.on_membership(0, members, ann)
    # partition: {1} | {2, 3}; 1 sets expected 1
    one.on_membership(100, [1], {1: one.announcement()})
    assert one.set_expected(1).accepted
    ann23 = {2: two.announcement(), 3: three.announcement()}
    two.on_membership(100, [2, 3], ann23)
    three.on_membership(100, [2, 3], ann23)
    # heal: 1 and 2 get identical inputs
    ann = {1: one.announcement(), 2: two.announcement(), 3: three.announcement()}
    assert ann[1] != ann[2]
    s1 = one.on_membership(200, members, ann)
    s2 = two.on_membership(200, members, ann)
    assert s1 == s2
    assert one.state == two.state
    assert s1.quorate
    assert s1.expected_votes == 3


def test_compute_is_a_pure_function() -> None:
    config = qc(4, auto_tie_breaker=True)
    announced = {
        1: Announcement(1, 4, True, ring_members=(1, 2, 3, 4)),
        2: Announcement(1, 4, True, ring_members=(1, 2, 3, 4)),
    }
    a = compute(config, [2, 1], announced, waiting_for_all=False)
    b = compute(config, (1, 2), dict(reversed(list(announced.items()))), waiting_for_all=False)
    assert a == b
    assert a.quorate
    assert a.tie_breaker


def test_compute_needs_every_announcement() -> None:
    with pytest.raises(ValueError, match="no announcement"):
        compute(qc(3), [1, 2], {1: Announcement(1, 3)}, waiting_for_all=False)
    with pytest.raises(ValueError, match="at least one member"):
        compute(qc(3), [], {}, waiting_for_all=False)


def test_last_man_standing_deadline_and_stale_proposal() -> None:
    sim = Sim(qc(5, last_man_standing=True))
    sim.ring([1, 2, 3, 4, 5])
    assert sim.nodes[1].next_deadline() is None
    sim.now = 1000
    sim.ring([1, 2, 3])
    assert sim.nodes[1].next_deadline() == 11000
    assert sim.nodes[1].on_timer(10999) is None
    proposal = sim.nodes[1].on_timer(11000)
    assert proposal == LastManStanding((1, 2, 3), 3)
    assert sim.nodes[1].next_deadline() is None
    # the membership changed before the proposal was delivered: ignored everywhere
    sim.ring([1, 2, 3, 4])
    assert sim.nodes[1].apply_last_man_standing(proposal) is None
    assert sim.nodes[1].status().expected_votes == 5


def test_reconfigure_takes_the_new_nodelist() -> None:
    sim = Sim(qc(3))
    sim.ring([1, 2, 3])
    bigger = qc(4)
    statuses = [sim.nodes[m].reconfigure(bigger) for m in (1, 2, 3)]
    assert statuses[0] == statuses[1] == statuses[2]
    assert statuses[0].expected_votes == 4
    assert statuses[0].quorum == 3
    assert statuses[0].quorate


def test_reconfigure_ends_an_expected_override() -> None:
    sim = Sim(qc(3))
    sim.ring([1])
    assert sim.nodes[1].set_expected(1).accepted
    assert sim.nodes[1].status().quorate
    status = sim.nodes[1].reconfigure(qc(3, expected_votes=3))
    assert not status.quorate
    assert status.expected_votes == 3


PVE = """\
nodelist {
  node {
    name: pve1
    nodeid: 1
    quorum_votes: 1
    ring0_addr: 10.0.0.1
  }
  node {
    name: pve2
    nodeid: 2
    quorum_votes: 1
    ring0_addr: 10.0.0.2
  }
}

quorum {
  provider: corosync_votequorum
  two_node: 1
}

totem {
  cluster_name: lab
  config_version: 2
}
"""


def test_quorum_config_from_cluster_config() -> None:
    config = QuorumConfig.from_config(conf.parse(PVE))
    assert config.node_votes == {1: 1, 2: 1}
    assert config.two_node_active
    assert config.wfa
    assert config.configured_expected == 2
    device = conf.parse(PVE.replace("  two_node: 1\n", "  device {\n    model: net\n  }\n"))
    assert QuorumConfig.from_config(device).device_votes == 1
    assert QuorumConfig.from_config(device).configured_expected == 3


def test_status_json() -> None:
    sim = Sim(qc(2, two_node=True))
    status = sim.ring([1, 2])
    assert status.to_json() == {
        "quorate": True, "expected_votes": 2, "highest_expected": 2, "total_votes": 2,
        "quorum": 1, "flags": ["TwoNode", "Quorate", "WaitForAll"],
    }


def test_render_status() -> None:
    sim = Sim(qc(3))
    status = sim.ring([1, 2, 3])
    names = {1: "10.0.0.1", 2: "10.0.0.2", 3: "10.0.0.3"}
    text = render_status(
        status, date="Tue Jan  2 10:00:00 2024", local_nodeid=1, ring_id="1.2c",
        members=member_infos(status, names), cluster=ClusterInfo("lab", 3, "udpu"))
    assert text == """\
Cluster information
-------------------
Name:             lab
Config Version:   3
Transport:        udpu

Quorum information
------------------
Date:             Tue Jan  2 10:00:00 2024
Quorum provider:  corosync_votequorum
Nodes:            3
Node ID:          0x00000001
Ring ID:          1.2c
Quorate:          Yes

Votequorum information
----------------------
Expected votes:   3
Highest expected: 3
Total votes:      3
Quorum:           2
Flags:            Quorate

Membership information
----------------------
    Nodeid      Votes Name
0x00000001          1 10.0.0.1 (local)
0x00000002          1 10.0.0.2
0x00000003          1 10.0.0.3
"""


def test_render_status_not_quorate_with_qdevice() -> None:
    sim = Sim(qc(3, device_votes=2))
    status = sim.ring([2])
    text = render_status(status, date="d", local_nodeid=2, ring_id="2.8",
                         members=[MemberInfo(2, 1, "pve2")])
    assert "Quorate:          No\n" in text
    assert "Quorum:           3 Activity blocked\n" in text
    assert "Flags:            Qdevice\n" in text
    assert text.endswith("0x00000002          1 pve2 (local)\n")
    assert "Cluster information" not in text
    status = sim.qdevice(2, True, [2])
    text = render_status(status, date="d", local_nodeid=2, ring_id="2.8",
                         members=[MemberInfo(2, 1, "pve2")])
    assert "Flags:            Quorate Qdevice QdeviceCastVote\n" in text
    assert text.endswith("0x00000000          2 Qdevice\n")


# ---------------------------------------------------------------------------------------------
# Property: any history of partitions -- members of a ring always agree, and two disjoint
# partitions are never quorate at the same time. The safety half leaves out what allows two
# quorate partitions by design: two_node (fencing decides), `expected` overrides, and an
# auto_tie_breaker_node *list*, which (as in votequorum) trusts each node's previous membership.

configs = st.builds(
    lambda n, wfa, atb, atb_node: qc(n, wait_for_all=wfa, auto_tie_breaker=atb,
                                     auto_tie_breaker_node=atb_node),
    st.integers(1, 6),
    st.sampled_from([None, True, False]),
    st.booleans(),
    st.sampled_from(["lowest", "highest", (2, 1), (1, 3), (4, 3, 1)]),
)


@st.composite
def histories(draw: st.DrawFn) -> tuple[QuorumConfig, list[list[list[int]]]]:
    config = draw(configs)
    atb_node = config.auto_tie_breaker_node
    if isinstance(atb_node, tuple):
        kept = tuple(n for n in atb_node if n in config.node_votes)
        config = replace(config, auto_tie_breaker_node=kept or "lowest")
    ids = sorted(config.node_votes)
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        labels = draw(st.lists(st.integers(0, 3), min_size=len(ids), max_size=len(ids)))
        alive = draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
        groups: dict[int, list[int]] = {}
        for nid, label, up in zip(ids, labels, alive, strict=True):
            if up:
                groups.setdefault(label, []).append(nid)
        steps.append(list(groups.values()))
    return config, steps


@settings(max_examples=400, deadline=None)
@given(histories())
def test_partitions_agree_and_never_two_quorate(
        history: tuple[QuorumConfig, list[list[list[int]]]]) -> None:
    config, steps = history
    list_mode = config.auto_tie_breaker and isinstance(config.auto_tie_breaker_node, tuple)
    sim = Sim(config)  # Sim.ring asserts that all members of every ring agree
    for partitions in steps:
        quorate = [p for p, s in zip(partitions, sim.split(*partitions), strict=True)
                   if s.quorate]
        if not list_mode:
            assert len(quorate) <= 1, (partitions, quorate)
