"""The real-process liveness scenarios of issue 12: one node's disk stalls, or every core is busy,
while writers create files on the mounts of three real daemons.

How a scenario runs (`run_slow_disk`, `run_cpu_saturation`):
1. three daemons (daemon_harness) come up and sync; the slow-disk scenario first mounts
   tools/slowdisk.py over node3's data directory, the CPU scenario gives them a corosync.conf
   without `token`/`token_coefficient` lines (corosync's default timers) and may set a
   scheduling policy on every thread of every daemon (normal, or SCHED_RR: with and without
   the protection of pmxfs/runtime/scheduling.py, whatever the daemons chose themselves);
2. every node's ring is noted (`pmxfs debug ring --json`: ring id, members, totem counters);
3. the trouble starts -- a series of fsync stalls on node3's disk, or busy-loop processes at
   normal priority, each one bounded by its own clock -- and writer processes
   (liveness_writer.py) create files on the mounts;
4. the writers are waited for, with a deadline (a writer still blocked then is killed by PID
   and its write counted as unfinished); then one synced tree on all nodes, with a deadline;
5. the rings are noted again, every acknowledged file is read back from every mount, and, after
   a graceful stop of all daemons, from every node's config.db (for node3 the backing
   directory: what reached its disk).
The result is a `Report` of plain data: the tests assert on it, tools/liveness.py prints it.
Any exit -- a failed assertion, an exception, Ctrl-C -- kills what was started, by PID, in the
order that lets every mount go: busy loops and writers, daemons (their mounts are unmounted by
the cluster), then the slow disk (SIGTERM unmounts it; after SIGKILL a lazy umount).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpg_harness import CpgProcess, ProcessGroup, wait_until
from daemon_harness import DaemonCluster, is_mounted, unmount

from pmxfs.runtime.scheduling import DEFAULT_PRIORITY, POLICY_NAMES, policy_of

REPO = Path(__file__).resolve().parent.parent
SLOWDISK = REPO / "tools" / "slowdisk.py"
WRITER = Path(__file__).resolve().parent / "liveness_writer.py"
NODES = ("node1", "node2", "node3")
SLOW_NODE = "node3"
# totem counters that grow when the ring is in trouble; compared before and after
RING_COUNTERS = ("token_lost", "gather", "rings_installed", "consensus_timeouts",
                 "merge_detected", "token_retransmits")
SETTLE_TIMEOUT_S = 30.0  # after the trouble: writers done, trees synced (each)
MOUNT_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SlowDiskPlan:
    """node3's fsyncs stall `stalls` times for `stall_s` seconds, `gap_s` apart; meanwhile
    `writers` processes on each of node1 and node2 write up to `files` files each, one every
    `write_gap_s` seconds, as long as the stalls last."""
    stall_s: float = 5.0
    stalls: int = 1
    gap_s: float = 1.0
    writers: int = 1
    files: int = 3
    write_gap_s: float = 0.0

    def trouble_s(self) -> float:
        return self.stalls * self.stall_s + (self.stalls - 1) * self.gap_s


SLOW_DISK_CI = SlowDiskPlan()
SLOW_DISK_FULL = SlowDiskPlan(stalls=10, gap_s=2.0, writers=4, files=10_000,
                              write_gap_s=0.05)
CPU_CI_S = 20.0
CPU_FULL_S = 120.0


@dataclass(frozen=True)
class CpuPlan:
    """`loops_per_core` busy loops per core for `seconds`, while one writer per node writes a
    file every `gap_s` seconds. `policy`: None leaves the daemons as they start (their own
    choice); "normal" or "rr" sets SCHED_OTHER or SCHED_RR at `rr_priority` on every thread of
    every daemon once it is up (threads made later take it from the main thread)."""
    seconds: float = 20.0
    loops_per_core: int = 2
    gap_s: float = 0.2
    policy: str | None = None
    rr_priority: int = DEFAULT_PRIORITY


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class RingView:
    ring_id: str
    members: list[int]
    counters: dict[str, int]


@dataclass(frozen=True)
class Write:
    node: str
    name: str
    content: str
    ok: bool
    ms: float
    error: str | None


@dataclass
class Report:
    scenario: str
    plan: dict[str, Any]
    before: dict[str, RingView] = field(default_factory=dict)
    after: dict[str, RingView] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    unfinished: int = 0  # writes that had not returned at the deadline
    synced: bool = False  # one synced tree on all nodes after the trouble
    lost: list[str] = field(default_factory=list)  # "node: where: name: what is wrong"
    held_fsyncs: int = 0  # slow disk: fsyncs the stall held
    policies: dict[str, str] = field(default_factory=dict)  # each daemon's, during the trouble

    def ring_changes(self) -> list[str]:
        """Nodes whose ring id or members differ between the two views."""
        return [n for n in self.before
                if n not in self.after
                or (self.before[n].ring_id, self.before[n].members)
                != (self.after[n].ring_id, self.after[n].members)]

    def counter_deltas(self) -> dict[str, int]:
        """How much each ring counter grew, summed over the nodes."""
        return {c: sum(self.after[n].counters.get(c, 0) - self.before[n].counters.get(c, 0)
                       for n in self.before if n in self.after)
                for c in RING_COUNTERS}

    def failed_writes(self) -> list[Write]:
        return [w for w in self.writes if not w.ok]

    def latency_ms(self) -> dict[str, float]:
        ms = sorted(w.ms for w in self.writes if w.ok)
        if not ms:
            return {}
        return {"p50": round(statistics.median(ms), 1),
                "p95": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 1),
                "max": round(ms[-1], 1)}

    def summary(self) -> dict[str, Any]:
        """What the tests and the runner look at, as JSON-able data."""
        return {"scenario": self.scenario, "plan": self.plan,
                "ring_changes": self.ring_changes(), "counter_deltas": self.counter_deltas(),
                "writes": len(self.writes), "failed_writes": len(self.failed_writes()),
                "unfinished": self.unfinished, "latency_ms": self.latency_ms(),
                "synced": self.synced, "lost": self.lost, "held_fsyncs": self.held_fsyncs,
                "policies": self.policies,
                "before": {n: asdict(v) for n, v in self.before.items()},
                "after": {n: asdict(v) for n, v in self.after.items()}}

    def describe(self) -> str:
        return json.dumps(self.summary(), indent=1)


# ---------------------------------------------------------------------------- pieces


def ring_view(cluster: DaemonCluster, name: str) -> RingView:
    ring = json.loads(cluster.cli(name, "debug", "ring", "--json").stdout)
    counters = ring.get("counters", {})
    return RingView(str(ring["ring_id"]), sorted(int(m) for m in ring["members"]),
                    {c: int(counters.get(c, 0)) for c in RING_COUNTERS})


def default_timers(config_text: str) -> str:
    """The config without `token` and `token_coefficient`: corosync's defaults apply."""
    return "".join(line for line in config_text.splitlines(keepends=True)
                   if line.split(":")[0].strip() not in ("token", "token_coefficient"))


