"""The fault harness's checker: what a client history, the final trees and lost+found must satisfy.

Clients write through the mounts and record every operation (`Op`): its start and end on the
machine's monotonic clock and its outcome. A write is *acknowledged* when close returned 0,
*refused* when it failed with an errno that means "not applied" (`REFUSED`: pmxfs refuses before
anything is sent, or the ring decided against it), and *unknown* otherwise (ETIMEDOUT, a daemon
that died under it, no answer at all): an unknown write may take effect at any later time, so it
is never taken as ordered before anything. Write values are unique, so a value names its write.

The read guarantees pmxfs gives, and so exactly what is checked (docs/design.md §5, "Reads"):
* every value read was written (never a value from nowhere or from the future). One exception
  by design (docs/tree-rules.md, "New files"): a file being created shows at once, empty, on the
  node that creates it; an empty read there while a write of the key through that node is under
  way counts as the key not existing yet;
* per node and daemon run, reads never go back past an acknowledged value: once a read that
  began after write w was acknowledged returned w's value, no later read there returns a value
  whose acknowledged write ended before w started, nor finds the key missing. Acknowledged means
  on disk on every member of the proposer's ring, and a sync adopts only the tree of the newest
  quorate ring, which holds every acknowledged write (majorities intersect); only a restart goes
  back to the disk, which may lack what was applied but not yet written when the node died. A
  read that returned w before its acknowledgement sets no floor: w may have been delivered only
  here, in the tail of a ring the others left; the next sync then takes it away and the
  proposer sends it again, and it is acknowledged once applied anew (docs/design.md §5);
* read-your-writes: after a write is acknowledged on a node, reads there (in any later run: the
  write is on its disk) return it or a value not ordered before it;
* a read may return a value that is later lost: a write delivered only on this node in the tail
  of a ring the others left is visible here until the next sync (never acknowledged). Reads are
  local, so two nodes can return different values at the same moment.

After a heal: every mount holds the same tree; every key that had an acknowledged write holds
the value of an acknowledged or unknown write that no acknowledged write started after (in real
time, an acknowledged write that started after another one's acknowledgement is ordered after
it); no refused value survives anywhere; lost+found holds no acknowledged value.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

OpKind = Literal["write", "read"]
EventKind = Literal["killed", "started", "paused", "resumed"]
Outcome = Literal["acked", "refused", "unknown"]

# Errnos after which the write was certainly not applied: refused by this node before anything
# was sent, or decided against by the ring (no quorum, a rule of the tree).
REFUSED = frozenset({"EACCES", "EPERM", "EROFS", "EINVAL", "ENOSPC", "EEXIST", "ENAMETOOLONG",
                     "EFBIG", "EDQUOT", "EISDIR", "ENOTDIR", "ENOENT"})


@dataclass(frozen=True, slots=True)
class Op:
    client: str
    node: str
    kind: OpKind
    key: str
    value: str | None
    start: float
    end: float | None
    outcome: str


@dataclass(frozen=True, slots=True)
class NodeEvent:
    t: float
    node: str
    kind: EventKind


@dataclass(frozen=True)
class CheckInput:
    ops: Sequence[Op]
    events: Sequence[NodeEvent]
    final_trees: Mapping[str, Mapping[str, str]]
    lost_found: Mapping[str, Sequence[str]]


def classify(op: Op) -> Outcome:
    if op.outcome == "ok":
        return "acked"
    if op.outcome in REFUSED:
        return "refused"
    return "unknown"


def write_counts(ops: Sequence[Op]) -> dict[Outcome, int]:
    """How many writes were acknowledged, refused and left unknown."""
    counts: dict[Outcome, int] = {"acked": 0, "refused": 0, "unknown": 0}
    for op in ops:
        if op.kind == "write":
            counts[classify(op)] += 1
    return counts


def _acked_end(write: Op) -> float:
    """When `write` is known to have taken effect: its end if acknowledged, else never."""
    if classify(write) == "acked" and write.end is not None:
        return write.end
    return math.inf


def _describe(op: Op) -> str:
    end = "-" if op.end is None else f"{op.end:.3f}"
    return (f"{op.kind} {op.key}={op.value!r} by {op.client} on {op.node} "
            f"[{op.start:.3f}, {end}] {op.outcome}")


class _Report:
    """Every violation, one line each: the history grows over a whole run and the harness
    reports each line once, so none may be left out here."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, check: str, text: str) -> None:
        self.lines.append(f"{check}: {text}")


def check(data: CheckInput) -> list[str]:
    """One readable line per violation; empty when every guarantee held."""
    report = _Report()
    writes = {op.value: op for op in data.ops if op.kind == "write" and op.value is not None}
    _check_trees_identical(data.final_trees, report)
    _check_final_values(data.ops, writes, data.final_trees, report)
    _check_lost_found(writes, data.lost_found, report)
    _check_reads(data.ops, data.events, writes, report)
    return report.lines


def _check_trees_identical(trees: Mapping[str, Mapping[str, str]], report: _Report) -> None:
    if not trees:
        return
    first_node = min(trees)
    reference = trees[first_node]
    for node, tree in sorted(trees.items()):
        if tree == reference:
            continue
        differing = sorted(k for k in set(tree) | set(reference)
                           if tree.get(k) != reference.get(k))
        shown = ", ".join(f"{k}: {reference.get(k)!r} vs {tree.get(k)!r}" for k in differing[:5])
        report.add("trees differ", f"{first_node} and {node} differ in {len(differing)} keys "
                                   f"({shown})")


