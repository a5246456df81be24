"""`pmxfs demo`: the generated cluster (config, addresses, port, timers, demo.json), the choice of
free addresses, the preparation of its directory (reuse, refusals) and argument errors, all
without starting a daemon; then end-to-end runs with real daemons and FUSE mounts (root and
/dev/fuse, skipped otherwise), one of them while its default addresses are in use.

No test runs or binds the demo's defaults (127.0.0.11... on port 5405): the suite passes while
a `pmxfs demo` runs on this machine."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cpg_harness import PORT_RANGE, random_port, wait_until

from pmxfs.cli import build_parser, main
from pmxfs.commands import daemon, demo
from pmxfs.core import conf

NODE_KEYS = {"name", "nodeid", "pid", "argv", "config", "authkey", "data_dir", "run_dir", "mount"}
END_TO_END_TIMEOUT_S = 60.0


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    code = main(["demo", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("count", [1, 3, 5, demo.MAX_NODES])
def test_generated_config_passes_the_check(tmp_path: Path, count: int) -> None:
    plan = demo.plan_demo(count, tmp_path / "d")
    result = conf.check(plan.config_text)
    problems = [str(e) for e in result.errors + result.warnings]
    assert result.ok, problems
    assert not result.warnings, problems
    config = result.config
    assert config is not None
    assert (config.cluster_name, config.transport, config.config_version) == ("demo", "udpu", 1)
    assert config.port == 5405 == demo.DEFAULT_PORT
    assert [(i.name, i.nodeid, i.addr, i.votes) for i in config.node_infos()] == [
        (f"node{i}", i, f"127.0.0.{10 + i}", 1) for i in range(1, count + 1)]
    params = conf.totem_params(config)
    assert params.token == 1000  # whatever the node count: a kill is noticed within a second
    assert params.consensus == 1200
    assert params.hold < params.token_retransmit < params.token
    assert not (tmp_path / "d").exists()  # planning touches nothing


def test_plan_paths_and_argv(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path / "d")
    root = (tmp_path / "d").resolve()
    assert plan.root == root
    for i, node in enumerate(plan.nodes, 1):
        home = root / f"node{i}"
        assert (node.config, node.authkey) == (home / "corosync.conf", home / "authkey")
        assert (node.data_dir, node.run_dir, node.mount) == (home / "data", home / "run",
                                                             home / "mnt")
        assert node.argv() == [sys.executable, "-m", "pmxfs", "daemon",
                               "--config", str(home / "corosync.conf"),
                               "--authkey", str(home / "authkey"), "--node", f"node{i}",
                               "--mount", str(home / "mnt"), "--data-dir", str(home / "data"),
                               "--run-dir", str(home / "run")]


def test_argv_is_a_daemon_command_line(tmp_path: Path) -> None:
    node = demo.plan_demo(2, tmp_path).nodes[1]
    args = build_parser().parse_args(node.argv()[3:])
    assert args.handler is daemon.run
    assert (args.config, args.authkey, args.node, args.mount, args.data_dir, args.run_dir) == (
        str(node.config), str(node.authkey), "node2", str(node.mount), str(node.data_dir),
        str(node.run_dir))
    assert not args.local


def test_demo_json_shape(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path / "d")
    record = json.loads(json.dumps(demo.demo_record(plan, {"node1": 11, "node2": 12,
                                                           "node3": 13})))
    assert list(record) == ["nodes"]
    assert [n["name"] for n in record["nodes"]] == ["node1", "node2", "node3"]
    for i, entry in enumerate(record["nodes"], 1):
        node = plan.nodes[i - 1]
        assert set(entry) == NODE_KEYS
        assert (entry["nodeid"], entry["pid"], entry["argv"]) == (i, 10 + i, node.argv())
        for key in ("config", "authkey", "data_dir", "run_dir", "mount"):
            assert os.path.isabs(entry[key]), key
            assert entry[key].startswith(str(plan.root)), key
        assert entry["mount"] == str(plan.root / f"node{i}" / "mnt")


def test_guide_names_mounts_pids_and_commands(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path)
    text = demo.guide(plan, {"node1": 101, "node2": 102, "node3": 103})
    for node in plan.nodes:
        assert str(node.mount) in text
    assert f"echo hi > {plan.nodes[0].mount / 'hello'}" in text
    assert f"cat {plan.nodes[1].mount / 'hello'}" in text
    assert f"cat {plan.nodes[0].mount / '.members'}" in text
    assert "kill -9 103" in text
    assert f"--run-dir {plan.nodes[0].run_dir} status" in text
    assert f"--run-dir {plan.nodes[0].run_dir} expected 1" in text
    assert "Ctrl-C" in text


def members(quorate: int, online: dict[str, int]) -> bytes:
    return json.dumps({"nodename": "node1", "version": 3,
                       "cluster": {"name": "demo", "version": 1, "nodes": len(online),
                                   "quorate": quorate},
                       "nodelist": {name: {"id": i, "online": up, "ip": f"127.0.0.{10 + i}"}
                                    for i, (name, up) in enumerate(online.items(), 1)}}).encode()


def test_ready_means_every_node_online_and_quorate() -> None:
    names = {"node1", "node2", "node3"}
    assert demo.members_ready(members(1, {"node1": 1, "node2": 1, "node3": 1}), names)
    assert not demo.members_ready(members(1, {"node1": 1, "node2": 1, "node3": 0}), names)
    assert not demo.members_ready(members(0, {"node1": 1, "node2": 1, "node3": 1}), names)
    assert not demo.members_ready(members(1, {"node1": 1, "node2": 1}), names)
    for garbage in (b"", b"{", b"[]", b'{"cluster": 1}', b'{"cluster": {}, "nodelist": []}'):
        assert not demo.members_ready(garbage, names)


# ---------------------------------------------------------------------------- the network


def test_plan_on_another_port_and_subnet(tmp_path: Path) -> None:
    plan = demo.plan_demo(2, tmp_path, port=6000, subnet=7)
    config = conf.parse(plan.config_text)
    assert config.port == 6000 == plan.port
    assert [i.addr for i in config.node_infos()] == ["127.0.7.11", "127.0.7.12"]
    assert plan.addresses == "127.0.7.11 to 127.0.7.12, port 6000"
    assert demo.plan_demo(1, tmp_path, port=6000).addresses == "127.0.0.11, port 6000"


@contextlib.contextmanager
def occupied(*addresses: tuple[str, int]) -> Iterator[None]:
    """UDP sockets bound to `addresses` for the duration, as another demo's daemons hold them."""
    with contextlib.ExitStack() as stack:
        for address in addresses:
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).bind(address)
        yield


