"""File-system benchmark: three real daemons with FUSE mounts (`pmxfs demo`), against tmpfs.

    python tools/bench_fs.py [--token MS|default] [--files 1000] [--samples 200]
                             [--idle-seconds 10] [--json-only]

Timers. `--token 1000` (the default) is the demo's own corosync.conf: `token: 1000` with
`token_coefficient: 0`, so the token timeout is exactly 1000 ms. Any other number MS writes
`token: MS` and `token_coefficient: 0` the same way. `--token default` writes no timer at all, as
`pvecm create` does: the daemon then runs corosync 3's defaults, token 3000 ms plus
token_coefficient 650 ms per node beyond two -- 3650 ms for three nodes, hold 685 ms, consensus
4380 ms (`pmxfs.core.totem_params`). The config is written into the demo's directory before the
demo starts; the demo reuses a config it finds there.

Measured on node1's mount (and, for the plain operations, on a tmpfs in the same run):
* create+write+close of FILES files of 1 KiB, one writer: each file timed on its own (median,
  p95, files/s); and with 8 parallel writers (files/s);
* open+read+close of each file with 1 and with 4 readers (files/s);
* the CPU time the three daemons spent together per file created (one writer) and per file
  read (one reader), from /proc/<pid>/stat: less disturbed than the times by other work on a
  shared machine;
* listdir of the directory of FILES entries (median ms of 50 rounds); unlink of each (files/s);
* close on node1 -> visible on node2: from close() returning on node1 until a read on node2
  returns the new content (p50/p95 of SAMPLES writes);
* idle CPU of each daemon: utime + stime from /proc/<pid>/stat over IDLE_SECONDS without any
  client, after IDLE_SETTLE_S of quiet (percent of one core);
* SIGKILL of node3 -> the survivors accept a write again (a write is started right after the
  kill and retried until one succeeds);
* `pmxfs expected 1` -> writable: node2 is killed too; once node1 shows it lost quorum, the
  wall time of `pmxfs --run-dir node1/run expected 1` (the command as a user runs it), and the
  time until a write on node1 succeeds; then the median wall time of EXPECTED_RUNS more runs of
  the same command (the CLI's start-up plus one request).
It prints one JSON object and a table with pmxcfs's figures (pmxcfs 9.1 on corosync 3.1, three
nodes, default timers, this kind of machine) and the targets of issue 12.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pmxfs.commands import demo as demo_command
from pmxfs.core import conf
from pmxfs.core.totem_params import MIN_TIMEOUT_MS, derive_params

DEMO_TIMEOUT_S = 120.0
VISIBLE_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 60.0
QUORUM_LOSS_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 70.0  # above the control socket's own 60 s for "expected"
IDLE_SETTLE_S = 2.0
LISTDIR_ROUNDS = 50
EXPECTED_RUNS = 9
PAYLOAD = b"x" * 1024
NODES = 3
DEMO_TOKEN_MS = 1000

# (pmxcfs, target of issue 12); None where pmxcfs was not measured or no target is set
REFERENCE: dict[str, tuple[float | None, float | None]] = {
    "create_write_close_median_ms": (1.8, 0.9),
    "create_write_close_8_writers_per_s": (None, 1500.0),
    "open_read_close_per_s": (4000.0, 8000.0),
    "open_read_close_4_readers_per_s": (11600.0, None),
    "listdir_ms": (1.9, None),
    "unlink_per_s": (1010.0, 1200.0),
    "visible_p50_ms": (0.49, 0.4),
    "visible_p95_ms": (0.85, None),
    "idle_cpu_percent_max": (0.60, 0.3),
    "expected_cli_s": (0.03, 0.1),
}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_fs: timed out waiting for {what}")
        time.sleep(0.01)


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[max(0, int(len(sorted_values) * fraction) - 1)]


def cpu_ticks(pid: int) -> int:
    """utime + stime of process `pid` (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 on
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


# ---------------------------------------------------------------------------- the cluster


def token_setting(text: str) -> int | None:
    """The value of --token: milliseconds, or None for corosync's defaults."""
    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of ms or 'default': {text!r}") from None
    if value < MIN_TIMEOUT_MS:
        raise argparse.ArgumentTypeError(f"--token must be at least {MIN_TIMEOUT_MS} ms")
    return value


def seed_demo_dir(demo_dir: Path, token: int | None) -> None:
    """Write the corosync.conf of every node of a 3-node demo in `demo_dir`: the demo's own
    network choice (free loopback addresses and port), with `token` (None: no timer lines)."""
    plan = demo_command.free_network(NODES, demo_dir.resolve(),
                                     [demo_command.DEFAULT_PORT, *demo_command.OTHER_PORTS])
    model = demo_command.cluster_config(NODES, plan.port, plan.subnet)
    coefficient = None if token is None else 0
    totem = dataclasses.replace(model.totem, token=token, token_coefficient=coefficient)
    text = conf.render(dataclasses.replace(model, totem=totem))
    result = conf.check(text, "bench corosync.conf")
    if not result.ok:
        raise SystemExit(f"bench_fs: the generated config is refused: {result.errors[0]}")
    for node in plan.nodes:
        node.home.mkdir(parents=True)
        node.config.write_text(text)


def effective_timers(token: int | None) -> dict[str, int]:
    """The derived timers the daemons run with for this --token."""
    params = derive_params(NODES, token=token, token_coefficient=None if token is None else 0)
    return {"token": params.token, "token_retransmit": params.token_retransmit,
            "hold": params.hold, "consensus": params.consensus}


def pmxfs_command() -> list[str]:
    """`pmxfs` as a user runs it: the console script next to this Python, else `-m pmxfs`."""
    script = Path(sys.executable).parent / "pmxfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmxfs"]


