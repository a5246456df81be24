"""The liveness scenarios of issue 12 at full length, by hand: a stalled disk under one node, and
every core busy, each on three real daemons with FUSE mounts (root, /dev/fuse).

    python tools/liveness.py [--scenario disk|cpu|all] [--seconds 120] [--short] [--json-only]

* disk: node3's data directory is tools/slowdisk.py; its fsyncs stall 5 s, ten times, 2 s
  apart, while 4 writers on each of node1 and node2 write files, one every 50 ms, for as long
  as the stalls last.
* cpu: corosync's default timers; for SECONDS, one writer per node writes a file every 0.2 s,
  (a) on idle cores, then with 2 x nproc busy loops at normal priority and the daemons (b) as
  they schedule themselves, (c) at normal priority, (d) under SCHED_RR at the priority of
  pmxfs/runtime/scheduling.py (set on every daemon thread once it is up).
--short runs the CI lengths instead (one stall, 3 files per writer; 20 s).

For each run: ring changes (nodes whose ring id or members differ after), the growth of the totem
counters (token_lost, rings_installed, token_retransmits), writes done / failed / never returned,
write latency (p50, p95, max), and acknowledged writes missing or wrong on some node's mount or
config.db. It prints one JSON object, then a table. The scenarios themselves are
tests/liveness_harness.py, the same code the CI tests run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
harness: Any = importlib.import_module("liveness_harness")

COLUMNS = ("run", "ring changes", "token lost", "rings", "token rexmit", "writes", "failed",
           "never returned", "p50 ms", "p95 ms", "max ms", "lost", "policy")


def disk_runs(short: bool) -> list[tuple[str, Any]]:
    plan = harness.SLOW_DISK_CI if short else harness.SLOW_DISK_FULL
    return [("disk: node3 fsync stalls", lambda root: harness.run_slow_disk(root, plan))]


def cpu_runs(seconds: float) -> list[tuple[str, Any]]:
    variants = [("cpu: idle cores", {"loops_per_core": 0}),
                ("cpu: busy, daemons' own policy", {}),
                ("cpu: busy, normal priority", {"policy": "normal"}),
                ("cpu: busy, SCHED_RR", {"policy": "rr"})]
    return [(name, lambda root, kw=kw: harness.run_cpu_saturation(
                root, harness.CpuPlan(seconds=seconds, **kw)))
            for name, kw in variants]


def row(name: str, summary: dict[str, Any]) -> list[str]:
    deltas = summary["counter_deltas"]
    latency = summary["latency_ms"]
    policies = sorted(set(summary["policies"].values()))
    return [name, str(len(summary["ring_changes"])), str(deltas["token_lost"]),
            str(deltas["rings_installed"]), str(deltas["token_retransmits"]),
            str(summary["writes"]), str(summary["failed_writes"]), str(summary["unfinished"]),
            str(latency.get("p50", "-")), str(latency.get("p95", "-")),
            str(latency.get("max", "-")), str(len(summary["lost"])), ",".join(policies)]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [list(COLUMNS), *rows]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("disk", "cpu", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=harness.CPU_FULL_S,
                        help=f"length of each CPU saturation (default {harness.CPU_FULL_S:g})")
    parser.add_argument("--short", action="store_true", help="the CI lengths")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the runs keep their daemons' files (default /var/tmp)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    runs: list[tuple[str, Any]] = []
    if args.scenario in ("disk", "all"):
        runs += disk_runs(args.short)
    if args.scenario in ("cpu", "all"):
        runs += cpu_runs(harness.CPU_CI_S if args.short else args.seconds)
    results: dict[str, dict[str, Any]] = {}
    for name, run in runs:
        with tempfile.TemporaryDirectory(prefix="pmxfs-liveness-", dir=args.dir) as root:
            summary: dict[str, Any] = run(Path(root)).summary()
        summary.pop("before")
        summary.pop("after")
        results[name] = summary
        if not args.json_only:
            print(f"liveness: {name} done", file=sys.stderr)
    print(json.dumps(results))
    if not args.json_only:
        print()
        print(table([row(name, summary) for name, summary in results.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
