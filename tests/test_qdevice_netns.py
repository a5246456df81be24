"""A QDevice end to end, with real processes (issue 14): node daemons and qnetd each in their
own network namespace (qdevice_harness.QdeviceLab), the cluster built with create / join-token /
add, qnetd made with `pmxfs qnetd init` / `token`, the device added with `pmxfs qdevice setup`
on one member -- all through the CLI, no daemon restarted.

Each cluster gets a 1000 ms totem token and the device a 2000 ms timeout (3000 ms sync_timeout),
written through the mount after setup, so that a stopped node, a partition or a lost qnetd is
settled within seconds; every wait has a deadline of several times that.

* 2 nodes, ffsplit: a stopped node leaves the other quorate and writable; a partition while both
  see qnetd leaves exactly the tie-breaker's side (lowest node id) quorate; without qnetd both
  nodes together stay quorate, one alone is not (a write fails EACCES) until qnetd is back; a
  node cut off from qnetd notices within the device timeout and reconnects by itself.
* 4 nodes split 2|2: exactly the half with the lowest node id is quorate.
* 3 nodes, lms (`--force`): the last node still seeing qnetd stays quorate as the others stop.
* Enrollment: a token of another qnetd (wrong CA), an unknown secret, a used token and an expired
  one are refused in one line, the cluster unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cpg_harness import wait_until
from lifecycle_harness import RING_TIMEOUT_S, lab_set
from qdevice_harness import DEVICE_TIMEOUT_MS, QdeviceLab

from pmxfs.core.qnetd_token import decode_token, encode_token, record_name

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.fuse]

DECISION_S = 30.0  # a ring change, then qnetd's decision (up to the device timeouts) and more
WATCH_S = 2 * DEVICE_TIMEOUT_MS / 1000  # how long a settled split is watched staying settled
LOST_S = DEVICE_TIMEOUT_MS / 1000 + 3.0  # a lost qnetd stops counting within the timeout

LabFactory = Callable[[Sequence[str]], QdeviceLab]


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[LabFactory]:
    """`make_lab(names)`: namespaces for those nodes and qnetd; all torn down after the test."""
    with lab_set(tmp_path) as keep:
        yield lambda names: keep(lambda root: QdeviceLab(root, names))


def _config_version(lab: QdeviceLab, name: str) -> int:
    return int(lab.status(name)["cluster"]["config_version"])


def _connected(lab: QdeviceLab, name: str) -> bool:
    device = lab.qdevice(name)
    return device is not None and bool(device["connected"])


def _casting(lab: QdeviceLab, name: str) -> bool:
    """Whether `name` reaches qnetd and counts the device's vote."""
    device = lab.qdevice(name)
    return device is not None and bool(device["connected"]) and bool(device["casting_vote"])


def _with_device(make_lab: LabFactory, names: Sequence[str], *setup: str) -> QdeviceLab:
    """A cluster of `names` built through the CLI, a running qnetd, `qdevice setup` on the first
    node (with `setup` options) and the short device timeouts; returns once every node is
    quorate and casts the device's vote."""
    lab = make_lab(names)
    lab.build(names)
    lab.qnetd_init()
    lab.start_qnetd()
    first = names[0]
    lab.setup(first, lab.qnetd_token(), *setup)
    version = lab.set_device_timeouts(first)
    wait_until(lambda: all(_config_version(lab, n) == version for n in names), RING_TIMEOUT_S,
               f"config_version {version} everywhere", lab.describe)
    wait_until(lambda: all(lab.quorate(n) and _casting(lab, n) for n in names), DECISION_S,
               "every node quorate and casting the device's vote", lab.describe)
    return lab


def _ring_and_quorum(lab: QdeviceLab, name: str, quorate: bool, members: Sequence[str]) -> bool:
    st = lab.status(name)
    return (sorted(m["name"] for m in st["membership"]["members"]) == sorted(members)
            and bool(st["quorum"]["quorate"]) == quorate)


def _all_quorate(lab: QdeviceLab, names: Sequence[str]) -> bool:
    """Whether `names` are exactly the ring of each of them, and quorate."""
    return all(_ring_and_quorum(lab, name, True, names) for name in names)


def _wait_split(lab: QdeviceLab, sides: dict[str, tuple[Sequence[str], bool]]) -> None:
    """Until each node in `sides` sees the members and the quorum given for it; then watched
    for WATCH_S: no node may leave that state (two quorate partitions would show here)."""
    def settled() -> bool:
        return all(_ring_and_quorum(lab, name, quorate, members)
                   for name, (members, quorate) in sides.items())

    wait_until(settled, DECISION_S, f"the split {sides}", lab.describe)
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        assert settled(), f"the split did not hold: {sides}\n{lab.describe()}"


