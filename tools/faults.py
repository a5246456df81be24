#!/usr/bin/env python3
"""Jepsen-style faults on real pmxfs daemons: N nodes in network namespaces joined by a
user-space switch, clients writing and reading through every mount, a nemesis that kills,
pauses, partitions, degrades links and stalls a disk, and after each heal a check of the
clients' history against what pmxfs promises (tools/faultlab/history.py). Needs root, TUN and
FUSE.

    tools/faults.py [--nodes 3] [--cycles 10] [--seed S] [--kinds kill,partition,...]
                    [--dir D] [--max-seconds T] [--json]

The seed (printed; random by default) fixes every choice of the nemesis and the clients, so a
run can be replayed (the daemons' own timing is not deterministic). Violations are saved under
D/violations/cycle-K/ and their directories printed; without --dir, a run with no violation
removes its temp dir. The last lines are the summary:

    faults: C cycles, N nodes, V violations, A acked, R refused, U unknown

Exit 0 without violations, 1 with, 2 on bad usage or a lab that cannot be built here.
Everything the run made (namespaces, TUN devices, mounts, daemons, clients) is removed on any
exit, also on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from faultlab.lab import Unavailable, lab_unavailable
from faultlab.nemesis import KINDS
from faultlab.runner import Runner

SECONDS_PER_CYCLE = 90.0


class Interrupted(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: one line, exit 2."""
        self.exit(2, f"{self.prog}: {message}\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="faults.py", description=__doc__.split("\n\n")[0],
        epilog=f"kinds: {', '.join(KINDS)}")
    parser.add_argument("--nodes", type=int, default=3, help="3..7 (default 3)")
    parser.add_argument("--cycles", type=int, default=10, help="fault cycles (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma-separated fault kinds (default: all)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the run keeps its files (default: a fresh temp dir)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="no cycle starts after this many seconds; the last one and the "
                             "clean-up still finish, each wait bounded (default: cycles x "
                             f"{SECONDS_PER_CYCLE:g})")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    args = parser.parse_args(argv)
    if not 3 <= args.nodes <= 7:
        parser.error("--nodes must be between 3 and 7")
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    args.kinds = kinds
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    return args


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    why = lab_unavailable()
    if why is not None:
        print(f"faults: cannot build the lab: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    own_dir = args.dir is None  # a temp dir of ours, removed unless it holds violations
    root = args.dir or Path(tempfile.mkdtemp(prefix="pmxfs-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        root = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    budget = args.max_seconds or args.cycles * SECONDS_PER_CYCLE
    print(f"faults: seed {seed}, {args.nodes} nodes, {args.cycles} cycles, kinds "
          f"{','.join(args.kinds)}, files in {root}", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    runner = Runner(root, args.nodes, args.kinds, seed, time.monotonic() + budget)
    status = 0
    built = False
    try:
        runner.build()
        built = True
        summary = runner.run(args.cycles)
    except Unavailable as exc:
        if not built:
            print(f"faults: cannot build the lab: {exc}", file=sys.stderr)
            return 2
        summary = runner.summary  # the lab failed under the run (an `ip` command, say)
        summary.stopped_early = f"the lab failed: {exc}"
        status = 1
    except Interrupted as exc:
        summary = runner.summary
        summary.stopped_early = f"interrupted by {exc}"
        status = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        runner.close()
    if own_dir and not summary.violations and not status:
        shutil.rmtree(root, ignore_errors=True)
    for line in summary.details():
        print(line)
    print(summary.line())
    if args.json:
        print(json.dumps(summary.as_json()))
    return 1 if summary.violations or status else 0


if __name__ == "__main__":
    sys.exit(main())
