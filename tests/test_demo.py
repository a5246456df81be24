"""`pmxfs demo`: the planned cluster (config, addresses, port, timers, demo.json) and that create,
the demo's timers and the adds build exactly it, the choice of free addresses (the join port
included), the preparation of its directory (a new one, reuse, an unfinished build, refusals),
a failed step and argument errors, all without starting a daemon; then end-to-end runs with real
daemons and FUSE mounts (root and /dev/fuse, skipped otherwise): a new DIR built with create and
add and a second run that reuses it, a failed create, and a run while its default addresses are
in use.

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
from pmxfs.commands import daemon, demo, demo_qnetd
from pmxfs.core import conf
from pmxfs.core.conf import edit
from pmxfs.core.join_token import JOIN_PORT

NODE_KEYS = {"name", "nodeid", "pid", "argv", "config", "authkey", "data_dir", "run_dir", "mount"}
SLACK_S = 30.0  # beyond the demo's own start deadline: the demo reports first


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    code = main(["demo", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ---------------------------------------------------------------------------- the plan


def seed(plan: demo.DemoPlan, count: int | None = None) -> str:
    """Write the corosync.conf of a cluster of the plan's first `count` nodes (all by default)
    into each of their homes, as an earlier run (or tools/bench_fs.py) leaves them; the text."""
    count = len(plan.nodes) if count is None else count
    text = conf.render(demo.cluster_config(count, plan.port, plan.subnet))
    for node in plan.nodes[:count]:
        node.home.mkdir(parents=True, exist_ok=True)
        node.config.write_text(text)
    return text


@pytest.mark.parametrize("count", [1, 3, 5, demo.MAX_NODES])
def test_planned_config_passes_the_check(tmp_path: Path, count: int) -> None:
    demo.plan_demo(count, tmp_path / "d")
    result = conf.check(conf.render(demo.cluster_config(count)))
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


@pytest.mark.parametrize("count", [1, 2, 3, demo.MAX_NODES])
def test_create_timers_and_adds_build_the_planned_cluster(count: int) -> None:
    """What `pmxfs create`, the demo's timers and `pmxfs add` write, node by node (the same
    edits of corosync.conf the daemons make), is the planned cluster."""
    port = 6000
    planned = demo.cluster_config(count, port, subnet=4)
    first = planned.node_infos()[0]
    text = edit.new_cluster(demo.CLUSTER_NAME, first.name, first.nodeid, 1, first.addr,
                            port=port)
    text = demo.with_demo_timers(text)
    for info in planned.node_infos()[1:]:
        text, nodeid = edit.with_node(text, info.name, info.addr, nodeid=info.nodeid)
        assert nodeid == info.nodeid
    built = conf.check(text).config
    assert built is not None
    assert built.config_version == count + 1  # create, the timers, one per add
    assert (built.cluster_name, built.transport, built.port) == (
        planned.cluster_name, planned.transport, planned.port)
    assert [(i.name, i.nodeid, i.addr, i.votes) for i in built.node_infos()] == [
        (i.name, i.nodeid, i.addr, i.votes) for i in planned.node_infos()]
    assert conf.totem_params(built) == conf.totem_params(planned)
    assert conf.totem_params(built).token == demo.TOKEN_MS


def test_the_demo_timers_are_an_update_the_tree_takes() -> None:
    created = edit.new_cluster("demo", "node1", 1, 1, "127.0.9.11", port=6000)
    assert conf.totem_params(conf.parse(created)).token == 3000  # corosync's default
    timed = demo.with_demo_timers(created)
    result = conf.check(timed, current=conf.parse(created))
    assert result.ok, result.errors
    assert result.config is not None
    assert result.config.config_version == 2
    assert (result.config.totem.token, result.config.totem.token_coefficient) == (1000, 0)
    with pytest.raises(demo.DemoError, match="not valid"):
        demo.with_demo_timers("totem {")


def test_start_deadline_grows_with_the_steps() -> None:
    assert demo.start_timeout(0) == demo.START_TIMEOUT_S
    assert demo.start_timeout(3) == demo.START_TIMEOUT_S + 3 * demo.STEP_TIMEOUT_S
    assert demo.start_timeout(demo.MAX_NODES) < 600  # bounded


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
    assert plan.port == 6000
    assert [n.addr for n in plan.nodes] == ["127.0.7.11", "127.0.7.12"]
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


def test_the_join_port_must_be_free_too(tmp_path: Path) -> None:
    """Each node's join service listens on TCP 5406 of its own address: an address where that
    port is taken is not used (a subnet the demo's defaults never use)."""
    port, subnet = random_port(), random.randrange(100, 250)
    plan = demo.plan_demo(2, tmp_path, port, subnet)
    assert demo.bindable(plan)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((plan.nodes[1].addr, JOIN_PORT))
        listener.listen()
        assert not demo.bindable(plan)
        settled = demo.free_network(2, tmp_path, [port], subnets=[subnet, subnet + 1])
        assert settled.subnet == subnet + 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((plan.nodes[0].addr, JOIN_PORT))  # UDP 5406 is not the join service's
        assert demo.bindable(plan)


def test_a_dir_keeps_its_addresses_and_port(tmp_path: Path) -> None:
    port = random_port()
    made = demo.plan_demo(2, tmp_path, port, subnet=3)
    seed(made)
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


def test_prepare_makes_a_new_dir_with_directories_only(tmp_path: Path) -> None:
    """A new DIR gets no config and no key: its daemons start standalone, and create and add
    make the cluster."""
    plan = demo.plan_demo(3, tmp_path / "d")
    demo.prepare(plan)
    assert demo.existing_cluster(plan) is None
    for node in plan.nodes:
        assert not node.config.exists()
        assert not node.authkey.exists()
        for sub in (node.data_dir, node.run_dir, node.mount):
            assert sub.is_dir()
    assert stat.S_IMODE(plan.nodes[0].data_dir.stat().st_mode) == 0o700


def test_prepare_gives_every_node_the_cluster_files(tmp_path: Path) -> None:
    """A DIR holding the cluster's config (tools/bench_fs.py writes only configs): every node
    gets the config and one authkey."""
    plan = demo.plan_demo(3, tmp_path / "d")
    text = seed(plan)
    plan.nodes[2].config.unlink()
    demo.prepare(plan)
    keys = set()
    for node in plan.nodes:
        assert node.config.read_text() == text
        assert stat.S_IMODE(node.authkey.stat().st_mode) == 0o400
        keys.add(node.authkey.read_bytes())
        assert not any(p.name.endswith(".tmp") for p in node.home.iterdir())
    assert len(keys) == 1
    assert len(next(iter(keys))) == 256


def test_prepare_again_reuses_config_key_and_data(tmp_path: Path) -> None:
    plan = demo.plan_demo(3, tmp_path / "d")
    text = seed(plan)
    demo.prepare(plan)
    n1, n2, n3 = plan.nodes
    key = n1.authkey.read_bytes()
    newer = text.replace("config_version: 1", "config_version: 2")
    n1.config.write_text(newer)  # as the cluster rewrites it after a change through the tree
    (n2.data_dir / "config.db").write_bytes(b"kept")
    n3.config.unlink()
    n3.authkey.unlink()
    demo.prepare(plan)
    assert n1.config.read_text() == newer
    assert n3.config.read_text() == newer  # the newest config of the cluster, not version 1
    assert [n.authkey.read_bytes() for n in plan.nodes] == [key] * 3
    assert (n2.data_dir / "config.db").read_bytes() == b"kept"


def test_prepare_keeps_an_unfinished_build(tmp_path: Path) -> None:
    """A build cut short: the cluster lists node1 and node2 (node2's add was answered, but it
    never wrote its files), node3 never joined. node2 gets the files; node3 stays without, so
    the run adds it."""
    plan = demo.plan_demo(3, tmp_path / "d", random_port())
    demo.prepare(plan)  # all homes, as the first run made them
    n1, n2, n3 = plan.nodes
    text = conf.render(demo.cluster_config(2, plan.port))
    n1.config.write_text(text)
    n1.authkey.write_bytes(os.urandom(256))
    demo.prepare(plan)
    existing = demo.existing_cluster(plan)
    assert existing == demo.ExistingCluster(text, frozenset({"node1", "node2"}))
    assert n2.config.read_text() == text
    assert n2.authkey.read_bytes() == n1.authkey.read_bytes()
    assert not n3.config.exists()
    assert not n3.authkey.exists()


def test_refuses_a_dir_of_another_node_count(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    seed(demo.plan_demo(3, tmp_path, random_port()))
    before = {p: p.read_bytes() for p in tmp_path.glob("node*/*") if p.is_file()}
    code, out, err = run_cli(capsys, "--nodes", "2", "--dir", str(tmp_path))
    assert (code, out) == (1, [])
    assert err == [f"pmxfs: {tmp_path} holds a demo of 3 nodes ({tmp_path}/node1/corosync.conf); "
                   "run with --nodes 3 or use another --dir"]
    assert {p: p.read_bytes() for p in tmp_path.glob("node*/*") if p.is_file()} == before
    assert not (tmp_path / "node4").exists()


@pytest.mark.parametrize("configs", [0, 2])
def test_refuses_a_smaller_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               configs: int) -> None:
    """A finished 2-node demo (or a new DIR prepared for 2 nodes) is not grown to 3: only a
    DIR made for 3 nodes, with all their homes, may hold fewer members while it is built."""
    plan = demo.plan_demo(2, tmp_path, random_port())
    demo.prepare(plan)
    seed(plan, configs)
    code, out, err = run_cli(capsys, "--nodes", "3", "--dir", str(tmp_path))
    assert (code, out) == (1, [])
    assert err == [f"pmxfs: {tmp_path} holds a demo of 2 nodes ({tmp_path}/node2); run with "
                   "--nodes 2 or use another --dir"]
    assert not (tmp_path / "node3").exists()


def test_refuses_differing_authkeys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = demo.plan_demo(2, tmp_path, random_port())
    seed(plan)
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


def daemons_running(root: Path, count: int) -> list[int]:
    """The PIDs of processes running exactly the argv of one of the demo's daemons in `root`
    (its paths are this test's own), whether or not demo.json still names them."""
    argvs = [node.argv() for node in demo.plan_demo(count, root).nodes]
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if any(runs(pid, argv) for argv in argvs)]


