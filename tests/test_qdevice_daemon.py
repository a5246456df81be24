"""Two real daemons with FUSE mounts on loopback and a real `pmxfs qnetd` process, driven with
the CLI as an admin would: `pmxfs qdevice setup` prints what it did, both nodes count the
device's vote (`status`, text and JSON), the node left alone when the other stops stays quorate
and writable, and `pmxfs qdevice remove` takes it all back. Skips without root or FUSE."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cpg_harness import PMXFS, random_port, wait_until
from daemon_harness import DaemonCluster, fuse_unavailable

from pmxfs.commands.status import check_status_shape

pytestmark = [pytest.mark.fuse, pytest.mark.root]

HOST = "127.0.0.1"
WAIT_S = 60.0


@dataclass
class Qnetd:
    directory: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def run(self, *args: str) -> str:
        result = subprocess.run([str(PMXFS), "qnetd", *args], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def token(self) -> str:
        return self.run("token", "--dir", str(self.directory), "--address",
                        f"{HOST}:{self.port}").strip()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[DaemonCluster, Qnetd]]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = DaemonCluster(tmp_path / "nodes", 2)
    qnetd = Qnetd(tmp_path / "qnetd", random_port(), tmp_path / "qnetd.log")
    try:
        qnetd.run("init", "--dir", str(qnetd.directory))
        with open(qnetd.log, "ab") as log:
            qnetd.proc = subprocess.Popen(
                [str(PMXFS), "qnetd", "--listen", f"{HOST}:{qnetd.port}", "--dir",
                 str(qnetd.directory)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        cluster.start_all()
        yield cluster, qnetd
    finally:
        cluster.close()
        if qnetd.proc is not None and qnetd.proc.poll() is None:
            qnetd.proc.send_signal(signal.SIGTERM)
            try:
                qnetd.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                qnetd.proc.kill()
                qnetd.proc.wait(timeout=30)


def qdevice(status: dict[str, Any]) -> dict[str, Any] | None:
    value: dict[str, Any] | None = status.get("qdevice")
    return value


def test_setup_a_node_stops_and_remove(lab: tuple[DaemonCluster, Qnetd]) -> None:
    cluster, qnetd = lab
    version = cluster.status("node1")["cluster"]["config_version"]
    result = cluster.cli("node1", "qdevice", "setup", f"{HOST}:{qnetd.port}", "--token",
                         qnetd.token())
    assert f"enrolled the cluster with qnetd at {HOST}:{qnetd.port}" in result.stdout
    assert (f"algorithm ffsplit, tie-breaker lowest, 1 vote(s); config_version {version + 1}"
            in result.stdout)

    def both_cast() -> bool:
        return all((qdevice(cluster.status(n)) or {}).get("casting_vote") is True
                   for n in ("node1", "node2"))

    wait_until(both_cast, WAIT_S, "both nodes counting the device's vote",
               lambda: qnetd.log_text() + cluster["node1"].log_tail(20))
    status = cluster.status("node2")
    assert check_status_shape(status) == []
    assert qdevice(status) == {"host": f"{HOST}:{qnetd.port}", "algorithm": "ffsplit",
                               "connected": True, "casting_vote": True}
    text = cluster.cli("node2", "status").stdout
    assert "Flags:            Quorate Qdevice QdeviceAlive QdeviceCastVote" in text
    assert "0x00000000          1 Qdevice" in text
    assert (cluster["node2"].mount / "priv" / "qdevice" / "client.pem").exists()

    # one node stops: the other keeps quorum with the device's vote, and stays writable
    assert cluster.stop("node2") == 0
    wait_until(lambda: (len(cluster.status("node1")["membership"]["members"]) == 1
                        and cluster.status("node1")["quorum"]["quorate"]), WAIT_S,
               "node1 quorate alone", lambda: qnetd.log_text())
    quorum = cluster.status("node1")["quorum"]
    assert (quorum["expected_votes"], quorum["total_votes"]) == (3, 2)
    (cluster["node1"].mount / "alone.txt").write_text("still writable\n")

    cluster.start("node2")
    cluster.wait_mounted("node2")
    cluster.wait_synced(["node1", "node2"], timeout=WAIT_S)
    assert (cluster["node2"].mount / "alone.txt").read_text() == "still writable\n"

    result = cluster.cli("node2", "qdevice", "remove")
    assert f"removed the quorum device (qnetd {HOST}:{qnetd.port})" in result.stdout
    wait_until(lambda: all(qdevice(cluster.status(n)) is None for n in ("node1", "node2")),
               WAIT_S, "the device gone from both nodes")
    status = cluster.status("node1")
    assert status["cluster"]["config_version"] == version + 2
    assert "Qdevice" not in status["quorum"]["flags"]
    assert not (cluster["node1"].mount / "priv" / "qdevice").exists()
    refused = cluster.cli("node1", "qdevice", "remove", check=False)
    assert (refused.returncode, refused.stderr) == (
        1, "pmxfs: no quorum device is configured\n")


def test_setup_refusals_are_one_line(lab: tuple[DaemonCluster, Qnetd]) -> None:
    cluster, qnetd = lab
    bad = cluster.cli("node1", "qdevice", "setup", HOST, "--token", "nonsense", check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("pmxfs: ")
    assert bad.stderr.count("\n") == 1  # one line, no traceback
    token = qnetd.token()
    wrong = cluster.cli("node1", "qdevice", "setup", f"{HOST}:{qnetd.port}", "--token", token,
                        "--tie-breaker", "7", check=False)
    assert wrong.returncode == 1
    assert "tie_breaker" in wrong.stderr
    tokens = sorted(p.name for p in (qnetd.directory / "tokens").iterdir())
    assert len(tokens) == 1, tokens  # the refusal spent nothing
