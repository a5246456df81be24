"""votequorum arithmetic and flags for pmxfs, as a pure state machine over agreed ring inputs.

How it works
------------
Quorum must be the same on every member of a ring, because every member gates the same writes
on it (DESIGN.md §3). So the decision is a pure function, `compute`, of inputs that the ring
agreed on: the membership of the REGULAR configuration and, per member, the `Announcement` it
broadcast after that configuration change (its votes, the expected votes it holds, whether it was
quorate in the ring it came from, whether its quorum-device client holds the device's vote, and
the members of its previous ring). `Quorum` wraps `compute` with what a node carries from ring to
ring (`QuorumState`); every later input inside a ring (an `expected N` request, a re-announcement,
the last-man-standing step, a config change) is applied at the point it is delivered in the total
order, so all members keep computing the same answer. Time only enters as the `now` argument (ms).

Rules (votequorum's, as DESIGN.md §3 states them):
* V = votes of the members (+ the device's votes while a member's device client holds its vote).
* Highest expected H = max of the expected votes announced by the members that were quorate in
  their previous ring (or of every member when none was): a member that was not quorate adopts the
  expected votes of a quorate partition it joins, as in votequorum.
* quorum = max(H//2 + 1, V//2 + 1); quorate <=> V >= quorum; E := max(H, V) (if V > E then E := V).
* two_node (nodelist of two nodes): quorum is 1; it implies wait_for_all unless that is set to 0.
* wait_for_all: after start, and again after quorum was lost, the partition is not quorate until
  all expected votes are present at once (V >= H). A member that was quorate in its previous ring
  satisfies it for the ring it joins.
* auto_tie_breaker: when the partition has exactly half of the expected votes (V*2 == E), it is
  quorate if it holds the tie-breaker node: `lowest`/`highest` = the lowest/highest node id of the
  nodelist; for a list, the first listed node present here wins, unless an earlier listed node
  was in one of the members' previous rings (it may be on the other side); with no previous ring
  (cold start) only the first listed node decides. Differences from votequorum, on purpose:
  votequorum takes lowest/highest from the last quorate membership each node saw and also
  accepts "half minus one" splits of an odd total; both depend on per-node history and can let
  two partitions win. The static choice can't: only one partition holds a given node, and the
  other half has at most E/2 < quorum votes. As in votequorum the flag is off with an odd vote
  total unless wait_for_all is set. The list form still relies on previous membership, as in
  votequorum.
* last_man_standing: when a membership change leaves the ring quorate with V < E, a window of
  `last_man_standing_window` ms starts (restarted by every membership change). When it ends,
  `on_timer` returns a `LastManStanding` proposal; the caller broadcasts it and every member applies
  it on delivery (`apply_last_man_standing`), so E := V everywhere at the same point of the order.
  It never goes below what quorum allows: at E = 2 losing a node loses quorum, unless
  auto_tie_breaker keeps the half holding the tie-breaker node (then it can go down to 1).
* quorum device: adds `device_votes` to V while a member announces that its device client holds
  the vote (qnetd gives it to at most one partition).
* `expected N` (pvecm expected): refused when N < 1, when N < V, or when the partition is quorate
  and N//2 + 1 > V (it would lose quorum); otherwise every member adopts E := N.
* A config taken at run time: applied in order, it resets E to what it expects (`reconfigure`).
  A quorate claim counts only from members that saw the newest quorate ring among the ring's
  members (the replica says which): a member that was away missed that ring's decisions, and
  may announce the expected votes of an older config. When a sync completes, every member
  settles the ring's quorum on the config the sync left them all with (`settle_config`): votes
  are the config's, and an announced E above the config's is lowered to it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeAlias

from pmxfs.core.conf import DEFAULT_LMS_WINDOW_MS, ClusterConfig, device_votes

AtbMode: TypeAlias = "Literal['lowest', 'highest'] | tuple[int, ...]"

FLAG_ORDER = ("TwoNode", "Quorate", "WaitForAll", "LastManStanding", "AutoTieBreaker", "Qdevice",
              "QdeviceCastVote")


@dataclass(frozen=True)
class QuorumConfig:
    """The votequorum part of a cluster config (see `from_config`)."""

    node_votes: Mapping[int, int]  # node id -> quorum_votes, for every node of the nodelist
    expected_votes: int | None = None  # explicit expected_votes, else derived from the votes
    two_node: bool = False
    wait_for_all: bool | None = None  # None: as two_node implies
    last_man_standing: bool = False
    last_man_standing_window: int = DEFAULT_LMS_WINDOW_MS  # ms
    auto_tie_breaker: bool = False
    auto_tie_breaker_node: AtbMode = "lowest"  # "lowest", "highest" or a list of node ids
    device_votes: int | None = None  # the quorum device's votes; None: no device configured

    @classmethod
    def from_config(cls, config: ClusterConfig) -> QuorumConfig:
        """Take the quorum settings of a validated `ClusterConfig`."""
        q = config.quorum
        votes = {n.nodeid: n.votes for n in config.nodes if n.nodeid is not None}
        return cls(
            node_votes=votes,
            expected_votes=q.expected_votes,
            two_node=bool(q.two_node),
            wait_for_all=q.wait_for_all,
            last_man_standing=bool(q.last_man_standing),
            last_man_standing_window=(DEFAULT_LMS_WINDOW_MS if q.last_man_standing_window is None
                                      else q.last_man_standing_window),
            auto_tie_breaker=bool(q.auto_tie_breaker),
            auto_tie_breaker_node=(q.auto_tie_breaker_node
                                   if q.auto_tie_breaker_node is not None else "lowest"),
            device_votes=device_votes(config),
        )

    @property
    def configured_expected(self) -> int:
        """E from the config: expected_votes, else the nodelist's votes plus the device's."""
        if self.expected_votes is not None:
            return self.expected_votes
        return sum(self.node_votes.values()) + (self.device_votes or 0)

    @property
    def two_node_active(self) -> bool:
        return self.two_node and len(self.node_votes) == 2

    @property
    def wfa(self) -> bool:
        """wait_for_all in force: explicit, else implied by two_node."""
        return self.two_node if self.wait_for_all is None else self.wait_for_all

    @property
    def atb_active(self) -> bool:
        """auto_tie_breaker in force (off with an odd vote total unless wait_for_all is set)."""
        if not self.auto_tie_breaker:
            return False
        return sum(self.node_votes.values()) % 2 == 0 or self.wfa


@dataclass(frozen=True)
class Announcement:
    """What one member broadcasts after each REGULAR configuration change (`Quorum.announcement`).

    votes: its quorum_votes; expected_votes: the E it holds; quorate: it was quorate in the ring it
    came from; qdevice_vote: its quorum-device client holds the device's vote; ring_members: the
    members of its previous ring (empty before its first ring).
    """

    votes: int
    expected_votes: int
    quorate: bool = False
    qdevice_vote: bool = False
    ring_members: tuple[int, ...] = ()


@dataclass(frozen=True)
class QuorumStatus:
    """The result for a ring: the same on every member given the same inputs."""

    quorate: bool
    expected_votes: int  # E
    highest_expected: int  # H
    total_votes: int  # V, the device's votes included
    quorum: int  # the votes needed
    flags: tuple[str, ...]  # votequorum's flag names in force, in FLAG_ORDER
    members: tuple[int, ...]  # sorted
    member_votes: tuple[tuple[int, int], ...] = ()  # (node id, votes) per member
    qdevice_votes: int = 0  # the device's votes counted in V
    waiting_for_all: bool = False  # wait_for_all still keeps the ring from being quorate
    tie_breaker: bool = False  # quorate only through auto_tie_breaker

    def to_json(self) -> dict[str, object]:
        """The `quorum` object of `pmxfs status --json`."""
        return {
            "quorate": self.quorate,
            "expected_votes": self.expected_votes,
            "highest_expected": self.highest_expected,
            "total_votes": self.total_votes,
            "quorum": self.quorum,
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class QuorumState:
    """What a node carries from ring to ring (equal on all members after each agreed input)."""

    expected_votes: int  # E as it stands
    quorate: bool = False  # in the current (or last) ring
    waiting_for_all: bool = False  # wait_for_all is (re-)armed
    members: tuple[int, ...] = ()  # of the current ring
    lms_deadline: int | None = None  # when the last-man-standing window ends (ms), if running


@dataclass(frozen=True)
class LastManStanding:
    """A last-man-standing step to broadcast: `members` lower E to `expected_votes`."""

    members: tuple[int, ...]
    expected_votes: int


@dataclass(frozen=True)
class ExpectedResult:
    """Outcome of `Quorum.set_expected`: accepted, or refused with a reason."""

    accepted: bool
    reason: str | None
    status: QuorumStatus


def _union(groups: Iterable[tuple[int, ...]]) -> set[int]:
    out: set[int] = set()
    for group in groups:
        out.update(group)
    return out


def _normalize(members: Iterable[int]) -> tuple[int, ...]:
    mem = tuple(sorted(set(members)))
    if not mem:
        raise ValueError("a ring has at least one member")
    return mem


def _current_claims(announced: dict[int, Announcement],
                    current: Collection[int] | None) -> dict[int, Announcement]:
    """`announced`, with the quorate claims of members outside `current` (if given) dropped."""
    if current is None:
        return announced
    return {m: a if m in current or not a.quorate else replace(a, quorate=False)
            for m, a in announced.items()}


def _tie_breaker_wins(config: QuorumConfig, members: tuple[int, ...],
                      anns: Sequence[Announcement]) -> bool:
    """Whether this exact half of the votes holds the auto_tie_breaker node."""
    here = set(members)
    mode = config.auto_tie_breaker_node
    configured = set(config.node_votes)
    if mode == "lowest" or mode == "highest":
        if not configured:
            return False
        return (min(configured) if mode == "lowest" else max(configured)) in here
    previous = _union(a.ring_members for a in anns)
    for index, node in enumerate(mode):
        if node in here:
            # an earlier listed node may be on the other side, unless the members' previous
            # ring(s) show that it was already gone; with no history only the first one decides
            return index == 0 or (bool(previous)
                                  and not any(earlier in previous for earlier in mode[:index]))
    return False


def compute(config: QuorumConfig, members: Iterable[int],
            announced: Mapping[int, Announcement], *, waiting_for_all: bool) -> QuorumStatus:
    """The quorum of a ring from agreed inputs (pure; see the module comment for the rules).

    `waiting_for_all` says whether the ring still waits for all votes (wait_for_all); the result
    says whether it still does afterwards (re-armed whenever the ring is not quorate).
    """
    mem = _normalize(members)
    missing = [m for m in mem if m not in announced]
    if missing:
        raise ValueError(f"no announcement from member(s) {missing}")
    anns = [announced[m] for m in mem]
    for m, a in zip(mem, anns, strict=True):
        if a.votes < 0 or a.expected_votes < 0:
            raise ValueError(f"negative votes announced by node {m}")
    node_total = sum(a.votes for a in anns)
    device = config.device_votes or 0
    qdevice_votes = device if device and any(a.qdevice_vote for a in anns) else 0
    total = node_total + qdevice_votes
    basis = [a for a in anns if a.quorate] or anns
    highest = max(1, max(a.expected_votes for a in basis))
    expected = max(highest, total)
    quorum = 1 if config.two_node_active else max(highest // 2 + 1, total // 2 + 1)
    waiting = config.wfa and waiting_for_all
    tie_breaker = False
    if waiting and total < highest:
        quorate = False
    else:
        waiting = False
        quorate = total >= quorum
        if (not quorate and config.atb_active and total * 2 == expected
                and _tie_breaker_wins(config, mem, anns)):
            quorate = tie_breaker = True
    if config.wfa and not quorate:
        waiting = True
    flags = {
        "TwoNode": config.two_node_active,
        "Quorate": quorate,
        "WaitForAll": config.wfa,
        "LastManStanding": config.last_man_standing,
        "AutoTieBreaker": config.atb_active,
        "Qdevice": config.device_votes is not None,
        "QdeviceCastVote": qdevice_votes > 0,
    }
    return QuorumStatus(
        quorate=quorate,
        expected_votes=expected,
        highest_expected=highest,
        total_votes=total,
        quorum=quorum,
        flags=tuple(name for name in FLAG_ORDER if flags[name]),
        members=mem,
        member_votes=tuple((m, a.votes) for m, a in zip(mem, anns, strict=True)),
        qdevice_votes=qdevice_votes,
        waiting_for_all=waiting,
        tie_breaker=tie_breaker,
    )


class Quorum:
    """votequorum for one node: feed it the ring's agreed inputs, read `status()`.

    Usage by the replica: after each REGULAR configuration change every member broadcasts
    `announcement()`; once all members' announcements are delivered, call
    `on_membership(now, members, announced)` on every member. Deliver `expected N` requests with
    `set_expected`, a member's device vote for the ring with `update_qdevice_vote`, config
    changes with `reconfigure`, and the `LastManStanding` proposals that `on_timer` returns with
    `apply_last_man_standing` -- all at their place in the total order. `nodeid` is used only to
    build this node's own announcement.
    """

    def __init__(self, config: QuorumConfig, nodeid: int) -> None:
        self.config = config
        self.nodeid = nodeid
        self._qdevice_vote = False  # this node's device client holds the device's vote
        self._state = QuorumState(expected_votes=config.configured_expected,
                                  waiting_for_all=config.wfa)
        own = {nodeid: self.announcement()}
        self._announced: dict[int, Announcement] = own  # the current ring's, by member
        self._status = compute(config, (nodeid,), own, waiting_for_all=config.wfa)
        self._state = replace(self._state, quorate=self._status.quorate,
                              waiting_for_all=self._status.waiting_for_all)

    # -- reading

    @property
    def state(self) -> QuorumState:
        return self._state

    def status(self) -> QuorumStatus:
        return self._status

    def next_deadline(self) -> int | None:
        """When `on_timer` next has something to do (the last-man-standing window), or None."""
        return self._state.lms_deadline

    def announcement(self) -> Announcement:
        """What this node broadcasts after a REGULAR configuration change."""
        return Announcement(
            votes=self.config.node_votes.get(self.nodeid, 0),
            expected_votes=self._state.expected_votes,
            quorate=self._state.quorate,
            qdevice_vote=self._qdevice_vote,
            ring_members=self._state.members,
        )

    # -- inputs

    def on_membership(self, now: int, members: Iterable[int],
                      announced: Mapping[int, Announcement],
                      current: Collection[int] | None = None) -> QuorumStatus:
        """A new ring: its members and every member's announcement. A quorate claim counts
        only from a member in `current` (default: every member): those that saw the newest
        quorate ring among the members -- another member's claim predates decisions it missed,
        a config change among them, and the expected votes it announces may be those of an
        older config."""
        mem = _normalize(members)
        anns = _current_claims({m: announced[m] for m in mem if m in announced}, current)
        waiting = self.config.wfa and not any(a.quorate for a in anns.values())
        status = self._evaluate(mem, anns, waiting)
        deadline = None
        if self._lms_applies(status):
            deadline = now + self.config.last_man_standing_window
        self._state = replace(self._state, members=mem, lms_deadline=deadline)
        return status

    def update_qdevice_vote(self, nodeid: int, has_vote: bool) -> QuorumStatus:
        """A member's device client got or lost the device's vote for this ring, delivered in
        the order (a member that is not in the ring is ignored)."""
        if nodeid not in self._announced:
            return self._status
        if nodeid == self.nodeid:
            self._qdevice_vote = has_vote
        anns = dict(self._announced)
        anns[nodeid] = replace(anns[nodeid], qdevice_vote=has_vote)
        return self._reevaluate(anns)

    def drop_qdevice_vote(self) -> None:
        """A new ring begins: a vote the device gave belongs to the ring it was given for, so
        this node announces none until its client is told the vote for the new ring."""
        self._qdevice_vote = False

    def expected_range_refusal(self, expected: int) -> str | None:
        """Why `expected N` is out of range whatever the membership: N must lie in
        1..the votes that exist (every node's votes and the device's); None when it is in."""
        existing = sum(self.config.node_votes.values()) + (self.config.device_votes or 0)
        if not 1 <= expected <= existing:
            return (f"expected votes must be between 1 and {existing} (the votes that exist), "
                    f"not {expected}")
        return None

    def set_expected(self, expected: int) -> ExpectedResult:
        """`expected N`, delivered in the ring: refused, or E := N on every member."""
        st = self._status
        votes = st.total_votes
        refusal = self.expected_range_refusal(expected)
        if refusal is not None:
            return ExpectedResult(False, refusal, st)
        if expected < votes:
            return ExpectedResult(False, f"expected votes {expected} is lower than the {votes} "
                                         "votes present", st)
        if st.quorate and expected // 2 + 1 > votes:
            return ExpectedResult(False, f"with expected votes {expected} the quorum would be "
                                         f"{expected // 2 + 1}, more than the {votes} votes "
                                         "present: this partition would lose quorum", st)
        anns = {m: replace(a, expected_votes=expected) for m, a in self._announced.items()}
        return ExpectedResult(True, None, self._reevaluate(anns))

    def on_timer(self, now: int) -> LastManStanding | None:
        """Time passed; returns a last-man-standing step to broadcast when its window ended."""
        deadline = self._state.lms_deadline
        if deadline is None or now < deadline:
            return None
        self._state = replace(self._state, lms_deadline=None)
        st = self._status
        if not self._lms_applies(st):
            return None
        return LastManStanding(st.members, st.total_votes)

    def apply_last_man_standing(self, step: LastManStanding) -> QuorumStatus | None:
        """A delivered `LastManStanding`: E := its expected votes; None when stale (ignored)."""
        st = self._status
        if (not self.config.last_man_standing or step.members != st.members or not st.quorate
                or not st.total_votes <= step.expected_votes < st.expected_votes):
            return None
        anns = {m: replace(a, expected_votes=step.expected_votes)
                for m, a in self._announced.items()}
        return self._reevaluate(anns)

    def reconfigure(self, config: QuorumConfig) -> QuorumStatus:
        """A new validated config was delivered: votes and E come from it again (an `expected`
        override or a last-man-standing reduction ends, as when corosync reloads its config)."""
        if config == self.config:
            return self._status
        self.config = config
        expected = config.configured_expected
        anns = {m: replace(a, votes=config.node_votes.get(m, 0), expected_votes=expected)
                for m, a in self._announced.items()}
        return self._reevaluate(anns)

    def settle_config(self, config: QuorumConfig, announced: Mapping[int, Announcement],
                      current: Collection[int]) -> QuorumStatus:
        """A sync of the ring completed: `config` is the one every member now holds, and the
        ring's quorum is worked out again from every member's announcement (`announced`, as
        `on_membership` had it) -- the same on every member, so they stay in agreement, also
        when the sync brought some of them a config they did not have. Members that ran with
        an older config announced its votes and expected votes, and a quorate claim of theirs
        may predate decisions they missed. So: votes are this config's; an announced E above
        this config's expected votes is lowered to them (only an older config can have put it
        there: `expected` and last man standing only lower E); and a quorate claim counts only
        from a member in `current`, as in `on_membership`."""
        self.config = config
        cap = config.configured_expected
        anns = _current_claims(
            {m: replace(a, votes=config.node_votes.get(m, 0),
                        expected_votes=min(a.expected_votes, cap))
             for m, a in announced.items() if m in self._status.members}, current)
        status = self._evaluate(self._status.members, anns,
                                config.wfa and not any(a.quorate for a in anns.values()))
        if not self._lms_applies(status):
            self._state = replace(self._state, lms_deadline=None)
        return status

    # -- internals

    def _lms_applies(self, st: QuorumStatus) -> bool:
        return self.config.last_man_standing and st.quorate and st.total_votes < st.expected_votes

    def _reevaluate(self, anns: dict[int, Announcement]) -> QuorumStatus:
        status = self._evaluate(self._status.members, anns, self._state.waiting_for_all)
        if not self._lms_applies(status):
            self._state = replace(self._state, lms_deadline=None)
        return status

    def _evaluate(self, members: tuple[int, ...], anns: Mapping[int, Announcement],
                  waiting: bool) -> QuorumStatus:
        status = compute(self.config, members, anns, waiting_for_all=waiting)
        # every member adopts the ring's E (votequorum: update_node_expected_votes)
        self._announced = {m: replace(anns[m], expected_votes=status.expected_votes)
                           for m in members}
        self._status = status
        self._state = replace(
            self._state,
            expected_votes=status.expected_votes,
            quorate=status.quorate,
            waiting_for_all=status.waiting_for_all,
        )
        return status


# --------------------------------------------------------------------------------------------
# Rendering, as `pvecm status` / `corosync-quorumtool -s` show it


@dataclass(frozen=True)
class MemberInfo:
    """One row of the membership table."""

    nodeid: int
    votes: int
    name: str  # the node's name, or its id when unknown


@dataclass(frozen=True)
class ClusterInfo:
    """The `Cluster information` block (optional)."""

    name: str
    config_version: int
    transport: str


def member_infos(status: QuorumStatus, names: Mapping[int, str]) -> tuple[MemberInfo, ...]:
    """Membership rows from a status and a node id -> name (or address) map."""
    return tuple(MemberInfo(nid, votes, names.get(nid, str(nid)))
                 for nid, votes in status.member_votes)


def _heading(title: str) -> list[str]:
    return [title, "-" * len(title)]


def render_status(
    status: QuorumStatus,
    *,
    date: str,
    local_nodeid: int,
    ring_id: str,
    members: Sequence[MemberInfo],
    cluster: ClusterInfo | None = None,
    provider: str = "corosync_votequorum",
) -> str:
    """The human status block. Pure: the caller passes the date string and the names."""
    lines: list[str] = []
    if cluster is not None:
        lines += _heading("Cluster information")
        lines += [
            f"Name:             {cluster.name}",
            f"Config Version:   {cluster.config_version}",
            f"Transport:        {cluster.transport}",
            "",
        ]
    lines += _heading("Quorum information")
    lines += [
        f"Date:             {date}",
        f"Quorum provider:  {provider}",
        f"Nodes:            {len(status.members)}",
        f"Node ID:          0x{local_nodeid:08x}",
        f"Ring ID:          {ring_id}",
        f"Quorate:          {'Yes' if status.quorate else 'No'}",
        "",
    ]
    lines += _heading("Votequorum information")
    blocked = "" if status.quorate else " Activity blocked"
    lines += [
        f"Expected votes:   {status.expected_votes}",
        f"Highest expected: {status.highest_expected}",
        f"Total votes:      {status.total_votes}",
        f"Quorum:           {status.quorum}{blocked}",
        f"Flags:            {' '.join(status.flags)}".rstrip(),
        "",
    ]
    lines += _heading("Membership information")
    lines.append(f"{'Nodeid':>10} {'Votes':>10} Name")
    for m in sorted(members, key=lambda m: m.nodeid):
        local = " (local)" if m.nodeid == local_nodeid else ""
        lines.append(f"0x{m.nodeid:08x} {m.votes:>10} {m.name}{local}")
    if status.qdevice_votes:
        lines.append(f"0x{0:08x} {status.qdevice_votes:>10} Qdevice")
    return "\n".join(lines) + "\n"


__all__ = [
    "FLAG_ORDER",
    "Announcement",
    "AtbMode",
    "ClusterInfo",
    "ExpectedResult",
    "LastManStanding",
    "MemberInfo",
    "Quorum",
    "QuorumConfig",
    "QuorumState",
    "QuorumStatus",
    "compute",
    "member_infos",
    "render_status",
]