def _wait_eacces(lab: QdeviceLab, name: str, file: str) -> None:
    wait_until(lambda: lab.write_errno(name, file) == errno.EACCES, DECISION_S,
               f"a write on {name} refused with EACCES", lab.describe)


def _one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The `pmxfs: reason` line of a refused command, checked to say each of `needles`."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pmxfs: "), lines
    for needle in needles:
        assert needle in lines[0].lower(), (needle, lines[0])
    return lines[0]


def test_two_nodes_one_stops_then_qnetd_goes_and_comes_back(make_lab: LabFactory) -> None:
    lab = _with_device(make_lab, ["a", "b"])
    for name in ("a", "b"):
        st = lab.status(name)
        assert st["qdevice"] == {"host": lab.qnetd_address, "algorithm": "ffsplit",
                                 "connected": True, "casting_vote": True}, st
        quorum = st["quorum"]
        assert (quorum["expected_votes"], quorum["total_votes"], quorum["quorum"]) == (3, 3, 2)
        assert "restart_needed" not in st, st  # setup takes effect at run time
        text = lab.cli(name, "status").stdout
        assert "Qdevice" in text, text
        assert "QdeviceCastVote" in text, text

    # the node with the lowest id stops: the other keeps the vote, so quorum and writes
    assert lab.stop("a") == 0
    wait_until(lambda: _ring_and_quorum(lab, "b", True, ["b"]), DECISION_S,
               "b alone and quorate", lab.describe)
    assert lab.write_errno("b", "while-a-is-away.txt") is None
    lab.start("a")
    lab.wait_ring(["a", "b"])
    wait_until(lambda: _casting(lab, "a") and _casting(lab, "b"), DECISION_S,
               "both casting again", lab.describe)
    assert (lab["a"].mount / "while-a-is-away.txt").read_text() == "written on b\n"

    # qnetd goes: both together still have 2 of 3 votes
    assert lab.stop_qnetd() == 0
    wait_until(lambda: not _connected(lab, "a") and not _connected(lab, "b"), LOST_S,
               "both nodes losing qnetd within the device timeout", lab.describe)
    for name in ("a", "b"):
        assert not _casting(lab, name)
        assert lab.quorate(name)
        assert lab.write_errno(name, f"without-qnetd-{name}.txt") is None

    # and one node stops: 1 of 3, not quorate, writes refused
    assert lab.stop("b") == 0
    wait_until(lambda: _ring_and_quorum(lab, "a", False, ["a"]), DECISION_S,
               "a alone and not quorate", lab.describe)
    _wait_eacces(lab, "a", "alone-without-qnetd.txt")

    # qnetd is back: the client reconnects by itself and a is quorate again
    lab.start_qnetd()
    wait_until(lambda: lab.quorate("a") and _casting(lab, "a"), DECISION_S + 10,
               "a quorate with qnetd back", lab.describe)
    assert lab.write_errno("a", "alone-with-qnetd.txt") is None


def test_two_nodes_split_the_tie_breaker_keeps_quorum(make_lab: LabFactory) -> None:
    lab = _with_device(make_lab, ["a", "b"])
    lab.cut(["a"], ["b"])
    _wait_split(lab, {"a": (["a"], True), "b": (["b"], False)})
    assert _casting(lab, "a")
    assert _connected(lab, "b")
    assert not _casting(lab, "b")
    assert lab.write_errno("a", "a-side.txt") is None
    _wait_eacces(lab, "b", "b-side.txt")

    lab.heal()
    lab.wait_ring(["a", "b"])
    wait_until(lambda: _casting(lab, "a") and _casting(lab, "b"), DECISION_S,
               "both casting after the heal", lab.describe)
    assert (lab["b"].mount / "a-side.txt").read_text() == "written on a\n"
    assert not (lab["a"].mount / "b-side.txt").exists()

    # b alone loses qnetd (silence, no closed connection): it notices within the timeout; the
    # two nodes keep quorum, and b comes back to qnetd by itself
    lab.cut_qnetd(["b"])
    wait_until(lambda: not _connected(lab, "b"), LOST_S,
               "b noticing qnetd's silence within the device timeout", lab.describe)
    assert _all_quorate(lab, ["a", "b"])
    assert lab.write_errno("b", "b-without-qnetd.txt") is None
    lab.heal()
    wait_until(lambda: _casting(lab, "a") and _casting(lab, "b"), DECISION_S,
               "b back with qnetd", lab.describe)


