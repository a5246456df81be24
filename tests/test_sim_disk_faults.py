"""The simulator's disk faults (issue 16): slow disks, failing disks, writes torn by a crash.

Scripted scenarios show each fault doing what the runtime does with it (a stalled disk holds
only the replies that need it; a failed commit stops the node, which starts again from its disk
or, when the disk is gone for good, stays down while the majority goes on; a crash between a
commit and its report leaves the group on disk, and the node uses it when it starts again).
The sabotage tests break, with a monkeypatch, what each fault targets and show that a run with
that fault forced on reports a violation within a few seeds, and that the same seeds are clean
without the sabotage.
"""

from __future__ import annotations

import random

import pytest

from pmxfs.core.fsop import Mkdir
from pmxfs.core.persist import Persist
from pmxfs.core.replica import StoredState
from pmxfs.sim.replica_sim import (
    CommitEnd,
    DiskFault,
    DiskProfile,
    NodeKey,
    ReplicaCluster,
    _Disk,
    _Step,
    run_fs_chaos,
)
from pmxfs.sim.totem_sim import sim_params

NODES = (3, 5)
SEEDS = range(50)  # a sabotage must be caught within these seeds


def make(nodes: int = 3) -> ReplicaCluster:
    cluster = ReplicaCluster(list(range(1, nodes + 1)), sim_params(nodes), random.Random(1))
    cluster.net.faults.min_delay = 1
    cluster.wait(cluster.settled, 20_000, "the first sync")
    return cluster


def on_disk(cluster: ReplicaCluster, node: int, name: str) -> bool:
    return any(e.name == name for e in cluster.disks[node].rows.values())


def in_memory(cluster: ReplicaCluster, node: int, path: str) -> bool:
    return cluster.replica(node).memdb.lookup(path) is not None


def first_caught(force: DiskFault, wanted: str) -> int:
    """The first seed of SEEDS whose run with `force` on reports a violation naming `wanted`."""
    for seed in SEEDS:
        violation = run_fs_chaos(seed, NODES, force_disk=force).violation
        if violation is not None:
            assert wanted in violation, f"seed {seed}: {violation}"
            return seed
    pytest.fail(f"{len(SEEDS)} seeds with the {force.value} disk fault found nothing")


def assert_clean(force: DiskFault, up_to: int) -> None:
    for seed in range(up_to + 1):
        violation = run_fs_chaos(seed, NODES, force_disk=force).violation
        assert violation is None, f"seed {seed} without the sabotage: {violation}"


# ---------------------------------------------------------------------- the faults