# ---------------------------------------------------------------------------- measurements


def create_one(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(PAYLOAD)


def read_one(path: Path) -> None:
    with open(path, "rb") as r:
        if r.read() != PAYLOAD:
            raise SystemExit(f"bench_fs: {path} does not hold what was written")


def parallel(action: Callable[[Path], None], paths: Sequence[Path], workers: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(action, paths))
    return time.perf_counter() - t0


def file_ops(directory: Path, files: int, pids: Sequence[int] = ()) -> dict[str, float]:
    """Create, read, list and unlink `files` files of 1 KiB in `directory`; `pids`: the daemons
    whose CPU time is counted."""
    one = directory / "one"
    many = directory / "eight"
    one.mkdir()
    many.mkdir()
    paths = [one / f"f{i}.cfg" for i in range(files)]
    per_file: list[float] = []
    ticks = sum(cpu_ticks(pid) for pid in pids)
    for path in paths:
        t0 = time.perf_counter()
        create_one(path)
        per_file.append(time.perf_counter() - t0)
    create_ticks = sum(cpu_ticks(pid) for pid in pids) - ticks
    t_parallel = parallel(create_one, [many / f"f{i}.cfg" for i in range(files)], 8)
    ticks = sum(cpu_ticks(pid) for pid in pids)
    t0 = time.perf_counter()
    for path in paths:
        read_one(path)
    t_read = time.perf_counter() - t0
    read_ticks = sum(cpu_ticks(pid) for pid in pids) - ticks
    t_read4 = parallel(read_one, paths, 4)
    listings: list[float] = []
    for _ in range(LISTDIR_ROUNDS):
        t0 = time.perf_counter()
        count = len(os.listdir(one))
        listings.append(time.perf_counter() - t0)
        if count != files:
            raise SystemExit(f"bench_fs: listdir of {one} shows {count} entries, not {files}")
    t0 = time.perf_counter()
    for path in paths:
        os.unlink(path)
    t_unlink = time.perf_counter() - t0
    for i in range(files):
        os.unlink(many / f"f{i}.cfg")
    per_file.sort()
    ms_per_tick = 1000 / os.sysconf("SC_CLK_TCK")
    cpu = {"daemons_cpu_ms_per_create": round(create_ticks * ms_per_tick / files, 3),
           "daemons_cpu_ms_per_read": round(read_ticks * ms_per_tick / files, 3)} if pids else {}
    return {
        **cpu,
        "create_write_close_median_ms": round(statistics.median(per_file) * 1000, 3),
        "create_write_close_p95_ms": round(percentile(per_file, 0.95) * 1000, 3),
        "create_write_close_per_s": rate(files, sum(per_file)),
        "create_write_close_8_writers_per_s": rate(files, t_parallel),
        "open_read_close_per_s": rate(files, t_read),
        "open_read_close_4_readers_per_s": rate(files, t_read4),
        "listdir_ms": round(statistics.median(listings) * 1000, 3),
        "unlink_per_s": rate(files, t_unlink),
    }


def visible_latency(src: Path, dst: Path, samples: int) -> dict[str, float]:
    """ms from close() on one node until the other node reads the new content."""
    times = []
    for k in range(samples):
        data = f"sample {k} {time.time_ns()}\n"
        with open(src / "latency.cfg", "w") as f:
            f.write(data)
        t0 = time.perf_counter()
        deadline = t0 + VISIBLE_TIMEOUT_S
        while True:
            try:
                if (dst / "latency.cfg").read_text() == data:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise SystemExit("bench_fs: a write on node1 never became visible on node2")
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"visible_p50_ms": round(statistics.median(times), 3),
            "visible_p95_ms": round(percentile(times, 0.95), 3)}


