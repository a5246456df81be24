"""A returning node's sync of a large tree (issue 12), for `test_large_sync.py` and
`tools/bench_sync.py`.

`run_scenario` drives real daemons (`daemon_harness.DaemonCluster`, FUSE mounts on loopback):
1. three nodes with the totem timers asked for -- `token_ms=None` is corosync's defaults: the
   config has neither a `token` nor a `token_coefficient` line, so three nodes run with
   token 3650 ms and consensus 4380 ms;
2. node3 is stopped (SIGTERM, or SIGKILL) by PID and the survivors settle into a ring of two;
3. node1 gets FILES files of about MIB / FILES bytes each, in directories of at most 100 files,
   from several writer threads at once; node2 must hold the same tree afterwards;
4. the survivors' totem counters are read, then node3 starts again (with its data directory, or
   with an empty one: a full transfer);
5. until node3 is in the survivors' ring and synced with the same tree checksum as node1, every
   node's control socket is asked for its status every `POLL_S`. The answers give the times
   (start -> in the ring -> synced), the ring ids each survivor passed through, and the longest
   time a node took to answer: the control socket is served by the same trio loop that passes
   the token, so a long answer is a long stretch in which that node could not have passed it;
6. a file written on node3's mount must appear on the others (one more round through the
   ring), then the counters are read again. Their differences say whether a survivor lost the
   token, and how many rings it installed (exactly one is the join).

Each variant (`ReturnSpec`) stops and restarts node3 on the same cluster, so the tree is written
once. Every wait has a deadline; whatever happens, `DaemonCluster.close` stops what was started.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpg_harness import POLL_S, wait_until
from daemon_harness import DaemonCluster

from pmxfs.runtime.ipc import ControlError, request

JOINER = "node3"
WRITER = "node1"
SURVIVORS = ("node1", "node2")
FILES_PER_DIR = 100
SETTLE_TIMEOUT_S = 120.0  # default timers: a leave takes token + consensus, about 8 s
WRITE_TIMEOUT_S = 900.0  # the whole tree; each write is bounded by the daemon too
SYNC_TIMEOUT_S = 300.0
TOTEM_KEYS = ("token_lost", "rings_installed", "gather", "consensus_timeouts",
              "token_retransmits", "fail_to_receive", "merge_detected")

# Called with the variant's name and node name -> pid once node3 runs again (the benchmark
# attaches its profiler); what it returns is called once the return is measured.
OnStart = Callable[[str, Mapping[str, int]], Callable[[], None]]


@dataclass(frozen=True)
class ReturnSpec:
    """How node3 leaves and comes back."""

    name: str  # how the reports call this variant
    empty: bool  # node3 comes back with an empty data directory
    signal: int = signal.SIGTERM  # how it is stopped


KEPT = ReturnSpec("kept data", empty=False)
EMPTY = ReturnSpec("empty data", empty=True)


@dataclass
class Probe:
    """What one node answered on its control socket while node3 returned."""

    slowest_answer_s: float = 0.0
    ring_ids: list[str] = field(default_factory=list)  # in the order seen, each once

    def saw(self, rtt: float, status: Mapping[str, Any] | None) -> None:
        self.slowest_answer_s = max(self.slowest_answer_s, rtt)
        if status is not None:
            ring = str(status["membership"]["ring_id"])
            if ring not in self.ring_ids:
                self.ring_ids.append(ring)


@dataclass
class ReturnResult:
    """One return of node3 (times in seconds from its start)."""

    variant: str
    in_ring_s: float  # node3 is a member of node1's ring
    synced_s: float  # node3 synced, all three in one ring with one tree checksum
    confirmed_s: float  # a write on node3 reached node1 and node2
    # survivor -> counter -> increase over the return (TOTEM_KEYS, datagrams sent/received)
    survivors: dict[str, dict[str, int]]
    joiner: dict[str, int]  # node3's own totem counters and replica counters at the end
    slowest_answer_ms: dict[str, float]  # node -> longest control-socket answer meanwhile
    ring_ids: dict[str, list[str]]  # node -> ring ids it showed meanwhile
    checksums: dict[str, str | None]  # node -> tree checksum at the end

    def token_losses(self) -> dict[str, int]:
        return {name: c["token_lost"] for name, c in self.survivors.items()}

    def rings_installed(self) -> dict[str, int]:
        return {name: c["rings_installed"] for name, c in self.survivors.items()}


@dataclass
class ScenarioResult:
    files: int
    total_bytes: int
    token_ms: int | None
    write_s: float  # writing the tree on node1 (with the survivors' acknowledgements)
    returns: list[ReturnResult]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- set-up


def set_timers(cluster: DaemonCluster, token_ms: int | None) -> None:
    """Rewrite every node's corosync.conf: `None` drops the token lines (corosync's defaults),
    a number sets `token` (with the harness's `token_coefficient: 0`)."""
    lines = []
    for line in cluster.config_text.splitlines():
        key = line.strip().split(":", 1)[0]
        if key in ("token", "token_coefficient") and token_ms is None:
            continue
        lines.append(f"  token: {token_ms}" if key == "token" else line)
    text = "\n".join(lines) + "\n"
    for name in cluster.daemons:
        cluster[name].config.write_text(text)


def file_sizes(files: int, total_bytes: int) -> list[int]:
    """`files` sizes adding up to `total_bytes`, as even as possible."""
    base, extra = divmod(total_bytes, files)
    return [base + (1 if i < extra else 0) for i in range(files)]


def write_tree(mount: Path, files: int, total_bytes: int, writers: int) -> float:
    """Write the tree under `mount/bulk` from `writers` threads; returns the seconds it took."""
    sizes = file_sizes(files, total_bytes)
    top = mount / "bulk"
    dirs = [top / f"d{i:03d}" for i in range((files + FILES_PER_DIR - 1) // FILES_PER_DIR)]
    t0 = time.monotonic()
    top.mkdir()
    for d in dirs:
        d.mkdir()

    def write(i: int) -> None:
        with open(dirs[i // FILES_PER_DIR] / f"f{i:05d}.cfg", "wb") as f:
            f.write(os.urandom(sizes[i]))

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(files), timeout=WRITE_TIMEOUT_S))
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- questions


def ask(cluster: DaemonCluster, name: str, cmd: str, **args: Any) -> Any:
    """One control request in this process (no CLI start-up); None while nobody answers."""
    try:
        return request(cluster[name].run_dir / "pmxfs.sock", cmd, **args)
    except ControlError:
        return None


def counters(cluster: DaemonCluster, name: str) -> dict[str, int]:
    """TOTEM_KEYS (missing ones are 0) and the datagram counters of `name`."""
    ring = ask(cluster, name, "debug", topic="ring")
    transport = ask(cluster, name, "debug", topic="transport")
    assert ring is not None, f"{name} does not answer:\n{cluster[name].log_tail()}"
    assert transport is not None, f"{name} does not answer:\n{cluster[name].log_tail()}"
    out = {key: int(ring["counters"].get(key, 0)) for key in TOTEM_KEYS}
    out.update(datagrams_sent=int(transport["datagrams_sent"]),
               datagrams_received=int(transport["datagrams_received"]))
    return out


def tree_checksum(cluster: DaemonCluster, name: str) -> str | None:
    answer = ask(cluster, name, "debug", topic="checksum")
    return None if answer is None else str(answer["tree"])


# ---------------------------------------------------------------------------- the return


def _all_synced(cluster: DaemonCluster, statuses: Mapping[str, Mapping[str, Any] | None]
                ) -> bool:
    """Every node answers, is synced, and shows the same ring of all nodes; then the tree
    checksums agree."""
    names = sorted(cluster.daemons)
    rings = set()
    for status in statuses.values():
        if status is None or not status["fs"]["synced"]:
            return False
        members = sorted(m["name"] for m in status["membership"]["members"])
        if members != names:
            return False
        rings.add(status["membership"]["ring_id"])
    if len(rings) != 1:
        return False
    sums = {tree_checksum(cluster, name) for name in names}
    return len(sums) == 1 and None not in sums


def _pid(cluster: DaemonCluster, name: str) -> int | None:
    proc = cluster[name].proc
    return proc.pid if proc is not None and proc.poll() is None else None


def _has_joined(status: Mapping[str, Any] | None) -> bool:
    return status is not None and any(m["name"] == JOINER
                                      for m in status["membership"]["members"])


def _confirm(cluster: DaemonCluster, tag: str) -> None:
    """A write on node3's mount is read on every other mount."""
    cluster.wait_mounted(JOINER)
    data = f"{tag} {time.time_ns()}\n"
    marker = cluster[JOINER].mount / f"returned-{time.time_ns()}.cfg"
    marker.write_text(data)

    def everywhere() -> bool:
        for name in SURVIVORS:
            try:
                if (cluster[name].mount / marker.name).read_text() != data:
                    return False
            except OSError:
                return False
        return True

    wait_until(everywhere, SYNC_TIMEOUT_S, f"{marker.name} on {SURVIVORS}")
    marker.unlink()


def leave(cluster: DaemonCluster, spec: ReturnSpec) -> None:
    """Stop node3 by PID and wait until the survivors are one synced ring of two."""
    cluster.kill(JOINER, spec.signal)
    cluster.wait_synced(list(SURVIVORS), timeout=SETTLE_TIMEOUT_S)


@dataclass
class _Timing:
    in_ring_s: float | None = None
    synced_s: float | None = None
    confirmed_s: float | None = None


def _watch(cluster: DaemonCluster, t0: float, probes: Mapping[str, Probe], timing: _Timing
           ) -> None:
    """Ask every node's status each POLL_S until node3 is synced (module header, step 5)."""
    proc = cluster[JOINER].proc
    assert proc is not None
    deadline = t0 + SYNC_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"{JOINER} exited:\n{cluster[JOINER].log_tail()}"
        statuses: dict[str, Mapping[str, Any] | None] = {}
        for name, probe in probes.items():
            asked = time.monotonic()
            statuses[name] = ask(cluster, name, "status")
            probe.saw(time.monotonic() - asked, statuses[name])
        if timing.in_ring_s is None and _has_joined(statuses[WRITER]):
            timing.in_ring_s = time.monotonic() - t0
        if _all_synced(cluster, statuses):
            timing.synced_s = time.monotonic() - t0
            return
        assert time.monotonic() < deadline, (
            f"{JOINER} not synced after {SYNC_TIMEOUT_S} s:\n{cluster[JOINER].log_tail()}")
        time.sleep(POLL_S)


def come_back(cluster: DaemonCluster, spec: ReturnSpec, on_start: OnStart | None = None
              ) -> ReturnResult:
    """Start node3 again and measure its sync (module header, steps 4-6)."""
    if spec.empty:
        shutil.rmtree(cluster[JOINER].data_dir)
        cluster[JOINER].data_dir.mkdir()
    names = sorted(cluster.daemons)
    before = {name: counters(cluster, name) for name in SURVIVORS}
    probes = {name: Probe() for name in names}
    timing = _Timing()
    t0 = time.monotonic()
    cluster.start(JOINER)
    finished = (on_start(spec.name, {name: pid for name in names
                                     if (pid := _pid(cluster, name)) is not None})
                if on_start is not None else None)
    try:
        _watch(cluster, t0, probes, timing)
        _confirm(cluster, spec.name)
        timing.confirmed_s = time.monotonic() - t0
    finally:
        if finished is not None:
            finished()
    after = {name: counters(cluster, name) for name in SURVIVORS}
    joiner = counters(cluster, JOINER)
    replica = ask(cluster, JOINER, "debug", topic="checksum")
    if replica is not None:
        joiner.update({f"replica_{k}": int(v) for k, v in replica["replica"]["counters"].items()})
    assert timing.synced_s is not None
    assert timing.confirmed_s is not None
    return ReturnResult(
        variant=spec.name,
        in_ring_s=round(timing.synced_s if timing.in_ring_s is None else timing.in_ring_s, 3),
        synced_s=round(timing.synced_s, 3), confirmed_s=round(timing.confirmed_s, 3),
        survivors={name: {k: after[name][k] - before[name][k] for k in after[name]}
                   for name in SURVIVORS},
        joiner=joiner,
        slowest_answer_ms={n: round(p.slowest_answer_s * 1000, 1) for n, p in probes.items()},
        ring_ids={n: p.ring_ids for n, p in probes.items()},
        checksums={n: tree_checksum(cluster, n) for n in names})


def run_scenario(root: Path, *, files: int, total_bytes: int, token_ms: int | None,
                 specs: tuple[ReturnSpec, ...] = (KEPT, EMPTY), writers: int = 8,
                 first: int = 71, on_start: OnStart | None = None) -> ScenarioResult:
    """The whole scenario of the module header in `root`; nodes on 127.0.0.FIRST.. ."""
    cluster = DaemonCluster(root, 3, first=first)
    try:
        set_timers(cluster, token_ms)
        cluster.start_all()
        leave(cluster, specs[0])
        write_s = write_tree(cluster[WRITER].mount, files, total_bytes, writers)
        cluster.wait_synced(list(SURVIVORS), timeout=SETTLE_TIMEOUT_S)
        returns = []
        for i, spec in enumerate(specs):
            if i > 0:
                leave(cluster, spec)
            returns.append(come_back(cluster, spec, on_start))
        return ScenarioResult(files, total_bytes, token_ms, round(write_s, 3), returns)
    finally:
        cluster.close()
