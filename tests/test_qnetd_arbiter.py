"""qnetd's decisions (pmxfs/core/qnetd_arbiter.py): who gets the device's vote, and the rule that
two live rings never hold it at once -- scripted scenarios and a random property."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core.qdevice_wire import Hello, Membership, Ring, Vote
from pmxfs.core.qnetd_arbiter import ClusterArbiter

TIMEOUT = 10_000
GRACE = TIMEOUT * 3 // 2
SYNC = 30_000


def hello(node: int, nodes: tuple[int, ...], algorithm: str = "ffsplit",
          tie_breaker: str = "lowest", keep_active: bool = False) -> Hello:
    return Hello("pmx", "0123456789abcdef", node, algorithm, tie_breaker, keep_active, TIMEOUT,
                 SYNC, nodes)


class Cluster:
    def __init__(self, count: int, **options: object) -> None:
        self.nodes = tuple(range(1, count + 1))
        self.arbiter = ClusterArbiter(0)
        self.now = 0
        self.options = options
        self.seq = 0
        for n in self.nodes:
            self.connect(n)

    def connect(self, node: int) -> None:
        self.arbiter.hello(self.now, hello(node, self.nodes, **self.options))  # type: ignore[arg-type]

    def ring(self, *members: int) -> Ring:
        """A new ring of `members`, reported by all of them."""
        self.seq += 4
        ring = Ring(self.seq, min(members))
        for m in members:
            self.report(m, ring, members)
        return ring

    def report(self, node: int, ring: Ring, members: tuple[int, ...]) -> None:
        self.arbiter.membership(self.now, node, Membership(ring, tuple(sorted(members)), True))

    def votes(self) -> dict[int, Vote]:
        return {n: r.vote for n, r in self.arbiter.decisions(self.now).items()}

    def at(self, now: int) -> dict[int, Vote]:
        self.now = now
        return self.votes()


def test_two_nodes_one_stops_the_other_gets_the_vote() -> None:
    c = Cluster(2)
    c.ring(1, 2)
    assert c.votes() == {1: Vote.ACK, 2: Vote.ACK}
    c.arbiter.gone(c.now, 2)
    c.ring(1)
    assert c.votes() == {1: Vote.ACK}


def test_a_split_waits_for_both_sides_then_the_tie_breaker_wins() -> None:
    for first, tie_breaker, winner in ((1, "lowest", 1), (2, "lowest", 1), (1, "highest", 2),
                                       (2, "2", 2)):
        c = Cluster(2, tie_breaker=tie_breaker)
        c.ring(1, 2)
        assert c.votes() == {1: Vote.ACK, 2: Vote.ACK}
        c.ring(first)
        assert c.votes()[first] is Vote.WAIT, "the other side still reports the old ring"
        c.ring(3 - first)
        votes = c.votes()
        assert votes[winner] is Vote.ACK, (tie_breaker, votes)
        assert votes[3 - winner] is Vote.NACK, (tie_breaker, votes)


def test_a_silent_side_is_waited_for_only_sync_timeout() -> None:
    c = Cluster(2)
    c.ring(1, 2)
    c.votes()
    c.ring(2)
    assert c.votes()[2] is Vote.WAIT
    assert c.arbiter.next_deadline() == SYNC
    assert c.at(SYNC - 1)[2] is Vote.WAIT
    assert c.at(SYNC)[2] is Vote.ACK


def test_ffsplit_four_nodes() -> None:
    c = Cluster(4)
    c.ring(1, 2, 3, 4)
    assert set(c.votes().values()) == {Vote.ACK}
    c.ring(3, 4)
    c.ring(1, 2)
    assert c.votes() == {1: Vote.ACK, 2: Vote.ACK, 3: Vote.NACK, 4: Vote.NACK}
    c = Cluster(4)
    c.ring(1, 2, 3, 4)
    c.votes()
    c.ring(1)
    c.ring(2, 3, 4)
    assert c.votes() == {1: Vote.NACK, 2: Vote.ACK, 3: Vote.ACK, 4: Vote.ACK}
    for n in (2, 3, 4):
        c.arbiter.gone(c.now, n)
    c.ring(1)
    assert c.at(10 * SYNC) == {1: Vote.NACK}, "a quarter of the nodes never wins ffsplit"


def test_lms_the_last_node_that_sees_qnetd_keeps_the_vote() -> None:
    c = Cluster(3, algorithm="lms")
    c.ring(1, 2, 3)
    assert set(c.votes().values()) == {Vote.ACK}
    c.arbiter.gone(c.now, 3)
    c.ring(1, 2)
    assert c.votes() == {1: Vote.ACK, 2: Vote.ACK}
    c.arbiter.gone(c.now, 2)
    c.ring(1)
    assert c.votes() == {1: Vote.ACK}


def test_a_holder_cut_off_from_qnetd_keeps_it_and_only_its_members_get_it_next() -> None:
    c = Cluster(4)
    c.ring(1, 2)
    c.ring(3, 4)
    assert c.votes() == {1: Vote.ACK, 2: Vote.ACK, 3: Vote.NACK, 4: Vote.NACK}
    c.now = 1000
    c.arbiter.gone(c.now, 1)
    c.arbiter.gone(c.now, 2)  # the ring {1, 2} may still be alive and count the vote
    assert c.votes() == {3: Vote.NACK, 4: Vote.NACK}
    assert c.arbiter.next_deadline() == 1000 + GRACE
    assert c.at(1000 + GRACE) == {3: Vote.NACK, 4: Vote.NACK}, (
        "{3, 4} has none of the holder's writes: never, not even after the grace")
    c.connect(2)
    c.ring(2, 3, 4)
    assert c.votes() == {2: Vote.ACK, 3: Vote.ACK, 4: Vote.ACK}


def test_a_restarted_qnetd_gives_the_vote_only_to_a_ring_with_the_last_holders_member() -> None:
    arbiter = ClusterArbiter(0, last_holder=frozenset({2}))
    for n in (1, 2):
        arbiter.hello(0, hello(n, (1, 2)))
    arbiter.membership(0, 1, Membership(Ring(20, 1), (1,), False))
    arbiter.membership(0, 2, Membership(Ring(24, 2), (2,), False))
    assert {n: r.vote for n, r in arbiter.decisions(0).items()} == {1: Vote.NACK, 2: Vote.ACK}
    assert arbiter.last_holder == frozenset({2})


def test_after_a_restart_nothing_is_granted_until_all_nodes_are_back_or_the_grace_is_over() -> None:
    arbiter = ClusterArbiter(0)
    arbiter.hello(0, hello(1, (1, 2)))
    arbiter.membership(0, 1, Membership(Ring(8, 1), (1,), False))
    assert arbiter.decisions(0)[1].vote is Vote.WAIT
    assert arbiter.decisions(GRACE)[1].vote is Vote.ACK
    arbiter = ClusterArbiter(0)
    for n in (1, 2):
        arbiter.hello(0, hello(n, (1, 2)))
        arbiter.membership(0, n, Membership(Ring(8, 1), (1, 2), True))
    assert {r.vote for r in arbiter.decisions(0).values()} == {Vote.ACK}


def test_keep_active_partition_tie_breaker() -> None:
    """Halves of equal size: the one holding more of the last holder's members wins with
    keep_active_partition_tie_breaker, the tie-breaker's (lowest) without."""
    for keep_active, winner in ((True, (3, 4)), (False, (1, 2))):
        c = Cluster(4, keep_active=keep_active)
        c.ring(1, 2, 3, 4)
        c.votes()
        c.arbiter.gone(c.now, 1)
        c.ring(2, 3, 4)
        assert c.votes() == {2: Vote.ACK, 3: Vote.ACK, 4: Vote.ACK}
        c.connect(1)
        c.ring(3, 4)
        c.ring(1, 2)
        assert {n for n, v in c.votes().items() if v is Vote.ACK} == set(winner)