def test_free_addresses_are_picked_when_the_defaults_are_in_use(tmp_path: Path) -> None:
    port = random_port()
    with occupied(("127.0.0.12", port)):
        plan, note = demo.settle_network(demo.plan_demo(3, tmp_path), port)
    assert (plan.port, plan.subnet) == (port, 1)
    assert [n.addr for n in plan.nodes] == ["127.0.1.11", "127.0.1.12", "127.0.1.13"]
    assert "127.0.1.11" in plan.config_text
    assert note == (f"127.0.0.11 to 127.0.0.13, port {port} are in use (another demo?), so "
                    f"this demo uses 127.0.1.11 to 127.0.1.13, port {port}.")
    assert demo.settle_network(demo.plan_demo(3, tmp_path), port) == (
        demo.plan_demo(3, tmp_path, port), "")  # free again: the default addresses, no note
    assert not list(tmp_path.iterdir())  # choosing writes nothing


def test_another_port_when_no_address_is_free_on_the_first(tmp_path: Path) -> None:
    first, second = random.sample(range(*PORT_RANGE), 2)
    with occupied(("127.0.0.11", first), ("127.0.1.11", first)):
        plan = demo.free_network(2, tmp_path, [first, second], subnets=[0, 1])
        assert (plan.port, plan.subnet) == (second, 0)
        with occupied(("127.0.0.11", second), ("127.0.1.11", second)), \
                pytest.raises(demo.DemoError, match="no free loopback addresses for 2 nodes"):
            demo.free_network(2, tmp_path, [first, second], subnets=[0, 1])


def test_a_dir_keeps_its_addresses_and_port(tmp_path: Path) -> None:
    port = random_port()
    made = demo.plan_demo(2, tmp_path, port, subnet=3)
    demo.prepare(made)
    assert demo.existing_network(tmp_path) == (port, 3)
    assert demo.settle_network(demo.plan_demo(2, tmp_path), None) == (made, "")
    assert demo.settle_network(demo.plan_demo(2, tmp_path), port) == (made, "")
    with pytest.raises(demo.DemoError) as info:
        demo.settle_network(demo.plan_demo(2, tmp_path), port + 1)
    assert str(info.value) == (f"the demo in {tmp_path} uses port {port}; run it without --port "
                               f"(or with --port {port}), or use another --dir")
    with occupied(("127.0.3.12", port)), pytest.raises(demo.DemoError) as info:
        demo.settle_network(demo.plan_demo(2, tmp_path), None)
    assert str(info.value) == (f"the demo in {tmp_path} uses 127.0.3.11 to 127.0.3.12, port "
                               f"{port}, which are in use (is it still running?); stop what "
                               "uses them or use another --dir")


