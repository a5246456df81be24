"""Liveness with every core busy (issue 12), and the realtime scheduling that protects the
daemon's token handling (pmxfs/runtime/scheduling.py).

The scenario, with real processes: 2 x nproc busy loops at normal priority while one writer per
node writes, on three daemons with corosync's default timers (no `token` line), scheduled as
they schedule themselves. The ring must keep its membership, every write completes, and every
acknowledged write is on every node afterwards, in its mount and in its config.db. CI saturates
for 20 s; PMXFS_LIVENESS_FULL=1 for 120 s; tools/liveness.py also compares the daemons at normal
priority and under SCHED_RR.

`use_realtime` runs in a child process where it changes anything (never in the test process).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import fuse_unavailable
from liveness_harness import CPU_CI_S, CPU_FULL_S, CpuPlan, run_cpu_saturation

from pmxfs.runtime import scheduling

FULL = os.environ.get("PMXFS_LIVENESS_FULL") == "1"
CHILD_TIMEOUT_S = 60

# prints: what use_realtime returned, the policy and priority it left, the policy of a child
REPORT_SCHEDULING = """
import os, subprocess, sys
from pmxfs.runtime.scheduling import policy_of, use_realtime
ok = use_realtime()
child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                       capture_output=True, text=True, check=True).stdout.split()[0]
print(ok, policy_of(), os.sched_getparam(0).sched_priority, child)
"""


def scheduling_child(*prefix: str) -> list[str]:
    result = subprocess.run([*prefix, sys.executable, "-c", REPORT_SCHEDULING],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.root
def test_use_realtime_switches_to_rr_and_children_start_normal() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to SCHED_RR needs root (CAP_SYS_NICE)")
    assert scheduling_child() == ["True", str(os.SCHED_RR), str(scheduling.DEFAULT_PRIORITY),
                                  str(os.SCHED_OTHER)]


@pytest.mark.root
def test_use_realtime_keeps_the_realtime_policy_it_was_started_with() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting under SCHED_FIFO (chrt) needs root (CAP_SYS_NICE)")
    assert scheduling_child("chrt", "--fifo", "3")[:3] == ["True", str(os.SCHED_FIFO), "3"]


def test_use_realtime_refused_warns_once_and_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(scheduling, "policy_of", lambda pid=0: os.SCHED_OTHER)
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.INFO, logger="pmxfs"):
        assert scheduling.use_realtime() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Operation not permitted" in warnings[0].getMessage()


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.root
def test_ring_survives_busy_cores(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    report = run_cpu_saturation(tmp_path, CpuPlan(seconds=CPU_FULL_S if FULL else CPU_CI_S))
    details = report.describe()
    assert report.ring_changes() == [], f"the ring changed\n{details}"
    deltas = report.counter_deltas()
    assert deltas["token_lost"] == 0, details
    assert deltas["rings_installed"] == 0, details
    assert report.unfinished == 0, details
    assert report.writes, details
    assert report.failed_writes() == [], details
    assert report.synced, details
    assert report.lost == [], details
