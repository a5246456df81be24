"""qnetd's decisions for one cluster: which ring gets the device's vote -- pure.

What it sees
------------
Each node's device client keeps one connection to qnetd (`hello`, `gone`) and reports its
current ring and the ring's members after every change (`membership`). Rings are totem rings:
a ring's seq grows with every new ring, and a ring ends for all its members as soon as one of
them moves on (the token cannot go round without it). So a member reporting a newer ring than
R proves that R is *dead*: R cannot deliver anything any more, whoever still believes in it.

The one safety rule
-------------------
At most one ring holds the vote (the *holder*) until it is released, and the vote goes to
another ring only after the release. A client casts the vote only for the ring its ACK names,
so two partitions can never both count it. The holder is released when
* a member of it reports a newer ring (it is dead), or
* every node told ACK for it is gone from qnetd since at least `grace` (1.5 x the device
  timeout): a client that stops hearing from qnetd withdraws its vote within 3/4 of the timeout
  (`qdevice_wire.silence_limit_ms`), so the rest of the grace is time for that withdrawal to be
  delivered in its ring.
After a restart qnetd knows no holder, while a ring somewhere may still count the vote it gave
before: for `grace` after the cluster first connects, nothing is granted unless every node of
the nodelist is connected (each of them then dropped its old vote when it lost the old qnetd);
the first grant ends that quiet time.

Where pmxfs is stricter than corosync-qnetd
-------------------------------------------
A ring that holds the vote may acknowledge writes that only its members have on disk (with lms a
single node holds it). corosync-qnetd gives the vote to whichever partition wins once the holder
is gone, so a partition without any of the holder's members could go on with an older tree and
the acknowledged writes would be lost at the next merge. Here the vote goes only to a ring that
holds a member of the last ring that had it (`last_holder`) *and* a member whose tree carries
the newest stamp any node reported (`newest_stamp`: every node reports the seq of the newest
quorate ring its tree comes from). The first covers a holder whose members fell before they
could report their new stamp, the second a holder granted whose sync never completed, so that
its members never got the tree before it. qnetd keeps both on disk across restarts. When every
node that has the newest writes is gone for good, an operator decides (`pmxfs expected`).

How the winner is chosen (corosync-qnetd's algorithms)
------------------------------------------------------
Connected nodes are grouped by the ring they report (a *partition*). Decisions wait until the
reports are *settled*: no connected node still reports a dead ring and every connected member
of a reported ring reports that ring -- so that after a split both sides are seen before one
wins. A wait lasts at most the device's `sync_timeout`; then the settled partitions decide.
* ffsplit (fifty-fifty split): only a partition with at least half of the nodelist may win;
  the most members wins, then the most nodes connected to qnetd, then (with
  `keep_active_partition_tie_breaker`) the one holding most members of the last holder, then
  the tie-breaker: `lowest` / `highest` node id, or the partition holding the given node id
  (`lowest` when none does).
* lms (last man standing): any partition may win, by the same order; with the device's votes at
  nodes - 1 (votequorum's default), the last node that still sees qnetd stays quorate.

Every connected node that reported a ring is told ACK (its ring holds the vote), NACK (it does
not: another ring holds it, the ring is dead, or it may not win) or WAIT (not decided yet).
Settings (algorithm, tie-breaker, timeouts, nodelist) are the newest `Hello`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pmxfs.core.qdevice_wire import Hello, Membership, Ring, Vote, VoteReply


@dataclass
class _Node:
    connected: bool = True
    gone_at: int | None = None  # when its connection ended (None while connected)
    ring: Ring | None = None  # the ring it last reported on its current connection
    members: frozenset[int] = frozenset()
    stamp: int = 0  # its tree's stamp, as it last reported it


@dataclass
class _Holder:
    ring: Ring
    members: frozenset[int]
    acked: set[int] = field(default_factory=set)  # nodes told ACK for it, not yet released


class ClusterArbiter:
    """The decisions of qnetd for one cluster (see the module comment). Times are ms."""

    def __init__(self, now: int, last_holder: frozenset[int] = frozenset(),
                 newest_stamp: int = 0) -> None:
        """`last_holder`, `newest_stamp`: as qnetd kept them on disk (empty, 0: none known)."""
        self._first_seen = now
        self._settings: Hello | None = None
        self._nodes: dict[int, _Node] = {}
        self._holder: _Holder | None = None
        self._last_holder_members = last_holder
        self._newest_stamp = newest_stamp
        self._unsettled_since: int | None = None
        self._granted = False  # a first grant ends the quiet time
        self._now = now  # the latest time given: deadlines before it are over

    # -- inputs

    def hello(self, now: int, hello: Hello) -> None:
        """A (new) connection of `hello.node_id`; it reports no ring until `membership`. A
        client that reconnects has dropped any vote it cast before."""
        self._now = max(self._now, now)
        self._settings = hello
        self._nodes[hello.node_id] = _Node()
        if self._holder is not None:
            self._holder.acked.discard(hello.node_id)

    def membership(self, now: int, node_id: int, msg: Membership) -> None:
        """The ring `node_id` is in now; ignored when the node is not connected or the report
        does not name the node among the members."""
        self._now = max(self._now, now)
        node = self._nodes.get(node_id)
        if (node is None or not node.connected or node_id not in msg.members
                or msg.stamp > msg.ring.seq):  # a tree cannot come from a ring yet to be
            return
        node.ring, node.members, node.stamp = msg.ring, frozenset(msg.members), msg.stamp
        self._newest_stamp = max(self._newest_stamp, msg.stamp)

    def gone(self, now: int, node_id: int) -> None:
        self._now = max(self._now, now)
        node = self._nodes.get(node_id)
        if node is not None and node.connected:
            node.connected, node.gone_at, node.ring = False, now, None

    # -- outputs

    @property
    def last_holder(self) -> frozenset[int]:
        """The members of the last ring given the vote: for qnetd to keep across restarts."""
        return self._last_holder_members

    @property
    def newest_stamp(self) -> int:
        """The newest tree stamp any node reported: for qnetd to keep across restarts."""
        return self._newest_stamp

    def idle(self) -> bool:
        """No node connected and no holder to remember: the cluster may be forgotten."""
        return self._holder is None and not any(n.connected for n in self._nodes.values())

    def next_deadline(self) -> int | None:
        """When `decisions` may change with time alone."""
        if self._settings is None:
            return None
        grace = self._grace()
        times: list[int] = [] if self._granted else [self._first_seen + grace]
        if self._holder is not None:
            times += [gone + grace for n in self._holder.acked
                      if (gone := self._nodes[n].gone_at) is not None]
        if self._unsettled_since is not None:
            times.append(self._unsettled_since + self._settings.sync_timeout_ms)
        return min((t for t in times if t > self._now), default=None)

    def decisions(self, now: int) -> dict[int, VoteReply]:
        """Per connected node that reported a ring: the vote for that ring, now."""
        self._now = max(self._now, now)
        if self._settings is None:
            return {}
        self._release_holder(now)
        reports = {nid: n for nid, n in self._nodes.items() if n.connected and n.ring is not None}
        if not reports:
            return {}
        dead = {n.ring for n in reports.values() if n.ring is not None
                and self._is_dead(n.ring, n.members)}
        live = {n.ring: n.members for n in reports.values()
                if n.ring is not None and n.ring not in dead}
        if self._holder is None:
            self._grant(now, reports, dead, live)
        replies: dict[int, VoteReply] = {}
        for nid, node in reports.items():
            assert node.ring is not None
            replies[nid] = VoteReply(node.ring, self._vote_for(nid, node.ring, dead, live,
                                                               reports))
        return replies

    # -- the rules

    def _grace(self) -> int:
        assert self._settings is not None
        return self._settings.timeout_ms * 3 // 2

    def _is_dead(self, ring: Ring, members: frozenset[int]) -> bool:
        """Some member of `ring` reports a newer ring."""
        for m in members:
            node = self._nodes.get(m)
            if node is not None and node.ring is not None and node.ring > ring:
                return True
        return False

    def _release_holder(self, now: int) -> None:
        holder = self._holder
        if holder is None:
            return
        moved_on = self._is_dead(holder.ring, holder.members)
        grace = self._grace()
        all_gone = all(
            not self._nodes[n].connected and (self._nodes[n].gone_at or 0) + grace <= now
            for n in holder.acked)
        if moved_on or all_gone:
            self._holder = None

    def _may_grant(self, now: int) -> bool:
        """Not in the quiet time after qnetd first saw the cluster, unless all nodes are here."""
        assert self._settings is not None
        if self._granted or now >= self._first_seen + self._grace():
            return True
        return all(n in self._nodes and self._nodes[n].connected
                   for n in self._settings.nodes)

    def _settled(self, reports: dict[int, _Node],
                 live: dict[Ring, frozenset[int]]) -> set[Ring]:
        """The live rings whose connected members all report them."""
        return {ring for ring, members in live.items()
                if all(reports[m].ring == ring for m in members if m in reports)}

    def _grant(self, now: int, reports: dict[int, _Node], dead: set[Ring],
               live: dict[Ring, frozenset[int]]) -> None:
        assert self._settings is not None
        settled = self._settled(reports, live)
        stale = any(n.ring in dead for n in reports.values())
        everything_settled = not stale and settled == set(live)
        if everything_settled:
            self._unsettled_since = None
        elif self._unsettled_since is None:
            self._unsettled_since = now
        waited_enough = (self._unsettled_since is not None
                         and now >= self._unsettled_since + self._settings.sync_timeout_ms)
        if not (everything_settled or waited_enough) or not self._may_grant(now):
            return
        candidates = [ring for ring in settled if self._eligible(live[ring])
                      and self._holds_newest_writes(live[ring], reports)]
        if not candidates:
            return
        winner = max(candidates, key=lambda r: self._rank(r, live[r], reports))
        self._holder = _Holder(winner, live[winner])
        self._last_holder_members = live[winner]
        self._unsettled_since = None
        self._granted = True

    def _holds_newest_writes(self, members: frozenset[int], reports: dict[int, _Node]) -> bool:
        """Whether a ring surely holds every acknowledged write (module comment): a member of
        the last holder, and a member whose tree has the newest stamp reported."""
        if self._last_holder_members and not members & self._last_holder_members:
            return False
        return any(reports[m].stamp >= self._newest_stamp for m in members if m in reports)

    def _eligible(self, members: frozenset[int]) -> bool:
        assert self._settings is not None
        if self._settings.algorithm == "lms":
            return True
        return len(members) * 2 >= len(self._settings.nodes)

    def _rank(self, ring: Ring, members: frozenset[int],
              reports: dict[int, _Node]) -> tuple[int, int, int, int]:
        assert self._settings is not None
        connected = sum(1 for n in reports.values() if n.ring == ring)
        keep = (len(members & self._last_holder_members) if self._settings.keep_active else 0)
        return len(members), connected, keep, self._tie_breaker_rank(members)

    def _tie_breaker_rank(self, members: frozenset[int]) -> int:
        """Greater is preferred."""
        assert self._settings is not None
        tie = self._settings.tie_breaker
        if tie == "highest":
            return max(members)
        if tie.isdecimal() and int(tie) in members:
            return 1 << 33
        return -min(members)

    def _vote_for(self, node_id: int, ring: Ring, dead: set[Ring],
                  live: dict[Ring, frozenset[int]], reports: dict[int, _Node]) -> Vote:
        holder = self._holder
        if holder is not None and ring == holder.ring:
            holder.acked.add(node_id)
            return Vote.ACK
        if ring in dead or holder is not None:
            return Vote.NACK
        if ring in live and not (self._eligible(live[ring])
                                 and self._holds_newest_writes(live[ring], reports)):
            return Vote.NACK
        return Vote.WAIT