def test_guide_says_why_the_addresses_are_not_the_defaults(tmp_path: Path) -> None:
    plan = demo.plan_demo(2, tmp_path, 6000, subnet=1)
    text = demo.guide(plan, {"node1": 1, "node2": 2}, "the defaults are in use")
    lines = text.splitlines()
    assert lines[:2] == ["pmxfs demo: 2 nodes of cluster 'demo' are up (udpu, port 6000, token "
                         "1000 ms)", "the defaults are in use"]
    assert "127.0.1.12" in text


# ---------------------------------------------------------------------------- the directory


def test_prepare_creates_the_layout(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path / "d")
    demo.prepare(plan)
    keys = set()
    for node in plan.nodes:
        assert node.config.read_text() == plan.config_text
        assert stat.S_IMODE(node.authkey.stat().st_mode) == 0o400
        keys.add(node.authkey.read_bytes())
        for sub in (node.data_dir, node.run_dir, node.mount):
            assert sub.is_dir()
        assert not any(p.name.endswith(".tmp") for p in node.home.iterdir())
    assert len(keys) == 1
    assert len(next(iter(keys))) == 256


def test_prepare_again_reuses_config_key_and_data(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path / "d")
    demo.prepare(plan)
    n1, n2, n3 = plan.nodes
    key = n1.authkey.read_bytes()
    newer = plan.config_text.replace("config_version: 1", "config_version: 2")
    n1.config.chmod(0o644)
    n1.config.write_text(newer)  # as the cluster rewrites it after a change through the tree
    (n2.data_dir / "config.db").write_bytes(b"kept")
    n3.config.unlink()
    n3.authkey.unlink()
    demo.prepare(plan)
    assert n1.config.read_text() == newer
    assert n3.config.read_text() == newer  # the newest config of the cluster, not version 1
    assert [n.authkey.read_bytes() for n in plan.nodes] == [key] * 3
    assert (n2.data_dir / "config.db").read_bytes() == b"kept"


def test_refuses_a_dir_of_another_node_count(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    demo.prepare(demo.plan_demo(3, tmp_path, random_port()))
    before = {p: p.read_bytes() for p in tmp_path.glob("node*/*") if p.is_file()}
    code, out, err = run_cli(capsys, "--nodes", "2", "--dir", str(tmp_path))
    assert (code, out) == (1, [])
    assert err == [f"pmxfs: {tmp_path} holds a demo of 3 nodes ({tmp_path}/node1/corosync.conf); "
                   "run with --nodes 3 or use another --dir"]
    assert {p: p.read_bytes() for p in tmp_path.glob("node*/*") if p.is_file()} == before
    assert not (tmp_path / "node4").exists()


def test_refuses_differing_authkeys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = demo.plan_demo(2, tmp_path, random_port())
    demo.prepare(plan)
    plan.nodes[1].authkey.unlink()
    plan.nodes[1].authkey.write_bytes(os.urandom(256))
    code, _, err = run_cli(capsys, "--nodes", "2", "--dir", str(tmp_path))
    assert code == 1
    assert err == [f"pmxfs: {plan.nodes[0].authkey} and {plan.nodes[1].authkey} differ; every "
                   "node needs the same authkey"]


def test_refuses_a_dir_in_use_by_another_demo(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    fd = os.open(tmp_path / "demo.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = run_cli(capsys, "--dir", str(tmp_path))
    finally:
        os.close(fd)
    assert code == 1
    assert err == [f"pmxfs: another pmxfs demo is running in {tmp_path}"]
    assert not (tmp_path / "node1").exists()


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", ["0", "65536", "x", "-1", "2.5", ""])
def test_bad_port_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              value: str) -> None:
    code, out, err = run_cli(capsys, "--port", value, "--dir", str(tmp_path / "d"))
    assert (code, out) == (2, [])
    assert err == [f"pmxfs: --port must be a number from 1 to 65535, not {value!r}"]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["0", "17", "x", "-1", "2.5", ""])
def test_bad_node_count_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    value: str) -> None:
    code, out, err = run_cli(capsys, "--nodes", value, "--dir", str(tmp_path / "d"))
    assert (code, out) == (2, [])
    assert err == [f"pmxfs: --nodes must be a number from 1 to 16, not {value!r}"]
    assert not (tmp_path / "d").exists()