def qnetd_running(root: Path) -> list[int]:
    """The PIDs of processes running the demo's qnetd for `root` (its directory is this test's
    own), whatever address it listens on."""
    head = [sys.executable, "-m", "pmxfs", "qnetd", "--listen"]
    tail = ["--dir", str(root / "qnetd")]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
        except (OSError, UnicodeDecodeError):
            continue
        if argv[:len(head)] == head and argv[-len(tail):] == tail:
            found.append(int(entry.name))
    return found


class RunningDemo:
    """A `pmxfs demo` process started by a test, its output and the nodes of its demo.json."""

    def __init__(self, root: Path, count: int, output: Path,
                 proc: subprocess.Popen[bytes]) -> None:
        self.root, self.count, self.output, self.proc = root, count, output, proc
        self.timeout_s = demo.start_timeout(count) + SLACK_S
        self.nodes: list[dict[str, Any]] = []

    def details(self) -> str:
        paths = [*sorted(self.root.glob("node*/daemon.log")), self.root / "qnetd/qnetd.log"]
        logs = "\n".join(f"--- {p}:\n{read(p)}" for p in paths if p.exists())
        return f"--- demo output:\n{read(self.output)}\n{logs}"

    def wait_up(self) -> list[Path]:
        """Until demo.json is written and every mount answers; the mounts."""
        def started() -> dict[str, Any] | None:
            assert self.proc.poll() is None, (f"the demo exited with {self.proc.returncode}\n"
                                              f"{self.details()}")
            return load_record(self.root / "demo.json")

        record = wait_until(started, self.timeout_s, "demo.json", self.details)
        self.nodes = record["nodes"]
        assert all(set(n) == NODE_KEYS for n in self.nodes)
        mounts = [Path(n["mount"]) for n in self.nodes]
        wait_until(lambda: all(str(m) in demo.mount_points() and (m / ".members").exists()
                               for m in mounts),
                   self.timeout_s, "the mounts", self.details)
        return mounts

    def replicates(self, mounts: list[Path], text: str = "hi\n") -> None:
        (mounts[0] / "hello").write_text(text)
        wait_until(lambda: read(mounts[1] / "hello") == text, self.timeout_s,
                   "node2 to read what node1 wrote", self.details)

    def interrupt(self) -> None:
        """SIGINT: every daemon stops, every mount is gone, demo.json too."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(self.timeout_s) == 0, self.details()
        self.assert_all_stopped()

    def assert_all_stopped(self) -> None:
        assert not [m for m in self.root.glob("node*/mnt") if str(m) in demo.mount_points()]
        assert daemons_running(self.root, self.count) == []
        assert not (self.root / "demo.json").exists()  # its PIDs are stale now


@contextlib.contextmanager
def running_demo(tmp_path: Path, count: int, *args: str,
                 output: str = "demo.out") -> Iterator[RunningDemo]:
    """`pmxfs demo --dir TMP/demo --nodes COUNT ARGS`; whatever happens, the demo, its daemons
    and their mounts are gone afterwards."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path.resolve() / "demo"  # as the demo and /proc/self/mountinfo name it
    out_path = tmp_path / output
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pmxfs", "demo", "--dir", str(root),
                                 "--nodes", str(count), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    running = RunningDemo(root, count, out_path, proc)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        # a killed demo leaves its daemons (and its qnetd) running
        for pid in [*daemons_running(root, count), *qnetd_running(root)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in sorted(root.glob("node*/mnt")):
            if str(mount) in demo.mount_points():
                subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30,
                               check=False)


