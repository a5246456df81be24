"""Real `pmxfs debug cpg` processes on loopback (127.0.0.11-13, udpu): one ring, agreed order
under concurrent senders, a SIGKILLed member noticed within token + consensus, a restarted member
rejoining with a newer ring id, a SIGSTOPped member leaving and merging back without losing or
duplicating messages; and the command's error reporting and clean exits."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from cpg_harness import (
    BIND_FAILURE,
    PMXFS,
    CpgProcess,
    Event,
    ProcessGroup,
    all_delivered,
    assert_exactly_once,
    check_agreement,
    cpg_argv,
    is_confchg,
    keygen,
    loopback_nodes,
    random_port,
    ring_seq,
    send_concurrently,
    start_ring,
    wait_until,
    write_config,
)

from pmxfs.runtime.frame_crypto import DROP_REASONS
from pmxfs.runtime.transport import TRANSPORT_COUNTERS

NODES = loopback_nodes(3)  # n1..n3 on 127.0.0.11..13
TOKEN_MS = 1000
MARGIN_S = 2.0  # scheduling noise on a loaded CI machine
DELIVERY_TIMEOUT_S = 20.0




def _messages(tag: str, procs: list[CpgProcess], count: int) -> dict[CpgProcess, list[str]]:
    return {p: [f"{tag}-n{p.nodeid}-{i}" for i in range(count)] for p in procs}


def _flat(messages: dict[CpgProcess, list[str]]) -> list[str]:
    return [m for texts in messages.values() for m in texts]


def _send_and_wait(messages: dict[CpgProcess, list[str]], receivers: list[CpgProcess],
                   describe: str) -> None:
    send_concurrently(messages)
    wait_until(all_delivered(receivers, _flat(messages)), DELIVERY_TIMEOUT_S,
               f"delivery of {describe}",
               lambda: "\n".join(p.describe() for p in receivers))


def _assert_same_order(procs: list[CpgProcess], prefix: str) -> list[str]:
    orders = {p.name: p.delivered_data(prefix=prefix) for p in procs}
    first = next(iter(orders.values()))
    assert all(order == first for order in orders.values()), orders
    return first


def _assert_sender_fifo(order: list[str], messages: dict[CpgProcess, list[str]]) -> None:
    """Each sender's messages come out in the order it wrote them."""
    for proc, texts in messages.items():
        assert [m for m in order if m in set(texts)] == texts, proc.name