def _check_final_values(ops: Sequence[Op], writes: Mapping[str, Op],
                        trees: Mapping[str, Mapping[str, str]], report: _Report) -> None:
    # Per key, the latest start of an acknowledged write: anything acknowledged before it is
    # ordered before it.
    latest_acked: dict[str, Op] = {}
    for op in ops:
        if op.kind == "write" and classify(op) == "acked":
            known = latest_acked.get(op.key)
            if known is None or op.start > known.start:
                latest_acked[op.key] = op
    for node, tree in sorted(trees.items()):
        for key, newest in sorted(latest_acked.items()):
            value = tree.get(key)
            if value is None:
                report.add("acknowledged write lost",
                           f"{key} is missing on {node}; {_describe(newest)}")
                continue
            held = writes.get(value)
            if held is None or held.key != key:
                report.add("value from nowhere", f"{node} holds {key}={value!r}, never written")
            elif _acked_end(held) < newest.start:
                report.add("acknowledged write lost",
                           f"{node} holds {key}={value!r} ({_describe(held)}) but "
                           f"{_describe(newest)} started after it was acknowledged")
        for value in sorted(tree.values()):
            held = writes.get(value)
            if held is not None and classify(held) == "refused":
                report.add("refused write applied", f"{node} holds {_describe(held)}")


def _check_lost_found(writes: Mapping[str, Op], lost_found: Mapping[str, Sequence[str]],
                      report: _Report) -> None:
    for node, contents in sorted(lost_found.items()):
        for content in contents:
            held = writes.get(content)
            if held is not None and classify(held) == "acked":
                report.add("acknowledged write in lost+found", f"{node}: {_describe(held)}")


def _incarnations(events: Sequence[NodeEvent]) -> dict[str, list[tuple[float, str]]]:
    by_node: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for event in sorted(events, key=lambda e: e.t):
        if event.kind in ("killed", "started"):
            by_node[event.node].append((event.t, event.kind))
    return by_node


def _run_of(changes: list[tuple[float, str]], start: float, end: float) -> int | None:
    """The daemon run a read between `start` and `end` went to (counted in starts), or None
    when the daemon was killed or started while it ran."""
    run = 0
    for t, _ in changes:
        if t < start:
            run += 1
        elif t <= end:
            return None
    return run


def _check_reads(ops: Sequence[Op], events: Sequence[NodeEvent], writes: Mapping[str, Op],
                 report: _Report) -> None:
    changes = _incarnations(events)
    reads: dict[tuple[str, str], list[tuple[float, float, int, Op]]] = defaultdict(list)
    own_acks: dict[tuple[str, str], list[Op]] = defaultdict(list)
    node_writes: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "write":
            node_writes[(op.node, op.key)].append(op)
            if classify(op) == "acked" and op.end is not None:
                own_acks[(op.node, op.key)].append(op)
    for recorded in ops:
        if recorded.kind != "read" or recorded.outcome != "ok" or recorded.end is None:
            continue
        end = recorded.end
        op = recorded
        if op.value == "" and _creating(node_writes.get((op.node, op.key), []), op):
            op = replace(op, value=None)
        if op.value is not None:
            written = writes.get(op.value)
            if written is None or written.key != op.key:
                report.add("read of a value never written", _describe(op))
                continue
            if written.start > end:
                report.add("read from the future", f"{_describe(op)} before {_describe(written)}")
                continue
        run = _run_of(changes.get(op.node, []), op.start, end)
        if run is not None:
            reads[(op.node, op.key)].append((op.start, end, run, op))
    for (node, key), node_reads in reads.items():
        _check_read_floor(sorted(node_reads, key=lambda r: r[0]),
                          sorted(own_acks.get((node, key), []), key=lambda w: w.end or 0.0),
                          writes, report)


def _creating(writes: Sequence[Op], read: Op) -> bool:
    """Whether one of `writes` (of the read's key, through its node) was under way while
    `read` ran: the file it creates shows there, empty, until its content is committed."""
    assert read.end is not None
    return any(w.start < read.end and (w.end is None or w.end > read.start) for w in writes)


def _check_read_floor(node_reads: list[tuple[float, float, int, Op]], acks: list[Op],
                      writes: Mapping[str, Op], report: _Report) -> None:
    """One node's reads of one key in start order: each must not return a value ordered before
    the floor -- the newest write acknowledged before an earlier finished read of the same run
    began and returned by it, or that this node acknowledged before the read began."""
    seen: list[tuple[float, int, int, Op]] = []  # (read end, order, run, write it returned)
    floor_by_run: dict[int, Op] = {}
    ack_index = 0
    ack_floor: Op | None = None
    for order, (start, end, run, read) in enumerate(node_reads):
        while seen and seen[0][0] < start:
            _, _, seen_run, write = heapq.heappop(seen)
            known = floor_by_run.get(seen_run)
            if known is None or write.start > known.start:
                floor_by_run[seen_run] = write
        while ack_index < len(acks) and (acks[ack_index].end or 0.0) < start:
            if ack_floor is None or acks[ack_index].start > ack_floor.start:
                ack_floor = acks[ack_index]
            ack_index += 1
        floors = [(w, why) for w, why in ((floor_by_run.get(run), "an earlier read returned"),
                                          (ack_floor, "this node acknowledged"))
                  if w is not None]
        held = None if read.value is None else writes[read.value]
        for floor, why in floors:
            if held is None or _acked_end(held) < floor.start:
                check = ("read went back" if why.startswith("an earlier")
                         else "read lost its own write")
                report.add(check, f"{_describe(read)}; {why} {_describe(floor)}")
                break
        if held is not None and _acked_end(held) < start:
            heapq.heappush(seen, (end, order, run, held))
