"""The deterministic simulator: it is deterministic, its checkers bite, and totem passes it.

Every seed that once found a bug is kept in REGRESSION_SEEDS (totem alone) or
LIFECYCLE_REGRESSION_SEEDS (nodes added and removed at run time) with what it found. The totem
seeds were found before runs drew their own fault mix: they replay, exactly, as classic runs
(`swarm=None`). The lifecycle seeds' runs have changed since (disk and fault mixes): they are
kept as seeds that exercised those paths.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

import pytest

from pmxfs.core import totem
from pmxfs.core.conf import parse, totem_params
from pmxfs.core.fsop import Mkdir, WriteFile
from pmxfs.core.replica import OpDecided
from pmxfs.core.replica_msgs import OpId
from pmxfs.core.totem import ConfChange, ConfChangeKind, Deliver, Stable
from pmxfs.core.totem_membership import Recovering
from pmxfs.core.totem_params import TotemParams
from pmxfs.core.wire import CommitToken, MemberInfo, RingId
from pmxfs.sim.lifecycle_sim import run_lifecycle_chaos
from pmxfs.sim.replica_sim import ReplicaChecker, ReplicaCluster, cluster_config_text
from pmxfs.sim.totem_checker import TotemChecker, Violation
from pmxfs.sim.totem_sim import TotemCluster, run_chaos, sim_params

NODES = (3, 7)

# seed -> the bug it found (all in pmxfs/core/totem.py unless said otherwise)
REGRESSION_SEEDS = {
    14: "livelock: a node outside a ring spread its stale fail set into the ring",
    25: "join storm: a join that changed nothing re-entered gather and answered with a join",
    59: "livelock between rings formed from stale fail sets",
    71: "livelock between rings formed from stale fail sets",
    100: "nodes stuck in commit/gather after heal",
    152: "livelock: symmetric 'you failed me' revenge between two rings",
    155: "nodes stuck in recovery/commit after heal",
    158: "livelock: late joins from a gathering ring broke a freshly installed ring",
    161: "livelock between a singleton ring and a gathering group",
    189: "livelock between a singleton ring and a gathering group",
    197: "two groups never merged after heal",
    297: "simulator: settled check ran while a paused node still held the old ring",
    422: "livelock: stale fail opinions kept circulating among gathering nodes for ever",
    441: "simulator: probes sent while a paused node had not resumed",
    543: "livelock: an abandoned commit token was accepted again and circulated for ever",
    2437: "livelock: a representative carried its fail set from an abandoned commit onwards",
    1881: "zero-delay livelock: a join older than my ring still failed me, so I went singleton",
    10285: "zero-delay livelock: a join older than my ring still failed me, so I went singleton",
}

# seed of `--workload lifecycle` -> the bug it found (with that fix switched off it fails still)
LIFECYCLE_REGRESSION_SEEDS = {
    10: "totem: a node that missed a nodelist change never formed a ring with the others "
        "(no refusals)",
    13: "totem: a node that missed a nodelist change never formed a ring with the others "
        "(no refusals)",
    53: "totem: refusals that came in joins dropped for naming unknown nodes were lost",
    233: "totem: a refused node came back into the proc set through other members' joins",
    1291: "totem: a recovery frame naming a removed sender was dropped, recovery never ended",
    84: "quorum: a member that missed a config change claimed quorate with the old config's "
        "expected votes: 3 of 6 configured nodes applied writes",
    103: "replica: only the member a sync brought a new config re-evaluated quorum, so the "
         "members decided a write differently",
    2034: "totem: all refusals lapsed at once and were learned again in another order, so a "
          "node behind kept an added node out ring after ring",
    2227: "quorum: a stale quorate claim with the old config's expected votes was adopted in a "
          "ring whose sync never completed, and announced on: 3 of 6 nodes applied writes",
}

CI_SEEDS = int(os.environ.get("PMXFS_SIM_SEEDS", "300"))
LIFECYCLE_CI_SEEDS = int(os.environ.get("PMXFS_LIFECYCLE_SIM_SEEDS", "60"))


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_regression_seed(seed: int) -> None:
    result = run_chaos(seed, NODES, swarm=None)
    assert result.violation is None, f"seed {seed} ({REGRESSION_SEEDS[seed]}): {result.violation}"


def test_same_seed_same_trace() -> None:
    first = run_chaos(7, NODES, keep_trace=True)
    second = run_chaos(7, NODES, keep_trace=True)
    assert first.trace_hash == second.trace_hash
    assert first.trace == second.trace
    assert first.delivered > 0
    assert first.confchgs > 0


def test_different_seeds_differ() -> None:
    assert run_chaos(1, NODES).trace_hash != run_chaos(2, NODES).trace_hash


def _chaos(seed: int) -> tuple[int, str | None]:
    return seed, run_chaos(seed, NODES).violation


def test_chaos_sweep() -> None:
    """CI's sweep: PMXFS_SIM_SEEDS seeds (default 300) across 3 to 7 nodes, no violation."""
    seeds = range(10_000, 10_000 + CI_SEEDS)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [(s, v) for s, v in pool.map(_chaos, seeds, chunksize=4) if v is not None]
    assert failures == [], "\n".join(
        f"seed {s}: {v}\n  replay: python tools/simulate.py --seed {s} --nodes 3-7 --trace"
        for s, v in failures
    )