@pytest.mark.fuse
@pytest.mark.root
def test_demo_builds_its_cluster_and_a_second_run_reuses_it(tmp_path: Path) -> None:
    """A new DIR: the daemons start standalone, node1 creates the cluster and the others join
    it with tokens; every corosync.conf is written by a daemon and all are the same. A second
    run starts the members from those files: nothing is created or joined again, data kept."""
    port = random_port()
    with running_demo(tmp_path, 3, "--port", str(port)) as first:
        mounts = first.wait_up()
        assert [(n["name"], n["nodeid"]) for n in first.nodes] == [
            ("node1", 1), ("node2", 2), ("node3", 3)]
        configs = [Path(n["config"]).read_bytes() for n in first.nodes]
        assert len(set(configs)) == 1, configs
        config = conf.parse(configs[0].decode())
        assert config.port == port
        assert config.config_version == 3 + 1  # create, the demo's timers, two adds
        assert conf.totem_params(config).token == demo.TOKEN_MS
        assert len({Path(n["authkey"]).read_bytes() for n in first.nodes}) == 1
        logs = [read(first.root / f"node{i}" / "daemon.log") or "" for i in (1, 2, 3)]
        assert "created cluster demo: node node1, id 1" in logs[0], first.details()
        for i in (2, 3):
            assert f"joined cluster demo as node {i}" in logs[i - 1], first.details()
        output = read(first.output) or ""
        first_addr = config.node_infos()[0].addr  # 127.0.0.11 unless that is in use
        assert (f"pmxfs demo: node1 created cluster demo (pmxfs create demo --link0 "
                f"{first_addr} --nodeid 1 --port {port})") in output, output
        assert "pmxfs demo: node1 set token 1000 ms in corosync.conf" in output, output
        assert "pmxfs demo: node2 joined with a token from node1" in output, output
        assert "pmxfs demo: node3 joined with a token from node1" in output, output
        first.replicates(mounts)
        first.interrupt()
    with running_demo(tmp_path, 3, output="again.out") as again:  # its port from the DIR
        mounts = again.wait_up()
        assert [Path(n["config"]).read_bytes() for n in again.nodes] == configs
        assert read(mounts[2] / "hello") == "hi\n"
        output = read(again.output) or ""
        assert "created cluster" not in output, output
        assert "joined" not in output, output
        again.replicates(mounts, "again\n")
        again.interrupt()


