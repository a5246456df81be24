"""Benchmark: a returning node's sync of a large tree, with real daemons (issue 12).

    python tools/bench_sync.py [--files 10000] [--mib 50] [--token MS] [--variants kept,empty]
                               [--kill] [--writers 8] [--profile DIR] [--json-only]

The full-size run of `tests/test_large_sync.py` (which CI runs shortened). Three daemons with
FUSE mounts on 127.0.0.81-83 (root and /dev/fuse needed); node3 is stopped (SIGTERM, or SIGKILL
with --kill), node1 gets FILES files totalling MIB MiB from WRITERS threads, then node3 comes
back -- with its data directory ("kept") and again with an empty one ("empty", a full transfer).
Without --token the config has no token line: corosync's default timers (3650 ms for three
nodes). The scenario and what each figure means are in `tests/sync_harness.py`:
* sync time: node3's start -> it is in node1's ring -> synced with node1's tree checksum ->
  a write on node3 read on node1 and node2;
* per survivor: token losses and rings installed over the return (no loss and exactly one ring,
  the join, is the goal), datagrams sent and received (the transport counts no bytes);
* the slowest control-socket answer of each node meanwhile: the socket is served by the trio
  loop that passes the token, so it bounds how long the token could have been held.

--profile DIR records node1 and node3 with py-spy while node3 returns (one Chrome trace per
node and variant, DIR/sync-<variant>-<node>.json, for https://ui.perfetto.dev) and summarises
the trio thread of each: share of time busy, the longest busy stretch (no return to epoll, so
no token could be passed) and the pmxfs frame that spans it, and the functions with the most
self and inclusive time. py-spy samples without stopping the process (--nonblocking, 250 Hz).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the daemon harness of the tests

# tests/ is not on mypy's path: the harness is typed and checked on its own (module header)
from sync_harness import (  # type: ignore[import-not-found]  # noqa: E402
    EMPTY,
    KEPT,
    run_scenario,
)

PY_SPY = Path(sys.executable).parent / "py-spy"
PROFILE_RATE_HZ = 250
PROFILE_STOP_TIMEOUT_S = 60.0
PROFILED = ("node1", "node3")
IDLE_LEAF = "get_events"  # trio's wait in epoll: the loop has nothing to do
TOP = 8
LOOP_SHARE = 0.95  # a frame on the stack this much of the busy time is the loop itself
VARIANTS = {"kept": KEPT, "empty": EMPTY}

Frame = tuple[str, str]  # function name, file


# ---------------------------------------------------------------------------- recording


class Recorder:
    """py-spy on each profiled node while node3 returns: `start` is the harness's `on_start`
    hook, the function it returns stops the recording once the return is measured."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.returns = 0
        self.traces: dict[str, dict[str, Path]] = {}  # variant -> node -> trace

    def start(self, variant: str, pids: Mapping[str, int]) -> Callable[[], None]:
        self.returns += 1
        running = []
        for node in PROFILED:
            out = self.directory / f"sync-{self.returns}-{variant.replace(' ', '-')}-{node}.json"
            self.traces.setdefault(variant, {})[node] = out
            running.append(subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(pids[node]), "--rate",
                 str(PROFILE_RATE_HZ), "--idle", "--nonblocking", "--format", "chrometrace",
                 "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return lambda: _stop(running)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGINT (py-spy writes its trace then) and wait, by PID."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(PROFILE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(PROFILE_STOP_TIMEOUT_S)


# ---------------------------------------------------------------------------- summarising


@dataclass(frozen=True)
class Segment:
    start_us: int
    end_us: int
    stack: tuple[Frame, ...]  # outermost first

    @property
    def us(self) -> int:
        return self.end_us - self.start_us

    @property
    def idle(self) -> bool:
        return not self.stack or self.stack[-1][0].endswith(IDLE_LEAF)


def segments(events: Sequence[Mapping[str, Any]]) -> dict[int, list[Segment]]:
    """Per thread, the stack py-spy saw between one change and the next (its B/E events)."""
    stacks: dict[int, list[Frame]] = {}
    last: dict[int, int] = {}
    out: dict[int, list[Segment]] = {}
    for event in events:
        tid, ts = int(event["tid"]), int(event["ts"])
        stack = stacks.setdefault(tid, [])
        if tid in last and ts > last[tid] and stack:
            out.setdefault(tid, []).append(Segment(last[tid], ts, tuple(stack)))
        last[tid] = ts
        if event["ph"] == "B":
            stack.append((str(event["name"]), str(event["args"]["filename"])))
        elif stack:
            stack.pop()
    return out


def _stretches(timeline: list[Segment]) -> Iterator[list[Segment]]:
    """Runs of consecutive busy segments."""
    run: list[Segment] = []
    for seg in timeline:
        if seg.idle:
            if run:
                yield run
            run = []
        else:
            run.append(seg)
    if run:
        yield run


def _spanning_frame(run: list[Segment]) -> str:
    """The innermost pmxfs frame on the stack during the whole run."""
    common = list(run[0].stack)
    for seg in run[1:]:
        n = next((i for i, (a, b) in enumerate(zip(common, seg.stack, strict=False)) if a != b),
                 min(len(common), len(seg.stack)))
        common = common[:n]
    ours = [f"{name} ({file})" for name, file in common if "pmxfs" in file]
    return ours[-1] if ours else (f"{common[-1][0]} ({common[-1][1]})" if common else "?")


def _label(frame: Frame) -> str:
    name, file = frame
    return f"{name} ({file.rsplit('/', 1)[-1]})"


def _shares(busy: Sequence[Segment]) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The TOP functions by self time, and the TOP pmxfs functions by inclusive time (leaving
    out those on the stack nearly all the time: the loop and its callers), in % of `busy`."""
    total = sum(s.us for s in busy)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for seg in busy:
        own[_label(seg.stack[-1])] += seg.us
        for label in {_label(f) for f in seg.stack if "/pmxfs/" in f[1]}:
            inclusive[label] += seg.us
    loop = {k for k, v in inclusive.items() if v >= LOOP_SHARE * total}

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        top = [(k, v) for k, v in counter.most_common() if k not in loop][:TOP]
        return [(k, round(100 * v / total, 1)) for k, v in top] if total else []

    return pct(own), pct(inclusive)


def summarise(trace: Path) -> dict[str, Any]:
    """The trio thread of one trace, from the loop's first wait in epoll on (what comes before
    is start-up, outside any ring): busy share, longest busy stretch, top functions."""
    per_thread = segments(json.loads(trace.read_text()))
    trio_threads = [t for t in per_thread.values() if any(s.idle for s in t)]
    if not trio_threads:
        return {"error": f"no trio thread in {trace}"}
    recorded = max(trio_threads, key=len)
    first_wait = next(i for i, s in enumerate(recorded) if s.idle)
    timeline = recorded[first_wait:]
    wall = timeline[-1].end_us - timeline[0].start_us
    busy = [s for s in timeline if not s.idle]
    runs = list(_stretches(timeline))
    longest = max(runs, key=lambda r: r[-1].end_us - r[0].start_us, default=[])
    top_self, top_inclusive = _shares(busy)
    return {
        "trace": str(trace),
        "start_up_ms": round((timeline[0].start_us - recorded[0].start_us) / 1000, 1),
        "wall_ms": round(wall / 1000, 1),
        "busy_pct": round(100 * sum(s.us for s in busy) / wall, 1) if wall else 0.0,
        "busy_stretches_over_100ms": sum(1 for r in runs
                                         if r[-1].end_us - r[0].start_us > 100_000),
        "longest_busy_ms": round((longest[-1].end_us - longest[0].start_us) / 1000, 1)
        if longest else 0.0,
        "longest_busy_at_ms": round((longest[0].start_us - timeline[0].start_us) / 1000, 1)
        if longest else 0.0,
        "longest_busy_in": _spanning_frame(longest) if longest else "",
        "longest_busy_inclusive_pct": _shares(longest)[1][:3] if longest else [],
        "top_self_pct": top_self,
        "top_inclusive_pct": top_inclusive,
    }


# ---------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    specs = tuple(dataclasses.replace(VARIANTS[v], signal=signal.SIGKILL) if args.kill
                  else VARIANTS[v] for v in args.variants)
    recorder = Recorder(args.profile) if args.profile is not None else None
    with tempfile.TemporaryDirectory(prefix="pmxfs-bench-sync-") as tmp:
        result = run_scenario(Path(tmp), files=args.files, total_bytes=args.mib << 20,
                              token_ms=args.token, specs=specs, writers=args.writers,
                              first=81, on_start=recorder.start if recorder else None)
    out: dict[str, Any] = result.to_json()
    out["stopped_by"] = "SIGKILL" if args.kill else "SIGTERM"
    if recorder is not None:
        out["profiles"] = {variant: {node: summarise(path) for node, path in nodes.items()
                                     if path.exists()}
                           for variant, nodes in recorder.traces.items()}
    return out


def table(out: Mapping[str, Any]) -> str:
    token = "corosync default" if out["token_ms"] is None else f"{out['token_ms']} ms"
    lines = [f"{out['files']} files, {out['total_bytes'] / (1 << 20):.1f} MiB, token {token}, "
             f"node3 stopped by {out['stopped_by']}; writing the tree on node1: "
             f"{out['write_s']} s", "",
             f"{'figure':44} " + " ".join(f"{r['variant']:>14}" for r in out["returns"])]

    def row(name: str, cell: Any) -> None:
        lines.append(f"{name:44} " + " ".join(f"{cell(r)!s:>14}" for r in out["returns"]))

    row("node3 start -> in node1's ring (s)", lambda r: r["in_ring_s"])
    row("node3 start -> synced, same checksum (s)", lambda r: r["synced_s"])
    row("  (goal <= 3 s from the ring)", lambda r: round(r["synced_s"] - r["in_ring_s"], 3))
    row("node3 start -> its write read on 1 and 2 (s)", lambda r: r["confirmed_s"])
    for name in ("node1", "node2"):
        row(f"{name}: token lost / rings installed", lambda r, n=name: (
            f"{r['survivors'][n]['token_lost']} / {r['survivors'][n]['rings_installed']}"))
    row("node1: datagrams sent", lambda r: r["survivors"]["node1"]["datagrams_sent"])
    row("node3: datagrams received", lambda r: r["joiner"]["datagrams_received"])
    for name in ("node1", "node2", "node3"):
        row(f"{name}: slowest control answer (ms)", lambda r, n=name: r["slowest_answer_ms"][n])
    for variant, nodes in out.get("profiles", {}).items():
        for node, p in nodes.items():
            if "error" in p:
                lines.append(f"\nprofile {variant} {node}: {p['error']}")
                continue
            lines += ["", f"profile {variant}, {node}: trio thread, {p['wall_ms']} ms after "
                      f"{p['start_up_ms']} ms of start-up: busy {p['busy_pct']} %, "
                      f"{p['busy_stretches_over_100ms']} busy stretches over 100 ms, the "
                      f"longest {p['longest_busy_ms']} ms (at {p['longest_busy_at_ms']} ms) in",
                      f"  {p['longest_busy_in']}: "
                      + ", ".join(f"{n} {pct} %" for n, pct in p["longest_busy_inclusive_pct"])]
            lines += [f"  self {pct:5.1f} %  {name}" for name, pct in p["top_self_pct"]]
            lines += [f"  incl {pct:5.1f} %  {name}" for name, pct in p["top_inclusive_pct"]]
    return "\n".join(lines)


def variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(VARIANTS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mib", type=int, default=50, help="total size of the files")
    parser.add_argument("--token", type=int, default=None,
                        help="token timeout in ms (default: none in the config, corosync's)")
    parser.add_argument("--variants", type=variants, default=["kept", "empty"],
                        help="kept, empty or both (comma-separated)")
    parser.add_argument("--kill", action="store_true", help="stop node3 with SIGKILL")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="record node1 and node3 with py-spy into DIR")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if args.files < 1 or args.mib < 1 or args.writers < 1:
        parser.error("--files, --mib and --writers must be at least 1")
    if args.profile is not None and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy at {PY_SPY}")
    out = run(args)
    print(json.dumps(out))
    if not args.json_only:
        print()
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