# ---------------------------------------------------------------------- the checkers can fail


def _deliver(sender: int, counter: int, ring: RingId, seq: int) -> Deliver:
    return Deliver(sender=sender, ring_id=ring, seq=seq, payload=b"%d:%d:x" % (sender, counter))


def _install(checker: TotemChecker, node: int, ring: RingId, members: tuple[int, ...],
             trans: tuple[int, ...], old: tuple[int, ...] | None = None) -> None:
    """Node `node` moves from a ring of `old` members (default: itself) to `ring`."""
    left = tuple(sorted(set(old or (node,)) - set(trans)))
    joined = tuple(sorted(set(members) - set(trans)))
    checker.on_confchg((node, 0), ConfChange(ConfChangeKind.TRANSITIONAL, ring, trans, left, ()))
    checker.on_confchg((node, 0), ConfChange(ConfChangeKind.REGULAR, ring, members, (), joined))


def _two_node_checker() -> tuple[TotemChecker, RingId]:
    checker = TotemChecker()
    ring = RingId(seq=4, rep=1)
    for node in (1, 2):
        checker.node_started((node, 0))
        _install(checker, node, ring, (1, 2), (node,))
    for counter in (1, 2):
        checker.accepted(b"1:%d:x" % counter)
    return checker, ring


def test_checker_catches_order_disagreement() -> None:
    checker, ring = _two_node_checker()
    checker.on_deliver((1, 0), _deliver(1, 1, ring, 1))
    checker.on_deliver((1, 0), _deliver(1, 2, ring, 2))
    with pytest.raises(Violation, match="elsewhere"):
        checker.on_deliver((2, 0), _deliver(1, 2, ring, 1))


def test_checker_catches_duplicates_and_inventions() -> None:
    checker, ring = _two_node_checker()
    checker.on_deliver((1, 0), _deliver(1, 1, ring, 1))
    with pytest.raises(Violation, match="twice"):
        checker.on_deliver((1, 0), _deliver(1, 1, ring, 1))
    with pytest.raises(Violation, match="nobody sent"):
        checker.on_deliver((2, 0), _deliver(1, 9, ring, 3))


def test_checker_catches_virtual_synchrony_breach() -> None:
    checker, ring = _two_node_checker()
    checker.on_deliver((1, 0), _deliver(1, 1, ring, 1))
    new = RingId(seq=8, rep=1)
    _install(checker, 1, new, (1, 2), (1, 2), old=(1, 2))
    with pytest.raises(Violation, match="different set"):
        _install(checker, 2, new, (1, 2), (1, 2), old=(1, 2))


def test_checker_catches_wrong_left_and_joined_lists() -> None:
    checker, _ = _two_node_checker()
    new = RingId(seq=8, rep=1)
    checker.on_confchg((1, 0), ConfChange(ConfChangeKind.TRANSITIONAL, new, (1,), (), ()))
    with pytest.raises(Violation, match="left="):
        checker.on_confchg((1, 0), ConfChange(ConfChangeKind.REGULAR, new, (1,), (), ()))
    checker, _ = _two_node_checker()
    checker.on_confchg((1, 0), ConfChange(ConfChangeKind.TRANSITIONAL, new, (1,), (2,), ()))
    with pytest.raises(Violation, match="joined="):
        checker.on_confchg((1, 0), ConfChange(ConfChangeKind.REGULAR, new, (1, 3), (), ()))


@pytest.mark.parametrize("stable_first", [True, False])
def test_checker_catches_a_false_stable_point(stable_first: bool) -> None:
    """Node 1 says seq 1 of the ring is stable, yet node 2 moves on without that message."""
    checker, ring = _two_node_checker()
    checker.on_deliver((1, 0), _deliver(1, 1, ring, 1))
    if stable_first:
        checker.on_stable((1, 0), Stable(ring, 1))
        with pytest.raises(Violation, match="stable point"):
            _install(checker, 2, RingId(seq=8, rep=2), (2,), (2,), old=(1, 2))
    else:
        _install(checker, 2, RingId(seq=8, rep=2), (2,), (2,), old=(1, 2))
        with pytest.raises(Violation, match="stable point"):
            checker.on_stable((1, 0), Stable(ring, 1))