def test_four_nodes_split_two_two_one_half_keeps_quorum(make_lab: LabFactory) -> None:
    names = ["a", "b", "c", "d"]
    lab = _with_device(make_lab, names)
    quorum = lab.status("a")["quorum"]
    assert (quorum["expected_votes"], quorum["quorum"]) == (5, 3), quorum
    lab.cut(["a", "b"], ["c", "d"])
    _wait_split(lab, {"a": (["a", "b"], True), "b": (["a", "b"], True),
                      "c": (["c", "d"], False), "d": (["c", "d"], False)})
    assert lab.write_errno("b", "ab-side.txt") is None
    _wait_eacces(lab, "d", "cd-side.txt")
    lab.heal()
    lab.wait_ring(names)
    wait_until(lambda: all(_casting(lab, n) for n in names), DECISION_S,
               "every node casting after the heal", lab.describe)


def test_three_nodes_lms_last_man_standing(make_lab: LabFactory) -> None:
    names = ["a", "b", "c"]
    lab = make_lab(names)
    lab.build(names)
    lab.qnetd_init()
    lab.start_qnetd()
    version = _config_version(lab, "a")
    _one_line_refusal(lab.setup("a", lab.qnetd_token(), check=False), "--force")
    assert _config_version(lab, "a") == version
    lab.setup("a", lab.qnetd_token(), "--force")
    new = lab.set_device_timeouts("a")
    wait_until(lambda: all(_config_version(lab, n) == new for n in names), RING_TIMEOUT_S,
               f"config_version {new} everywhere", lab.describe)
    wait_until(lambda: all(lab.quorate(n) and _casting(lab, n) for n in names), DECISION_S,
               "every node casting", lab.describe)
    st = lab.status("a")
    assert st["qdevice"]["algorithm"] == "lms", st
    assert (st["quorum"]["expected_votes"], st["quorum"]["quorum"]) == (5, 3), st

    for stopped, left in (("c", ["a", "b"]), ("b", ["a"])):
        assert lab.stop(stopped) == 0
        wait_until(functools.partial(_all_quorate, lab, left), DECISION_S,
                   f"{left} quorate without {stopped}", lab.describe)
        for name in left:
            assert lab.write_errno(name, f"{name}-without-{stopped}.txt") is None


def test_enrollment_refusals(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b"])
    lab.build(["a", "b"])
    lab.qnetd_init()
    other = lab.root / "other-qnetd"
    lab.qnetd_init(other)
    lab.start_qnetd()
    version, tree = _config_version(lab, "a"), lab.tree_checksum("a")
    token = lab.qnetd_token()

    refused = {
        "wrong CA": lab.setup("a", lab.qnetd_token(directory=other), check=False),
        "unknown secret": lab.setup("a", encode_token(dataclasses.replace(
            decode_token(lab.qnetd_token()), secret=bytes(32))), check=False),
    }
    expired = lab.qnetd_token()
    record = lab.qnetd_dir / "tokens" / record_name(decode_token(expired).secret)
    assert json.loads(record.read_text())["expires"] > time.time()
    record.write_text(json.dumps({"expires": int(time.time()) - 1}))
    refused["expired"] = lab.setup("a", expired, check=False)
    lines = {what: _one_line_refusal(result) for what, result in refused.items()}
    assert "fingerprint" in lines["wrong CA"], lines
    assert "nothing was sent" in lines["wrong CA"], lines
    assert "expired" in lines["expired"], lines
    for name in ("a", "b"):
        assert _config_version(lab, name) == version
        assert lab.tree_checksum(name) == tree
        assert lab.qdevice(name) is None
    assert not (lab["a"].mount / "priv/qdevice").exists()

    lab.setup("a", token)
    lab.cli("a", "qdevice", "remove")
    lines["used"] = _one_line_refusal(lab.setup("b", token, check=False), "used")
    assert lab.qdevice("b") is None

    # qnetd logged each refusal it made, with the reason the node printed
    logged = [line for line in lab.qnetd_text().splitlines() if "refused" in line]
    for what in ("unknown secret", "expired", "used"):
        reason = lines[what].partition("refused the enrollment: ")[2]
        assert reason, (what, lines[what])
        assert any(line.endswith(f"refused: {reason}") for line in logged), (what, logged)
    assert len(logged) == 3, logged  # the wrong CA's node sent nothing
