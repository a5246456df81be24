"""One run of the fault harness: build the lab, then cycles of fault, heal, converge, check.

A cycle (`Runner.cycle`):
1. the clients of every node start (a fresh counter base) and the nemesis carries out its plan;
2. heal: every fault undone, paused daemons continued, killed ones restarted; a daemon found
   dead that the nemesis did not kill is a violation;
3. converge: until every node answers with one ring of all nodes, quorate and synced (deadline
   CONVERGE_S, else a violation "did not converge"); the time from the heal is the cycle's
   convergence time;
4. quiesce the clients, then wait until every mount holds the same workload tree (the checker
   reports trees that still differ after TREES_S);
5. read the final trees and every node's lost+found, and hand them with the whole history (it
   is cumulative over the run) and the daemons' start/kill/pause events to `history.check`;
   check that every daemon is alive;
6. a cycle with new violations saves under DIR/violations/cycle-K/: every daemon's log, the
   history, the nemesis log, the events, the final trees and lost+found, and the violations.
A violation line already reported by an earlier cycle is not counted again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from faultlab.client import WORKLOAD
from faultlab.history import CheckInput, check, write_counts
from faultlab.lab import Lab, Unavailable, bounded
from faultlab.nemesis import Nemesis
from faultlab.workload import ClientSet, History, prepare

CONVERGE_S = 120.0
TREES_S = 30.0
READ_TREE_S = 15.0
READ_ATTEMPTS = 3
WARMUP_S = 1.0
POLL_S = 0.3
PRINTED_VIOLATIONS = 20  # per cycle on the terminal; violations.txt has them all


@dataclass
class Summary:
    seed: int
    nodes: int
    cycles: int = 0
    violations: int = 0
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    converge_s: list[float] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    violation_dirs: list[str] = field(default_factory=list)
    stopped_early: str | None = None
    seconds: float = 0.0

    def line(self) -> str:
        return (f"faults: {self.cycles} cycles, {self.nodes} nodes, {self.violations} "
                f"violations, {self.acked} acked, {self.refused} refused, {self.unknown} unknown")

    def details(self) -> list[str]:
        out = [f"seed {self.seed}, {self.seconds:.0f} s"]
        if self.converge_s:
            out.append(f"converge after heal: median {statistics.median(self.converge_s):.1f} s,"
                       f" max {max(self.converge_s):.1f} s")
        if self.cycle_s:
            out.append(f"cycle: median {statistics.median(self.cycle_s):.1f} s, "
                       f"max {max(self.cycle_s):.1f} s")
        out.append("kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())))
        out += [f"violations saved in {d}" for d in self.violation_dirs]
        if self.stopped_early:
            out.append(f"stopped early: {self.stopped_early}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "nodes": self.nodes, "violations": self.violations,
                "acked": self.acked, "refused": self.refused, "unknown": self.unknown,
                "converge_median_s": (round(statistics.median(self.converge_s), 3)
                                      if self.converge_s else None),
                "converge_max_s": round(max(self.converge_s), 3) if self.converge_s else None,
                "cycle_median_s": (round(statistics.median(self.cycle_s), 3)
                                   if self.cycle_s else None),
                "kinds": dict(self.kinds), "seed": self.seed,
                "seconds": round(self.seconds, 1), "violation_dirs": self.violation_dirs,
                "stopped_early": self.stopped_early}


def read_tree(root: Path) -> dict[str, str]:
    """key -> content of every file under `root`; OSError when any of it cannot be read (os.walk
    would skip a directory it cannot list: a dead mount would read as an empty tree)."""
    tree = {}
    for dirpath, _, files in os.walk(root, onerror=_raise):
        for name in files:
            path = Path(dirpath) / name
            tree[str(path.relative_to(root))] = path.read_text(errors="replace")
    return tree


def _raise(exc: OSError) -> None:
    raise exc


def tree_or_none(root: Path) -> dict[str, str] | None:
    """`read_tree(root)`, or None when the mount does not answer it (ENOTCONN, ...)."""
    try:
        return read_tree(root)
    except OSError:
        return None


def read_lost_found(data_dir: Path) -> list[str]:
    """The contents of every file under the data directory's lost+found (none: no directory).
    A file the daemon is writing right now may vanish between listing and reading: retried."""
    lost_found = data_dir / "lost+found"
    for attempt in range(1, READ_ATTEMPTS + 1):
        if not lost_found.exists():
            return []
        try:
            return list(read_tree(lost_found).values())
        except FileNotFoundError:
            if attempt == READ_ATTEMPTS:
                raise
    return []


class Runner:
    def __init__(self, root: Path, nodes: int, kinds: list[str], seed: int,
                 deadline: float, echo: bool = True) -> None:
        self.root = root
        self.kinds = kinds
        self.seed = seed
        self.deadline = deadline
        self.echo = echo
        self.rng = random.Random(seed)
        slow = f"n{nodes}" if ("slowdisk" in kinds or "combo" in kinds) else None
        self.lab = Lab(root / "lab", nodes, seed, slow)
        self.nemesis_log = open(root / "nemesis.log", "a", encoding="utf-8")  # noqa: SIM115
        self.nemesis = Nemesis(self.lab, self.rng, self.nemesis_log)
        self.clients = ClientSet(root, {n.name: n.mount for n in self.lab.nodes.values()}, seed)
        self.history = History([self.clients.history_file(n) for n in self.lab.names])
        self.summary = Summary(seed, nodes)
        self.reported: set[str] = set()
        self._order: list[str] = []

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def build(self) -> None:
        (self.root / "lab").mkdir(parents=True)
        self.lab.build()
        why = self._converge(min(self.deadline, time.monotonic() + CONVERGE_S))
        if why is not None:
            raise Unavailable(f"the cluster did not form: {why}")
        first = self.lab.nodes[self.lab.names[0]].mount
        prepare(first)
        end = time.monotonic() + TREES_S
        while not all((n.mount / WORKLOAD / "own").is_dir() for n in self.lab.nodes.values()):
            if time.monotonic() > end:
                raise Unavailable("the workload directory did not reach every node")
            time.sleep(POLL_S)

    def next_kind(self) -> str:
        """Kinds in rounds: each round a shuffled order of all the kinds asked for."""
        if not self._order:
            self._order = self.kinds[:]
            self.rng.shuffle(self._order)
        return self._order.pop()

    def run(self, cycles: int) -> Summary:
        started = time.monotonic()
        try:
            for number in range(1, cycles + 1):
                if time.monotonic() >= self.deadline:
                    self.summary.stopped_early = f"time bound reached before cycle {number}"
                    break
                self.cycle(number)
        finally:
            self.summary.seconds = time.monotonic() - started
            counts = write_counts(self.history.ops())
            self.summary.acked = counts["acked"]
            self.summary.refused = counts["refused"]
            self.summary.unknown = counts["unknown"]
        return self.summary

    def cycle(self, number: int) -> None:
        cycle_start = time.monotonic()
        kind = self.next_kind()
        self.clients.start(number)
        time.sleep(WARMUP_S)
        plan = self.nemesis.plan(kind)
        self.summary.kinds[kind] += 1
        self.nemesis.execute(plan, self.deadline)
        problems = []
        heal_at = time.monotonic()
        problems += self.nemesis.heal()
        why = self._converge(min(heal_at + CONVERGE_S, self.deadline + CONVERGE_S))
        converge = time.monotonic() - heal_at
        if why is None:
            self.summary.converge_s.append(converge)
        else:
            problems.append(f"did not converge within {converge:.0f} s after the heal: {why}")
        stuck = self.clients.stop()
        if stuck:
            self.nemesis.note(f"client processes killed after the quiesce bound: {stuck}")
        trees, lost_found, tree_problems = self._final_state()
        problems += tree_problems
        ops = self.history.ops()
        problems += check(CheckInput(ops, list(self.lab.events), trees, lost_found))
        problems += [f"daemon of {name} is not running after the checks"
                     for name in self.lab.dead()]
        new = [p for p in problems if p not in self.reported]
        self.reported.update(new)
        self.summary.cycles += 1
        self.summary.violations += len(new)
        elapsed = time.monotonic() - cycle_start
        self.summary.cycle_s.append(elapsed)
        counts = write_counts(ops)
        self.say(f"cycle {number} {plan.kind}: converged in {converge:.1f} s, "
                 f"{len(new)} violations, {elapsed:.0f} s "
                 f"(acked {counts['acked']}, refused {counts['refused']}, "
                 f"unknown {counts['unknown']})")
        for line in new[:PRINTED_VIOLATIONS]:
            self.say(f"  VIOLATION {line}")
        if len(new) > PRINTED_VIOLATIONS:
            self.say(f"  ... and {len(new) - PRINTED_VIOLATIONS} more (all in violations.txt)")
        if new:
            self._save(number, new, trees, lost_found)

    def _converge(self, deadline: float) -> str | None:
        """None once the ring is together (Lab.ring_together), else the last reason."""
        why = self.lab.ring_together()
        while why is not None and time.monotonic() < deadline:
            time.sleep(POLL_S)
            why = self.lab.ring_together()
        return why

    def _final_state(self) -> tuple[dict[str, dict[str, str]], dict[str, list[str]], list[str]]:
        problems: list[str] = []
        end = time.monotonic() + TREES_S
        trees: dict[str, dict[str, str]] = {}
        while True:
            trees = {}
            for name, node in self.lab.nodes.items():
                tree = bounded(partial(tree_or_none, node.mount / WORKLOAD), READ_TREE_S)
                if tree is not None:
                    trees[name] = tree
            if len(trees) < len(self.lab.nodes) or time.monotonic() > end:
                break
            if all(t == trees[self.lab.names[0]] for t in trees.values()):
                break
            time.sleep(POLL_S)
        problems += [f"the mount of {name} did not answer a read of the tree"
                     for name in self.lab.names if name not in trees]
        lost_found = {name: read_lost_found(node.backing)
                      for name, node in self.lab.nodes.items()}
        return trees, lost_found, problems

    def _save(self, number: int, lines: list[str], trees: dict[str, dict[str, str]],
              lost_found: dict[str, list[str]]) -> None:
        out = self.root / "violations" / f"cycle-{number}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "violations.txt").write_text("\n".join(lines) + "\n")
        for name, node in self.lab.nodes.items():
            for source, target in ((node.log, f"{name}-daemon.log"),
                                   (node.home / "slowdisk.log", f"{name}-slowdisk.log")):
                if source.exists():
                    shutil.copy2(source, out / target)
        self.history.dump(out / "history.jsonl")
        self.nemesis_log.flush()
        shutil.copy2(self.root / "nemesis.log", out / "nemesis.log")
        with open(out / "events.jsonl", "w", encoding="utf-8") as f:
            for event in self.lab.events:
                f.write(json.dumps(asdict(event)) + "\n")
        (out / "final.json").write_text(json.dumps({"trees": trees, "lost_found": lost_found},
                                                   indent=1, sort_keys=True))
        self.summary.violation_dirs.append(str(out))
        self.say(f"  saved in {out}")

    def close(self) -> None:
        self.clients.close()
        self.lab.close()
        self.nemesis_log.close()
