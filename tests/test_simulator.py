"""The deterministic simulator: it is deterministic, its checkers bite, and totem passes it.

Every seed that once found a bug is kept in REGRESSION_SEEDS with what it found.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from pmxfs.core import totem
from pmxfs.core.totem import ConfChange, ConfChangeKind, Deliver, Stable
from pmxfs.core.totem_membership import Recovering
from pmxfs.core.wire import CommitToken, MemberInfo, RingId
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

CI_SEEDS = int(os.environ.get("PMXFS_SIM_SEEDS", "300"))


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_regression_seed(seed: int) -> None:
    result = run_chaos(seed, NODES)
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
