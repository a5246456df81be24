"""`Totem.reconfigure`: a configuration taken at run time changes who is heard and the timers.

Every scenario runs real `Totem` objects on the simulated network with the totem checker
active (agreed order, no duplicates, virtual synchrony), but unlike `TotemCluster`'s default
each node starts with its own configured node set, as nodes do whose corosync.conf differs: a
node that is not yet (or no longer) in a peer's configured set is ignored by that peer until a
reconfigure says otherwise. All waiting is on simulated time with a deadline.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from pmxfs.core import totem
from pmxfs.core.totem import State, Totem
from pmxfs.core.totem_params import TotemParams, derive_params
from pmxfs.core.wire import Join, encode
from pmxfs.sim.totem_sim import TotemCluster, sim_params


class ConfiguredCluster(TotemCluster):
    """Totem nodes on the simulated network, each started with its own configured node set."""

    def __init__(self, configured: dict[int, Iterable[int]], seed: int) -> None:
        self.configured = {n: sorted(nodes) for n, nodes in configured.items()}
        super().__init__(sorted(configured), sim_params(3), random.Random(seed))
        self.net.faults.min_delay = 1

    def _make_core(self, node_id: int) -> Totem:
        nodes = self.configured[node_id]
        return Totem(node_id, nodes, sim_params(len(nodes)), self.net.now,
                     ring_seq=self.disk.get(node_id, 0),
                     on_event=lambda text: self.trace(f"{self.net.now} n{node_id} {text}"))

    def reconfigure(self, node_ids: Iterable[int], nodes: Iterable[int],
                    params: TotemParams | None = None) -> None:
        """Hand `nodes` (and `params`, default the simulator's timers for that many nodes) to
        every node of `node_ids` at the same moment, as a config applied in order does."""
        nodes = sorted(nodes)
        for n in node_ids:
            self.configured[n] = nodes
            self.core(n).reconfigure(self.net.now, nodes, params or sim_params(len(nodes)))
            self.net.flush(self.net.nodes[n])

    def wait(self, condition: Callable[[], bool], timeout: int, what: str) -> None:
        assert self.net.run_while(lambda: not condition(), self.net.now + timeout, step=1), (
            f"timed out after {timeout} ms of simulated time waiting for {what}")

    def ring_stays(self, nodes: list[int], ms: int) -> None:
        """`nodes` are one ring of exactly themselves, and still the same ring `ms` later."""
        assert self.one_ring(nodes), f"{nodes} are not one ring"
        ring = self.core(nodes[0]).ring.ring_id
        end = self.net.now + ms
        while self.net.now < end:
            self.run_for(10)
            assert self.one_ring(nodes), f"{nodes} are no ring any more at {self.net.now}"
            assert self.core(nodes[0]).ring.ring_id == ring, f"a new ring at {self.net.now}"

    def dropped(self, node_id: int) -> int:
        return self.core(node_id).counters.get("dropped_unknown_node", 0)


def test_a_node_outside_the_configured_set_is_ignored_until_the_others_reconfigure() -> None:
    """n4 knows the others, they do not know n4: their ring of three is not disturbed by n4's
    joins (dropped and counted); once the three take a config with n4, all four merge into one
    ring through the protocol, and messages reach all four in one order."""
    c = ConfiguredCluster({1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3], 4: [1, 2, 3, 4]}, seed=3)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the ring of the three configured nodes")
    c.ring_stays([1, 2, 3], 5_000)
    assert all(c.dropped(n) > 0 for n in (1, 2, 3)), "n4's frames were not dropped"
    assert 4 not in c.core(1).proc
    c.reconfigure([1, 2, 3], [1, 2, 3, 4])
    c.wait(lambda: c.one_ring([1, 2, 3, 4]), 10_000, "one ring of all four")
    sent = [c.mcast(n) for n in (4, 1, 3)]
    assert None not in sent
    c.wait(lambda: all(p in c.checker.views[(n, 0)].delivered for n in (1, 2, 3, 4)
                       for p in sent if p is not None), 3_000, "messages everywhere")
    c.check_self_delivery()


def test_removing_a_stopped_node_changes_nothing_and_keeps_it_out_when_it_returns() -> None:
    """n3 crashed and the others formed a ring without it; taking a config without n3 leaves
    that ring as it is (no new membership round), and n3 started again with its old config is
    refused: its frames are dropped and the ring of n1 and n2 stays the same ring."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=5)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    c.crash(3)
    c.wait(lambda: c.one_ring([1, 2]), 10_000, "the ring without n3")
    ring = c.core(1).ring.ring_id
    gathers = c.core(1).counters.get("gather", 0)
    c.reconfigure([1, 2], [1, 2])
    assert c.core(1).state is State.OPERATIONAL
    assert c.core(1).nodes == {1, 2}
    c.restart(3)
    c.ring_stays([1, 2], 5_000)
    assert c.core(1).ring.ring_id == ring
    assert c.core(1).counters.get("gather", 0) == gathers
    assert c.dropped(1) > 0
    assert c.dropped(2) > 0
    assert c.core(3).ring.members == (3,) or c.core(3).state is not State.OPERATIONAL


def test_removing_a_running_member_forms_a_ring_without_it_and_drops_its_frames() -> None:
    """n1 and n2 take a config without n3 while n3 is a running member (still configured with
    all three): they gather at once and form a ring of the two, delivering the messages of the
    old ring with virtual synchrony; n3's later frames are dropped, so that ring stays."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=7)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    before = [c.mcast(n) for n in (1, 2, 3)]
    c.wait(lambda: all(p in c.checker.views[(n, 0)].delivered for n in (1, 2, 3)
                       for p in before if p is not None), 3_000, "messages in the old ring")
    queued = [c.mcast(n) for n in (1, 2)]
    c.reconfigure([1, 2], [1, 2])
    assert c.core(1).state is State.GATHER
    assert c.core(2).state is State.GATHER
    c.wait(lambda: c.one_ring([1, 2]), 2 * c.params.consensus, "the ring of n1 and n2")
    c.wait(lambda: all(p in c.checker.views[(n, 0)].delivered for n in (1, 2)
                       for p in queued if p is not None), 3_000, "queued messages in the new ring")
    dropped = c.dropped(1)
    c.ring_stays([1, 2], 5_000)
    assert c.dropped(1) > dropped, "n3 went quiet instead of being refused"
    assert 3 not in c.core(1).proc
    assert 3 not in c.core(2).proc
    assert c.core(3).nodes == {1, 2, 3}
    c.check_self_delivery()


def test_a_removed_node_in_the_consensus_round_is_not_waited_for() -> None:
    """n3 crashed and n1, n2 are gathering, waiting for n3's join until the consensus timeout;
    a config without n3 taken meanwhile lets them form their ring at once."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=9)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    c.crash(3)
    c.wait(lambda: c.core(1).state is State.GATHER and c.core(2).state is State.GATHER
           and 3 in c.core(1).proc - c.core(1).fail, 5_000, "n1 and n2 gathering with n3")
    c.reconfigure([1, 2], [1, 2])
    c.wait(lambda: c.one_ring([1, 2]), c.params.consensus // 2, "a ring before the timeout")
    assert c.core(1).counters.get("consensus_timeouts", 0) == 0


def test_a_config_without_this_node_leaves_it_running() -> None:
    """A node never removes itself: handed a config without it, it keeps itself configured."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=11)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    c.reconfigure([3], [1, 2])
    assert c.core(3).nodes == {1, 2, 3}
    c.ring_stays([1, 2, 3], 2_000)


def test_new_timers_apply_to_the_next_token_loss() -> None:
    """With a token timeout of 4000 ms taken at run time, a crashed member is not noticed for
    seconds (under the old 450 ms timeout it would be within a second: the last token a survivor
    saw is at most a hold time old), and it is noticed within the new timeout plus consensus."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=13)
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    slow = derive_params(3, token=4000, token_coefficient=0, join=30, merge=100)
    c.reconfigure([1, 2, 3], [1, 2, 3], slow)
    assert c.core(1).params == slow
    c.run_for(2 * slow.token)  # every timer armed under the old params has fired by now
    c.crash(3)
    c.run_for(slow.token // 2)
    for n in (1, 2):
        assert c.core(n).state is State.OPERATIONAL, f"n{n} noticed the crash too early"
        assert c.core(n).ring.members == (1, 2, 3)
        assert c.core(n).counters.get("token_lost", 0) == 0
    c.wait(lambda: c.one_ring([1, 2]), slow.token + slow.consensus + 500, "the ring of two")


def test_a_node_behind_leaves_out_a_removed_node_it_still_has_and_joins_the_others() -> None:
    """n3 missed the removal of n5 and n5 runs again with its old config: n1 and n2 drop n3's
    joins (they name n5) and answer with a refusal of n5, so n3 leaves n5 out and the three form
    their ring without n5; once n3 takes the config (as its sync hands it over) n5 stays out."""
    c = ConfiguredCluster({1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3, 5], 5: [1, 2, 3, 5]},
                          seed=15)
    c.wait(lambda: c.one_ring([1, 2, 3]), 20_000, "the ring of n1, n2 and n3")
    assert sum(c.core(n).counters.get("refusals_sent", 0) for n in (1, 2)) > 0
    assert c.core(3).counters.get("nodes_refused", 0) > 0
    assert 5 in c.core(3).refused
    c.reconfigure([1, 2, 3], [1, 2, 3])
    c.ring_stays([1, 2, 3], 5_000)
    assert c.core(3).refused == {}


def test_a_node_behind_that_lacks_an_added_node_makes_the_others_leave_it_out_first() -> None:
    """n4 was added while n3 was away: n3 drops the joins naming n4 and refuses n4, so n1 and n2
    leave n4 out and the three form a ring; when the sync hands n3 the new config (and n1, n2
    the same one again), the refusals end and all four merge."""
    c = ConfiguredCluster({1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 3: [1, 2, 3], 4: [1, 2, 3, 4]},
                          seed=17)
    c.wait(lambda: c.one_ring([1, 2, 3]), 20_000, "the ring of n1, n2 and n3")
    assert c.core(3).counters.get("refusals_sent", 0) > 0
    assert 4 in c.core(1).refused
    assert 4 in c.core(2).refused
    c.reconfigure([1, 2, 3], [1, 2, 3, 4])
    c.wait(lambda: c.one_ring([1, 2, 3, 4]), 10_000, "one ring of all four")


def test_two_nodes_that_each_lack_a_node_of_the_other_still_learn_the_refusals() -> None:
    """n3 missed both the removal of n5 (running again) and the addition of n4: the joins of n1
    and n2 name n4, which n3 does not have, and n3's name n5, which they do not have, so each
    side drops the other's joins -- their refusals included. The refusals are taken from the
    dropped joins all the same: the three form a ring without n4 and n5, and once they take the
    config of n1, n2, n3 and n4, n4 merges and n5 stays out."""
    c = ConfiguredCluster({1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 3: [1, 2, 3, 5], 4: [1, 2, 3, 4],
                           5: [1, 2, 3, 5]}, seed=19)
    c.wait(lambda: c.one_ring([1, 2, 3]), 20_000, "the ring of n1, n2 and n3")
    assert 4 in c.core(1).refused
    assert 5 in c.core(3).refused
    c.reconfigure([1, 2, 3], [1, 2, 3, 4])
    c.wait(lambda: c.one_ring([1, 2, 3, 4]), 10_000, "the ring of n1 to n4")
    c.ring_stays([1, 2, 3, 4], 3_000)


def test_a_refusal_lapses_when_the_node_that_refused_does_not_come_back() -> None:
    """n3 refused the added n4 and then crashed before any sync could bring it the new config:
    n1 and n2 leave n4 out only until the refusal lapses, then the three form their ring."""
    c = ConfiguredCluster({1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 3: [1, 2, 3], 4: [1, 2, 3, 4]},
                          seed=21)
    c.wait(lambda: c.one_ring([1, 2, 3]), 20_000, "the ring of n1, n2 and n3")
    c.crash(3)
    lapse = totem.REFUSAL_CONSENSUS_TIMEOUTS * c.params.consensus
    c.wait(lambda: c.one_ring([1, 2]), 5_000, "the ring of n1 and n2")
    assert 4 in c.core(1).refused
    c.wait(lambda: c.one_ring([1, 2, 4]), lapse + 10_000, "the ring of n1, n2 and n4")
    assert c.core(1).refused == {}


def test_the_frames_of_a_member_removed_mid_ring_are_recovered_without_it() -> None:
    """n1 and n2 take a config without n3 while n1 holds frames of n3 that n2 lacks: in the
    recovery of the ring without n3, n1 re-broadcasts them, still naming n3 as their sender;
    n2 takes them all the same (dropping them, it could never complete the recovery), and both
    deliver the same messages of n3, those included."""
    c = ConfiguredCluster({n: [1, 2, 3] for n in (1, 2, 3)}, seed=23)
    c.net.faults.max_jitter = 5
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the first ring")
    sent = [c.mcast(3, 1000) for _ in range(30)]

    def n1_ahead() -> set[int]:
        """Seqs of n3's frames that n1 holds and n2 may lack."""
        ring1, ring2 = c.core(1).ring, c.core(2).ring
        return {seq for seq, frame in ring1.frames.items()
                if frame.sender == 3 and seq > ring2.aru and seq not in ring2.frames}

    c.wait(lambda: bool(n1_ahead()), 2_000, "frames of n3 that n1 holds and n2 lacks")
    c.reconfigure([1, 2], [1, 2])
    c.wait(lambda: c.one_ring([1, 2]), 5_000, "the ring of n1 and n2")
    got = [{p for p in sent if p in c.checker.views[(n, 0)].delivered} for n in (1, 2)]
    assert got[0] == got[1]
    assert c.core(2).counters.get("recovered_frames", 0) > 0


def test_a_refusal_ends_with_a_config_taken_in_a_ring_with_the_node_that_refused() -> None:
    """A config taken in a ring without the refusing node (a behind node's sync of its own ring)
    does not end the refusal: the node it refused would come straight back and be refused
    again, ring after ring. One taken in a ring with it does."""
    c = ConfiguredCluster({1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3, 5], 5: [1, 2, 3, 5]},
                          seed=25)
    c.wait(lambda: c.one_ring([1, 2, 3]), 20_000, "the ring of n1, n2 and n3")
    c.net.partition([[1, 2], [3, 5]])
    c.wait(lambda: c.one_ring([3]), 10_000, "n3 alone, without the node it refuses")
    c.reconfigure([3], [1, 2, 3, 5])
    assert set(c.core(3).refused) == {5}
    c.ring_stays([3], 2_000)
    c.net.heal()
    c.wait(lambda: c.one_ring([1, 2, 3]), 10_000, "the ring of n1, n2 and n3 again")
    c.reconfigure([3], [1, 2, 3, 5])
    assert c.core(3).refused == {}


def test_the_refusals_of_a_refused_node_do_not_count() -> None:
    """n3 missed the removal of n5, which runs again with a config older than n4's addition:
    n5 refuses n4 to n3, n1 refuses n5. Once n3 leaves n5 out, n5's refusal of n4 no longer
    counts (n5 is in no ring of n3's), so n3 takes n4 in with n1 at once instead of keeping it
    out until the refusal lapses."""
    node = Totem(3, [1, 2, 3, 4, 5], sim_params(5), 0)
    node.receive(10, 5, encode(Join(sender=5, ring_seq=0, proc=(3, 5), fail=(4,))))
    assert node.refused == {4: {5}}
    node.receive(20, 1, encode(Join(sender=1, ring_seq=0, proc=(1, 2, 3, 4), fail=(5,))))
    assert node.refused == {5: {1}}
    assert node.proc == {1, 2, 3, 4}