@pytest.mark.fuse
@pytest.mark.root
def test_demo_finishes_an_unfinished_build(tmp_path: Path) -> None:
    """A DIR made for 3 nodes whose cluster has 2 (a build cut short; here a 2-node demo and a
    third home): the members start from their files, node1 makes a token, node3 joins."""
    port = random_port()
    with running_demo(tmp_path, 2, "--port", str(port)) as first:
        first.wait_up()
        first.interrupt()
    (first.root / "node3").mkdir()
    with running_demo(tmp_path, 3, output="finish.out") as finish:
        mounts = finish.wait_up()
        output = read(finish.output) or ""
        assert "created cluster" not in output, output
        assert "node2 joined" not in output, output
        assert "pmxfs demo: node3 joined with a token from node1" in output, output
        configs = {Path(n["config"]).read_bytes() for n in finish.nodes}
        assert len(configs) == 1, configs
        config = conf.parse(configs.pop().decode())
        assert config.config_version == 4  # create, the demo's timers, two adds
        assert [i.name for i in config.node_infos()] == ["node1", "node2", "node3"]
        finish.replicates([mounts[2], mounts[0]])
        finish.interrupt()


@pytest.mark.fuse
@pytest.mark.root
def test_demo_reports_a_failed_create(tmp_path: Path) -> None:
    """A step that fails is reported as a daemon that fails to start: the node, the reason, the
    tail of its log, and every daemon stopped. Here every corosync.conf was removed, so the
    demo creates the cluster again -- but each daemon takes its config back from its tree
    (the restore path) and node1 refuses the create."""
    port = random_port()
    with running_demo(tmp_path, 2, "--port", str(port)) as first:
        first.wait_up()
        first.interrupt()
    for config in first.root.glob("node*/corosync.conf"):
        config.unlink()
    with running_demo(tmp_path, 2, "--port", str(port), output="failed.out") as failed:
        assert failed.proc.wait(failed.timeout_s) == 1, failed.details()
        output = read(failed.output) or ""
        node1 = failed.root / "node1"
        assert (f"pmxfs: node1: `pmxfs create` failed: this node is already in a cluster "
                f"({node1}/corosync.conf exists)") in output, output
        assert f"--- last lines of {node1}/daemon.log:" in output, output
        assert f"restored {node1}/corosync.conf (cluster demo) from the tree" in output, output
        failed.assert_all_stopped()


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
        with running_demo(tmp_path, 2, "--port", str(port)) as running:
            mounts = running.wait_up()
            addrs = [i.addr for i in conf.parse(Path(running.nodes[0]["config"]).read_text())
                     .node_infos()]
            assert not any(a.startswith("127.0.0.") for a in addrs), addrs
            output = read(running.output) or ""
            assert (f"127.0.0.11 to 127.0.0.12, port {port} are in use (another demo?), so "
                    f"this demo uses {addrs[0]} to {addrs[1]}, port {port}.") in output, output
            running.replicates(mounts)
            running.interrupt()