# ------------------------------------------------------------------------ the safety property

EVENTS = st.lists(st.tuples(st.sampled_from(["split", "gone", "back", "tick"]),
                            st.integers(0, 2**16)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(2, 5), algorithm=st.sampled_from(["ffsplit", "lms"]), events=EVENTS)
def test_two_live_rings_never_hold_the_vote(count: int, algorithm: str,
                                           events: list[tuple[str, int]]) -> None:
    """Random splits, disconnections and time. A ring is live until one of its members moves
    to a newer ring; a node counts the vote for its ring while its last ACK names that ring
    and it heard from qnetd within 3/4 of the timeout. Two live rings never both count it."""
    nodes = tuple(range(1, count + 1))
    arbiter = ClusterArbiter(0)
    now, seq = 0, 0
    ring_of = {n: Ring(0, 1) for n in nodes}
    members_of: dict[Ring, tuple[int, ...]] = {Ring(0, 1): nodes}
    connected = set(nodes)
    last_heard = dict.fromkeys(nodes, 0)
    acked: dict[int, Ring] = {}
    for n in nodes:
        arbiter.hello(now, hello(n, nodes, algorithm))
        arbiter.membership(now, n, Membership(ring_of[n], nodes, True))
    for kind, pick in events:
        now += pick % 7000
        if kind == "split":
            group = tuple(n for i, n in enumerate(nodes) if pick >> i & 1) or (nodes[0],)
            seq += 1
            ring = Ring(seq, min(group))
            members_of[ring] = group
            for n in group:
                ring_of[n] = ring
                acked.pop(n, None)
                if n in connected:
                    arbiter.membership(now, n, Membership(ring, group, True))
        elif kind == "gone":
            n = nodes[pick % count]
            if n in connected:
                connected.discard(n)
                arbiter.gone(now, n)
        elif kind == "back":
            n = nodes[pick % count]
            if n not in connected:
                connected.add(n)
                acked.pop(n, None)
                arbiter.hello(now, hello(n, nodes, algorithm))
                arbiter.membership(now, n, Membership(ring_of[n], members_of[ring_of[n]], True))
        for n, reply in arbiter.decisions(now).items():
            last_heard[n] = now
            if reply.vote is Vote.ACK and reply.ring == ring_of[n]:
                acked[n] = reply.ring
            else:
                acked.pop(n, None)
        counting = {acked[n] for n in acked
                    if (n in connected or now - last_heard[n] < TIMEOUT * 3 // 4)
                    and acked[n] == ring_of[n]}
        live = {r for r in counting if all(ring_of[m] == r for m in members_of[r])}
        assert len(live) <= 1, (now, live)
