"""The random faults of the simulator's chaos runs, drawn as a *swarm*: each run its own mix.

Swarm testing (as TigerBeetle's VOPR does it): rather than one fixed blend of faults for every
run, each seed first draws a `FaultMix` -- which kinds of fault are enabled at all, how often
each strikes relative to the others, how often a fault step does anything (`intensity`), and the
rates and timings (loss 0-30 % on every link, duplication, delay and jitter, the highest loss of
one lossy direction, the size of clock jumps, the processing cost of a slow node). A kind that
is off in a run cannot mask a bug that another kind exposes, and different seeds explore
different mixes. The mix is one line at the head of the trace (`install_mix`), so a failing seed
shows it, and the seed alone replays it.

The kinds (`FaultKind`), each one trace line when it strikes:
* partition (two groups), isolate (one node alone), bridge (two sides that both hear one node),
  one-way (a direction cut: one ordered pair, or every pair from one group to the other),
  link loss (one direction loses 10 % up to the mix's bound of its packets); heal ends them all;
* crash and restart (from what the node persisted);
* pause (SIGSTOP for one to three token timeouts);
* clock jump (one node's clock leaps forward: from a quarter of a token timeout up to 90 s, so
  that also unanswered proposals time out at once);
* slow (one node, for two to ten token timeouts, pays a processing time for every event);
* stall of the token holder: exactly the node that holds the token now (the representative of
  an idle ring that holds it, else the receiver of the newest token on its way) stops for half
  to one and a half token timeouts.

`draw_mix` takes a `Swarm`: per kind, the chance that a run enables it (a workload leaves out
what it cannot take; a test forces one kind with `only`). Heal comes with any link kind, restart
with crash.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from pmxfs.core.totem import Totem
from pmxfs.core.wire import RingId, Token, decode

from .network import Network


class FaultKind(Enum):
    PARTITION = "partition"
    ISOLATE = "isolate"
    BRIDGE = "bridge"
    ONE_WAY = "one-way"
    LINK_LOSS = "link-loss"
    HEAL = "heal"
    CRASH = "crash"
    RESTART = "restart"
    PAUSE = "pause"
    CLOCK_JUMP = "clock-jump"
    SLOW = "slow"
    STALL_TOKEN_HOLDER = "stall-token-holder"


LINK_KINDS = (FaultKind.PARTITION, FaultKind.ISOLATE, FaultKind.BRIDGE, FaultKind.ONE_WAY,
              FaultKind.LINK_LOSS)
COMPANIONS = (FaultKind.HEAL, FaultKind.RESTART)  # enabled by others, never drawn on their own

Swarm = Mapping[FaultKind, float]  # per kind, the chance that a run enables it

EVERY_FAULT: Swarm = {kind: 0.6 for kind in FaultKind if kind not in COMPANIONS}


def only(*kinds: FaultKind) -> Swarm:
    """A swarm with exactly `kinds` enabled in every run."""
    return dict.fromkeys(kinds, 1.0)


@dataclass(frozen=True)
class FaultMix:
    loss: float  # on every link
    duplicate: float
    min_delay: int
    max_jitter: int
    intensity: float  # the chance that a fault step does anything
    weights: tuple[tuple[FaultKind, float], ...]  # the enabled kinds and their relative odds
    link_loss: float  # the highest loss rate of one lossy direction
    clock_jump: tuple[int, int]  # ms
    slow_cost: tuple[int, int]  # ms per event

    def enabled(self, kind: FaultKind) -> bool:
        return any(k is kind for k, _ in self.weights)

    def describe(self) -> str:
        kinds = " ".join(f"{k.value}:{w:.2f}" for k, w in self.weights) or "none"
        return (f"loss {self.loss} dup {self.duplicate} delay {self.min_delay}+"
                f"{self.max_jitter} intensity {self.intensity} kinds [{kinds}] link-loss "
                f"<={self.link_loss} jump {self.clock_jump[0]}-{self.clock_jump[1]} slow "
                f"{self.slow_cost[0]}-{self.slow_cost[1]} ms/event")


def draw_mix(rng: random.Random, swarm: Swarm, token: int) -> FaultMix:
    """This run's mix, from the seed's `rng`."""
    weights = {kind: round(rng.uniform(0.5, 2.0), 2) for kind in FaultKind
               if kind not in COMPANIONS and rng.random() < swarm.get(kind, 0.0)}
    link = sum(w for kind, w in weights.items() if kind in LINK_KINDS)
    if link:
        weights[FaultKind.HEAL] = round(link, 2)
    if FaultKind.CRASH in weights:
        weights[FaultKind.RESTART] = weights[FaultKind.CRASH]
    return FaultMix(
        loss=rng.choice([0.0, 0.0, 0.01, 0.05, 0.1, 0.2, 0.3]),
        duplicate=rng.choice([0.0, 0.0, 0.02, 0.05]),
        min_delay=rng.randint(0, 2),
        max_jitter=rng.choice([0, 1, 3, 10]),
        intensity=rng.choice([0.25, 0.5, 1.0]),
        weights=tuple((kind, weights[kind]) for kind in FaultKind if kind in weights),
        link_loss=rng.choice([0.3, 0.6, 0.9]),
        clock_jump=rng.choice([(token // 4, token), (token, 4 * token), (30_000, 90_000)]),
        slow_cost=rng.choice([(0, 2), (1, 5), (2, 10), (5, 20)]),
    )


def install_mix(net: Network, mix: FaultMix) -> None:
    """Run `net` with `mix`: its link rates now, its kinds at each `mixed_fault`."""
    net.mix = mix
    net.faults.loss = mix.loss
    net.faults.duplicate = mix.duplicate
    net.faults.min_delay = mix.min_delay
    net.faults.max_jitter = mix.max_jitter
    net.trace(f"fault mix {mix.describe()}")


def _totem(core: object) -> Totem | None:
    """The totem instance of a core (a `Totem`, or a replica that runs one)."""
    if isinstance(core, Totem):
        return core
    inner = getattr(core, "totem", None)
    return inner if isinstance(inner, Totem) else None


def token_holders(net: Network, ids: list[int]) -> list[int]:
    """Per ring, the node among `ids` that holds its token now: the representative holding an
    idle ring's token, else the receiver of the newest token passed on (the highest hop count;
    its sender keeps it until it sees it arrived)."""
    newest: dict[RingId, tuple[int, int]] = {}  # ring -> (hop count, holder)
    for n in ids:
        node = net.nodes[n]
        totem = _totem(node.core)
        if totem is None:
            continue
        if totem.held_token is not None:
            newest[totem.held_token.ring_id] = (2**62, n)
            continue
        forwarded = totem.relay.forwarded
        if forwarded is None or forwarded.to not in ids:
            continue
        token = decode(forwarded.data)
        if isinstance(token, Token) and token.token_seq > newest.get(token.ring_id, (-1, 0))[0]:
            newest[token.ring_id] = (token.token_seq, forwarded.to)
    return sorted(holder for _, holder in newest.values())


@dataclass(frozen=True)
class FaultOdds:
    """The fixed odds of a classic run (one without a mix, as every run was before the swarm:
    the regression seeds of that time replay with it): cumulative upper bounds of the caller's
    roll in [0, 1) for each fault; a roll below `partition` is not a fault (the caller's
    workload), a roll at or above `restart` pauses a node."""

    partition: float
    isolate: float
    heal: float
    crash: float
    restart: float


def classic_fault(roll: float, odds: FaultOdds, rng: random.Random, net: Network, ids: list[int],
                  token: int, crash: Callable[[int], None],
                  restart: Callable[[int], None]) -> None:
    """One fault step of a classic run (no mix: the fixed odds the totem regression seeds were
    found with) among the nodes `ids`: the fault `roll` falls on in `odds` (`token`: the token
    timeout, the time scale of pauses)."""
    live = [n for n in ids if net.nodes[n].up]
    if roll < odds.partition:
        _partition(rng, net, ids)
    elif roll < odds.isolate:
        _isolate(rng, net, ids)
    elif roll < odds.heal:
        net.heal()
    elif roll < odds.crash:
        if len(live) > 1:
            crash(rng.choice(live))
    elif roll < odds.restart:
        _restart(rng, net, ids, restart)
    elif live:
        net.pause(rng.choice(live), rng.randint(token, 3 * token))


def _partition(rng: random.Random, net: Network, ids: list[int]) -> None:
    shuffled = ids[:]
    rng.shuffle(shuffled)
    cut = rng.randint(1, len(ids) - 1)
    net.partition([shuffled[:cut], shuffled[cut:]])


def _isolate(rng: random.Random, net: Network, ids: list[int]) -> None:
    victim = rng.choice(ids)
    net.partition([[victim], [n for n in ids if n != victim]])


def _restart(rng: random.Random, net: Network, ids: list[int],
             restart: Callable[[int], None]) -> None:
    dead = [n for n in ids if not net.nodes[n].up]
    if dead:
        restart(rng.choice(dead))


def mixed_fault(rng: random.Random, net: Network, ids: list[int], token: int,
                crash: Callable[[int], None], restart: Callable[[int], None]) -> None:
    """One fault step of a run with a mix installed (`install_mix`) among the nodes `ids`:
    maybe (`intensity`) one fault of the mix (`token`: the token timeout, the time scale of
    pauses and stalls)."""
    mix = net.mix
    assert mix is not None, "install_mix first"
    if not mix.weights or rng.random() >= mix.intensity:
        return
    kind = rng.choices([k for k, _ in mix.weights], [w for _, w in mix.weights])[0]
    live = [n for n in ids if net.nodes[n].up]
    if kind in LINK_KINDS and len(ids) < 2:
        return
    if kind is FaultKind.PARTITION:
        _partition(rng, net, ids)
    elif kind is FaultKind.ISOLATE:
        _isolate(rng, net, ids)
    elif kind is FaultKind.BRIDGE:
        if len(ids) >= 3:
            shuffled = ids[:]
            rng.shuffle(shuffled)
            middle, rest = shuffled[0], shuffled[1:]
            cut = rng.randint(1, len(rest) - 1)
            net.bridge(sorted(rest[:cut]), middle, sorted(rest[cut:]))
    elif kind is FaultKind.ONE_WAY:
        if rng.random() < 0.5:
            a, b = rng.sample(ids, 2)
            net.cut([(a, b)])
        else:
            shuffled = ids[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(ids) - 1)
            net.cut((a, b) for a in shuffled[:cut] for b in shuffled[cut:])
    elif kind is FaultKind.LINK_LOSS:
        a, b = rng.sample(ids, 2)
        net.set_link_loss((a, b), round(rng.uniform(0.1, mix.link_loss), 2))
    elif kind is FaultKind.HEAL:
        net.heal()
    elif kind is FaultKind.CRASH:
        if len(live) > 1:
            crash(rng.choice(live))
    elif kind is FaultKind.RESTART:
        _restart(rng, net, ids, restart)
    elif not live:
        return
    elif kind is FaultKind.PAUSE:
        net.pause(rng.choice(live), rng.randint(token, 3 * token))
    elif kind is FaultKind.CLOCK_JUMP:
        net.jump_clock(rng.choice(live), rng.randint(*mix.clock_jump))
    elif kind is FaultKind.SLOW:
        net.slow(rng.choice(live), rng.randint(2 * token, 10 * token), mix.slow_cost)
    else:
        assert kind is FaultKind.STALL_TOKEN_HOLDER
        holders = token_holders(net, live)
        if holders:
            net.pause(rng.choice(holders), rng.randint(token // 2, 3 * token // 2),
                      "stall token holder")