def set_policy(pid: int, policy: str, rr_priority: int) -> None:
    """SCHED_OTHER ("normal") or SCHED_RR at `rr_priority` ("rr") on every thread of `pid`."""
    chosen = (os.SCHED_RR, rr_priority) if policy == "rr" else (os.SCHED_OTHER, 0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setscheduler(int(tid), chosen[0], os.sched_param(chosen[1]))


def policies(cluster: DaemonCluster) -> dict[str, str]:
    """Each running daemon's scheduling policy (its main thread's, which handles the token)."""
    return {n: POLICY_NAMES.get(policy_of(d.proc.pid), "?") for n, d in cluster.daemons.items()
            if d.proc is not None and d.running()}


class SlowDiskMount:
    """tools/slowdisk.py serving `backing` at `mount`: one process, in a group of its own so that
    it outlives the daemons on it; `close()` ends it whatever happened."""

    def __init__(self, backing: Path, mount: Path, plan: SlowDiskPlan) -> None:
        backing.mkdir(parents=True, exist_ok=True)
        mount.mkdir(parents=True, exist_ok=True)
        self.mount = mount
        self._procs = ProcessGroup()
        self.proc: CpgProcess = self._procs.start("slowdisk", 0, [
            sys.executable, str(SLOWDISK), str(backing), str(mount), "--stall",
            str(plan.stall_s), "--stalls", str(plan.stalls), "--gap", str(plan.gap_s)])
        try:
            wait_until(lambda: self._seen("mounted") and is_mounted(mount), MOUNT_TIMEOUT_S,
                       "the slow disk's mount", self.proc.describe)
        except BaseException:
            self.close()
            raise

    def _seen(self, event: str) -> int:
        return sum(1 for e in self.proc.events() if e.get("event") == event)

    def stall(self) -> None:
        self.proc.signal(signal.SIGUSR1)

    def wait_calm(self, timeout: float) -> None:
        wait_until(lambda: any(e.get("event") == "calm" and e.get("last")
                               for e in self.proc.events()),
                   timeout, "the end of the stalls", self.proc.describe)

    def held_fsyncs(self) -> int:
        return self._seen("fsync")

    def close(self) -> None:
        """SIGTERM (it unmounts), else SIGKILL and a lazy umount."""
        if self.proc.alive():
            with contextlib.suppress(AssertionError):
                self.proc.terminate()
        self._procs.close()
        unmount(self.mount)


class Writers:
    """liveness_writer.py processes; each JSON line they print is a `Write`."""

    def __init__(self, procs: ProcessGroup) -> None:
        self._procs = procs
        self.running: list[tuple[str, CpgProcess]] = []

    def start(self, cluster: DaemonCluster, node: str, prefix: str, files: int,
              seconds: float | None = None, gap_s: float = 0.0) -> None:
        argv = [sys.executable, str(WRITER), str(cluster[node].mount), prefix,
                "--files", str(files), "--gap", str(gap_s)]
        if seconds is not None:
            argv += ["--seconds", str(seconds)]
        self.running.append((node, self._procs.start(prefix, 0, argv)))

    def wait(self, timeout: float) -> int:
        """Until every writer exited or `timeout` passed; kills the rest (by PID) and returns
        how many were still running."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: all(not p.alive() for _, p in self.running), timeout,
                       "the writers")
        late = [p for _, p in self.running if p.alive()]
        for proc in late:
            proc.kill()
        return len(late)

    def writes(self) -> list[Write]:
        return [Write(node, str(e["name"]), str(e["content"]), bool(e["ok"]), float(e["ms"]),
                      e.get("error"))
                for node, proc in self.running for e in proc.events()
                if e.get("event") == "write"]


@contextlib.contextmanager
def busy_loops(count: int, seconds: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` processes spinning at normal priority; each stops by itself after `seconds` (so
    none outlives a killed test for long), and all are killed by PID on leaving."""
    spin = ("import sys, time\nend = time.monotonic() + float(sys.argv[1])\n"
            "while time.monotonic() < end:\n    pass\n")
    loops: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            loops.append(subprocess.Popen([sys.executable, "-c", spin, str(seconds)],
                                          stdin=subprocess.DEVNULL))
        yield loops
    finally:
        for loop in loops:
            if loop.poll() is None:
                loop.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                loop.wait(timeout=10)


def stored_files(data_dir: Path) -> dict[str, bytes]:
    """Name -> content of the plain files directly in the tree's root, from config.db (pmxcfs's
    layout: the root's inode is 0, a regular file has type 8)."""
    uri = f"file:{data_dir / 'config.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT name, data FROM tree WHERE parent = 0 AND type = 8 "
                          "AND inode != 0").fetchall()
    return {str(name): bytes(data or b"") for name, data in rows}