def idle_cpu(pids: Sequence[int], seconds: float) -> dict[str, Any]:
    """Percent of one core each daemon used while no client touched the cluster."""
    time.sleep(IDLE_SETTLE_S)
    before = [cpu_ticks(pid) for pid in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    after = [cpu_ticks(pid) for pid in pids]
    elapsed = time.monotonic() - t0
    hz = os.sysconf("SC_CLK_TCK")
    percents = [round((b - a) / hz / elapsed * 100, 2) for a, b in zip(before, after, strict=True)]
    return {"idle_cpu_percent": percents, "idle_cpu_percent_max": max(percents),
            "idle_seconds": round(elapsed, 1)}


def write_succeeds(mount: Path, name: str) -> bool:
    try:
        create_one(mount / name)
    except OSError:
        return False
    return True


def until_writable(mount: Path, t0: float, prefix: str) -> float:
    """Seconds from `t0` until a write on `mount` succeeds (retried every 10 ms)."""
    attempt = 0
    while time.perf_counter() - t0 < KILL_TIMEOUT_S:
        attempt += 1
        if write_succeeds(mount, f"{prefix}-{attempt}.cfg"):
            return round(time.perf_counter() - t0, 3)
        time.sleep(0.01)
    raise SystemExit(f"bench_fs: {mount} took no write within {KILL_TIMEOUT_S:.0f} s")


def kill_to_writable(victim_pid: int, mount: Path) -> float:
    os.kill(victim_pid, signal.SIGKILL)
    return until_writable(mount, time.perf_counter(), "after-kill")


def quorate(mount: Path) -> bool | None:
    """Whether `mount`'s .members says quorate (None: unreadable)."""
    try:
        return bool(json.loads((mount / ".members").read_bytes())["cluster"]["quorate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_expected(run_dir: Path) -> float:
    """Wall time of `pmxfs --run-dir RUN_DIR expected 1`, which must succeed."""
    argv = [*pmxfs_command(), "--run-dir", str(run_dir), "expected", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_fs: {' '.join(argv)} exited {done.returncode}: "
                         f"{done.stderr.strip()}")
    return elapsed


def expected_to_writable(victim_pid: int, mount: Path, run_dir: Path) -> dict[str, float]:
    """Kill `victim_pid`, wait until `mount` lost quorum, then `pmxfs expected 1` -> writable."""
    os.kill(victim_pid, signal.SIGKILL)
    wait_for(lambda: quorate(mount) is False, QUORUM_LOSS_TIMEOUT_S, "node1 to lose quorum")
    t0 = time.perf_counter()
    cli = run_expected(run_dir)
    writable = until_writable(mount, t0, "after-expected")
    again = sorted(run_expected(run_dir) for _ in range(EXPECTED_RUNS))
    return {"expected_cli_s": round(cli, 3), "expected_to_writable_s": writable,
            "expected_cli_median_s": round(statistics.median(again), 3)}


def tmpfs_dir(root: Path) -> tuple[Path, bool]:
    """A tmpfs to compare with: our own mount when root, else /dev/shm."""
    target = root / "tmpfs"
    target.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)],
                                            capture_output=True, check=False).returncode == 0:
        return target, True
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    return shm, False


# ---------------------------------------------------------------------------- one run


def measure(nodes: list[dict[str, Any]], files: int, samples: int,
            idle_seconds: float) -> dict[str, Any]:
    mounts = [Path(n["mount"]) for n in nodes]
    work = mounts[0] / "bench"
    work.mkdir()
    found = file_ops(work, files, [n["pid"] for n in nodes])
    found.update(visible_latency(mounts[0], mounts[1], samples))
    found.update(idle_cpu([n["pid"] for n in nodes], idle_seconds))
    found["kill_to_writable_s"] = kill_to_writable(nodes[2]["pid"], mounts[0])
    found.update(expected_to_writable(nodes[1]["pid"], mounts[0], Path(nodes[0]["run_dir"])))
    return found


