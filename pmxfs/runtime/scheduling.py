"""Realtime scheduling for the daemon, so that busy cores do not delay its token handling.

Why. Totem declares the token lost when a node has not seen it for `token` ms, and every write
waits for at least one rotation. At normal priority the daemon shares each core with whatever
else is runnable -- on a hypervisor, the VMs keep every core busy -- and each of its wake-ups
(a frame arrived, a timer expired) waits its turn behind them, at every hop of the token.
corosync runs under SCHED_RR for this reason, and so does pmxfs. With two busy loops per core
on a 2-core machine (default timers, 120 s, tools/liveness.py) the ring held either way, but a
write on the mount took p50/p95/max 59/160/459 ms at normal priority and 12/40/119 ms under
SCHED_RR (idle cores: 10/25/404 ms). The priority is a modest one, DEFAULT_PRIORITY:
above every normal task, below the kernel's interrupt threads (50) and corosync (99), which
carries the cluster's other traffic.

How. `use_realtime()` switches the calling thread to SCHED_RR with SCHED_RESET_ON_FORK. Threads
take their creator's policy, so it is called once at start, before any thread exists, and then
covers the whole daemon; reset-on-fork starts its children (umount, the readiness probe) at
normal priority. A realtime policy the daemon was started with (chrt, or systemd's
CPUSchedulingPolicy=) is kept as it is. When the kernel refuses -- no CAP_SYS_NICE and a low
RLIMIT_RTPRIO, an unprivileged container, a cgroup without realtime budget -- one warning is
logged and the daemon runs on at normal priority: the file system must come up even where the
priority cannot. (This is also why the systemd unit does not ask for the policy itself: a
CPUSchedulingPolicy= that systemd cannot apply fails the start.) Should the daemon ever spin,
the kernel's realtime throttle (sched_rt_runtime_us, 95 % of each second by default) still
leaves the rest of every core to other tasks.
"""

from __future__ import annotations

import logging
import os

DEFAULT_PRIORITY = 10
REALTIME_POLICIES = frozenset({os.SCHED_RR, os.SCHED_FIFO})
POLICY_NAMES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_RR: "SCHED_RR",
                os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_BATCH: "SCHED_BATCH",
                os.SCHED_IDLE: "SCHED_IDLE"}

log = logging.getLogger("pmxfs")


def policy_of(pid: int = 0) -> int:
    """The scheduling policy of `pid` (0: the calling thread), without the reset-on-fork flag."""
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


def use_realtime(priority: int = DEFAULT_PRIORITY) -> bool:
    """Run the calling thread, and the threads it creates from now on, under SCHED_RR at
    `priority` (see the module header). True when the daemon now runs under a realtime policy,
    False (after one warning) when the kernel refused it."""
    current = policy_of()
    if current in REALTIME_POLICIES:
        log.debug("scheduling: keeping %s priority %d, as started", POLICY_NAMES[current],
                  os.sched_getparam(0).sched_priority)
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(priority))
    except OSError as exc:
        log.warning("scheduling: cannot use SCHED_RR priority %d (%s): running at normal "
                    "priority, so busy cores can delay the token", priority,
                    exc.strerror or exc)
        return False
    log.debug("scheduling: SCHED_RR priority %d", priority)  # a refused start stays one line
    return True