def check_files(report: Report, cluster: DaemonCluster, data_dirs: dict[str, Path]) -> None:
    """Every acknowledged write, read back from every mount, then -- after a graceful stop --
    from every node's database. Problems go to `report.lost`."""
    acknowledged = [w for w in report.writes if w.ok]
    for name, d in cluster.daemons.items():
        for w in acknowledged:
            try:
                got = (d.mount / w.name).read_text()
            except OSError as exc:
                got = f"<{exc.strerror}>"
            if got != w.content:
                report.lost.append(f"{name}: mount: {w.name}: {got!r}")
    for name in cluster.daemons:
        status = cluster.stop(name)
        if status != 0:
            report.lost.append(f"{name}: stop: exit status {status}")
    for name, data_dir in data_dirs.items():
        stored = stored_files(data_dir)
        for w in acknowledged:
            if stored.get(w.name) != w.content.encode():
                report.lost.append(f"{name}: config.db: {w.name}: {stored.get(w.name)!r}")


def settle(report: Report, cluster: DaemonCluster, writers: Writers, timeout: float) -> None:
    """Wait for the writers and for one synced tree, then note the rings again."""
    report.unfinished += writers.wait(timeout)
    report.writes = writers.writes()
    try:
        cluster.wait_synced(list(cluster.daemons), timeout=SETTLE_TIMEOUT_S)
        report.synced = True
    except AssertionError:
        report.synced = False
    report.after = {n: ring_view(cluster, n) for n in cluster.daemons}