def test_simulator_finds_a_sabotaged_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without re-broadcasting old-ring frames in recovery, virtual synchrony breaks: the
    simulator must notice within a handful of seeds."""
    original = totem.Totem._enter_recovery

    def no_rebroadcast(self: totem.Totem, now: int, ct: CommitToken,
                       infos: tuple[MemberInfo, ...]) -> None:
        original(self, now, ct, infos)
        assert isinstance(self.phase, Recovering)
        self.phase.rebroadcast.clear()

    monkeypatch.setattr(totem.Totem, "_enter_recovery", no_rebroadcast)
    found = [s for s in range(40) if run_chaos(s, NODES).violation is not None]
    assert found, "40 seeds of chaos did not notice that recovery was switched off"


def test_cluster_delivers_in_one_order_without_faults() -> None:
    orders: dict[int, list[bytes]] = {1: [], 2: [], 3: []}
    cluster = TotemCluster([1, 2, 3], sim_params(3), random.Random(5),
                           on_deliver=lambda node, d: orders[node].append(d.payload))
    assert cluster.wait_one_ring(timeout=10_000)
    sent = [cluster.mcast(1 + i % 3, 40) for i in range(30)]
    assert all(p is not None for p in sent)
    assert cluster.net.run_while(lambda: any(len(o) < 30 for o in orders.values()),
                                 cluster.net.now + 5_000)
    assert orders[1] == orders[2] == orders[3]
    assert sorted(orders[1]) == sorted(p for p in sent if p is not None)


# ---------------------------------------------------------------------- run-time nodelist changes


@pytest.mark.parametrize("seed", sorted(LIFECYCLE_REGRESSION_SEEDS))
def test_lifecycle_regression_seed(seed: int) -> None:
    result = run_lifecycle_chaos(seed, NODES)
    assert result.violation is None, (
        f"seed {seed} ({LIFECYCLE_REGRESSION_SEEDS[seed]}): {result.violation}")


def test_the_simulated_corosync_conf_keeps_the_simulator_timers() -> None:
    """A node taking the simulator's corosync.conf from the tree keeps the timers it runs with."""
    for count in (3, 4, 5, 7):
        config = parse(cluster_config_text(range(1, count + 1)))
        assert totem_params(config) == sim_params(count)


def test_lifecycle_same_seed_same_trace_and_nodes_come_and_go() -> None:
    first = run_lifecycle_chaos(1, NODES, keep_trace=True)
    second = run_lifecycle_chaos(1, NODES, keep_trace=True)
    assert first.violation is None, first.violation
    assert first.trace_hash == second.trace_hash
    assert first.trace == second.trace
    changes = [line for line in first.trace if "admin:" in line and " acknowledged" in line
               and "not acknowledged" not in line]
    assert any(" add " in line for line in changes), "no node was added"
    assert any(" remove " in line for line in changes), "no node was removed"


def _lifecycle(seed: int) -> tuple[int, str | None]:
    return seed, run_lifecycle_chaos(seed, NODES).violation


def test_lifecycle_sweep() -> None:
    """CI's sweep of the lifecycle workload: PMXFS_LIFECYCLE_SIM_SEEDS seeds (default 60)."""
    seeds = range(20_000, 20_000 + LIFECYCLE_CI_SEEDS)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [(s, v) for s, v in pool.map(_lifecycle, seeds, chunksize=2) if v is not None]
    assert failures == [], "\n".join(
        f"seed {s}: {v}\n  replay: python tools/simulate.py --workload lifecycle --seed {s} "
        f"--trace" for s, v in failures
    )


def test_replica_checker_counts_the_majority_of_the_applying_replicas_config() -> None:
    """The same ring of two holds a majority of a config of three nodes, not of one of five."""
    checker = ReplicaChecker()
    key = (1, 0)
    checker.started(key, ([], 0))
    three, five = (parse(cluster_config_text(nodes)) for nodes in ([1, 2, 3], [1, 2, 3, 4, 5]))
    checker.on_confchg(key, ConfChange(ConfChangeKind.REGULAR, RingId(4, 1), (1, 2), (), ()),
                       three)
    checker.on_event(key, OpDecided(OpId(1, 0, 1), Mkdir("d", 1), 1, 0, True, 1), three)
    with pytest.raises(Violation, match="no majority"):
        checker.on_event(key, OpDecided(OpId(1, 0, 2), Mkdir("e", 1), 1, 0, True, 2), five)