def run(token: int | None, files: int, samples: int, idle_seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pmxfs-bench-") as tmp:
        root = Path(tmp)
        demo_dir = root / "demo"
        seed_demo_dir(demo_dir, token)
        log = open(root / "demo.out", "wb")  # noqa: SIM115 - closed below, after the demo
        demo = subprocess.Popen([sys.executable, "-m", "pmxfs", "demo", "--nodes", str(NODES),
                                 "--dir", str(demo_dir)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        baseline, own_mount = tmpfs_dir(root)
        try:
            wait_for(lambda: (demo_dir / "demo.json").exists() or demo.poll() is not None,
                     DEMO_TIMEOUT_S, "the demo cluster")
            if demo.poll() is not None:
                raise SystemExit("bench_fs: the demo stopped:\n"
                                 + (root / "demo.out").read_text(errors="replace")[-2000:])
            nodes = json.loads((demo_dir / "demo.json").read_text())["nodes"]
            return {"token": "default" if token is None else token,
                    "timers_ms": effective_timers(token), "files": files, "samples": samples,
                    "tmpfs": file_ops(baseline, files),
                    "pmxfs": measure(nodes, files, samples, idle_seconds)}
        finally:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait(timeout=30)
            log.close()
            if own_mount:
                subprocess.run(["umount", str(baseline)], check=False, capture_output=True)
            else:
                subprocess.run(["rm", "-rf", str(baseline)], check=False)


# ---------------------------------------------------------------------------- output


ROWS = (
    ("create+write+close 1 KiB, 1 writer, median (ms)", "create_write_close_median_ms"),
    ("create+write+close 1 KiB, 1 writer, p95 (ms)", "create_write_close_p95_ms"),
    ("create+write+close 1 KiB, 1 writer (files/s)", "create_write_close_per_s"),
    ("create+write+close 1 KiB, 8 writers (files/s)", "create_write_close_8_writers_per_s"),
    ("CPU of the 3 daemons per file created (ms)", "daemons_cpu_ms_per_create"),
    ("CPU of the 3 daemons per file read (ms)", "daemons_cpu_ms_per_read"),
    ("open+read+close 1 KiB, 1 reader (files/s)", "open_read_close_per_s"),
    ("open+read+close 1 KiB, 4 readers (files/s)", "open_read_close_4_readers_per_s"),
    ("listdir of FILES entries, median (ms)", "listdir_ms"),
    ("unlink, 1 process (files/s)", "unlink_per_s"),
    ("close on node1 -> read on node2, p50 (ms)", "visible_p50_ms"),
    ("close on node1 -> read on node2, p95 (ms)", "visible_p95_ms"),
    ("idle CPU of a daemon, max of 3 (% of a core)", "idle_cpu_percent_max"),
    ("SIGKILL of node3 -> writable again (s)", "kill_to_writable_s"),
    ("node alone: `pmxfs expected 1` wall time (s)", "expected_cli_s"),
    ("node alone: `pmxfs expected 1` -> writable (s)", "expected_to_writable_s"),
    ("`pmxfs expected 1` again, median of 9 (s)", "expected_cli_median_s"),
)


def table(results: dict[str, Any]) -> str:
    p, t = results["pmxfs"], results["tmpfs"]
    timers = results["timers_ms"]
    lines = [f"token {results['token']}: token {timers['token']} ms, hold {timers['hold']} ms, "
             f"consensus {timers['consensus']} ms; {results['files']} files",
             f"{'figure':50} {'pmxfs':>9} {'tmpfs':>9} {'pmxcfs':>8} {'target':>8}"]
    for name, key in ROWS:
        ref, target = REFERENCE.get(key, (None, None))
        if key == "expected_cli_median_s":
            ref, target = REFERENCE["expected_cli_s"]
        lines.append(f"{name.replace('FILES', str(results['files'])):50} {p[key]:>9} "
                     f"{t.get(key, ''):>9} {'' if ref is None else ref:>8} "
                     f"{'' if target is None else target:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token", type=token_setting, default=DEMO_TOKEN_MS, metavar="MS",
                        help="token timeout in ms with token_coefficient 0, or 'default' for "
                             f"corosync's defaults (default: the demo's {DEMO_TOKEN_MS})")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if args.files < 1 or args.samples < 1 or args.idle_seconds <= 0:
        parser.error("--files and --samples must be at least 1, --idle-seconds above 0")
    results = run(args.token, args.files, args.samples, args.idle_seconds)
    print(json.dumps(results))
    if not args.json_only:
        print()
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
