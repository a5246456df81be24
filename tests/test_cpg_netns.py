"""`pmxfs debug cpg` with `transport: udp` (IP multicast) inside network namespaces the test
creates: a bridge in its own "switch" namespace and one namespace per node, joined by veth pairs,
with the nodes' addresses existing only inside those namespaces. A partition (one bridge port
taken down) splits the ring in two; healing it merges them back into one."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cpg_harness import (
    CpgProcess,
    Node,
    ProcessGroup,
    Ring,
    all_delivered,
    assert_exactly_once,
    check_agreement,
    is_confchg,
    send_concurrently,
    start_ring,
    wait_until,
)

pytestmark = pytest.mark.netns

MCASTADDR = "239.192.77.1"
TOKEN_MS = 1000
DELIVERY_TIMEOUT_S = 20.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    probe = f"pmxt-{secrets.token_hex(3)}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` does not work here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Lab:
    """The namespaces of one test: `switch` holds br0 with port `port[node]` per node."""

    tag: str
    switch: str
    node_ns: dict[str, str]
    port: dict[str, str]
    nodes: list[Node]
    group: ProcessGroup = field(default_factory=ProcessGroup)

    def set_port(self, name: str, state: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port[name], state)


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    prefix = f"pmxt-{tag}-"
    subnet = random.Random().randrange(1, 255)
    created: list[str] = []
    group = ProcessGroup()
    try:
        switch = prefix + "sw"
        _ip("netns", "add", switch)
        created.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", switch, "link", "set", "br0", "up")
        nodes, node_ns, port = [], {}, {}
        for i in (1, 2, 3):
            name, ns, veth = f"n{i}", f"{prefix}n{i}", f"vb{i}"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", switch, "link", "set", veth, "master", "br0")
            _ip("-n", switch, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            addr = f"10.77.{subnet}.1{i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            nodes.append(Node(name, i, addr))
            node_ns[name], port[name] = ns, veth
        yield Lab(tag, switch, node_ns, port, nodes, group)
    finally:
        group.close()
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)


def _in_namespaces(lab: Lab, root: Path) -> Ring:
    return start_ring(lab.group, root, lab.nodes, transport="udp", mcastaddr=MCASTADDR,
                      token=TOKEN_MS,
                      prefix=lambda node: ("ip", "netns", "exec", lab.node_ns[node.name]))


def _messages(tag: str, procs: list[CpgProcess], count: int) -> dict[CpgProcess, list[str]]:
    return {p: [f"{tag}-n{p.nodeid}-{i}" for i in range(count)] for p in procs}


def _flat(messages: dict[CpgProcess, list[str]]) -> list[str]:
    return [m for texts in messages.values() for m in texts]


def _exchange(tag: str, procs: list[CpgProcess], ring: Ring) -> None:
    """Each of `procs` sends 10 messages at once; all of them deliver all, in one order."""
    messages = _messages(tag, procs, 10)
    send_concurrently(messages)
    wait_until(all_delivered(procs, _flat(messages)), DELIVERY_TIMEOUT_S,
               f"delivery of the {tag!r} messages", ring.describe)
    assert_exactly_once(procs, _flat(messages))
    orders = [p.delivered_data(prefix=f"{tag}-") for p in procs]
    assert all(order == orders[0] for order in orders), orders


def test_multicast_ring_partition_and_heal(lab: Lab, tmp_path: Path) -> None:
    ring = _in_namespaces(lab, tmp_path)
    params = ring.params()
    p1, p2, p3 = (ring.procs[n] for n in ("n1", "n2", "n3"))
    for p in (p1, p2, p3):  # `ip netns exec` execs pmxfs: the PID we kill is pmxfs itself
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
        assert b"cpg" in cmdline, cmdline
        assert cmdline[0] != b"ip", cmdline
        assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    _exchange("a", [p1, p2, p3], ring)
    # multicast carried the to-all frames: with `udp` every sealed frame (to-all or token) is one
    # datagram; `udpu` would send one per peer
    for p in (p1, p2, p3):
        counters = p.counters()["transport"]
        assert counters["send_failed"] == 0
        assert counters["datagrams_sent"] == counters["frames_sealed"], counters
    host_addrs = _ip("-o", "addr", "show").stdout
    assert not any(n.addr in host_addrs for n in lab.nodes), "node addresses leaked to the host"

    # partition: n3's bridge port goes down -> a ring of two and a ring of one
    marks = ring.marks()
    lab.set_port("n3", "down")
    bound = (params.token + params.consensus) / 1000 + 10
    ring.wait_ring(["n1", "n2"], bound, since=marks)
    ring.wait_ring(["n3"], bound, since=marks)
    _exchange("b", [p1, p2], ring)
    _exchange("c", [p3], ring)
    assert not set(p3.delivered_data(prefix="b-"))
    assert not set(p1.delivered_data(prefix="c-"))

    # heal: the port comes back -> merge detection -> one ring of three
    marks = ring.marks()
    lab.set_port("n3", "up")
    merged = ring.wait_ring(["n1", "n2", "n3"], 30, since=marks)  # fails beyond 30 s
    assert merged["n3"]["joined"] == [1, 2]
    assert merged["n1"]["joined"] == [3]
    for p in (p1, p2, p3):
        trans = p.find(lambda e: is_confchg(e, "transitional"), marks[p.name])
        assert trans is not None
        assert trans[1].event["members"] == ([3] if p is p3 else [1, 2])
    _exchange("d", [p1, p2, p3], ring)

    for p in (p1, p2, p3):
        assert p.terminate() == 0, p.describe()
        assert p.events()[-1]["event"] == "counters"
        assert "Traceback" not in p.stderr(), p.stderr()
    check_agreement(lab.group.procs)