# ---------------------------------------------------------------------------- --qdevice


def with_device(text: str, host: str, port: int = 5403) -> str:
    """A demo corosync.conf with the QDevice `qdevice setup` adds (config_version + 1)."""
    return edit.with_qdevice(text, host, port, None, "lowest", force=False)


def test_qdevice_plan_and_its_qnetd(tmp_path: Path) -> None:
    plan = demo.plan_demo(2, tmp_path, 6000, subnet=7, qdevice=True)
    assert plan.qdevice
    assert not demo.plan_demo(2, tmp_path, 6000, subnet=7).qdevice
    qnetd = demo.qnetd_plan(plan)
    assert (qnetd.host, qnetd.port, qnetd.address) == ("127.0.7.10", 5403, "127.0.7.10:5403")
    assert (qnetd.name, qnetd.dir, qnetd.log) == ("qnetd", plan.root / "qnetd",
                                                  plan.root / "qnetd" / "qnetd.log")
    assert qnetd.argv() == [sys.executable, "-m", "pmxfs", "qnetd", "--listen",
                            "127.0.7.10:5403", "--dir", str(plan.root / "qnetd")]
    args = build_parser().parse_args(qnetd.argv()[3:])
    assert (args.command, args.qnetd_command) == ("qnetd", None)  # qnetd itself, no subcommand
    assert args.listen == ("127.0.7.10", 5403)
    assert args.serve_dir == str(plan.root / "qnetd")
    assert qnetd.token_args() == ["qnetd", "token", "--dir", str(qnetd.dir), "--address",
                                  "127.0.7.10:5403", "--ttl", demo_qnetd.TOKEN_TTL]
    assert not list(tmp_path.iterdir())  # planning touches nothing


