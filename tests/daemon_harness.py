"""Real `pmxfs daemon` processes with FUSE mounts on loopback, for the tests and the benchmark.

`DaemonCluster(root, count, first=41)` writes one corosync.conf (node i on 127.0.0.(first+i-1),
udpu, token 1000 ms) and one authkey, and keeps per node a directory with data/, run/, mnt/ and
the daemon's log. `start()` runs a daemon, `wait_mounted()` waits until its mount answers,
`kill()` sends a signal by PID, `close()` stops every daemon it started (SIGKILL by PID) and
lazily unmounts whatever is still mounted, whatever happened in the test. `cli()` runs the
`pmxfs` client against a node's control socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpg_harness import Node, keygen, random_port, render_config, wait_until

PMXFS = Path(sys.executable).parent / "pmxfs"
MOUNT_TIMEOUT_S = 30.0


def fuse_unavailable() -> str | None:
    """Why real mounts cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "FUSE mounts of the daemon tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (package fuse3) is not installed"
    return None


def is_mounted(path: Path) -> bool:
    """From the mount table: a dead FUSE mount (ENOTCONN) counts, `os.path.ismount` says no."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts)


def unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False, timeout=30)


@dataclass
class Daemon:
    node: Node
    home: Path
    config: Path
    authkey: Path
    proc: subprocess.Popen[bytes] | None = None
    started: list[int] = field(default_factory=list)

    @property
    def mount(self) -> Path:
        return self.home / "mnt"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "daemon.log"

    def argv(self) -> list[str]:
        return [str(PMXFS), "daemon", "--config", str(self.config), "--authkey",
                str(self.authkey), "--node", self.node.name, "--mount", str(self.mount),
                "--data-dir", str(self.data_dir), "--run-dir", str(self.run_dir)]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class DaemonCluster:
    def __init__(self, root: Path, count: int, first: int = 41,
                 rng: random.Random | None = None) -> None:
        self.root = root
        self.nodes = [Node(f"node{i}", i, f"127.0.0.{first + i - 1}")
                      for i in range(1, count + 1)]
        self.port = random_port(rng)
        self.config_text = render_config(self.nodes, port=self.port, cluster_name="pmxtest")
        authkey = root / "authkey"
        keygen(authkey)
        self.daemons: dict[str, Daemon] = {}
        for node in self.nodes:
            home = root / node.name
            for sub in ("data", "run", "mnt"):
                (home / sub).mkdir(parents=True, exist_ok=True)
            config = home / "corosync.conf"
            config.write_text(self.config_text)
            self.daemons[node.name] = Daemon(node, home, config, authkey)

    def __getitem__(self, name: str) -> Daemon:
        return self.daemons[name]

    # ------------------------------------------------------------------ processes

    def start(self, name: str) -> Daemon:
        d = self.daemons[name]
        assert not d.running(), f"{name} is already running"
        with open(d.log, "ab") as log:
            d.proc = subprocess.Popen(d.argv(), stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
        d.started.append(d.proc.pid)
        return d

    def wait_mounted(self, name: str, timeout: float = MOUNT_TIMEOUT_S) -> None:
        d = self.daemons[name]

        def answers() -> bool:
            assert d.running(), f"{name} exited:\n{d.log_tail()}"
            try:
                return is_mounted(d.mount) and (d.mount / ".members").exists()
            except OSError:
                return False  # the dead mount of an earlier run, not yet cleared

        wait_until(answers, timeout, f"the mount of {name}", d.log_tail)

    def start_all(self) -> None:
        for name in self.daemons:
            self.start(name)
        for name in self.daemons:
            self.wait_mounted(name)
        self.wait_synced(list(self.daemons), timeout=60)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        d = self.daemons[name]
        assert d.proc is not None
        d.proc.send_signal(sig)
        d.proc.wait(timeout=60)

    def stop(self, name: str) -> int:
        """SIGTERM by PID; returns the exit status."""
        d = self.daemons[name]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        return d.proc.wait(timeout=60)

    def close(self) -> None:
        for d in self.daemons.values():
            if d.running() and d.proc is not None:
                d.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    d.proc.wait(timeout=30)
            unmount(d.mount)

    # ------------------------------------------------------------------ questions

    def cli(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        d = self.daemons[name]
        result = subprocess.run([str(PMXFS), "--run-dir", str(d.run_dir), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert result.returncode == 0, f"pmxfs {' '.join(args)}: {result.stderr}"
        return result

    def status(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli(name, "status", "--json").stdout)
        return out

    def checksum(self, name: str) -> str:
        out = json.loads(self.cli(name, "debug", "checksum", "--json").stdout)
        return str(out["tree"])

    def wait_synced(self, names: list[str], timeout: float = 30) -> None:
        """Until `names` are one quorate, synced ring of exactly them with one tree."""
        def together() -> bool:
            sums = set()
            for name in names:
                st = self.status(name)
                members = sorted(m["name"] for m in st["membership"]["members"])
                if members != sorted(names) or not st["fs"]["synced"]:
                    return False
                sums.add(self.checksum(name))
            return len(sums) == 1

        wait_until(together, timeout, f"{names} synced together",
                   lambda: "\n".join(self[n].log_tail(10) for n in names))
