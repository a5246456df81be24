"""File-system benchmark: three real daemons with FUSE mounts (`pmxfs demo`), against tmpfs.

    python tools/bench_fs.py [--files 1000] [--samples 200] [--json-only]

Starts `pmxfs demo --nodes 3` in a temporary directory (nodes on 127.0.0.11-13, token 1000 ms),
waits for its demo.json, and measures on node1's mount and on a tmpfs in the same run:
* create+write+close of FILES files of 1 KiB, one writer, and with 8 parallel writers;
* open+read+close of each of them; listdir of the directory holding them; unlink of each;
* write on node1 -> visible on node2: the time from close() returning on node1 until a read on
  node2 returns the new content (p50/p95 of SAMPLES writes);
* SIGKILL of node3 -> the survivors accept a write again (a write is started right after the
  kill and retried until one succeeds).
It prints one JSON object and a table, with ratios to the reference (pmxcfs on corosync, three
nodes, this kind of machine). The kill figure is measured with the demo's 1000 ms token; the
reference (about 8 s) is corosync's default token; the corresponding pmxfs default is
token + consensus (3650 + 4380 ms for three nodes), see tools/bench_totem.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DEMO_TIMEOUT_S = 90.0
VISIBLE_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 60.0
PAYLOAD = b"x" * 1024
REF_CREATE_PER_S = 550.0
REF_READ_PER_S = (4000.0, 5800.0)
REF_VISIBLE_MS = 0.4
REF_KILL_S = 8.0


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_fs: timed out waiting for {what}")
        time.sleep(0.01)


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def file_ops(directory: Path, files: int) -> dict[str, float]:
    """Create, read, list and unlink `files` files of 1 KiB in `directory`."""
    one = directory / "one"
    many = directory / "eight"
    one.mkdir()
    many.mkdir()
    t0 = time.perf_counter()
    for i in range(files):
        with open(one / f"f{i}.cfg", "wb") as f:
            f.write(PAYLOAD)
    t_create = time.perf_counter() - t0

    def create(i: int) -> None:
        with open(many / f"f{i}.cfg", "wb") as f:
            f.write(PAYLOAD)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(files)))
    t_parallel = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(files):
        with open(one / f"f{i}.cfg", "rb") as r:
            assert r.read() == PAYLOAD
    t_read = time.perf_counter() - t0
    rounds = 50
    t0 = time.perf_counter()
    for _ in range(rounds):
        assert len(os.listdir(one)) == files
    t_list = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(files):
        os.unlink(one / f"f{i}.cfg")
    t_unlink = time.perf_counter() - t0
    for i in range(files):
        os.unlink(many / f"f{i}.cfg")
    return {
        "create_write_close_per_s": rate(files, t_create),
        "create_write_close_ms": round(t_create / files * 1000, 3),
        "create_write_close_8_writers_per_s": rate(files, t_parallel),
        "open_read_close_per_s": rate(files, t_read),
        "listdir_per_s": rate(rounds, t_list),
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
            "visible_p95_ms": round(times[int(len(times) * 0.95) - 1], 3)}


def kill_to_writable(victim_pid: int, mount: Path) -> float:
    os.kill(victim_pid, signal.SIGKILL)
    t0 = time.perf_counter()
    attempt = 0
    while time.perf_counter() - t0 < KILL_TIMEOUT_S:
        attempt += 1
        try:
            with open(mount / f"after-kill-{attempt}.cfg", "wb") as f:
                f.write(PAYLOAD)
            return round(time.perf_counter() - t0, 3)
        except OSError:
            time.sleep(0.01)
    raise SystemExit("bench_fs: the survivors did not take a write after the kill")


def tmpfs_dir(root: Path) -> tuple[Path, bool]:
    """A tmpfs to compare with: our own mount when root, else /dev/shm."""
    target = root / "tmpfs"
    target.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)],
                                            capture_output=True, check=False).returncode == 0:
        return target, True
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    return shm, False


def run(files: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pmxfs-bench-") as tmp:
        root = Path(tmp)
        demo_dir = root / "demo"
        log = open(root / "demo.out", "wb")  # noqa: SIM115 - closed below, after the demo
        demo = subprocess.Popen([sys.executable, "-m", "pmxfs", "demo", "--nodes", "3",
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
            mounts = [Path(n["mount"]) for n in nodes]
            work = mounts[0] / "bench"
            work.mkdir()
            results: dict[str, Any] = {"files": files, "samples": samples}
            results["pmxfs"] = file_ops(work, files)
            results["tmpfs"] = file_ops(baseline, files)
            results["pmxfs"].update(visible_latency(mounts[0], mounts[1], samples))
            results["pmxfs"]["kill_to_writable_s"] = kill_to_writable(nodes[2]["pid"],
                                                                      mounts[0])
            return results
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


def table(results: dict[str, Any]) -> str:
    p, t = results["pmxfs"], results["tmpfs"]
    lo, hi = REF_READ_PER_S
    rows = [
        ("create+write+close, 1 writer (files/s)", p["create_write_close_per_s"],
         t["create_write_close_per_s"],
         f"{p['create_write_close_per_s'] / REF_CREATE_PER_S:.2f}x of 550"),
        ("create+write+close, 8 writers (files/s)", p["create_write_close_8_writers_per_s"],
         t["create_write_close_8_writers_per_s"], ""),
        ("open+read+close (files/s)", p["open_read_close_per_s"], t["open_read_close_per_s"],
         f"{p['open_read_close_per_s'] / hi:.2f}-{p['open_read_close_per_s'] / lo:.2f}x "
         "of 4000-5800"),
        ("listdir of 1000 entries (/s)", p["listdir_per_s"], t["listdir_per_s"], ""),
        ("unlink (files/s)", p["unlink_per_s"], t["unlink_per_s"], ""),
        ("close on node1 -> read on node2, p50 (ms)", p["visible_p50_ms"], "",
         f"{p['visible_p50_ms'] / REF_VISIBLE_MS:.2f}x of 0.4 ms"),
        ("close on node1 -> read on node2, p95 (ms)", p["visible_p95_ms"], "", ""),
        ("SIGKILL -> writable again (s, token 1000 ms)", p["kill_to_writable_s"], "",
         f"{p['kill_to_writable_s'] / REF_KILL_S:.2f}x of 8 s"),
    ]
    lines = [f"{'figure':46} {'pmxfs':>10} {'tmpfs':>10}  vs pmxcfs"]
    for name, a, b, ratio in rows:
        lines.append(f"{name:46} {a:>10} {b!s:>10}  {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if args.files < 1 or args.samples < 1:
        parser.error("--files and --samples must be at least 1")
    results = run(args.files, args.samples)
    print(json.dumps(results))
    if not args.json_only:
        print()
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
