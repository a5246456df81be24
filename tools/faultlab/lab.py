"""The fault lab: N real `pmxfs daemon` processes, each in its own network namespace, joined by
the user-space switch, each with its own FUSE mount visible to the harness.

`Lab(root, count, seed, slow_node)` lays node i (`n<i>`) out under `root/n<i>/` (corosync.conf,
authkey, data/, run/, mnt/, daemon.log -- `NodeHome`'s layout). `build()` makes, in this order,
everything `close()` undoes: one namespace `pmxf-<tag>-n<i>` per node with the loopback up and
a TUN port of the switch (`pf<tag><i>`, address 10.216.0.i/24), one corosync.conf (udpu, token
1000 ms) and one authkey for every node, the slow disk (tools/slowdisk.py serving
`data-backing/` at `data/`) under `slow_node`'s data directory when asked, and the daemons. A
daemon runs as `nsenter --net=/run/netns/NS -- pmxfs daemon ...`: only the network namespace is
entered, so its mount is visible here, and nsenter execs the daemon, so the PID is the daemon's.

Every daemon start, SIGKILL, SIGSTOP and SIGCONT is recorded as a `NodeEvent` (the checker
splits a node's reads by daemon run). Anything that talks to a daemon or its mount is bounded in
time (`bounded`): a stopped daemon blocks FUSE calls and control-socket answers.

`close()` is safe to call at any point and more than once: paused daemons are continued, every
daemon stopped by PID (SIGTERM, SIGKILL after a deadline), every mount unmounted (lazily), the
slow disk stopped, the switch's ports closed (their devices go with them) and the namespaces
deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from faultlab.history import NodeEvent
from faultlab.switch import Switch
from pmxfs.commands.node_home import NodeHome

T = TypeVar("T")

SUBNET = "10.216.0"
CLUSTER = "faults"
TOKEN_MS = 1000
PYTHON = Path(sys.executable)
PMXFS = PYTHON.parent / "pmxfs"
SLOWDISK = Path(__file__).resolve().parent.parent / "slowdisk.py"
SLOW_STALL_S = 4.0  # each SIGUSR1 to the slow disk holds its fsyncs this long
MOUNT_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 5.0
POLL_S = 0.2


class Unavailable(Exception):
    """The lab cannot be built on this machine (the message says why)."""


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (not root, no tools, no TUN, no FUSE), or None."""
    if os.geteuid() != 0:
        return "the fault lab needs root (network namespaces, TUN devices, FUSE mounts)"
    for tool in ("ip", "nsenter", "fusermount3", "umount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return f"/dev/net/tun cannot be opened: {exc.strerror}"
    if not PMXFS.exists():
        return f"no pmxfs next to this python ({PMXFS})"
    return None


def bounded(call: Callable[[], T], timeout: float) -> T | None:
    """`call()` in a daemon thread; its result, or None when it did not return in `timeout`
    (the thread is left behind: a FUSE call to a stopped daemon may never return)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    return result[0] if result else None


def answers(mount: Path) -> bool:
    """Whether a daemon serves `mount` (a dead mount answers ENOTCONN)."""
    try:
        return (mount / ".members").exists()
    except OSError:
        return False


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if check and done.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def mount_target(path: Path) -> str:
    """`path` as the mount table names it: its parent resolved, the mount point itself never
    touched (a stopped daemon would block the lookup, a dead one answers ENOTCONN)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def is_mounted(path: Path) -> bool:
    """From the mount table: a dead FUSE mount counts (os.path.ismount would say no)."""
    target = mount_target(path)
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts)


def unmount(path: Path) -> None:
    """Lazily, without looking at the mount point (`mount_target`); bounded."""
    for _ in range(3):
        if not is_mounted(path):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["umount", "-l", "--no-canonicalize", mount_target(path)],
                           capture_output=True, timeout=30, check=False)


