"""Three real daemons with FUSE mounts on loopback, driven with ordinary file operations, shell
tools and the `pmxfs` CLI (issue 6). They skip with a reason without root or /dev/fuse."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cpg_harness import wait_until
from daemon_harness import DaemonCluster, fuse_unavailable, is_mounted

from pmxfs.commands.status import check_status_shape

pytestmark = [pytest.mark.fuse, pytest.mark.root]

REPLICATION_TIMEOUT_S = 10.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DaemonCluster]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    c = DaemonCluster(tmp_path, 3)
    try:
        c.start_all()
        yield c
    finally:
        c.close()


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def wait_content(path: Path, text: str | None) -> None:
    wait_until(lambda: read(path) == text, REPLICATION_TIMEOUT_S,
               f"{path} to read {text!r} (it reads {read(path)!r})")


def test_shell_tools_on_one_node_are_seen_on_the_others(cluster: DaemonCluster) -> None:
    m1, m2, m3 = (cluster[f"node{i}"].mount for i in (1, 2, 3))
    assert sh("echo hello > hello.txt", m1).returncode == 0
    wait_content(m2 / "hello.txt", "hello\n")
    wait_content(m3 / "hello.txt", "hello\n")
    assert sh("cat hello.txt", m2).stdout == "hello\n"
    assert sh("sed -i 's/hello/bye/' hello.txt", m1).returncode == 0
    wait_content(m3 / "hello.txt", "bye\n")
    assert sh("mkdir -p a/b/c && mv hello.txt a/b/c/moved.txt", m1).returncode == 0
    wait_content(m2 / "a/b/c/moved.txt", "bye\n")
    assert read(m2 / "hello.txt") is None
    source = cluster.root / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "x.cfg").write_text("x\n")
    (source / "y.cfg").write_text("y\n")
    assert sh(f"cp -r {source} copied", m2).returncode == 0
    wait_content(m1 / "copied/sub/x.cfg", "x\n")
    listing = sh("ls -l copied", m3).stdout
    assert "y.cfg" in listing
    assert "sub" in listing
    assert "root www-data" in listing
    assert sh("rm -r a copied", m3).returncode == 0
    wait_until(lambda: not (m1 / "a").exists() and not (m1 / "copied").exists(),
               REPLICATION_TIMEOUT_S, "the removal on node1")
    assert (m1 / "local").resolve() == (m1 / "nodes/node1").resolve()
    for name in ("node1", "node2", "node3"):
        wait_until(lambda n=name: (m1 / "nodes" / n / "qemu-server").is_dir(),  # type: ignore
                   REPLICATION_TIMEOUT_S, f"nodes/{name}/qemu-server")


def test_lost_quorum_then_expected_one_then_rejoin(cluster: DaemonCluster) -> None:
    m1 = cluster["node1"].mount
    assert sh("echo before > before.txt", m1).returncode == 0
    wait_content(cluster["node3"].mount / "before.txt", "before\n")
    cluster.kill("node2")
    cluster.kill("node3")
    wait_until(lambda: not cluster.status("node1")["quorum"]["quorate"], 30,
               "node1 to lose quorum")
    with pytest.raises(PermissionError):
        (m1 / "refused.txt").write_text("no\n")
    wait_until(lambda: stat.S_IMODE(os.stat(m1 / "before.txt").st_mode) == 0o440, 10,
               "read-only file modes")
    assert stat.S_IMODE(os.stat(m1 / "nodes").st_mode) == 0o555
    assert read(m1 / "before.txt") == "before\n"
    assert cluster.cli("node1", "expected", "1").returncode == 0
    wait_until(lambda: cluster.status("node1")["quorum"]["quorate"], 10, "quorum by expected 1")
    (m1 / "survivor.txt").write_text("alone\n")
    for name in ("node2", "node3"):
        cluster.start(name)
        cluster.wait_mounted(name)
    cluster.wait_synced(["node1", "node2", "node3"], timeout=60)
    wait_content(cluster["node2"].mount / "survivor.txt", "alone\n")
    assert len({cluster.checksum(n) for n in ("node1", "node2", "node3")}) == 1


def test_limits_guest_ids_and_lock_race(cluster: DaemonCluster) -> None:
    m1, m2 = cluster["node1"].mount, cluster["node2"].mount
    fd = os.open(m1 / "big", os.O_WRONLY | os.O_CREAT)
    assert os.write(fd, b"x" * (1 << 20)) == 1 << 20
    with pytest.raises(OSError, match=os.strerror(errno.EFBIG)) as too_big:
        os.write(fd, b"y")
    assert too_big.value.errno == errno.EFBIG
    # nothing half-written is committed
    with pytest.raises(OSError, match=os.strerror(errno.EFBIG)) as at_close:
        os.close(fd)
    assert at_close.value.errno == errno.EFBIG
    assert not (m1 / "big").exists()  # a new file whose creation failed never existed
    wait_until(lambda: (m1 / "nodes/node2/qemu-server").is_dir(), REPLICATION_TIMEOUT_S,
               "node2's guest directory")
    (m1 / "nodes/node1/qemu-server/100.conf").write_text("memory: 512\n")
    wait_content(m2 / "nodes/node1/qemu-server/100.conf", "memory: 512\n")
    with pytest.raises(FileExistsError):
        (m2 / "nodes/node2/qemu-server/100.conf").write_text("memory: 1024\n")
    os.rename(m1 / "nodes/node1/qemu-server/100.conf", m1 / "nodes/node2/qemu-server/100.conf")
    wait_content(m2 / "nodes/node2/qemu-server/100.conf", "memory: 512\n")
    (m1 / "priv/lock").mkdir(parents=True, exist_ok=True)
    wait_until(lambda: (m2 / "priv/lock").is_dir(), REPLICATION_TIMEOUT_S, "priv/lock")
    outcomes: list[str] = []

    def take(mount: Path) -> None:
        try:
            (mount / "priv/lock/race").mkdir()
            outcomes.append("won")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=take, args=(m,)) for m in (m1, m2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["lost", "won"]


def test_corosync_conf_is_validated_and_distributed(cluster: DaemonCluster) -> None:
    m1 = cluster["node1"].mount
    tree_conf = m1 / "corosync.conf"
    wait_until(lambda: read(tree_conf) == cluster.config_text, REPLICATION_TIMEOUT_S,
               "the cluster's corosync.conf in the tree")
    bad = cluster.root / "bad.conf"
    bad.write_text(cluster.config_text.replace("totem {", "totem {\n  token: nonsense"))
    result = sh(f"cp {bad} corosync.conf", m1)
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr
    assert read(tree_conf) == cluster.config_text
    wait_until(lambda: "refused a new corosync.conf" in (read(cluster["node2"].mount
                                                            / ".clusterlog") or ""),
               REPLICATION_TIMEOUT_S, "the refusal's reason in the cluster log")
    assert "token" in cluster["node1"].log.read_text()
    newer = cluster.config_text.replace("config_version: 1", "config_version: 2")
    good = cluster.root / "good.conf"
    good.write_text(newer)
    assert sh(f"cp {good} corosync.conf", m1).returncode == 0
    for name in ("node1", "node2", "node3"):
        wait_until(lambda n=name: read(cluster[n].config) == newer,  # type: ignore[misc]
                   REPLICATION_TIMEOUT_S, f"{name}'s local corosync.conf to be rewritten")


def test_restart_keeps_data_and_a_stale_mount_is_recovered(cluster: DaemonCluster) -> None:
    m1 = cluster["node1"].mount
    (m1 / "kept.txt").write_text("kept\n")
    wait_content(cluster["node2"].mount / "kept.txt", "kept\n")
    assert cluster.stop("node1") == 0
    assert not is_mounted(m1)
    cluster.start("node1")
    cluster.wait_mounted("node1")
    assert read(m1 / "kept.txt") == "kept\n"
    cluster.kill("node1")  # SIGKILL leaves a dead mount behind
    assert is_mounted(m1)
    cluster.start("node1")
    cluster.wait_mounted("node1")
    cluster.wait_synced(["node1", "node2", "node3"])
    assert read(m1 / "kept.txt") == "kept\n"


def test_status_and_nodes_have_the_documented_shape(cluster: DaemonCluster) -> None:
    status = cluster.status("node2")
    assert check_status_shape(status) == []
    assert status["node"] == {"name": "node2", "nodeid": 2}
    assert status["quorum"]["quorate"] is True
    assert status["fs"]["synced"] is True
    assert [m["nodeid"] for m in status["membership"]["members"]] == [1, 2, 3]
    nodes = json.loads(cluster.cli("node2", "nodes", "--json").stdout)
    assert [(n["name"], n["local"]) for n in nodes] == [("node1", False), ("node2", True),
                                                         ("node3", False)]
    text = cluster.cli("node2", "status").stdout
    assert "Quorate:          Yes" in text
    assert "node2 (local)" in text


def test_second_daemon_on_the_same_data_is_refused(cluster: DaemonCluster) -> None:
    d = cluster["node1"]
    result = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "another pmxfs daemon" in result.stderr
    assert "Traceback" not in result.stderr
