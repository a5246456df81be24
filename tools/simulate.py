"""Run the deterministic simulator over many seeds and print a summary.

    python tools/simulate.py --seeds 0-999 --nodes 3-7          # many seeds, summary
    python tools/simulate.py --seed 42 --nodes 3-7 --trace      # replay one seed with its trace
    python tools/simulate.py --workload fs --seeds 0-999 --nodes 3-5   # replicas, file workload
    python tools/simulate.py --workload lifecycle --seeds 0-999     # nodes added and removed
    python tools/simulate.py --workload qdevice --seeds 0-999 --nodes 2-5   # a quorum device
    python tools/simulate.py --seed 14 --classic               # a totem seed of the classic odds

Workloads: `totem` runs the ordered broadcast alone with application messages; `fs` runs full
replicas (totem + quorum + memdb + sync, with simulated disks) under a random file workload;
`lifecycle` runs the fs workload while an administrator adds and removes nodes at run time
(`--nodes` is then the range of the first config's node count, at least 3); `qdevice` runs it
on a cluster with a quorum device, qnetd's arbiter and every node's device client, with links to
qnetd failing and qnetd restarting, and checks that never two partitions are quorate.

Each seed draws its own fault mix (swarm testing, `pmxfs/sim/faults.py`): which fault kinds
strike at all and how often -- partitions, isolation, bridges, one-way cuts, lossy directions,
crashes and restarts, pauses, clock jumps, slow nodes, a stalled token holder, and the replica
workloads' disk faults -- with loss (0-30 %), duplication, delay and jitter on every link. The
mix is the first `fault mix` line of the trace. `--classic` runs the totem workload with the
fixed odds of the time before the swarm, with which the regression seeds of
tests/test_simulator.py were found (they replay exactly).

A violation prints the seed, the broken guarantee and the one-line command that replays it.
The same seed always gives the same trace (its hash is printed with --trace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pmxfs.sim.lifecycle_sim import run_lifecycle_chaos
from pmxfs.sim.qdevice_sim import run_qdevice_chaos
from pmxfs.sim.replica_sim import run_fs_chaos
from pmxfs.sim.totem_sim import RunResult, run_chaos


class Runner(Protocol):
    """A workload's chaos run of one seed."""

    def __call__(self, seed: int, node_range: tuple[int, int], *,
                 keep_trace: bool = False) -> RunResult: ...


RUNNERS: dict[str, Runner] = {"totem": run_chaos, "fs": run_fs_chaos,
                              "lifecycle": run_lifecycle_chaos, "qdevice": run_qdevice_chaos}
# What RunResult's accepted / delivered / confchgs count, per workload: (json key, words).
LABELS = {
    "totem": (("messages_accepted", "messages accepted"), ("messages_delivered", "deliveries"),
              ("membership_changes", "membership changes")),
    "fs": (("writes_acknowledged", "writes acknowledged"),
           ("operations_applied", "operations applied"), ("syncs", "syncs")),
}
LABELS["lifecycle"] = LABELS["qdevice"] = LABELS["fs"]


def parse_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        first = int(lo)
        last = int(hi) if sep else first
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or range: {text!r}") from None
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"bad range: {text!r}")
    return first, last


def _run(args: tuple[str, int, tuple[int, int], bool]) -> RunResult:
    workload, seed, nodes, classic = args
    if classic:
        return run_chaos(seed, nodes, swarm=None)
    return RUNNERS[workload](seed, nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seeds", type=parse_range, help="range of seeds, e.g. 0-999")
    which.add_argument("--seed", type=int, help="one seed")
    parser.add_argument("--nodes", type=parse_range, default=(3, 7), help="node count range")
    parser.add_argument("--workload", choices=sorted(RUNNERS), default="totem")
    parser.add_argument("--trace", action="store_true", help="print the trace of --seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--classic", action="store_true",
                        help="totem: the fixed fault odds of the regression seeds, no mix")
    args = parser.parse_args(argv)
    if args.classic and args.workload != "totem":
        parser.error("--classic is for the totem workload")
    node_arg = f"{args.nodes[0]}-{args.nodes[1]}"
    classic_arg = " --classic" if args.classic else ""

    if args.seed is not None:
        if args.classic:
            result = run_chaos(args.seed, args.nodes, keep_trace=args.trace, swarm=None)
        else:
            result = RUNNERS[args.workload](args.seed, args.nodes, keep_trace=args.trace)
        if args.trace:
            print("\n".join(result.trace))
            print(f"trace hash {result.trace_hash}")
        status = "ok" if result.violation is None else f"VIOLATION: {result.violation}"
        (_, accepted_words), (_, delivered_words), (_, changes_words) = LABELS[args.workload]
        print(f"seed {args.seed} ({result.nodes} nodes): {status}; {result.accepted} "
              f"{accepted_words}, {result.delivered} {delivered_words}, {result.confchgs} "
              f"{changes_words}, {result.events} events")
        return 0 if result.violation is None else 1

    first, last = args.seeds
    seeds = range(first, last + 1)
    start = time.monotonic()
    violations: list[RunResult] = []
    delivered = confchgs = accepted = 0
    work = [(args.workload, seed, args.nodes, args.classic) for seed in seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(_run, work, chunksize=4):
            delivered += result.delivered
            confchgs += result.confchgs
            accepted += result.accepted
            if result.violation is not None:
                violations.append(result)
                print(f"seed {result.seed}: VIOLATION: {result.violation}", file=sys.stderr)
                print(f"  replay: python tools/simulate.py --workload {args.workload} "
                      f"--seed {result.seed} --nodes {node_arg}{classic_arg} --trace",
                      file=sys.stderr)
    elapsed = time.monotonic() - start
    (a_key, a_words), (d_key, d_words), (c_key, c_words) = LABELS[args.workload]
    summary = {
        "workload": args.workload, "seeds": len(seeds), "nodes": node_arg,
        "violations": len(violations), a_key: accepted, d_key: delivered, c_key: confchgs,
        "seconds": round(elapsed, 1), "failed_seeds": [r.seed for r in violations],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['seeds']} seeds ({node_arg} nodes), {len(violations)} violations, "
              f"{accepted} {a_words}, {delivered} {d_words}, {confchgs} {c_words}, "
              f"{elapsed:.1f} s")
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