def test_ring_order_kill_restart_and_stop(group: ProcessGroup, tmp_path: Path) -> None:
    ring = start_ring(group, tmp_path, NODES, token=TOKEN_MS)
    params = ring.params()
    detect_bound_s = (params.token + params.consensus) / 1000 + MARGIN_S
    p1, p2, p3 = (ring.procs[n] for n in ("n1", "n2", "n3"))

    # -- 1. concurrent senders: one order everywhere, each message exactly once
    first = _messages("a", [p1, p2, p3], 25)
    _send_and_wait(first, [p1, p2, p3], "concurrent messages")
    order = _assert_same_order([p1, p2, p3], "a-")
    assert_exactly_once([p1, p2, p3], _flat(first))
    _assert_sender_fifo(order, first)
    # the concurrency really interleaved senders (not one sender's burst after another's)
    assert len({m.split("-")[1] for m in order[:40]}) > 1

    # -- 2. SIGKILL n3: the survivors see it leave within token + consensus (+ margin)
    marks = ring.marks()
    killed_at = time.monotonic()
    p3.signal(signal.SIGKILL)
    for p in (p1, p2):
        index, line = wait_until(
            partial(p.find, lambda e: is_confchg(e, "regular", [1, 2]), marks[p.name]),
            detect_bound_s + 10, f"{p.name}'s regular configuration [1, 2]", ring.describe)
        took = line.at - killed_at
        assert took <= detect_bound_s, (
            f"{p.name} took {took:.2f} s to deliver the new configuration (bound "
            f"{detect_bound_s:.2f} s = token {params.token} + consensus {params.consensus} ms "
            f"+ {MARGIN_S} s)")
        trans = p.find(lambda e: is_confchg(e, "transitional", [1, 2]), marks[p.name])
        assert trans is not None, "no transitional configuration"
        assert trans[0] < index, "no transitional configuration first"
        # as corosync: the transitional change lists who left, the regular one who joined
        assert trans[1].event["left"] == [3]
        assert line.event["joined"] == []
        assert trans[1].event["ring_id"] == line.event["ring_id"]
    assert p3.wait_exit(10) == -signal.SIGKILL
    second = _messages("b", [p1, p2], 20)
    _send_and_wait(second, [p1, p2], "messages after the kill")
    _assert_sender_fifo(_assert_same_order([p1, p2], "b-"), second)
    assert p1.delivered_data() == p2.delivered_data()  # together all along: identical histories

    # -- 3. restart n3 on its data dir: it rejoins with a ring id newer than any before
    seq_before = max(ring_seq(e["ring_id"]) for p in group.procs for e in p.confchgs())
    marks = ring.marks()
    del marks["n3"]  # the new process prints from line 0
    p3 = ring.start("n3")
    rejoined = ring.wait_ring(["n1", "n2", "n3"], 30, since=marks)
    assert ring_seq(rejoined["n1"]["ring_id"]) > seq_before
    assert rejoined["n1"]["joined"] == [3]
    assert rejoined["n3"]["joined"] == [1, 2]
    third = _messages("c", [p1, p2, p3], 15)
    _send_and_wait(third, [p1, p2, p3], "messages after the restart")
    _assert_sender_fifo(_assert_same_order([p1, p2, p3], "c-"), third)

    # -- 4. SIGSTOP n1 (the representative) beyond the token timeout, then SIGCONT
    marks = ring.marks()
    stopped_at = time.monotonic()
    p1.signal(signal.SIGSTOP)
    try:
        # sent while the ring is breaking up: in the old ring, during gather or in the new one
        during = _messages("d", [p2, p3], 10)
        send_concurrently(during)
        ring.wait_ring(["n2", "n3"], detect_bound_s + 10, since=marks)
        assert time.monotonic() - stopped_at > params.token / 1000
        in_two = _messages("e", [p2, p3], 10)
        _send_and_wait(in_two, [p2, p3], "messages in the ring of two")
        wait_until(all_delivered([p2, p3], _flat(during)), DELIVERY_TIMEOUT_S,
                   "delivery of the messages sent while n1 stopped", ring.describe)
        marks = ring.marks()
    finally:
        p1.signal(signal.SIGCONT)
    merging = _messages("f", [p2, p3], 10)  # sent while n1 comes back
    send_concurrently(merging)
    ring.wait_ring(["n1", "n2", "n3"], 30, since=marks)
    after = _messages("g", [p1, p2, p3], 10)
    _send_and_wait(after, [p1, p2, p3], "messages after the merge")
    wait_until(all_delivered([p2, p3], _flat(merging)), DELIVERY_TIMEOUT_S,
               "delivery of the messages sent during the merge", ring.describe)
    survivors_msgs = _flat(during) + _flat(in_two) + _flat(merging) + _flat(after)
    assert_exactly_once([p2, p3], survivors_msgs)
    assert_exactly_once([p1], _flat(after))
    for tag in ("d-", "e-", "f-", "g-"):
        _assert_same_order([p2, p3], tag)
    _assert_same_order([p1, p2, p3], "g-")
    # n2 and the restarted n3 were together all along since n3 came back
    start3 = p2.delivered_data().index(p3.delivered_data()[0])
    assert p2.delivered_data()[start3:] == p3.delivered_data()

    # -- 5. clean exits, and the whole history agrees (the killed process included)
    for p in (p1, p2, p3):
        assert p.terminate() == 0, p.describe()
        assert p.events()[-1]["event"] == "counters"
        assert not p.garbage(), p.garbage()
        assert "Traceback" not in p.stderr(), p.stderr()
    check_agreement(group.procs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_counters_on_sigusr1_and_clean_exit(group: ProcessGroup, tmp_path: Path,
                                            signum: int) -> None:
    ring = start_ring(group, tmp_path, NODES, run=["n1"], token=TOKEN_MS)
    proc = ring.procs["n1"]
    counters = proc.counters()
    assert set(counters) == {"event", "totem", "transport"}
    assert set(DROP_REASONS) | set(TRANSPORT_COUNTERS) <= set(counters["transport"])
    assert counters["totem"].get("rings_installed", 0) >= 1
    proc.send("alone")
    wait_until(lambda: "alone" in proc.delivered_data(), DELIVERY_TIMEOUT_S, "self-delivery",
               proc.describe)
    assert proc.alive()
    proc.signal(signum)
    assert proc.wait_exit(15) == 0, proc.describe()
    last = proc.events()[-1]
    assert last["event"] == "counters"
    assert last["totem"]["delivered"] == 1
    assert proc.stderr() == ""


def _run_cpg(tmp_path: Path, config: Path, authkey: Path, node: str
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cpg_argv(config, authkey, node, tmp_path / "data"), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)


def test_bad_config_is_reported_with_its_position(tmp_path: Path) -> None:
    authkey = tmp_path / "authkey"
    keygen(authkey)
    config = tmp_path / "corosync.conf"
    config.write_text("totem {\n  cluster_name: x\n  token: soon\n}\nnodelist {\n")
    result = _run_cpg(tmp_path, config, authkey, "n1")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        assert re.fullmatch(re.escape(str(config)) + r":\d+:\d+: \S.*", line), line
    assert any(line.startswith(f"{config}:3:") and "soon" in line for line in lines), lines


def test_unknown_node_and_missing_authkey_are_one_line_errors(tmp_path: Path) -> None:
    authkey = tmp_path / "authkey"
    keygen(authkey)
    config = tmp_path / "corosync.conf"
    write_config(config, NODES, port=random_port())
    for node, key, needle in (("n9", authkey, "n9"),
                              ("n1", tmp_path / "missing", str(tmp_path / "missing"))):
        result = _run_cpg(tmp_path, config, key, node)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("pmxfs: "), lines
        assert needle in lines[0], lines


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    """What `start_ring` relies on to retry another port."""
    authkey = tmp_path / "authkey"
    keygen(authkey)
    config = tmp_path / "corosync.conf"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind((NODES[0].addr, 0))
        write_config(config, NODES, port=blocker.getsockname()[1])
        result = _run_cpg(tmp_path, config, authkey, "n1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pmxfs: {BIND_FAILURE}: "), lines
    assert PMXFS.exists()


@dataclass
class _Transcript:
    name: str
    pid: int
    lines: list[Event]

    def events(self) -> list[Event]:
        return self.lines


def _d(sender: int, ring_id: str, seq: int, data: str) -> Event:
    return {"event": "deliver", "from": sender, "ring_id": ring_id, "seq": seq, "data": data}


def _c(kind: str, ring_id: str, members: list[int]) -> Event:
    return {"event": "confchg", "kind": kind, "ring_id": ring_id, "members": members,
            "left": [], "joined": []}


def test_the_agreement_checker_catches_violations() -> None:
    """The checker the process tests rely on fails on each property it claims to check."""
    def start(node: int) -> list[Event]:
        return [_c("transitional", "1.4", [node]), _c("regular", "1.4", [1, 2])]

    a = [*start(1), _d(1, "1.4", 1, "x"), _d(2, "1.4", 2, "y"), _c("transitional", "1.8", [1, 2])]
    b = [*start(2), _d(1, "1.4", 1, "x"), _d(2, "1.4", 2, "y"), _c("transitional", "1.8", [1, 2])]
    check_agreement([_Transcript("a", 1, a), _Transcript("b", 2, b)])
    broken = {
        "delivered 'x' twice": [*start(2), _d(1, "1.4", 1, "x"), _d(1, "1.4", 1, "x")],
        "delivered as": [*start(2), _d(1, "1.4", 3, "x")],
        "seq 1 after 2": [*start(2), _d(2, "1.4", 2, "z"), _d(1, "1.4", 1, "x")],
        "virtual synchrony": [*start(2), _d(1, "1.4", 1, "x"), _c("transitional", "1.8", [1, 2])],
    }
    for message, events in broken.items():
        with pytest.raises(AssertionError, match=message):
            check_agreement([_Transcript("a", 1, a), _Transcript("b", 2, events)])
    # two messages of one frame (same seq), in different orders
    packed = [*start(1), _d(1, "1.4", 1, "x"), _d(1, "1.4", 1, "y")]
    swapped = [*start(2), _d(1, "1.4", 1, "y"), _d(1, "1.4", 1, "x")]
    with pytest.raises(AssertionError, match="different orders"):
        check_agreement([_Transcript("a", 1, packed), _Transcript("b", 2, swapped)])
