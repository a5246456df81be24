"""Totem's membership states, what each state holds, and the transitions between them.

A member is in exactly one state, and the state's data exists only while it is in it: the
consensus a GATHER collects, the commit token of COMMIT and RECOVERY, the new ring and the frames
to re-broadcast of RECOVERY, the token hold and merge timer of OPERATIONAL. `Totem` keeps one
`Phase` value (the state and its data together), so a field cannot be read in the wrong state,
and changes it only through `check_transition`, which refuses any transition the protocol does
not have:

    GATHER      -> GATHER (the view changed, or consensus timed out), COMMIT (consensus reached)
    COMMIT      -> RECOVERY (the commit token's second rotation), GATHER (token lost, a join)
    RECOVERY    -> OPERATIONAL (the ring is installed), GATHER (token lost, a join, a deaf member)
    OPERATIONAL -> GATHER (token lost, a join, merge detected, a deaf member)

Every transition is taken only from the states listed, whatever peers send, so an illegal one is
a bug in this code: `IllegalTransition` is an assertion failure, not a protocol error.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from .totem_ringlog import RingLog
from .totem_token import Rotation
from .wire import CommitToken, Mcast, Token


class State(Enum):
    """The membership state alone (without its data), as status reports show it."""

    OPERATIONAL = "operational"
    GATHER = "gather"
    COMMIT = "commit"
    RECOVERY = "recovery"


LEGAL_TRANSITIONS: dict[State, frozenset[State]] = {
    State.GATHER: frozenset({State.GATHER, State.COMMIT}),
    State.COMMIT: frozenset({State.RECOVERY, State.GATHER}),
    State.RECOVERY: frozenset({State.OPERATIONAL, State.GATHER}),
    State.OPERATIONAL: frozenset({State.GATHER}),
}


class IllegalTransition(AssertionError):
    """The membership state machine was asked for a transition it does not have: a bug."""


def check_transition(old: State, new: State) -> None:
    if new not in LEGAL_TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value}")


@dataclass(slots=True)
class Gathering:
    """GATHER: multicasting my view (proc and fail sets) until every live member shares it."""

    state: ClassVar[State] = State.GATHER
    consensus: set[int]  # members whose last join matched my view (me included)
    consensus_at: int  # then members that have not agreed are failed
    join_at: int  # when my join is multicast again


@dataclass(slots=True)
class Committing:
    """COMMIT: the commit token's first rotation, collecting every member's old-ring state."""

    state: ClassVar[State] = State.COMMIT
    commit: CommitToken  # the commit token as I passed it on
    hop: int  # the highest hop of it seen: lower ones are duplicates


@dataclass(slots=True)
class Recovering:
    """RECOVERY: the new ring runs its token, carrying old-ring frames that some member of my old
    ring may lack, until the representative sees a quiet ring and installs it."""

    state: ClassVar[State] = State.RECOVERY
    commit: CommitToken  # complete: every member's info filled in
    hop: int  # the highest hop of it seen
    ring: RingLog  # the new ring (its frames are recovery frames)
    trans_members: tuple[int, ...]  # members coming from my old ring: the transitional config
    rebroadcast: deque[Mcast]  # old-ring frames still to be sent as recovery frames
    rotation: Rotation  # the new ring's token bookkeeping (it carries on into OPERATIONAL)
    quiet_rotations: int = 0  # representative: consecutive rotations in which all was quiet
    last_seq: int = -1  # representative: the token's seq on its previous visit


@dataclass(slots=True)
class Operational:
    """OPERATIONAL: the ring (`Totem.ring`) is installed and application messages flow."""

    state: ClassVar[State] = State.OPERATIONAL
    rotation: Rotation  # the ring's token bookkeeping
    merge_at: int | None  # representative: when MERGE_DETECT is multicast next
    held_token: Token | None = None  # representative, idle ring: the token it holds
    hold_release_at: int | None = None  # when the held token goes on


Phase = Gathering | Committing | Recovering | Operational
