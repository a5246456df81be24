"""Benchmark: redundant knet links with real daemons in network namespaces (issue 15).

    python tools/bench_links.py [--token MS] [--before S] [--cut S] [--after S]
                                [--loss PERCENT] [--loss-seconds S] [--no-loss] [--json-only]

Root, network namespaces and /dev/fuse are needed. Three nodes a, b, c, two links on two
bridges (tests/links_harness.py: LinksLab), a two-link `transport: knet` corosync.conf, every
node appending to its own file through its mount all along (WriteLoad).

* failover (link_mode passive): link 0 of c is cut at the switch after --before seconds of
  writes, plugged back after --cut seconds, then --after more seconds. Figures: the time from
  the cut to c sending to both peers on link 1 only (polling `pmxfs links --json` on c, so up to
  one CLI round trip late) and to each daemon logging link 0 as down (from the log's
  millisecond timestamps: the knet ping timeout itself); the same back to link 0; whether the
  ring id changed; write latency (p50/p99/max) before the cut, from the cut until traffic was
  on link 1, while link 0 stayed down, and after it came back. A write's latency is the time
  until its writer began the next one (each writer writes in a loop).
* loss: --loss % of the frames each node sends dropped on EACH link independently, link_mode
  active (every frame on both links), against a one-link knet cluster with the same loss on
  its one link, each for --loss-seconds of writes. Figures: the retransmission counters of
  `pmxfs debug ring --json` and the frame counters of `debug transport` (duplicate_frames:
  the second copies active mode drops), summed over the nodes, per acknowledged write. Loss is
  made with tc netem, or where the kernel has no sch_netem with an htb + classic-BPF random
  classifier (LinksLab.set_loss); when tc can do neither the part is skipped and says why.

Prints one JSON object (the figures) and, unless --json-only, a table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the namespace lab of the tests

# tests/ is not on mypy's path: the harness is typed and checked on its own
from lifecycle_harness import lab_unavailable  # type: ignore[import-not-found]  # noqa: E402
from links_harness import (  # type: ignore[import-not-found]  # noqa: E402
    LinksLab,
    WriteLoad,
    knet_timeouts_ms,
    lossy_load,
    summary,
)

NAMES = ("a", "b", "c")
CUT = "c"  # the node whose link 0 is cut
POLL_TIMEOUT_S = 30.0
WARMUP_WRITES = 5  # acknowledged writes per writer before anything is measured
LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held (checked back to back: each check is a CLI call)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"bench_links: no {what} within {timeout} s")
    return time.monotonic() - started


def carried_on(lab: Any, name: str) -> set[int]:
    """The links `name` sends on now, over all its peers."""
    return {entry.link for entry in lab.links(name) if entry.active}


def logged_after(lab: Any, name: str, since: float, link: int, state: str) -> list[float]:
    """Seconds after the wall-clock time `since` of each line of `name`'s daemon log saying
    that link `link` to a peer went `state` ("down" or "up")."""
    out = []
    for line in lab[name].log_text().splitlines():
        stamp = LOG_STAMP.match(line)
        text = line.lower()
        if stamp is None or f"link {link}" not in text or not text.rstrip().endswith(state):
            continue
        at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at >= since - 0.001:
            out.append(round(at - since, 3))
    return out


def failover(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    lab = LinksLab(root / "failover", NAMES, 2)
    try:
        lab.start_cluster(lab.config_text(token_ms=args.token))
        ring_id = lab.ring_id(NAMES[0])
        load = WriteLoad(lab, NAMES)
        with load:
            load.wait_progress(WARMUP_WRITES)
            measured = time.monotonic()
            time.sleep(args.before)  # a measurement window
            cut_at, cut_wall = time.monotonic(), time.time()
            lab.set_link(CUT, 0, up=False)
            to_link1 = poll(lambda: carried_on(lab, CUT) == {1}, POLL_TIMEOUT_S,
                            "traffic on link 1")
            time.sleep(max(0.0, cut_at + args.cut - time.monotonic()))
            back_at, back_wall = time.monotonic(), time.time()
            lab.set_link(CUT, 0, up=True)
            to_link0 = poll(lambda: carried_on(lab, CUT) == {0}, POLL_TIMEOUT_S,
                            "traffic back on link 0")
            time.sleep(args.after)
            ended = time.monotonic()
        written = load.verify(list(NAMES))
        windows = {"before": (measured, cut_at), "failover": (cut_at, cut_at + to_link1),
                   "link0_down": (cut_at + to_link1, back_at), "after": (back_at, ended)}
        interval, timeout = knet_timeouts_ms(args.token, len(NAMES))
        return {
            "token_ms": args.token, "knet_ping_interval_ms": interval,
            "knet_ping_timeout_ms": timeout,
            "cut_to_link1_s": round(to_link1, 3), "back_to_link0_s": round(to_link0, 3),
            "down_logged_s": {name: logged_after(lab, name, cut_wall, 0, "down")
                              for name in NAMES},
            "up_logged_s": {name: logged_after(lab, name, back_wall, 0, "up")
                            for name in NAMES},
            "ring_changed": any(lab.ring_id(name) != ring_id for name in NAMES),
            "writes": sum(written.values()),
            "latency": {key: summary(load.latencies(*span)) for key, span in windows.items()},
        }
    finally:
        lab.close()


def loss(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    active = LinksLab(root / "active", NAMES, 2)
    try:
        reason = active.loss_unavailable()
        if reason is not None:
            return {"skipped": reason}
        active.start_cluster(active.config_text(link_mode="active", token_ms=args.token))
        both = lossy_load(active, {0: args.loss, 1: args.loss}, args.loss_seconds)
    finally:
        active.close()
    single = LinksLab(root / "single", NAMES, 1)
    try:
        single.start_cluster(single.config_text(token_ms=args.token))
        one = lossy_load(single, {0: args.loss}, args.loss_seconds)
    finally:
        single.close()
    for run in (both, one):
        run["retransmissions_per_write"] = round(
            sum(run["retransmissions"].values()) / max(1, run["writes"]), 4)
    return {"active_two_links": both, "one_link": one}


# ---------------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(result: dict[str, Any]) -> str:
    f = result["failover"]
    lines = [f"failover, passive, 3 nodes, token {f['token_ms']} ms (knet ping interval "
             f"{f['knet_ping_interval_ms']} ms, timeout {f['knet_ping_timeout_ms']} ms)",
             f"  cut link 0 on {CUT} -> traffic on link 1 only  {f['cut_to_link1_s']:.3f} s"
             "  (pmxfs links on c)",
             f"  link 0 plugged back -> traffic on link 0     {f['back_to_link0_s']:.3f} s"]
    for name in NAMES:
        lines.append(f"  logged down/up on {name} (s after)          "
                     f"{f['down_logged_s'][name]} / {f['up_logged_s'][name]}")
    lines += [f"  ring id changed: {'YES' if f['ring_changed'] else 'no'}; writes: "
              f"{f['writes']}, none failed, lost or reordered", "",
              f"  {'write latency':<26}{'writes':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    names = {"before": "before the cut", "failover": "cut -> on link 1",
             "link0_down": "link 0 down, on link 1", "after": "link 0 back"}
    for key, label in names.items():
        s = f["latency"][key]
        lines.append(f"  {label:<26}{s['writes']:>8}{_cell(s['p50_ms']):>9}"
                     f"{_cell(s['p99_ms']):>9}{_cell(s['max_ms']):>9}")
    lossy = result.get("loss")
    if lossy is None:
        return "\n".join(lines)
    lines.append("")
    if "skipped" in lossy:
        lines.append(f"loss: skipped: {lossy['skipped']}")
        return "\n".join(lines)
    keys = sorted({k for run in lossy.values() for k in run["retransmissions"]})
    header = f"  {'run':<26}{'writes':>8}" + "".join(
        f"{k.removeprefix('counters.'):>19}" for k in keys)
    lines += ["loss (per node, per link, independently)",
              header + f"{'per write':>11}{'duplicates':>12}{'ring chg':>10}"]
    labels = {"active_two_links": "active, 2 links", "one_link": "1 link"}
    for key, run in lossy.items():
        percent = "/".join(f"{p:g}%" for p in run["loss_percent"].values())
        cells = "".join(f"{run['retransmissions'].get(k, 0):>19}" for k in keys)
        lines.append(f"  {labels[key] + ' ' + percent:<26}{run['writes']:>8}{cells}"
                     f"{run['retransmissions_per_write']:>11}"
                     f"{run['transport'].get('duplicate_frames', 0):>12}"
                     f"{'YES' if run['ring_changed'] else 'no':>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", type=int, default=1000, help="totem token, ms")
    parser.add_argument("--before", type=float, default=10.0, help="writes before the cut, s")
    parser.add_argument("--cut", type=float, default=10.0, help="how long link 0 stays cut, s")
    parser.add_argument("--after", type=float, default=5.0, help="writes after it is back, s")
    parser.add_argument("--loss", type=float, default=20.0, help="loss per link, percent")
    parser.add_argument("--loss-seconds", type=float, default=30.0,
                        help="writes per lossy run, s")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss comparison")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason is not None:
        print(f"bench_links: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pmxfs-bench-links-") as tmp:
        result: dict[str, Any] = {"failover": failover(Path(tmp), args)}
        if not args.no_loss:
            result["loss"] = loss(Path(tmp), args)
    print(json.dumps(result, indent=2))
    if not args.json_only:
        print()
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