def test_dir_that_is_a_file_is_one_line(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    code, _, err = run_cli(capsys, "--dir", str(path))
    assert code == 1
    assert err == [f"pmxfs: {path} is not a directory"]


def test_python_dash_m_pmxfs_runs_the_cli(tmp_path: Path) -> None:
    """The daemons are started as `python -m pmxfs daemon ...`."""
    proc = subprocess.run([sys.executable, "-m", "pmxfs", "demo", "--nodes", "0", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "pmxfs: --nodes must be a number from 1 to 16, not '0'\n"


# ---------------------------------------------------------------------------- end to end


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the demo's FUSE mounts need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (package fuse3) is not installed"
    return None


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record


def runs(pid: int, argv: list[str]) -> bool:
    """Whether process `pid` still runs exactly `argv` (so a reused PID is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0")[:-1] == [a.encode() for a in argv]


class RunningDemo:
    """A `pmxfs demo` process started by a test, its output and the nodes of its demo.json."""

    def __init__(self, root: Path, output: Path, proc: subprocess.Popen[bytes]) -> None:
        self.root, self.output, self.proc = root, output, proc
        self.nodes: list[dict[str, Any]] = []

    def details(self) -> str:
        logs = "\n".join(f"--- {p}:\n{read(p)}" for p in sorted(self.root.glob("node*/daemon.log")))
        return f"--- demo output:\n{read(self.output)}\n{logs}"

    def wait_up(self) -> list[Path]:
        """Until demo.json is written and every mount answers; the mounts."""
        def started() -> dict[str, Any] | None:
            assert self.proc.poll() is None, (f"the demo exited with {self.proc.returncode}\n"
                                              f"{self.details()}")
            return load_record(self.root / "demo.json")

        record = wait_until(started, END_TO_END_TIMEOUT_S, "demo.json", self.details)
        self.nodes = record["nodes"]
        assert all(set(n) == NODE_KEYS for n in self.nodes)
        mounts = [Path(n["mount"]) for n in self.nodes]
        wait_until(lambda: all(str(m) in demo.mount_points() and (m / ".members").exists()
                               for m in mounts),
                   END_TO_END_TIMEOUT_S, "the mounts", self.details)
        return mounts

    def replicates(self, mounts: list[Path]) -> None:
        (mounts[0] / "hello").write_text("hi\n")
        wait_until(lambda: read(mounts[1] / "hello") == "hi\n", END_TO_END_TIMEOUT_S,
                   "node2 to read what node1 wrote", self.details)

    def interrupt(self) -> None:
        """SIGINT: every daemon stops, every mount is gone, demo.json too."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(END_TO_END_TIMEOUT_S) == 0, self.details()
        assert not [n["mount"] for n in self.nodes if n["mount"] in demo.mount_points()]
        assert not [n["name"] for n in self.nodes if runs(n["pid"], n["argv"])]
        assert not (self.root / "demo.json").exists()  # its PIDs are stale now


@contextlib.contextmanager
def running_demo(tmp_path: Path, *args: str) -> Iterator[RunningDemo]:
    """`pmxfs demo --dir TMP/demo ARGS`; whatever happens, the demo, its daemons and their mounts
    are gone afterwards."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path.resolve() / "demo"  # as the demo and /proc/self/mountinfo name it
    output = tmp_path / "demo.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pmxfs", "demo", "--dir", str(root), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    running = RunningDemo(root, output, proc)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for node in running.nodes:  # a killed demo leaves its daemons (own sessions) running
            if runs(node["pid"], node["argv"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node["pid"], signal.SIGKILL)
        for mount in sorted(root.glob("node*/mnt")):
            if str(mount) in demo.mount_points():
                subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30,
                               check=False)


@pytest.mark.fuse
@pytest.mark.root
def test_demo_end_to_end(tmp_path: Path) -> None:
    port = random_port()
    with running_demo(tmp_path, "--nodes", "3", "--port", str(port)) as running:
        mounts = running.wait_up()
        assert [(n["name"], n["nodeid"]) for n in running.nodes] == [
            ("node1", 1), ("node2", 2), ("node3", 3)]
        config = conf.parse(Path(running.nodes[0]["config"]).read_text())
        assert config.port == port
        running.replicates(mounts)
        running.interrupt()


@pytest.mark.fuse
@pytest.mark.root
def test_demo_end_to_end_while_its_default_addresses_are_in_use(tmp_path: Path) -> None:
    """Another program holds node1's and node2's addresses on the port asked for (as a running
    demo would): this demo picks free loopback addresses, says so, and works."""
    port = random_port()
    with contextlib.ExitStack() as stack:
        for nodeid in (1, 2):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((f"127.0.0.{10 + nodeid}", port))
        with running_demo(tmp_path, "--nodes", "2", "--port", str(port)) as running:
            mounts = running.wait_up()
            addrs = [i.addr for i in conf.parse(Path(running.nodes[0]["config"]).read_text())
                     .node_infos()]
            assert not any(a.startswith("127.0.0.") for a in addrs), addrs
            output = read(running.output) or ""
            assert (f"127.0.0.11 to 127.0.0.12, port {port} are in use (another demo?), so "
                    f"this demo uses {addrs[0]} to {addrs[1]}, port {port}.") in output, output
            running.replicates(mounts)
            running.interrupt()
