"""A token captured on the wire and delivered to another node must not run there (issue 11).

Three `pmxfs debug cpg` nodes (udpu) in network namespaces on one bridge (the `lab` of
test_cpg_netns). An on-path attacker without the key, in the bridge's namespace, reads what n1
puts on the wire (a packet socket on n1's bridge port) and picks the datagrams n1 sent to n2
alone -- the tokens: a frame for every node goes to n3 with the same bytes, so a datagram to n2
whose bytes never went to n3 was for n2 only. Meanwhile n2 is stopped (SIGSTOP), so the token
cannot move on: n1 retransmits it to n2, and n3 has not seen that token yet -- exactly when a
copy would start a second token at n3. The attacker sends each captured token to n3 from a raw
IP socket with n1's address as source, then n2 is continued (well within the token timeout).

n3 must drop every copy as `wrong_receiver` (the frame names n2), and the ring must not notice:
no configuration change anywhere, and later messages are delivered once each, in one order, on
every node. Without the receiver in the authenticated header n3 takes the copies (authentic,
from n1's address, counters it never saw), so the test fails there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cpg_harness import (
    CpgProcess,
    Ring,
    all_delivered,
    assert_exactly_once,
    check_agreement,
    send_concurrently,
    start_ring,
    wait_until,
)
from test_cpg_netns import Lab, _ip
from test_cpg_netns import lab as lab  # the fixture: namespaces, bridge, veth pairs

pytestmark = [pytest.mark.netns, pytest.mark.root]

TOKEN_MS = 5000  # n2 is stopped for CAPTURE_S and a little more: far below the token timeout
CAPTURE_S = 2.0  # n1 retransmits the token every 1190 ms (hold: 942 ms) with this token

# Runs in the bridge's namespace (stdlib only): capture on n1's bridge port, then inject.
ATTACKER = r"""
import json, socket, struct, sys, time

cfg = json.loads(sys.argv[1])
n1, n2, n3, port = cfg["n1"], cfg["n2"], cfg["n3"], cfg["port"]
ETH_P_ALL = 0x0003

def datagrams(sock, deadline):
    # (time, destination IP, UDP payload) of each IPv4/UDP datagram n1 sends to the port
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            frame = sock.recv(70000)
        except socket.timeout:
            return
        if len(frame) < 42 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != n1:
            continue
        sport, dport, length = struct.unpack("!HHH", ip[ihl:ihl + 6])
        if dport == port:
            yield time.monotonic(), socket.inet_ntoa(ip[16:20]), bytes(ip[ihl + 8:ihl + length])

def capture():
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((cfg["n1_port"], 0))
    print("ready", flush=True)
    to_n2, to_n3 = [], set()
    for _at, dst, payload in datagrams(sock, time.monotonic() + cfg["capture_s"]):
        if dst == n2:
            to_n2.append(payload)
        elif dst == n3:
            to_n3.add(payload)
    sock.close()
    return [p for p in to_n2 if p not in to_n3], len(to_n2), len(to_n3)

def inject(payloads):
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    for payload in payloads:
        udp = struct.pack("!HHHH", port, port, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(n1), socket.inet_aton(n3))
        raw.sendto(ip + udp, (n3, 0))
    raw.close()

tokens, seen_n2, seen_n3 = capture()
inject(tokens)
print(json.dumps({"injected": [t.hex() for t in tokens], "to_n2": seen_n2, "to_n3": seen_n3}))
"""


def _attack(lab: Lab, ring: Ring, p2: CpgProcess) -> list[bytes]:
    """Run the attacker in the bridge's namespace while n2 is stopped; the tokens it sent to
    n3."""
    addr = {n.name: n.addr for n in lab.nodes}
    subnet = addr["n1"].rsplit(".", 1)[0]
    _ip("-n", lab.switch, "addr", "add", f"{subnet}.100/24", "dev", "br0")  # its own address
    cfg = {"n1": addr["n1"], "n2": addr["n2"], "n3": addr["n3"], "port": ring.port,
           "n1_port": lab.port["n1"], "capture_s": CAPTURE_S}
    with subprocess.Popen(["ip", "netns", "exec", lab.switch, sys.executable, "-c", ATTACKER,
                           json.dumps(cfg)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as attacker:
        try:
            assert attacker.stdout is not None
            assert attacker.stdout.readline().strip() == "ready"
            p2.signal(signal.SIGSTOP)
            out, err = attacker.communicate(timeout=CAPTURE_S + 30)
        finally:
            p2.signal(signal.SIGCONT)
            if attacker.poll() is None:
                attacker.kill()
    assert attacker.returncode == 0, err
    result = json.loads(out)
    injected = [bytes.fromhex(t) for t in result["injected"]]
    assert injected, f"n1 sent no token to n2 in {CAPTURE_S} s: {result}"
    return injected


def _exchange(tag: str, procs: list[CpgProcess], ring: Ring) -> None:
    messages = {p: [f"{tag}-n{p.nodeid}-{i}" for i in range(10)] for p in procs}
    flat = [m for texts in messages.values() for m in texts]
    send_concurrently(messages)
    wait_until(all_delivered(procs, flat), 20, f"delivery of the {tag!r} messages",
               ring.describe)
    assert_exactly_once(procs, flat)
    orders = [p.delivered_data(prefix=f"{tag}-") for p in procs]
    assert all(order == orders[0] for order in orders), orders


def test_a_token_for_n2_delivered_to_n3_is_dropped(lab: Lab, tmp_path: Path) -> None:
    ring = start_ring(lab.group, tmp_path, lab.nodes, transport="udpu", token=TOKEN_MS,
                      prefix=lambda node: ("ip", "netns", "exec", lab.node_ns[node.name]))
    p1, p2, p3 = (ring.procs[n] for n in ("n1", "n2", "n3"))
    procs = [p1, p2, p3]
    formed = {p.name: p.count() for p in procs}  # no configuration change from here on
    before = p3.counters()["transport"].get("wrong_receiver", 0)

    injected = _attack(lab, ring, p2)
    assert all(frame[:2] == b"PX" for frame in injected)

    def counted() -> int | None:
        dropped = p3.counters()["transport"].get("wrong_receiver", 0) - before
        return dropped if dropped == len(injected) else None

    wait_until(counted, 10, f"n3 to drop the {len(injected)} tokens as wrong_receiver",
               ring.describe)
    _exchange("after", procs, ring)
    for p in procs:
        assert not p.confchgs(formed[p.name]), f"membership changed on {p.name}:\n{p.describe()}"
    assert p3.counters()["transport"]["wrong_receiver"] - before == len(injected)
    for p in procs:
        assert p.terminate() == 0, p.describe()
        assert "Traceback" not in p.stderr(), p.stderr()
    check_agreement(lab.group.procs)
