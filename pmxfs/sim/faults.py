"""The random fault step shared by the simulator's chaos runs (totem alone and full replicas)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .network import Network


@dataclass(frozen=True)
class FaultOdds:
    """Cumulative upper bounds of a roll in [0, 1) for each fault; a roll below `partition` is
    not a fault (the caller's workload), a roll at or above `restart` pauses a node."""

    partition: float
    isolate: float
    heal: float
    crash: float
    restart: float


def random_fault(roll: float, odds: FaultOdds, rng: random.Random, net: Network, ids: list[int],
                 token: int, crash: Callable[[int], None],
                 restart: Callable[[int], None]) -> None:
    live = [n for n in ids if net.nodes[n].up]
    if roll < odds.partition:
        shuffled = ids[:]
        rng.shuffle(shuffled)
        cut = rng.randint(1, len(ids) - 1)
        net.partition([shuffled[:cut], shuffled[cut:]])
    elif roll < odds.isolate:
        victim = rng.choice(ids)
        net.partition([[victim], [n for n in ids if n != victim]])
    elif roll < odds.heal:
        net.heal()
    elif roll < odds.crash:
        if len(live) > 1:
            crash(rng.choice(live))
    elif roll < odds.restart:
        dead = [n for n in ids if not net.nodes[n].up]
        if dead:
            restart(rng.choice(dead))
    elif live:
        net.pause(rng.choice(live), rng.randint(token, 3 * token))