def test_qdevice_setup_follows_pvecm_rules_for_the_node_count(tmp_path: Path) -> None:
    qnetd = demo_qnetd.QnetdPlan(tmp_path, "127.0.7.10")
    assert demo_qnetd.setup_args(qnetd, "T", 2) == ["qdevice", "setup", "127.0.7.10:5403",
                                                    "--token", "T"]
    assert demo_qnetd.setup_args(qnetd, "T", 3)[-1] == "--force"  # odd: lms
    assert demo_qnetd.setup_args(qnetd, "T", 4)[-1] == "T"
    for count in (2, 3, 4):  # what setup writes into the demo's corosync.conf passes the check
        text = conf.render(demo.cluster_config(count, 6000, 7))
        force = "--force" in demo_qnetd.setup_args(qnetd, "T", count)
        added = edit.with_qdevice(text, qnetd.host, qnetd.port, None, "lowest", force=force)
        assert demo_qnetd.configured_device(added) == ("127.0.7.10", 5403)
        assert demo_qnetd.configured_device(text) is None


def test_a_dir_with_a_device_keeps_it(tmp_path: Path) -> None:
    text = conf.render(demo.cluster_config(2, 6000, 7))
    assert demo_qnetd.plan_qnetd(tmp_path, "127.0.7.10", None).port == 5403
    assert demo_qnetd.plan_qnetd(tmp_path, "127.0.7.10", text).port == 5403
    assert demo_qnetd.plan_qnetd(tmp_path, "127.0.7.10",
                                 with_device(text, "127.0.7.10", 5999)).port == 5999
    with pytest.raises(demo_qnetd.QnetdError) as info:
        demo_qnetd.plan_qnetd(tmp_path, "127.0.7.10", with_device(text, "192.0.2.10"))
    assert str(info.value) == (f"the cluster in {tmp_path} has a QDevice at 192.0.2.10:5403, "
                               "not at the demo's 127.0.7.10; use another --dir")


def test_qnetd_address_in_use_moves_the_demo(tmp_path: Path) -> None:
    """With --qdevice, qnetd's TCP address counts when the demo picks its subnet (a subnet the
    demo's defaults never use)."""
    port, subnet = random_port(), random.randrange(100, 250)
    plan = demo.plan_demo(2, tmp_path, port, subnet, qdevice=True)
    assert demo.bindable(plan)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((f"127.0.{subnet}.10", 5403))
        listener.listen()
        assert not demo.bindable(plan)
        assert demo.bindable(demo.plan_demo(2, tmp_path, port, subnet))  # without --qdevice
        settled = demo.free_network(2, tmp_path, [port], subnets=[subnet, subnet + 1],
                                    qdevice=True)
        assert (settled.subnet, settled.qdevice) == (subnet + 1, True)


def test_listening_reads_the_process_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert not demo_qnetd.listening(os.getpid(), port)
        listener.listen()
        assert demo_qnetd.listening(os.getpid(), port)
    assert not demo_qnetd.listening(os.getpid(), port)


def test_demo_json_with_qnetd_only_adds_a_key(tmp_path: Path) -> None:
    plan = demo.plan_demo(2, tmp_path / "d", qdevice=True)
    qnetd = demo.qnetd_plan(plan)
    pids = {"node1": 11, "node2": 12, "qnetd": 10}
    record = json.loads(json.dumps(demo.demo_record(plan, pids, qnetd)))
    assert list(record) == ["nodes", "qnetd"]
    assert record["nodes"] == demo.demo_record(plan, pids)["nodes"]
    assert record["qnetd"] == {"name": "qnetd", "address": "127.0.0.10:5403", "pid": 10,
                               "argv": qnetd.argv(), "dir": str(qnetd.dir),
                               "log": str(qnetd.log)}


