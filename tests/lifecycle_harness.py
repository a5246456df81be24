"""Real `pmxfs daemon` processes, each in its own network namespace, for the cluster lifecycle
tests (issue 13): create, join with a token, delnode, restore -- all through the CLI.

`NetnsLab(root, names)` makes a "switch" namespace holding a bridge and one namespace per node,
joined to the bridge by a veth pair; node i has the address 10.213.0.i/24, which exists only in
its namespace (the same layout as the `lab` of test_cpg_netns, for any number of nodes). Each
node keeps its own corosync.conf, authkey, data, run and mount paths and daemon log under
`root/<name>/`. A daemon starts with `nsenter --net=/run/netns/NS` -- only the network namespace
is entered, so its FUSE mount is visible to the test (`ip netns exec` would make a new mount
namespace) -- and without corosync.conf it runs standalone until `create` or `add` gives it one.
The `pmxfs` client talks to a daemon over its unix control socket, which needs no namespace.

`close()` undoes everything whatever happened in the test: every daemon it started is stopped
by PID (SIGTERM, then SIGKILL after a deadline), whatever is still mounted is unmounted lazily,
and the namespaces are deleted. Every wait polls a condition until a deadline (`wait_until`).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from cpg_harness import PMXFS, wait_until
from daemon_harness import MOUNT_TIMEOUT_S, fuse_unavailable, is_mounted, unmount
from test_cpg_netns import _ip, _netns_unavailable

from pmxfs.commands.node_home import NodeHome

CLUSTER = "lab"
SUBNET = "10.213.0"
TOKEN_MS = 1000  # the totem token the tests give every cluster right after `create`
TOKEN_COEFFICIENT_MS = 650  # corosync's default: the token grows by this per node beyond two
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL
CLI_TIMEOUT_S = 150.0  # `pmxfs add` itself waits up to 120 s for quorum
RING_TIMEOUT_S = 60.0


def running_token(configured: int, nodes: int) -> int:
    """The token timeout a ring of `nodes` runs with (corosync's token_coefficient rule)."""
    return configured + TOKEN_COEFFICIENT_MS * max(0, nodes - 2)


def lab_unavailable() -> str | None:
    """Why these tests cannot run here (no root, no network namespaces, no FUSE), or None."""
    return _netns_unavailable() or fuse_unavailable()


class _Closable(Protocol):
    def close(self) -> None: ...


Lab = TypeVar("Lab", bound=_Closable)


@contextlib.contextmanager
def lab_set(root: Path) -> Iterator[Callable[[Callable[[Path], Lab]], Lab]]:
    """For a fixture: skips the test when labs cannot run here, else gives `keep(build)`, which
    builds a lab in a fresh directory under `root` (`build(directory)`); every lab kept is
    closed at the end, whatever happened in the test."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    labs: list[_Closable] = []

    def keep(build: Callable[[Path], Lab]) -> Lab:
        lab = build(root / f"lab{len(labs)}")
        labs.append(lab)
        return lab

    try:
        yield keep
    finally:
        for lab in labs:
            lab.close()


@dataclass
class LabNode(NodeHome):
    """One node: its namespace, address and paths, and the daemon running there (if any)."""

    name: str
    nodeid: int  # the id `create` / `add` give it (the tests ask for it explicitly)
    ns: str
    addr: str
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)  # every daemon PID started, in order

    def argv(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", str(PMXFS), "daemon",
                *self.daemon_options(self.name), "--no-realtime"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return f"--- {self.name} ---\n" + "\n".join(self.log_text().splitlines()[-lines:])


class NetnsLab:
    """The namespaces and daemons of one test (module header)."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = root
        self.tag = secrets.token_hex(3)
        self.switch = f"pmxl-{self.tag}-sw"
        self.namespaces: list[str] = []
        self.nodes: dict[str, LabNode] = {}
        try:
            self._make_switch()
            for nodeid, name in enumerate(names, start=1):
                self.nodes[name] = self._make_node(name, nodeid)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> LabNode:
        return self.nodes[name]

    def _make_switch(self) -> None:
        _ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _make_node(self, name: str, nodeid: int) -> LabNode:
        ns, veth = f"pmxl-{self.tag}-{name}", f"vb{nodeid}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self.switch, "link", "set", veth, "master", "br0")
        _ip("-n", self.switch, "link", "set", veth, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        addr = f"{SUBNET}.{nodeid}"
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        home = self.root / name
        home.mkdir(parents=True)
        node = LabNode(name, nodeid, ns, addr, home)
        node.mount.mkdir()
        return node

    # ------------------------------------------------------------------ processes

    def start(self, name: str) -> LabNode:
        """Start the daemon of `name` and wait until its mount answers."""
        node = self.nodes[name]
        assert not node.running(), f"{name} is already running"
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(node.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        node.pids.append(node.proc.pid)
        self.wait_mounted(name)
        return node

    def wait_mounted(self, name: str) -> None:
        node = self.nodes[name]

        def answers() -> bool:
            assert node.running(), f"{name} exited:\n{node.log_tail()}"
            try:
                return is_mounted(node.mount) and (node.mount / ".members").exists()
            except OSError:
                return False

        wait_until(answers, MOUNT_TIMEOUT_S, f"the mount of {name}", node.log_tail)

    def stop(self, name: str) -> int:
        """SIGTERM by PID, SIGKILL after STOP_TIMEOUT_S; the exit status."""
        node = self.nodes[name]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        try:
            status = node.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            status = node.proc.wait(timeout=STOP_TIMEOUT_S)
        unmount(node.mount)
        return status

    def close(self) -> None:
        for name, node in self.nodes.items():
            if node.running():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.stop(name)
            unmount(node.mount)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()

    def describe(self, names: Sequence[str] | None = None) -> str:
        return "\n".join(self.nodes[n].log_tail(15) for n in (names or list(self.nodes)))

    # ------------------------------------------------------------------ the client

    def cli(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        result = subprocess.run([str(PMXFS), "--run-dir", str(node.run_dir), *args],
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                check=False)
        if check:
            assert result.returncode == 0, (f"{name}: pmxfs {' '.join(args)} -> "
                                            f"{result.returncode}: {result.stderr}"
                                            f"\n{self.describe()}")
        return result

    def query(self, name: str, *args: str) -> Any:
        return json.loads(self.cli(name, *args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.query(name, "status")
        return out

    def tree_checksum(self, name: str) -> str:
        return str(self.query(name, "debug", "checksum")["tree"])

    def ring(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.query(name, "debug", "ring")
        return out

    def transport(self, name: str) -> dict[str, int]:
        out: dict[str, int] = self.query(name, "debug", "transport")
        return out

    def cluster_log(self, name: str) -> list[str]:
        """The messages of the cluster log, as the mount's .clusterlog shows them."""
        data = json.loads((self.nodes[name].mount / ".clusterlog").read_text())["data"]
        return [str(entry["msg"]) for entry in data]

    # ------------------------------------------------------------------ the lifecycle

    def create(self, name: str) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        return self.cli(name, "create", CLUSTER, "--link0", node.addr, "--nodeid",
                        str(node.nodeid))

    def join_token(self, name: str, ttl: str = "15m") -> str:
        lines = self.cli(name, "join-token", "--ttl", ttl).stdout.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("pmxfs-join-1:"), lines
        return lines[0]

    def add(self, name: str, token: str, *, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        node = self.nodes[name]
        return self.cli(name, "add", "--token", token, "--link0", node.addr, "--nodeid",
                        str(node.nodeid), check=check)

    def write_config(self, name: str, change: dict[str, int]) -> int:
        """Write corosync.conf through `name`'s mount with the totem options in `change` set
        and config_version + 1; the new config_version."""
        path = self.nodes[name].mount / "corosync.conf"
        text = path.read_text()
        match = re.search(r"config_version:\s*(\d+)", text)
        assert match is not None, text
        version = int(match.group(1)) + 1
        text = text[:match.start(1)] + str(version) + text[match.end(1):]
        for key, value in change.items():
            text, count = re.subn(rf"(?m)^(\s*){key}:.*$", rf"\g<1>{key}: {value}", text)
            if count == 0:
                text = re.sub(r"(?m)^(\s*)config_version:.*$",
                              rf"\g<0>\n\g<1>{key}: {value}", text, count=1)
        path.write_text(text)
        return version

    def wait_ring(self, names: Sequence[str], timeout: float = RING_TIMEOUT_S, *,
                  same_tree: bool = True) -> None:
        """Until `names` form one quorate, synced ring of exactly them, holding one tree (unless
        `same_tree` is False: while writes go on, the trees are rarely equal at one moment)."""
        want = sorted(names)

        def together() -> bool:
            sums = set()
            for name in names:
                st = self.status(name)
                members = sorted(m["name"] for m in st["membership"]["members"])
                if members != want or not st["quorum"]["quorate"] or not st["fs"]["synced"]:
                    return False
                if same_tree:
                    sums.add(self.tree_checksum(name))
            return len(sums) <= 1

        wait_until(together, timeout, f"{want} synced together", lambda: self.describe(names))

    def build(self, names: Sequence[str]) -> None:
        """A cluster of `names` made through the CLI: every daemon started standalone, `create`
        on the first (and the totem token set to TOKEN_MS), `add` of the others in turn."""
        first, *others = names
        for name in names:
            self.start(name)
        self.create(first)
        self.write_config(first, {"token": TOKEN_MS})
        wait_until(lambda: self.ring(first)["params"]["token"] == TOKEN_MS, RING_TIMEOUT_S,
                   f"token {TOKEN_MS} on {first}", lambda: self.describe([first]))
        for name in others:
            self.add(name, self.join_token(first))
        self.wait_ring(names)