# ---------------------------------------------------------------------------- scenarios


def run_slow_disk(root: Path, plan: SlowDiskPlan, first: int = 111) -> Report:
    report = Report("slow_disk", asdict(plan))
    procs = ProcessGroup()
    cluster = DaemonCluster(root, len(NODES), first=first)
    slow: SlowDiskMount | None = None
    try:
        backing = cluster[SLOW_NODE].home / "data.backing"
        slow = SlowDiskMount(backing, cluster[SLOW_NODE].data_dir, plan)
        cluster.start_all()
        report.policies = policies(cluster)
        report.before = {n: ring_view(cluster, n) for n in cluster.daemons}
        writers = Writers(procs)
        slow.stall()
        for node in NODES:
            if node != SLOW_NODE:
                for k in range(plan.writers):
                    writers.start(cluster, node, f"{node}-w{k}", plan.files, plan.trouble_s(),
                                  plan.write_gap_s)
        slow.wait_calm(plan.trouble_s() + SETTLE_TIMEOUT_S)
        settle(report, cluster, writers, SETTLE_TIMEOUT_S)
        report.held_fsyncs = slow.held_fsyncs()
        data_dirs = {n: cluster[n].data_dir for n in NODES if n != SLOW_NODE}
        check_files(report, cluster, {**data_dirs, SLOW_NODE: backing})
        return report
    finally:
        procs.close()
        cluster.close()
        if slow is not None:
            slow.close()


def run_cpu_saturation(root: Path, plan: CpuPlan, first: int = 121) -> Report:
    report = Report("cpu_saturation", asdict(plan))
    procs = ProcessGroup()
    cluster = DaemonCluster(root, len(NODES), first=first)
    try:
        for d in cluster.daemons.values():
            d.config.write_text(default_timers(cluster.config_text))
        cluster.start_all()
        for d in cluster.daemons.values():
            if plan.policy is not None and d.proc is not None:
                set_policy(d.proc.pid, plan.policy, plan.rr_priority)
        report.policies = policies(cluster)
        report.before = {n: ring_view(cluster, n) for n in cluster.daemons}
        writers = Writers(procs)
        loops = plan.loops_per_core * (os.cpu_count() or 1)
        with busy_loops(loops, plan.seconds):
            for node in NODES:
                writers.start(cluster, node, f"{node}-cpu", 1_000_000, plan.seconds,
                              plan.gap_s)
            report.unfinished += writers.wait(plan.seconds + SETTLE_TIMEOUT_S)
        settle(report, cluster, writers, SETTLE_TIMEOUT_S)
        check_files(report, cluster, {n: cluster[n].data_dir for n in NODES})
        return report
    finally:
        procs.close()
        cluster.close()
