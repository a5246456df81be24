"""The nemesis: per cycle, a plan of timed faults of one kind (or a combination), carried out on
the lab, then one heal that undoes everything.

`Nemesis.plan(kind)` draws a `Plan` from the seeded generator: `Step`s at offsets from the
cycle's start, each a description and an action on the lab. Kinds (`KINDS`):
* process faults (`PROCESS_KINDS`): kill (SIGKILL 1..(N-1)/2 nodes, restart after a while),
  pause (SIGSTOP/SIGCONT 1..(N-1)/2 nodes, shorter or longer than the token timeout),
  kill-during-sync (heal an isolation or restart a killed node without waiting for its mount,
  then SIGKILL a node 0-100 ms after a daemon logs the ring that takes that node back: the sync
  of a small tree takes a few token rotations), slowdisk (stall the slow node's fsyncs);
* network faults, through the switch's rules: partition (a random minority), isolate (one
  node), bridge (two sides that both see one node), oneway (a node's packets out, or in, are
  dropped), loss, duplicate, delay (with jitter, which reorders); and through the node's TUN
  link: linkdown (down, then up), flap (toggled every 1-2 s);
* combo: two or three of the above at once, at most one of them a process fault (so at most a
  minority of the daemons is down at once; a partition on top may still leave no quorum).
Network rules of simultaneous faults are merged (`Rules.merged`).

`heal()` clears the rules, brings every link up, continues every paused daemon and restarts every
daemon the nemesis killed; a daemon that is dead although the nemesis never killed it is
reported (and restarted, so the run goes on). Every action is logged with its time, and each
heal logs the switch's counters (forwarded, dropped, overflow, ...).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

from faultlab import rules
from faultlab.lab import SLOW_STALL_S, Lab
from faultlab.rules import LinkFault, Rules

NETWORK_KINDS = ("partition", "isolate", "bridge", "oneway", "loss", "duplicate", "delay",
                 "linkdown", "flap")
PROCESS_KINDS = ("kill", "pause", "kill-during-sync", "slowdisk")
KINDS = (*PROCESS_KINDS, *NETWORK_KINDS, "combo")
TOKEN_S = 1.0
SYNC_WAIT_S = 10.0
SYNC_POLL_S = 0.005
SYNC_KILL_DELAY_S = 0.1
MEMBERSHIP = re.compile(r"membership \d+\.\d+: (.+)$", re.MULTILINE)  # replica_node's log line


def ring_takes_back(log_text: str, node: str) -> bool:
    """Whether `log_text` holds a daemon's membership line of a ring with `node` and another
    node (a restarted daemon first logs a ring of its own, which starts no sync with anyone)."""
    for match in MEMBERSHIP.finditer(log_text):
        members = match.group(1).strip().split(", ")
        if node in members and len(members) > 1:
            return True
    return False


@dataclass
class Step:
    at: float  # seconds after the start of the fault phase
    what: str
    action: Callable[[], None]


@dataclass
class Plan:
    kind: str
    steps: list[Step] = field(default_factory=list)
    length: float = 0.0  # the fault phase lasts at least this long

    def add(self, at: float, what: str, action: Callable[[], None]) -> None:
        self.steps.append(Step(at, what, action))
        self.length = max(self.length, at)


class Nemesis:
    def __init__(self, lab: Lab, rng: random.Random, log: TextIO) -> None:
        self.lab = lab
        self.rng = rng
        self.log = log
        self.killed: set[str] = set()  # killed by us and not restarted yet
        self._net: dict[str, Rules] = {}

    def note(self, text: str) -> None:
        self.log.write(f"{time.monotonic():.3f} {text}\n")
        self.log.flush()

    # ------------------------------------------------------------------ actions

    def _set_net(self, key: str, value: Rules | None) -> None:
        if value is None:
            self._net.pop(key, None)
        else:
            self._net[key] = value
        merged = Rules()
        for part in self._net.values():
            merged = merged.merged(part)
        self.lab.switch.set_rules(merged)

    def _kill(self, name: str) -> None:
        self.lab.kill(name)
        self.killed.add(name)

    def _restart(self, name: str, *, wait: bool = True) -> None:
        if name in self.killed and not self.lab.nodes[name].running():
            self.killed.discard(name)
            self.lab.start(name, wait=wait)

    # ------------------------------------------------------------------ plans

    def plan(self, kind: str) -> Plan:
        plan = Plan(kind)
        if kind == "combo":
            network = self.rng.sample(NETWORK_KINDS, self.rng.randint(1, 2))
            process = [self.rng.choice(PROCESS_KINDS)] if self.rng.random() < 0.6 else []
            if not process:
                network = self.rng.sample(NETWORK_KINDS, self.rng.randint(2, 3))
            plan.kind = "combo(" + "+".join([*network, *process]) + ")"
            for part in [*network, *process]:
                self._plan_kind(part, plan)
        else:
            self._plan_kind(kind, plan)
        plan.steps.sort(key=lambda s: s.at)
        return plan

    def _plan_kind(self, kind: str, plan: Plan) -> None:
        builders: dict[str, Callable[[Plan], None]] = {
            "kill": self._plan_kill, "pause": self._plan_pause,
            "kill-during-sync": self._plan_kill_during_sync, "slowdisk": self._plan_slowdisk,
            "partition": self._plan_partition, "isolate": self._plan_isolate,
            "bridge": self._plan_bridge, "oneway": self._plan_oneway,
            "linkdown": self._plan_linkdown, "flap": self._plan_flap}
        if kind in ("loss", "duplicate", "delay"):
            self._plan_link_fault(plan, kind)
        else:
            builders[kind](plan)

    def _minority(self) -> int:
        return (len(self.lab.names) - 1) // 2

    def _some(self, count: int) -> list[str]:
        return self.rng.sample(self.lab.names, count)

    def _plan_kill(self, plan: Plan) -> None:
        for name in self._some(self.rng.randint(1, self._minority())):
            at = self.rng.uniform(0.5, 2.0)
            plan.add(at, f"SIGKILL {name}", partial(self._kill, name))
            plan.add(at + self.rng.uniform(1.0, 6.0), f"restart {name}",
                     partial(self._restart, name))

    def _plan_pause(self, plan: Plan) -> None:
        for name in self._some(self.rng.randint(1, self._minority())):
            at = self.rng.uniform(0.5, 2.0)
            short = self.rng.random() < 0.5
            length = (self.rng.uniform(0.2, 0.7 * TOKEN_S) if short
                      else self.rng.uniform(2.0 * TOKEN_S, 6.0 * TOKEN_S))
            plan.add(at, f"SIGSTOP {name} for {length:.2f} s", partial(self.lab.pause, name))
            plan.add(at + length, f"SIGCONT {name}", partial(self.lab.resume, name))
        plan.length = max(plan.length, 3.0)

    def _plan_kill_during_sync(self, plan: Plan) -> None:
        victim = self.rng.choice(self.lab.names)
        cause = self.rng.choice(self.lab.names)
        cut = self.rng.uniform(2.0, 5.0)
        delay = self.rng.uniform(0.0, SYNC_KILL_DELAY_S)
        if self.rng.random() < 0.5:
            others = [n for n in self.lab.names if n != cause]
            plan.add(0.5, f"isolate {cause}",
                     lambda: self._set_net("sync", rules.split([[cause], others])))
            what, heal = f"heal the isolation of {cause}", partial(self._set_net, "sync", None)
        else:
            plan.add(0.5, f"SIGKILL {cause}", partial(self._kill, cause))
            what, heal = f"restart {cause}", partial(self._restart, cause, wait=False)
        plan.add(0.5 + cut, f"{what}, SIGKILL {victim} {delay * 1000:.0f} ms after the ring that "
                            f"takes {cause} back forms",
                 partial(self._kill_in_sync, heal, cause, victim, delay))
        plan.add(0.5 + cut + self.rng.uniform(1.5, 3.5), f"restart {victim}",
                 partial(self._restart, victim))

    def _kill_in_sync(self, heal: Callable[[], None], cause: str, victim: str,
                      delay: float) -> None:
        """`heal()`, then SIGKILL `victim` `delay` seconds after a daemon logs the ring that
        takes `cause` back, whose sync then runs (bounded: SYNC_WAIT_S, then it is killed
        anyway)."""
        marks = {name: self.lab.log_size(name) for name in self.lab.names}
        heal()
        deadline = time.monotonic() + SYNC_WAIT_S
        while time.monotonic() < deadline:
            if any(ring_takes_back(self.lab.log_since(name, offset), cause)
                   for name, offset in marks.items()):
                seen = time.monotonic()
                break
            time.sleep(SYNC_POLL_S)
        else:
            seen = time.monotonic()
            self.note(f"no ring with {cause} seen; killing anyway")
        time.sleep(delay)
        self._kill(victim)
        self.note(f"SIGKILL {victim} {(time.monotonic() - seen) * 1000:.0f} ms after the ring "
                  "was seen")

    def _plan_slowdisk(self, plan: Plan) -> None:
        stalls = self.rng.randint(1, 2)
        for k in range(stalls):
            at = 0.5 + k * (SLOW_STALL_S + self.rng.uniform(0.5, 2.0))
            plan.add(at, f"stall the fsyncs of {self.lab.slow_node}", self._stall)
        plan.length = max(plan.length, at + SLOW_STALL_S + 0.5)

    def _stall(self) -> None:
        if not self.lab.stall_disk():
            self.note("no slow disk to stall")

    def _network_window(self, plan: Plan, key: str, what: str, value: Rules) -> None:
        at = self.rng.uniform(0.3, 1.5)
        length = self.rng.uniform(2.0, 8.0)
        plan.add(at, f"{what}: {value.describe()}", lambda: self._set_net(key, value))
        plan.add(at + length, f"end {what}", lambda: self._set_net(key, None))

    def _plan_partition(self, plan: Plan) -> None:
        names = self.lab.names[:]
        self.rng.shuffle(names)
        cut = self.rng.randint(1, self._minority())
        minority, majority = names[:cut], names[cut:]
        self._network_window(plan, "partition", f"partition {minority} | {majority}",
                             rules.split([minority, majority]))

    def _plan_isolate(self, plan: Plan) -> None:
        node = self.rng.choice(self.lab.names)
        others = [n for n in self.lab.names if n != node]
        self._network_window(plan, "isolate", f"isolate {node}", rules.split([[node], others]))

    def _plan_bridge(self, plan: Plan) -> None:
        names = self.lab.names[:]
        self.rng.shuffle(names)
        middle, rest = names[0], names[1:]
        cut = self.rng.randint(1, len(rest) - 1)
        left, right = rest[:cut], rest[cut:]
        self._network_window(plan, "bridge", f"bridge {left} <{middle}> {right}",
                             rules.bridge(left, middle, right))

    def _plan_oneway(self, plan: Plan) -> None:
        node = self.rng.choice(self.lab.names)
        outgoing = self.rng.random() < 0.5
        what = f"{node} {'cannot send' if outgoing else 'cannot receive'}"
        self._network_window(plan, "oneway", what,
                             rules.one_way(node, self.lab.names, outgoing=outgoing))

    def _plan_link_fault(self, plan: Plan, kind: str) -> None:
        if kind == "loss":
            fault = LinkFault(loss=self.rng.uniform(0.05, 0.4))
        elif kind == "duplicate":
            fault = LinkFault(duplicate=self.rng.uniform(0.1, 0.5))
        else:
            delay = self.rng.uniform(0.005, 0.3)
            fault = LinkFault(delay_s=delay, jitter_s=delay * self.rng.uniform(0.3, 1.0))
        only = [self.rng.choice(self.lab.names)] if self.rng.random() < 0.5 else None
        where = "all links" if only is None else f"links of {only[0]}"
        self._network_window(plan, kind, f"{kind} on {where}",
                             rules.everywhere(self.lab.names, fault, only))

    def _plan_linkdown(self, plan: Plan) -> None:
        node = self.rng.choice(self.lab.names)
        at = self.rng.uniform(0.3, 1.5)
        plan.add(at, f"link of {node} down", lambda: self.lab.set_link(node, up=False))
        plan.add(at + self.rng.uniform(2.0, 8.0), f"link of {node} up",
                 lambda: self.lab.set_link(node, up=True))

    def _plan_flap(self, plan: Plan) -> None:
        node = self.rng.choice(self.lab.names)
        at = self.rng.uniform(0.3, 1.0)
        up = False
        for _ in range(self.rng.randint(3, 8)):
            plan.add(at, f"link of {node} {'up' if up else 'down'} (flap)",
                     partial(self.lab.set_link, node, up=up))
            at += self.rng.uniform(1.0, 2.0)
            up = not up
        plan.add(at, f"link of {node} up (flap ends)", lambda: self.lab.set_link(node, up=True))

    # ------------------------------------------------------------------ running

    def execute(self, plan: Plan, deadline: float) -> None:
        """Carry out `plan`'s steps at their times (a step that blocks delays the later ones),
        then wait out the plan's length; stops early at `deadline` (monotonic)."""
        start = time.monotonic()
        self.note(f"plan {plan.kind}")
        for step in plan.steps:
            wait = start + step.at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                self.note("time bound: the rest of the plan is skipped")
                return
            self.note(f"+{time.monotonic() - start:.2f} {step.what}")
            step.action()
        rest = start + plan.length - time.monotonic()
        if rest > 0:
            time.sleep(min(rest, max(0.0, deadline - time.monotonic())))

    def heal(self) -> list[str]:
        """Undo every fault (module header); one line per daemon found dead unkilled."""
        problems = []
        self._net.clear()
        self.lab.switch.set_rules(Rules())
        for name, node in self.lab.nodes.items():
            if not node.link_up:
                self.lab.set_link(name, up=True)
            self.lab.resume(name)
        for name, node in self.lab.nodes.items():
            if node.running():
                continue
            if name not in self.killed:
                status = node.proc.returncode if node.proc is not None else None
                problems.append(f"daemon of {name} died without being killed (exit {status}):"
                                f" {self.lab.log_tail(name, 5)!r}")
            self.killed.add(name)
        for name in sorted(self.killed):
            self.lab.start(name, wait=False)
            self.note(f"heal: restart {name}")
        self.killed.clear()
        for name in self.lab.names:
            if not self.lab.wait_mounted(name):
                problems.append(f"the mount of {name} did not answer after the heal")
        counters = self.lab.switch.counters.copy()
        self.note("healed; switch " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
        return problems