def test_replica_checker_catches_a_removed_node_in_the_ring_of_a_node_without_it() -> None:
    """n3 was removed: n1 may share a ring with it while n1's config still has it (n1 is behind)
    or after n1's totem left that ring, not otherwise; n3 is always in its own ring."""
    checker = ReplicaChecker()
    checker.removed.add(3)
    for key in ((1, 0), (3, 0)):
        checker.started(key, ([], 0))
    ring = ConfChange(ConfChangeKind.REGULAR, RingId(8, 1), (1, 3), (), (3,))
    with_3, without_3 = (parse(cluster_config_text(nodes)) for nodes in ([1, 2, 3], [1, 2, 4]))
    checker.on_confchg((1, 0), ring, with_3)
    checker.on_confchg((1, 0), ring, None)
    checker.on_confchg((3, 0), ring, without_3)
    with pytest.raises(Violation, match="removed node"):
        checker.on_confchg((1, 0), ring, without_3)


def _first_violation(seeds: range, wanted: str) -> str | None:
    for seed in seeds:
        violation = run_lifecycle_chaos(seed, NODES).violation
        if violation is not None and wanted in violation:
            return violation
    return None


def test_lifecycle_finds_a_totem_that_ignores_the_node_set_it_is_handed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Totem keeps its first node set (only the timers change): an added node never joins the
    ring, which the final check notices within a few seeds."""
    def timers_only(self: totem.Totem, now: int, nodes: object, params: TotemParams) -> None:
        self.params = params

    monkeypatch.setattr(totem.Totem, "reconfigure", timers_only)
    assert _first_violation(range(10), "no single synced ring of the final config"), (
        "10 seeds did not notice that added nodes never join")


def test_lifecycle_finds_a_totem_that_still_hears_removed_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Totem never drops a node from its set: a removed node that runs again with its old
    config is taken back into the others' ring, which the checker notices."""
    original = totem.Totem.reconfigure

    def never_removes(self: totem.Totem, now: int, nodes: Iterable[int],
                      params: TotemParams) -> None:
        original(self, now, {*nodes, *self.nodes}, params)

    monkeypatch.setattr(totem.Totem, "reconfigure", never_removes)
    assert _first_violation(range(20), "with removed node"), (
        "20 seeds did not notice a removed node in the others' ring")


def _with_config(cluster: ReplicaCluster, writer: int, nodes: list[int], version: int) -> str:
    """Write the corosync.conf of `nodes` through `writer` (acknowledged); its text."""
    text = cluster_config_text(nodes, version)
    reply = cluster.write(writer, WriteFile("corosync.conf", text.encode(), version, create=True))
    assert reply.errno == 0, reply
    return text


def test_a_node_away_while_a_node_was_added_catches_up_and_the_new_node_joins() -> None:
    """n3 is down while n4 is added; started again with its old config it refuses n4, n1 and n2
    leave n4 out and sync with n3, which takes the new config, and n4 merges: all four in one
    ring within two consensus timeouts (the refusals end with that sync, not when they lapse)."""
    c = ReplicaCluster([1, 2, 3, 4], sim_params(3), random.Random(1), installed=[1, 2, 3])
    c.net.faults.min_delay = 1
    c.wait(lambda: c.settled([1, 2, 3]), 20_000, "the first ring")
    _with_config(c, 1, [1, 2, 3], 1)
    c.crash(3)
    c.wait(lambda: c.settled([1, 2]), 10_000, "the ring of n1 and n2")
    text = _with_config(c, 1, [1, 2, 3, 4], 2)
    c.install(4, text)
    c.wait(lambda: c.settled([1, 2, 4]), 10_000, "the ring with the new node")
    c.restart(3)
    c.wait(lambda: c.settled([1, 2, 3, 4]), 2 * c.replica(1).totem.params.consensus,
           "all four in one ring")
    assert c.replica(3).config_text == text
    assert all(c.replica(n).quorum.status().quorate for n in (1, 2, 3, 4))


def test_a_node_away_while_a_node_was_removed_catches_up_without_it() -> None:
    """n3 is down while n5 (stopped) is removed; both start again with their old configs: n3
    leaves n5 out on the others' refusal, syncs with them and takes the new config, and n5 stays
    out of their ring (the checker watches that too)."""
    c = ReplicaCluster([1, 2, 3, 4, 5], sim_params(5), random.Random(2))
    c.net.faults.min_delay = 1
    c.wait(c.settled, 20_000, "the first ring")
    _with_config(c, 1, [1, 2, 3, 4, 5], 1)
    c.crash(3)
    c.crash(5)
    c.wait(lambda: c.settled([1, 2, 4]), 10_000, "the ring of n1, n2 and n4")
    c.checker.removed.add(5)
    text = _with_config(c, 1, [1, 2, 3, 4], 2)
    c.restart(5)
    c.restart(3)
    c.wait(lambda: c.settled([1, 2, 3, 4]), 10_000, "n1 to n4 in one ring")
    assert c.replica(3).config_text == text
    c.run_for(5_000)
    assert c.settled([1, 2, 3, 4]), "n5 disturbed the ring"
    assert set(c.replica(5).members) <= {5}, "n5 formed a ring with others"