def test_guide_with_a_qdevice(tmp_path: Path) -> None:
    plan = demo.plan_demo(2, tmp_path, qdevice=True)
    qnetd = demo.qnetd_plan(plan)
    text = demo.guide(plan, {"node1": 101, "node2": 102, "qnetd": 100}, qnetd=qnetd)
    assert f"  qnetd  127.0.0.10:5403  pid 100      {qnetd.dir}/  (log qnetd.log)" in text
    assert f"  node1  127.0.0.11       pid 101      {plan.nodes[0].mount}" in text
    assert "without node2, node1 stays quorate" in text
    assert "Ctrl-C stops every node and qnetd started here" in text
    assert "kill -9 102" in text
    assert "QdeviceCastVote" in text
    assert f"--run-dir {plan.nodes[0].run_dir} status" in text
    assert "expected 1" not in text  # a node left alone keeps quorum with the device
    assert "qnetd" not in demo.guide(plan, {"node1": 101, "node2": 102})


def test_qdevice_needs_two_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--nodes", "1", "--qdevice", "--dir", str(tmp_path / "d"))
    assert (code, out) == (2, [])
    assert err == ["pmxfs: --qdevice needs at least 2 nodes"]
    assert not (tmp_path / "d").exists()


def status(node: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pmxfs", "--run-dir", node["run_dir"],
                           "status", "--json"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def alone_and_quorate(node: dict[str, Any]) -> bool:
    st = status(node)
    members = [m["name"] for m in st["membership"]["members"]]
    return members == [node["name"]] and bool(st["quorum"]["quorate"])


@pytest.mark.fuse
@pytest.mark.root
def test_demo_with_a_qdevice(tmp_path: Path) -> None:
    """Two nodes and a qnetd on loopback: node1 sets the device up, both nodes cast its vote;
    node2 stops and node1 stays quorate and writable; Ctrl-C stops qnetd too. A second run
    starts qnetd again and sets nothing up."""
    port = random_port()
    with running_demo(tmp_path, 2, "--port", str(port), "--qdevice") as first:
        mounts = first.wait_up()
        record = load_record(first.root / "demo.json")
        assert record is not None
        qnetd = record["qnetd"]
        assert runs(qnetd["pid"], qnetd["argv"]), first.details()
        config = conf.parse(Path(first.nodes[0]["config"]).read_text())
        device = config.quorum.device
        assert device is not None
        assert device.net is not None
        assert f"{device.net.host}:{device.net.port}" == qnetd["address"]
        assert device.net.algorithm == "ffsplit"
        output = read(first.output) or ""
        assert f"pmxfs demo: qnetd listens on {qnetd['address']}" in output, output
        assert (f"pmxfs demo: node1 added qnetd as the cluster's QDevice with a token from "
                f"`pmxfs qnetd token` (pmxfs qdevice setup {qnetd['address']} --token "
                "TOKEN)") in output, output
        for node in first.nodes:
            st = status(node)
            assert st["qdevice"]["casting_vote"], st
            assert st["quorum"]["expected_votes"] == 3, st
        first.replicates(mounts)

        os.kill(first.nodes[1]["pid"], signal.SIGTERM)
        wait_until(lambda: alone_and_quorate(first.nodes[0]), first.timeout_s,
                   "node1 alone and quorate", first.details)
        (mounts[0] / "alone").write_text("node1 alone\n")
        first.interrupt()
        assert qnetd_running(first.root) == []
    with running_demo(tmp_path, 2, "--qdevice", output="again.out") as again:
        again.wait_up()
        output = read(again.output) or ""
        assert "added qnetd" not in output, output
        assert "qnetd listens on" in output, output
        for node in again.nodes:
            assert status(node)["qdevice"]["casting_vote"]
        again.interrupt()
        assert qnetd_running(again.root) == []