def render_config(nodes: Sequence[tuple[str, int, str]], token_ms: int = TOKEN_MS) -> str:
    """corosync.conf for `nodes` (name, nodeid, address): udpu, one link."""
    out = ["totem {", f"  cluster_name: {CLUSTER}", "  config_version: 1", "  version: 2",
           "  transport: udpu", f"  token: {token_ms}", "}", "", "nodelist {"]
    for name, nodeid, addr in nodes:
        out += ["  node {", f"    name: {name}", f"    nodeid: {nodeid}", "    quorum_votes: 1",
                f"    ring0_addr: {addr}", "  }"]
    out += ["}", "", "quorum {", "  provider: corosync_votequorum", "}", ""]
    return "\n".join(out)


@dataclass
class Node(NodeHome):
    name: str
    nodeid: int
    ns: str
    ifname: str
    addr: str
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    link_up: bool = True
    slowdisk: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", str(PMXFS), "daemon",
                *self.daemon_options(self.name), "--no-realtime"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def backing(self) -> Path:
        """Where the data directory's files really are (differs on the slow disk)."""
        return self.home / "data-backing" if self.slowdisk is not None else self.data_dir


class Lab:
    """The namespaces, switch, daemons and mounts of one run (module header)."""

    def __init__(self, root: Path, count: int, seed: int, slow_node: str | None = None) -> None:
        self.root = root
        self.tag = secrets.token_hex(3)
        self.switch = Switch(seed)
        self.events: list[NodeEvent] = []
        self.namespaces: list[str] = []
        self.slow_node = slow_node
        self.nodes: dict[str, Node] = {}
        for i in range(1, count + 1):
            name = f"n{i}"
            self.nodes[name] = Node(name, i, f"pmxf-{self.tag}-{name}", f"pf{self.tag}{i}",
                                    f"{SUBNET}.{i}", root / name)

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    # ------------------------------------------------------------------ building

    def build(self) -> None:
        for node in self.nodes.values():
            self._make_namespace(node)
        self.switch.start()
        self._write_configs()
        if self.slow_node is not None:
            self._start_slowdisk(self.nodes[self.slow_node])
        for name in self.nodes:
            self.start(name, wait=False)
        for name in self.nodes:
            self.wait_mounted(name)

    def _make_namespace(self, node: Node) -> None:
        node.home.mkdir(parents=True)
        node.mount.mkdir()
        self.namespaces.append(node.ns)  # before it exists: an interrupted `ip` may make it
        ip("netns", "add", node.ns)
        self.switch.add_port(node.name, node.ifname, node.addr)
        ip("link", "set", node.ifname, "netns", node.ns)
        ip("-n", node.ns, "link", "set", "lo", "up")
        ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
        ip("-n", node.ns, "link", "set", node.ifname, "up")

    def _write_configs(self) -> None:
        key = self.root / "authkey"
        done = subprocess.run([str(PMXFS), "keygen", str(key)], capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise Unavailable(f"pmxfs keygen: {done.stderr.strip()}")
        text = render_config([(n.name, n.nodeid, n.addr) for n in self.nodes.values()])
        for node in self.nodes.values():
            node.config.write_text(text)
            shutil.copy2(key, node.authkey)

    def _start_slowdisk(self, node: Node) -> None:
        backing = node.home / "data-backing"
        backing.mkdir(mode=0o700)
        node.data_dir.mkdir(mode=0o700)
        with open(node.home / "slowdisk.log", "ab") as log:
            node.slowdisk = subprocess.Popen(
                [str(PYTHON), str(SLOWDISK), str(backing), str(node.data_dir), "--stall",
                 str(SLOW_STALL_S)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not is_mounted(node.data_dir):
            if node.slowdisk.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"the slow disk of {node.name} did not mount; see "
                                  f"{node.home / 'slowdisk.log'}")
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ daemons

    def start(self, name: str, *, wait: bool = True) -> None:
        """Start `name`'s daemon (it takes a dead mount away itself); wait for its mount."""
        node = self.nodes[name]
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(node.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        node.paused = False
        self.events.append(NodeEvent(time.monotonic(), name, "started"))
        if wait:
            self.wait_mounted(name)

    def wait_mounted(self, name: str, timeout: float = MOUNT_TIMEOUT_S) -> bool:
        """Until `name`'s mount answers; False when it did not in time or the daemon died."""
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.running():
                return False
            if is_mounted(node.mount) and bounded(partial(answers, node.mount), CLI_TIMEOUT_S):
                return True
            time.sleep(POLL_S)
        return False

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        if not node.running():
            return
        assert node.proc is not None
        self.events.append(NodeEvent(time.monotonic(), name, "killed"))
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(STOP_TIMEOUT_S)
        node.paused = False

    def pause(self, name: str) -> None:
        node = self.nodes[name]
        if node.running() and not node.paused:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True
            self.events.append(NodeEvent(time.monotonic(), name, "paused"))

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.running() and node.paused:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGCONT)
            node.paused = False
            self.events.append(NodeEvent(time.monotonic(), name, "resumed"))

    def set_link(self, name: str, *, up: bool) -> None:
        node = self.nodes[name]
        ip("-n", node.ns, "link", "set", node.ifname, "up" if up else "down")
        node.link_up = up

    def stall_disk(self) -> bool:
        """Stall the slow node's fsyncs for SLOW_STALL_S; False when there is no slow disk."""
        node = self.nodes[self.slow_node] if self.slow_node is not None else None
        if node is None or node.slowdisk is None or node.slowdisk.poll() is not None:
            return False
        node.slowdisk.send_signal(signal.SIGUSR1)
        return True

    # ------------------------------------------------------------------ observing

    def status(self, name: str) -> dict[str, Any] | None:
        node = self.nodes[name]
        try:
            done = subprocess.run([str(PMXFS), "--run-dir", str(node.run_dir), "status",
                                   "--json"], capture_output=True, text=True,
                                  timeout=CLI_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        try:
            out: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            return None
        return out

    def ring_together(self) -> str | None:
        """None when every node is in one quorate, synced ring of all nodes; else why not."""
        want = sorted(self.nodes)
        rings = set()
        for name in self.nodes:
            st = self.status(name)
            if st is None:
                return f"{name} does not answer"
            members = sorted(m["name"] for m in st["membership"]["members"])
            if members != want:
                return f"{name} sees members {members}"
            if not st["quorum"]["quorate"]:
                return f"{name} is not quorate"
            if not st["fs"]["synced"]:
                return f"{name} is syncing"
            rings.add(st["membership"]["ring_id"])
        return None if len(rings) == 1 else f"ring ids differ: {sorted(rings)}"

    def dead(self) -> list[str]:
        """Nodes whose daemon is not running (a SIGKILL the nemesis did not undo, or a crash)."""
        return [name for name, node in self.nodes.items() if not node.running()]

    def log_size(self, name: str) -> int:
        try:
            return self.nodes[name].log.stat().st_size
        except OSError:
            return 0

    def log_since(self, name: str, offset: int) -> str:
        """What `name`'s daemon log gained after byte `offset`."""
        try:
            with open(self.nodes[name].log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.nodes[name].log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ tearing down

    def close(self) -> None:
        for node in self.nodes.values():
            if node.running():
                assert node.proc is not None
                with contextlib.suppress(OSError):
                    node.proc.send_signal(signal.SIGCONT)
                    node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.proc is not None:
                stop(node.proc)
            unmount(node.mount)
        for node in self.nodes.values():
            if node.slowdisk is not None:
                if node.slowdisk.poll() is None:
                    node.slowdisk.send_signal(signal.SIGTERM)
                    stop(node.slowdisk)
                unmount(node.data_dir)
        self.switch.close()
        for ns in reversed(self.namespaces):
            with contextlib.suppress(subprocess.TimeoutExpired):
                ip("netns", "del", ns, check=False)
        self.namespaces.clear()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for `proc`, signalled to stop, then SIGKILL it; bounded, never raises."""
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