def test_a_stalled_disk_holds_only_the_replies_that_need_it() -> None:
    """n3's disk takes ten token timeouts per commit: the ring stays as it is, every member
    delivers at once, and the write is answered only after n3's commit."""
    c = make()
    ring = c.replica(1).ring
    stall = 10 * c.params.token
    c.disks[3].profile.delay = (stall, stall)
    request = c.propose(1, Mkdir("slow", 1))
    assert request is not None
    c.wait(lambda: all(in_memory(c, n, "slow") for n in (1, 2, 3)), 2_000, "delivery")
    c.run_for(stall // 2)
    assert request not in c.replies
    assert on_disk(c, 1, "slow")
    assert on_disk(c, 2, "slow")
    assert not on_disk(c, 3, "slow")
    assert all(c.replica(n).ring == ring for n in (1, 2, 3)), "the slow disk changed the ring"
    c.wait(lambda: request in c.replies, stall, "the answer after n3's commit")
    assert c.replies[request].errno == 0
    assert on_disk(c, 3, "slow")
    assert all(c.replica(n).ring == ring for n in (1, 2, 3))


@pytest.mark.parametrize("for_good", [False, True])
def test_a_failed_commit_stops_the_node(for_good: bool) -> None:
    """n3's commit fails: n3 stops before it reports, the write is answered by the ring that
    goes on without it, and n3 starts again from its disk and syncs -- unless its disk is gone
    for good, when it stays down and the two others go on writing."""
    c = make()
    c.disks[3].profile = DiskProfile(fail=1.0, fail_for_good=for_good)
    request = c.propose(1, Mkdir("d", 1))
    assert request is not None
    c.wait(lambda: not c.net.nodes[3].up, 2_000, "n3 to stop")
    c.wait(lambda: request in c.replies, 10_000, "the answer of the ring without n3")
    assert c.replies[request].errno == 0
    c.disks[3].profile.fail = 0.0
    c.restart(3)
    if for_good:
        assert not c.net.nodes[3].up
        assert c.runnable() == [1, 2]
        c.wait(c.settled, 10_000, "n1 and n2 settled")
        assert c.write(2, Mkdir("e", 1)).errno == 0
    else:
        c.wait(c.settled, 10_000, "n3 back and synced")
        assert in_memory(c, 3, "d")


def test_a_crash_between_a_commit_and_its_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """n3's commit reaches its disk and n3 crashes before it learns so: it acknowledged
    nothing on that basis (the write is answered by the ring without it), and when it starts
    again it holds the group at once, from its disk."""
    c = make()
    target = c.disks[3].profile
    target.torn = 1.0  # on, with its first commit's end forced below
    ends = [CommitEnd.TORN_AFTER]
    monkeypatch.setattr(ReplicaCluster, "_draw_end", lambda self, profile: (
        ends.pop() if profile is target and ends else CommitEnd.DONE))
    request = c.propose(1, Mkdir("t", 1))
    assert request is not None
    c.wait(lambda: not c.net.nodes[3].up, 2_000, "n3 to crash")
    assert on_disk(c, 3, "t")
    assert c.disks[3].written > 0
    c.wait(lambda: request in c.replies, 10_000, "the answer of the ring without n3")
    assert c.replies[request].errno == 0
    c.restart(3)
    assert in_memory(c, 3, "t")  # before any sync: from its own disk
    c.wait(c.settled, 10_000, "n3 back and synced")


# ---------------------------------------------------------------------- the checkers bite


def test_slow_disks_catch_a_commit_reported_when_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime reports a commit done as it starts it, not when the disk has it: slow disks
    let the answer overtake the commit, and the reply checker sees the disk without it."""
    original = ReplicaCluster._start_commit

    def reports_at_start(self: ReplicaCluster, key: NodeKey) -> None:
        last = self.disks[key[0]].queue[-1][0].id

        def report() -> None:
            if self.net.nodes[key[0]].up and self.key(key[0]) == key:
                self.replica(key[0]).persisted(self.net.now, last)
                self.net.flush(self.net.nodes[key[0]])

        original(self, key)
        self.net.schedule(self.net.now, report)

    with monkeypatch.context() as m:
        m.setattr(ReplicaCluster, "_start_commit", reports_at_start)
        seed = first_caught(DiskFault.SLOW, "was on the disk of ring member")
    assert_clean(DiskFault.SLOW, seed)


def test_failing_disks_catch_a_node_that_runs_on_after_a_failed_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime ignores a failed commit (reports it done and goes on) instead of stopping
    the node: writes are acknowledged that a member's disk does not hold."""

    def runs_on(self: ReplicaCluster, key: NodeKey,
                batch: list[tuple[Persist, tuple[list[_Step], int]]], end: CommitEnd) -> None:
        self._tell_persisted(key, batch[-1][0].id)

    with monkeypatch.context() as m:
        m.setattr(ReplicaCluster, "_commit_failed", runs_on)
        seed = first_caught(DiskFault.FAILING, "was on the disk of ring member")
    assert_clean(DiskFault.FAILING, seed)


def test_torn_writes_catch_a_restart_from_what_was_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime starts again from the state it last reported, not from its disk: after a
    crash between a commit and its report the node does not hold the group its disk holds
    (and would write its next Persists over rows it does not know)."""
    reported: dict[int, StoredState] = {}
    original_tell = ReplicaCluster._tell_persisted
    original_start = ReplicaCluster._start

    def remember(self: ReplicaCluster, key: NodeKey, persist_id: int) -> None:
        original_tell(self, key, persist_id)
        reported[id(self.disks[key[0]])] = self.disks[key[0]].stored()

    def start_from_reported(self: ReplicaCluster, node_id: int) -> None:
        disk = self.disks[node_id]
        state = reported.get(id(disk))
        if state is None:
            original_start(self, node_id)
            return
        with monkeypatch.context() as inner:
            inner.setattr(disk, "stored", lambda: state)
            original_start(self, node_id)

    with monkeypatch.context() as m:
        m.setattr(ReplicaCluster, "_tell_persisted", remember)
        m.setattr(ReplicaCluster, "_start", start_from_reported)
        seed = first_caught(DiskFault.TORN, "started with a tree that is not the result")
    assert_clean(DiskFault.TORN, seed)


def test_torn_writes_catch_a_restart_that_believes_the_whole_queue_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash loses the commit under way and what is queued behind it; a runtime whose
    restart believes the queue was written starts with rows its disk's lineage lacks."""
    original = _Disk.lose_unwritten

    def keeps_the_queue(self: _Disk) -> None:
        for persist, lineage in self.queue:
            self.write(persist, lineage)
        original(self)

    with monkeypatch.context() as m:
        m.setattr(_Disk, "lose_unwritten", keeps_the_queue)
        seed = first_caught(DiskFault.TORN, "started with a tree that is not the result")
    assert_clean(DiskFault.TORN, seed)
