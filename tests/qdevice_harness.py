"""Real node daemons and a real qnetd, each in its own network namespace, for the QDevice tests
(issue 14).

`QdeviceLab(root, names)` is lifecycle_harness's `NetnsLab` (a bridge in a "switch" namespace,
one namespace per node, node i on 10.213.0.i, daemons started with `nsenter --net`, clusters
built with `pmxfs create` / `join-token` / `add`) plus one more namespace on the same bridge for
qnetd, on 10.213.0.200, with its directory under `root/qnetd/`. qnetd is `pmxfs qnetd --listen
ADDR:PORT --dir DIR` started by PID like the daemons; it is up once its process has a TCP socket
listening on PORT, read from /proc/PID/net/tcp (`demo_qnetd.listening`: that file shows the
sockets of the process's own network namespace, which the test cannot reach otherwise). `init`
and `token` need no network and run in the test's namespace.

A partition (`cut(side, other)`) cuts the wire between two groups of nodes and nothing else
(`cut_qnetd(names)` the one between those nodes and qnetd):
each node gets a permanent neighbour entry that maps every address of the other side to a MAC
address no port has, so their frames go nowhere (the kernel drops a frame whose destination is
another host's MAC) while both sides still reach qnetd. Sends succeed, as on a cut cable; no
route or packet filter is needed. `heal()` deletes those entries.

`set_device_timeouts` writes a short quorum.device timeout (and sync_timeout) into corosync.conf
through a node's mount, so that qnetd's decisions and a lost qnetd are noticed within seconds.

`close()` stops qnetd by PID (SIGTERM, then SIGKILL after a deadline) before the lab's own
teardown stops the daemons, unmounts and deletes every namespace.
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpg_harness import PMXFS, wait_until
from lifecycle_harness import (
    CLI_TIMEOUT_S,
    STOP_TIMEOUT_S,
    NetnsLab,
)
from test_cpg_netns import _ip

from pmxfs.commands.demo_qnetd import listening

QNETD_NODEID = 200  # the qnetd namespace's host number on the lab's subnet (10.213.0.200)
QNETD_PORT = 5403
DEVICE_TIMEOUT_MS = 2000  # quorum.device.timeout the tests set (corosync-qdevice: 10000)
DEVICE_SYNC_TIMEOUT_MS = 3000  # quorum.device.sync_timeout (corosync-qdevice: 30000)
QNETD_START_TIMEOUT_S = 30.0
NOWHERE_MAC = "02:00:5e:00:00:fe"  # locally administered, no port of the bridge has it

__all__ = ["DEVICE_SYNC_TIMEOUT_MS", "DEVICE_TIMEOUT_MS", "QNETD_PORT", "QdeviceLab",
           "with_device_timeouts"]


def with_device_timeouts(text: str, timeout_ms: int, sync_timeout_ms: int) -> str:
    """`text` (a corosync.conf with a quorum.device section) with the device's timeout and
    sync_timeout set and config_version + 1."""
    text, bumped = re.subn(r"(?m)^([ \t]*config_version:[ \t]*)(\d+)",
                           lambda m: f"{m.group(1)}{int(m.group(2)) + 1}", text, count=1)
    text = re.sub(r"(?m)^[ \t]*(sync_)?timeout:.*\n", "", text)  # totem's is `token`
    device = re.search(r"(?m)^([ \t]*)device[ \t]*\{[ \t]*\n", text)
    assert bumped == 1, text
    assert device is not None, text
    indent = device.group(1) + "  "
    lines = f"{indent}timeout: {timeout_ms}\n{indent}sync_timeout: {sync_timeout_ms}\n"
    return text[:device.end()] + lines + text[device.end():]


class QdeviceLab(NetnsLab):
    """A NetnsLab with a qnetd host on the same bridge (module header)."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        super().__init__(root, names)
        self.cuts: list[tuple[str, str]] = []  # (namespace, address) of each neighbour entry
        self.qnetd_proc: subprocess.Popen[bytes] | None = None
        self.qnetd_pids: list[int] = []
        try:
            host = self._make_node("qnetd", QNETD_NODEID)
        except BaseException:
            self.close()
            raise
        self.qnetd_ns, self.qnetd_addr = host.ns, host.addr
        self.qnetd_dir = host.home / "dir"
        self.qnetd_log = host.home / "qnetd.log"

    @property
    def qnetd_address(self) -> str:
        """Where the nodes reach qnetd: ADDR:PORT."""
        return f"{self.qnetd_addr}:{QNETD_PORT}"

    # ------------------------------------------------------------------ qnetd

    def qnetd_cli(self, *args: str, directory: Path | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """`pmxfs qnetd ARGS --dir DIR` (init, token) in the test's namespace."""
        argv = [str(PMXFS), "qnetd", *args, "--dir", str(directory or self.qnetd_dir)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                check=False)
        if check:
            assert result.returncode == 0, (f"pmxfs qnetd {' '.join(args)} -> "
                                            f"{result.returncode}: {result.stderr}")
        return result

    def qnetd_init(self, directory: Path | None = None) -> None:
        self.qnetd_cli("init", directory=directory)

    def qnetd_token(self, ttl: str = "1h", directory: Path | None = None) -> str:
        """A new enrollment token naming this lab's qnetd address."""
        lines = self.qnetd_cli("token", "--address", self.qnetd_address, "--ttl", ttl,
                               directory=directory).stdout.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("pmxfs-qnetd-1:"), lines
        return lines[0]

    def qnetd_running(self) -> bool:
        return self.qnetd_proc is not None and self.qnetd_proc.poll() is None

    def start_qnetd(self) -> None:
        """Run qnetd in its namespace and wait until it listens."""
        assert not self.qnetd_running(), "qnetd is already running"
        argv = ["nsenter", f"--net=/run/netns/{self.qnetd_ns}", "--", str(PMXFS), "qnetd",
                "--listen", self.qnetd_address, "--dir", str(self.qnetd_dir)]
        with open(self.qnetd_log, "ab") as log:
            self.qnetd_proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                               stdin=subprocess.DEVNULL)
        self.qnetd_pids.append(self.qnetd_proc.pid)
        proc = self.qnetd_proc

        def up() -> bool:
            assert proc.poll() is None, f"qnetd exited:\n{self.qnetd_tail()}"
            return listening(proc.pid, QNETD_PORT)

        wait_until(up, QNETD_START_TIMEOUT_S, "qnetd listening", self.qnetd_tail)

    def stop_qnetd(self) -> int:
        """SIGTERM by PID, SIGKILL after STOP_TIMEOUT_S; the exit status."""
        proc = self.qnetd_proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=STOP_TIMEOUT_S)

    def qnetd_text(self) -> str:
        try:
            return self.qnetd_log.read_text(errors="replace")
        except OSError:
            return ""

    def qnetd_tail(self, lines: int = 30) -> str:
        return "--- qnetd ---\n" + "\n".join(self.qnetd_text().splitlines()[-lines:])

    def describe(self, names: Sequence[str] | None = None) -> str:
        return f"{super().describe(names)}\n{self.qnetd_tail(15)}"

    def close(self) -> None:
        if self.qnetd_running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop_qnetd()
        super().close()

    # ------------------------------------------------------------------ the device

    def setup(self, name: str, token: str, *extra: str,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        """`pmxfs qdevice setup QNETD_ADDR:PORT --token TOKEN EXTRA` on `name`."""
        return self.cli(name, "qdevice", "setup", self.qnetd_address, "--token", token, *extra,
                        check=check)

    def set_device_timeouts(self, name: str, timeout_ms: int = DEVICE_TIMEOUT_MS,
                            sync_timeout_ms: int = DEVICE_SYNC_TIMEOUT_MS) -> int:
        """Write the device's timeouts into corosync.conf through `name`'s mount; the new
        config_version."""
        path = self.nodes[name].mount / "corosync.conf"
        text = with_device_timeouts(path.read_text(), timeout_ms, sync_timeout_ms)
        path.write_text(text)
        match = re.search(r"config_version:\s*(\d+)", text)
        assert match is not None
        return int(match.group(1))

    def qdevice(self, name: str) -> dict[str, Any] | None:
        """The `qdevice` object of `name`'s `pmxfs status --json`, None when it has none."""
        device: dict[str, Any] | None = self.status(name).get("qdevice")
        return device

    def quorate(self, name: str) -> bool:
        return bool(self.status(name)["quorum"]["quorate"])

    def write_errno(self, name: str, file: str) -> int | None:
        """Write `file` through `name`'s mount: None when it worked, else the errno."""
        try:
            (self.nodes[name].mount / file).write_text(f"written on {name}\n")
        except OSError as exc:
            return exc.errno if exc.errno is not None else errno.EIO
        return None

    # ------------------------------------------------------------------ partitions

    def cut(self, side: Sequence[str], other: Sequence[str]) -> None:
        """No frame between a node of `side` and one of `other` (module header)."""
        for here, there in ((side, other), (other, side)):
            for name in here:
                for peer in there:
                    ns, addr = self.nodes[name].ns, self.nodes[peer].addr
                    _ip("-n", ns, "neigh", "replace", addr, "lladdr", NOWHERE_MAC, "dev",
                        "eth0", "nud", "permanent")
                    self.cuts.append((ns, addr))

    def cut_qnetd(self, names: Sequence[str]) -> None:
        """No frame between qnetd and each of `names` (the nodes still reach each other)."""
        for name in names:
            node = self.nodes[name]
            for ns, addr in ((node.ns, self.qnetd_addr), (self.qnetd_ns, node.addr)):
                _ip("-n", ns, "neigh", "replace", addr, "lladdr", NOWHERE_MAC, "dev", "eth0",
                    "nud", "permanent")
                self.cuts.append((ns, addr))

    def heal(self) -> None:
        """Every cut undone: the nodes resolve each other's addresses again."""
        for ns, addr in self.cuts:
            _ip("-n", ns, "neigh", "del", addr, "dev", "eth0", check=False)
        self.cuts.clear()
