"""`pmxfs demo`: a whole cluster of N daemons on this machine, to try pmxfs.

Node i (1..N) is `node<i>`, node id i, on 127.0.K.(10+i) with K = 0 and port 5405 by default;
transport udpu, cluster name "demo", token 1000 ms. Each node has `DIR/node<i>/` with
`corosync.conf`, `authkey`, `data/`, `run/`, the mount `mnt/` and the daemon's output `daemon.log`.

The cluster is built as an admin builds one (README, "Build a cluster"): every daemon starts
standalone, `pmxfs create` on node1 makes a cluster of one, and every other node joins it with
`pmxfs add` and a token from `pmxfs join-token` on node1. The daemons write every corosync.conf
and authkey; the demo writes them only into a DIR that already holds the cluster (below).

How it works:
1. Plan (`plan_demo`, no I/O): names, ids, addresses, port, paths and each daemon's argv; the
   cluster they form (`cluster_config`) must pass `conf.check`.
2. Network (`settle_network`): a DIR that already holds the demo's configs keeps their addresses
   and port (refused when they are in use, or when --port asks for another one). A new DIR gets
   the default addresses on the port asked for (5405 without --port) when every one of them can
   be bound -- UDP on the cluster's port and TCP on the join port 5406 -- else the first K in
   1..255 whose addresses can, else (without --port) the same search on other ports; the guide
   says why the addresses are not the defaults.
3. Prepare (`prepare`): DIR is locked against a second demo (`DIR/demo.lock`); a mount left dead
   by a crashed run is unmounted (one that still answers is refused: a daemon this demo did not
   start serves it). A DIR is made for one node count: it holds node1..nodeN, all made before
   any daemon starts, so a DIR holding a cluster of another size is refused. In a DIR that holds
   the cluster's corosync.conf (a later run), a node the newest one lists but whose file is
   missing gets it, and the cluster's authkey; a new DIR gets directories only.
4. Run: every daemon is started in its own session (a Ctrl-C reaches only the demo, which stops
   them in order) with its output appended to its log. A node with a corosync.conf is a member
   from its files; the others start standalone and `_build` makes them members once their
   control sockets answer, each step the `pmxfs` CLI run as a child process:
   - when no node has a config (a new DIR): `pmxfs create demo --link0 ADDR --nodeid 1 --port
     PORT` on node1, then the demo's token timers written into corosync.conf through node1's
     mount (config_version 2; create writes no timers, and corosync's defaults would make a
     killed node leave three times later: 3650 ms token for three nodes);
   - then, node by node, once node1's `.members` shows a quorate ring of all members so far:
     `pmxfs join-token` on node1 and `pmxfs add --token TOKEN --link0 ADDR --nodeid i` on the
     node, which returns once that node is quorate and synced.
   A build cut short (a failure, Ctrl-C) leaves a smaller cluster: the next run starts it from
   its files and adds the nodes it lacks. Once every mount answers and its `.members` shows all
   nodes online and quorate -- so the tree takes writes -- `DIR/demo.json` is written and a
   guide printed. A daemon that exits first, a step that fails or the deadline (START_TIMEOUT_S,
   plus STEP_TIMEOUT_S per create or add) stops everything, with the failed node, the reason and
   the tail of its log printed. A daemon that dies later is reported in one line; the demo keeps
   running.
   With --qdevice (demo_qnetd), a qnetd runs beside the daemons on 127.0.K.10 (DIR/qnetd/,
   made by `pmxfs qnetd init`; its TCP address counts in step 2's choice), and once the cluster
   is quorate node1 adds it as the cluster's QDevice: `pmxfs qnetd token`, then `pmxfs qdevice
   setup ADDR:PORT --token TOKEN` (skipped when corosync.conf names the device already); the
   demo is ready when every node casts the device's vote. demo.json gets a "qnetd" entry.
5. Stop, on SIGINT, SIGTERM or SIGHUP: SIGTERM to every daemon the demo started and to its
   qnetd (by PID; a node restarted by hand is not the demo's), a wait with a deadline (SIGKILL
   after it), then every dead mount is unmounted and demo.json, whose PIDs are now stale,
   removed. Exit 0 when everything stopped cleanly.

Signals, daemon exits and the steps' exits are waited for with `poll` on a signal wake-up pipe
and pidfds; the only periodic checks are whether the nodes are up or ready yet, until the start
deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pmxfs.commands import demo_qnetd, keygen
from pmxfs.commands.control import SOCKET_NAME
from pmxfs.commands.node_home import NodeHome
from pmxfs.core import conf
from pmxfs.core.errors import LocalError
from pmxfs.core.join_token import JOIN_PORT
from pmxfs.runtime.daemon import answers, mount_table, unmount

DEFAULT_NODES = 3
MAX_NODES = 16
DEFAULT_DIR = "./pmxfs-demo"
CLUSTER_NAME = "demo"
ADDRESS_BASE = 10  # node i listens on 127.0.K.(ADDRESS_BASE + i), K = 0 unless that is in use
SUBNETS = range(256)  # the values of K tried, in order
DEFAULT_PORT = conf.DEFAULT_PORT
OTHER_PORTS = tuple(range(DEFAULT_PORT + 10, DEFAULT_PORT + 110, 10))  # tried without --port
# token_coefficient 0 keeps the token at TOKEN_MS whatever the node count (corosync would add
# 650 ms per node beyond two). `totem_params` derives from it: token_retransmit 238 ms, hold
# 180 ms, consensus 1200 ms -- a killed node is missed after 1 s, the new ring forms about 1.2 s
# later.
TOKEN_MS = 1000
TOKEN_COEFFICIENT_MS = 0
JOIN_TOKEN_TTL = "2m"  # each token is used at once; one left by a failed add expires soon
START_TIMEOUT_S = 30.0  # starting the daemons and the final wait for a quorate cluster
STEP_TIMEOUT_S = 10.0  # added for each create or add (measured: well under a second each)
QDEVICE_STEPS = 2  # --qdevice: qnetd's token and setup, then the first vote
CONTROL_PROBE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 20.0
READY_POLL_S = 0.05
LOG_TAIL_LINES = 20
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NODE_HOME = re.compile(r"node([1-9][0-9]*)")


class DemoError(LocalError):
    """Why the demo cannot run: one line."""


@dataclass(frozen=True)
class DemoNode(NodeHome):
    """One node of the demo: identity and where everything of it lives (absolute paths)."""

    name: str
    nodeid: int
    addr: str
    home: Path

    def argv(self) -> list[str]:
        """The full command line of this node's daemon; it restarts the node on its own."""
        return [sys.executable, "-m", "pmxfs", "daemon", *self.daemon_options(self.name)]


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo will create and start, decided before anything is touched."""

    root: Path
    nodes: tuple[DemoNode, ...]
    port: int
    subnet: int  # K of the nodes' addresses 127.0.K.(10+i)
    qdevice: bool = False  # --qdevice: a qnetd on 127.0.K.10 too (demo_qnetd)

    @property
    def addresses(self) -> str:
        """The nodes' addresses and the port, for messages."""
        first, last = self.nodes[0].addr, self.nodes[-1].addr
        span = first if first == last else f"{first} to {last}"
        return f"{span}, port {self.port}"

    @property
    def demo_json(self) -> Path:
        return self.root / "demo.json"

    @property
    def lock(self) -> Path:
        return self.root / "demo.lock"


# ---------------------------------------------------------------------------- command line


DESCRIPTION = f"""\
Run a whole cluster on this machine to try pmxfs: N `pmxfs daemon` processes, node i on
127.0.0.(10+i) (udpu, port {DEFAULT_PORT}, token {TOKEN_MS} ms), each with its own FUSE mount
DIR/node<i>/mnt. In a new DIR the daemons start standalone and the cluster is built as on real
machines: `pmxfs create` on node1, then for each other node `pmxfs join-token` on node1 and
`pmxfs add` on that node. It waits until every mount shows all nodes online and quorate, then
prints a guide (the mounts, pids and commands to try) and keeps running; Ctrl-C (or SIGTERM)
stops every daemon it started and unmounts.

When the default addresses or port (or TCP port {JOIN_PORT} of the joins on them) are in use
(another demo, say), free loopback addresses 127.0.K.(10+i) -- and, without --port, another
port -- are picked, and the guide says so.
Each node keeps corosync.conf, authkey, data/, run/ (control socket), mnt/ and daemon.log in
DIR/node<i>/; DIR/demo.json lists each node's name, node id, pid, paths and the argv that
restarts it. A later run on the same DIR reuses its config, key, data and addresses. Needs root
and /dev/fuse.

--qdevice also runs a qnetd on 127.0.K.10, TCP port 5403 (`pmxfs qnetd init --dir DIR/qnetd`),
and once the cluster is quorate adds it with `pmxfs qnetd token` and `pmxfs qdevice setup` on
node1 (ffsplit for an even node count, lms with --force for an odd one), as the README's "Two
nodes and a QDevice" does on real machines; Ctrl-C stops qnetd too."""

EXAMPLES = """\
examples:
  pmxfs demo                                   # 3 nodes in ./pmxfs-demo
  pmxfs demo --nodes 5 --dir /tmp/demo5 --port 5500
  pmxfs demo --nodes 2 --qdevice --dir /tmp/demo-qdevice
  pmxfs --run-dir ./pmxfs-demo/node1/run status   # in another shell, while it runs"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs demo` (see `pmxfs.cli`)."""
    parser.description, parser.epilog = DESCRIPTION, EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--nodes", default=str(DEFAULT_NODES), metavar="N",
                        help=f"how many nodes, 1 to {MAX_NODES} (default: {DEFAULT_NODES})")
    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help=f"where configs, data and mounts live (default: {DEFAULT_DIR}); "
                             "a later run on the same DIR reuses them")
    parser.add_argument("--port", metavar="PORT",
                        help=f"the cluster's UDP port (default: {DEFAULT_PORT}, or a free one "
                             "when that is in use); a DIR made before keeps its port")
    parser.add_argument("--qdevice", action="store_true",
                        help="also run a qnetd on 127.0.K.10 (DIR/qnetd/) and add it as the "
                             "cluster's QDevice with `pmxfs qdevice setup` on node1 (ffsplit "
                             "for an even node count, lms for an odd one)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of `pmxfs demo`; returns the exit status (2: bad arguments, 1: cannot run)."""
    try:
        port = None if args.port is None else port_number(args.port)
        plan = plan_demo(node_count(args.nodes), args.dir, qdevice=args.qdevice)
        if args.qdevice and len(plan.nodes) < 2:
            raise DemoError("--qdevice needs at least 2 nodes")
    except DemoError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 2
    try:
        with _locked(plan):
            plan, note = settle_network(plan, port)
            prepare(plan)
            device = prepare_device(plan) if plan.qdevice else None
            return _run_cluster(plan, note, device)
    except (DemoError, demo_qnetd.QnetdError) as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1


def node_count(text: str) -> int:
    """The value of --nodes, checked."""
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= MAX_NODES:
        raise DemoError(f"--nodes must be a number from 1 to {MAX_NODES}, not {text!r}")
    return int(text)


def port_number(text: str) -> int:
    """The value of --port, checked."""
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise DemoError(f"--port must be a number from 1 to 65535, not {text!r}")
    return int(text)


# ---------------------------------------------------------------------------- the plan


def node_address(nodeid: int, subnet: int = 0) -> str:
    return f"127.0.{subnet}.{ADDRESS_BASE + nodeid}"


def cluster_config(count: int, port: int = DEFAULT_PORT, subnet: int = 0) -> conf.ClusterConfig:
    """The demo cluster's corosync.conf as a model."""
    nodes = tuple(conf.NodeEntry(name=f"node{i}", nodeid=i, ring0_addr=node_address(i, subnet))
                  for i in range(1, count + 1))
    totem = conf.TotemSection(cluster_name=CLUSTER_NAME, config_version=1, transport="udpu",
                              port=port, token=TOKEN_MS, token_coefficient=TOKEN_COEFFICIENT_MS)
    return conf.ClusterConfig(totem=totem, nodes=nodes,
                              quorum=conf.QuorumSection(provider=conf.QUORUM_PROVIDER))


def plan_demo(count: int, directory: str | os.PathLike[str], port: int = DEFAULT_PORT,
              subnet: int = 0, *, qdevice: bool = False) -> DemoPlan:
    """The demo of `count` nodes in `directory` on 127.0.`subnet`.x and `port` (with a qnetd
    when `qdevice`); touches nothing."""
    root = Path(directory).resolve()  # as /proc/self/mountinfo names the mounts
    result = conf.check(conf.render(cluster_config(count, port, subnet)), "demo corosync.conf")
    if result.config is None or result.warnings:
        problem = (result.errors or result.warnings)[0]
        raise DemoError(f"the demo's cluster config does not pass the check: {problem}")
    nodes = tuple(DemoNode(info.name, info.nodeid, info.addr, root / info.name)
                  for info in result.config.node_infos())
    return DemoPlan(root, nodes, port, subnet, qdevice)


def with_demo_timers(text: str) -> str:
    """`text`, the corosync.conf `pmxfs create` wrote (no timers: corosync's defaults), with
    the demo's token timers and config_version + 1, as the tree takes an update."""
    current = conf.check(text).config
    if current is None:
        raise DemoError("the cluster's corosync.conf is not valid")
    totem = dataclasses.replace(current.totem, token=TOKEN_MS,
                                token_coefficient=TOKEN_COEFFICIENT_MS,
                                config_version=current.config_version + 1)
    new = conf.render(dataclasses.replace(current, totem=totem))
    result = conf.check(new, current=current)
    if not result.ok:
        raise DemoError(f"the cluster's corosync.conf with the demo's timers would be refused: "
                        f"{result.errors[0]}")
    return new


@dataclass(frozen=True)
class _Device:
    """--qdevice: the demo's qnetd, and whether node1 still has to set the device up."""

    qnetd: demo_qnetd.QnetdPlan
    set_up: bool


def prepare_device(plan: DemoPlan) -> _Device:
    """The demo's qnetd (demo_qnetd), its directory made by `pmxfs qnetd init`; refused when the
    cluster in DIR has a device elsewhere. `settle_network` checked that its address is free."""
    existing = existing_cluster(plan)
    text = None if existing is None else existing.config_text
    qnetd = demo_qnetd.plan_qnetd(plan.root, node_address(0, plan.subnet), text)
    demo_qnetd.init(qnetd)
    return _Device(qnetd, text is None or demo_qnetd.configured_device(text) is None)


def qnetd_plan(plan: DemoPlan) -> demo_qnetd.QnetdPlan:
    """The demo's qnetd in a new DIR: 127.0.K.10, "node 0" of the nodes' addresses."""
    return demo_qnetd.QnetdPlan(plan.root, node_address(0, plan.subnet))


def start_timeout(steps: int) -> float:
    """The start deadline (s) of a demo that runs `steps` creates and adds."""
    return START_TIMEOUT_S + STEP_TIMEOUT_S * steps


def demo_record(plan: DemoPlan, pids: Mapping[str, int],
                qnetd: demo_qnetd.QnetdPlan | None = None) -> dict[str, Any]:
    """The content of demo.json for daemons running with `pids` (by node name, and "qnetd"
    for `qnetd`, which adds the key "qnetd")."""
    record: dict[str, Any] = {
        "nodes": [{"name": n.name, "nodeid": n.nodeid, "pid": pids[n.name], "argv": n.argv(),
                   "config": str(n.config), "authkey": str(n.authkey),
                   "data_dir": str(n.data_dir), "run_dir": str(n.run_dir),
                   "mount": str(n.mount)}
                  for n in plan.nodes]}
    if qnetd is not None:
        record["qnetd"] = demo_qnetd.record(qnetd, pids[qnetd.name])
    return record


# ---------------------------------------------------------------------------- the network


def settle_network(plan: DemoPlan, port: int | None) -> tuple[DemoPlan, str]:
    """`plan` on the addresses and port it will use, and a note for the guide when they are not
    the defaults because those are in use (else ""). `port` is what --port asked for."""
    count = len(plan.nodes)
    reused = existing_network(plan.root)
    if reused is not None:
        if port is not None and port != reused[0]:
            raise DemoError(f"the demo in {plan.root} uses port {reused[0]}; run it without "
                            f"--port (or with --port {reused[0]}), or use another --dir")
        settled = plan_demo(count, plan.root, *reused, qdevice=plan.qdevice)
        existing_cluster(settled)  # its refusals before any address is tried
        if not bindable(settled):
            raise DemoError(f"the demo in {plan.root} uses {settled.addresses}, which are in "
                            "use (is it still running?); stop what uses them or use another --dir")
        return settled, ""
    existing_cluster(plan)  # a DIR of another size is refused before any address is tried
    wanted = plan_demo(count, plan.root, DEFAULT_PORT if port is None else port,
                       qdevice=plan.qdevice)
    ports = [wanted.port] if port is not None else [DEFAULT_PORT, *OTHER_PORTS]
    settled = free_network(count, plan.root, ports, qdevice=plan.qdevice)
    if settled.addresses == wanted.addresses:
        return settled, ""
    return settled, (f"{wanted.addresses} are in use (another demo?), so this demo uses "
                     f"{settled.addresses}.")


def existing_network(root: Path) -> tuple[int, int] | None:
    """(port, subnet) of the demo whose configs are in `root`, if the first one is a valid
    demo config (`prepare` checks all of them)."""
    paths = sorted(root.glob("node*/corosync.conf"))
    if not paths:
        return None
    try:
        config = conf.check(paths[0].read_text(), str(paths[0])).config
    except (OSError, UnicodeDecodeError):
        return None
    if config is None:
        return None
    infos = config.node_infos()
    subnet = next((k for k in SUBNETS
                   if all((i.name, i.addr) == (f"node{i.nodeid}", node_address(i.nodeid, k))
                          for i in infos)), None)
    return None if subnet is None else (config.port, subnet)


def free_network(count: int, root: Path, ports: Sequence[int],
                 subnets: Sequence[int] = SUBNETS, *, qdevice: bool = False) -> DemoPlan:
    """The plan on the first of `ports`, then the first of `subnets`, where every node's address
    and port (and qnetd's, with `qdevice`) can be bound now."""
    for port in ports:
        for subnet in subnets:
            plan = plan_demo(count, root, port, subnet, qdevice=qdevice)
            if bindable(plan):
                return plan
    raise DemoError(f"no free loopback addresses for {count} nodes on port "
                    f"{', '.join(map(str, ports))}; use another --port")


def bindable(plan: DemoPlan) -> bool:
    """Whether every node's address can be bound right now as its daemon will bind it: UDP on
    the cluster's port, and TCP on the join port (with SO_REUSEADDR, as the join service
    listens: a connection of an earlier join waiting out TIME_WAIT does not count); with
    --qdevice, qnetd's TCP address too."""
    if plan.qdevice and not demo_qnetd.bindable(qnetd_plan(plan)):
        return False
    with contextlib.ExitStack() as stack:
        for node in plan.nodes:
            udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((node.addr, plan.port))
                tcp.bind((node.addr, JOIN_PORT))
            except OSError:
                return False
    return True


# ---------------------------------------------------------------------------- preparing DIR


@contextlib.contextmanager
def _locked(plan: DemoPlan) -> Iterator[None]:
    """Hold DIR/demo.lock, so two demos never share (and unmount) each other's nodes."""
    if plan.root.exists() and not plan.root.is_dir():
        raise DemoError(f"{plan.root} is not a directory")
    try:
        plan.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(plan.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DemoError(f"cannot use {exc.filename or plan.root}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another pmxfs demo is running in {plan.root}") from None
        yield
    finally:
        os.close(fd)


def prepare(plan: DemoPlan) -> None:
    """Make DIR ready to start the daemons: stale mounts gone, every node's directories there,
    and, in a DIR that holds the cluster already, the config and authkey of every node its newest
    config lists. What a previous run left is reused, never overwritten. A new DIR gets no config
    and no key: its daemons start standalone and `_build` makes the cluster."""
    plan.demo_json.unlink(missing_ok=True)  # present again only once this run's nodes answer
    for node in plan.nodes:
        _clear_stale_mount(node)
    existing = existing_cluster(plan)
    try:
        for node in plan.nodes:
            node.home.mkdir(parents=True, exist_ok=True, mode=0o755)
            node.data_dir.mkdir(exist_ok=True, mode=0o700)
            node.run_dir.mkdir(exist_ok=True, mode=0o755)
            node.mount.mkdir(exist_ok=True, mode=0o755)
        if existing is None:
            return
        listed = [n for n in plan.nodes if n.name in existing.members]
        key = _shared_authkey(listed)
        for node in listed:
            if not node.config.exists():
                _create(node.config, existing.config_text.encode(), 0o644)
            if not node.authkey.exists():
                _create(node.authkey, key, 0o400)
    except OSError as exc:
        raise DemoError(f"cannot prepare {exc.filename or plan.root}: "
                        f"{exc.strerror or exc}") from None


@dataclass(frozen=True)
class ExistingCluster:
    """The cluster a DIR holds from an earlier run: its newest corosync.conf (the cluster may
    have changed it through the tree) and the names of the nodes that lists."""

    config_text: str
    members: frozenset[str]


def existing_cluster(plan: DemoPlan) -> ExistingCluster | None:
    """The cluster in DIR, None for a new DIR; refused (DemoError) when DIR does not fit `plan`.
    Every config in DIR must be valid, on the plan's port, and list only planned nodes -- fewer
    only while a build is unfinished, when DIR holds the homes of all planned nodes (`prepare`
    makes them all before the first daemon starts). A DIR is for one node count: homes beyond
    the plan are refused too."""
    newest: tuple[int, str, conf.ClusterConfig] | None = None
    want = {(n.name, n.nodeid, n.addr) for n in plan.nodes}
    for path in sorted(plan.root.glob("node*/corosync.conf")):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DemoError(f"cannot read {path}: {exc}") from None
        result = conf.check(text, str(path))
        if result.config is None:
            raise DemoError(f"{result.errors[0]} (fix it or use another --dir)")
        infos = result.config.node_infos()
        if len(infos) > len(plan.nodes):
            raise _size_error(plan, len(infos), path)
        if not {(i.name, i.nodeid, i.addr) for i in infos} <= want:
            raise DemoError(f"{path} does not describe the demo's nodes; use another --dir")
        if result.config.port != plan.port:
            raise DemoError(f"{path} uses port {result.config.port}, not {plan.port}; "
                            "use another --dir")
        if newest is None or result.config.config_version > newest[0]:
            newest = (result.config.config_version, text, result.config)
    homes = _homes(plan.root)
    if homes and max(homes) != len(plan.nodes):
        raise _size_error(plan, max(homes), plan.root / f"node{max(homes)}")
    if newest is None:
        return None
    return ExistingCluster(newest[1], frozenset(i.name for i in newest[2].node_infos()))


def _homes(root: Path) -> list[int]:
    """The i of every node<i> directory in `root`."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DemoError(f"cannot read {root}: {exc.strerror or exc}") from None
    return [int(m[1]) for p in entries if (m := NODE_HOME.fullmatch(p.name)) and p.is_dir()]


def _size_error(plan: DemoPlan, count: int, where: Path) -> DemoError:
    return DemoError(f"{plan.root} holds a demo of {count} nodes ({where}); run with --nodes "
                     f"{count} or use another --dir")


def _shared_authkey(nodes: Sequence[DemoNode]) -> bytes:
    """The one authkey of the cluster's nodes: the one they have, else a new one for the
    first."""
    keys: dict[bytes, Path] = {}
    for node in nodes:
        try:
            keys.setdefault(node.authkey.read_bytes(), node.authkey)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DemoError(f"cannot read {node.authkey}: {exc.strerror or exc}") from None
    if len(keys) > 1:
        first, second = list(keys.values())[:2]
        raise DemoError(f"{first} and {second} differ; every node needs the same authkey")
    if keys:
        return next(iter(keys))
    first_key = nodes[0].authkey
    try:
        keygen.write_authkey(first_key)
        return first_key.read_bytes()
    except (keygen.KeygenError, OSError) as exc:
        raise DemoError(str(exc)) from None


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with `mode`, never replacing one and never leaving a partial one: the
    bytes go to a fsynced temporary file that is then hard-linked into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:  # each write makes progress or raises
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- mounts


def mount_points() -> set[str]:
    """Every mount point of this mount namespace (see `pmxfs.runtime.daemon.mount_table`)."""
    return set(mount_table())


def _clear_stale_mount(node: DemoNode) -> None:
    if str(node.mount) not in mount_points():
        return
    if answers(node.mount):
        raise DemoError(f"{node.mount} is mounted and answers: a {node.name} daemon not started "
                        "by this demo is running; stop it first")
    print(f"pmxfs demo: unmounting {node.mount}, left by a crashed run", flush=True)
    if not unmount(node.mount):
        raise DemoError(f"cannot unmount {node.mount}")


# ---------------------------------------------------------------------------- processes


class _Signals:
    """SIGINT, SIGTERM and SIGHUP while the demo runs: each is written to a pipe (Python's
    signal wake-up fd) that the main loop polls together with the daemons' pidfds."""

    def __enter__(self) -> _Signals:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = {s: signal.signal(s, self._ignore) for s in STOP_SIGNALS}
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        os.close(self.fd)
        os.close(self._write_fd)

    @staticmethod
    def _ignore(_signum: int, _frame: FrameType | None) -> None:
        """The pipe carries the signal; the Python-level handler has nothing left to do."""

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived since the last call (drains the pipe)."""
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 64):
                got += chunk
        return any(signum in got for signum in STOP_SIGNALS)


class _Process(Protocol):
    """What the demo starts and stops: a node's daemon (DemoNode) or qnetd (QnetdPlan)."""

    @property
    def name(self) -> str: ...

    @property
    def log(self) -> Path: ...

    def argv(self) -> list[str]: ...


@dataclass
class _Daemon:
    node: _Process
    proc: subprocess.Popen[bytes]
    pidfd: int

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            return f"was killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"


class _StartFailed(LocalError):
    """Nodes that did not come up; the message is the first line of the report."""

    def __init__(self, message: str, nodes: Sequence[_Process]) -> None:
        super().__init__(message)
        self.nodes = nodes


def _poll(fds: Sequence[int], timeout_s: float | None) -> set[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(None if timeout_s is None else int(timeout_s * 1000))}


def _start(node: _Process) -> _Daemon:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # READY=1 is not ours
    try:
        with open(node.log, "ab") as log:
            log.write(f"--- pmxfs demo: starting {node.name} at {time.strftime('%F %T')}\n"
                      .encode())
            log.flush()
            proc = subprocess.Popen(node.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, env=env, start_new_session=True)
    except OSError as exc:
        raise DemoError(f"cannot start {node.name}: {exc.strerror or exc}") from None
    return _Daemon(node, proc, os.pidfd_open(proc.pid))


def _run_cluster(plan: DemoPlan, note: str, device: _Device | None) -> int:
    daemons: list[_Daemon] = []
    joining = [n for n in plan.nodes if not n.config.exists()]  # before a daemon may write one
    everyone = frozenset(n.name for n in plan.nodes)
    steps = len(joining) + (QDEVICE_STEPS if device is not None else 0)
    with _Signals() as signals:
        try:
            for node in plan.nodes:
                daemons.append(_start(node))
            if device is not None:
                daemons.append(_start(device.qnetd))
            startup = _Startup(daemons, signals, start_timeout(steps))
            if _build(plan, joining, startup) and startup.wait(
                    functools.partial(_without_ring, plan.nodes, everyone),
                    f"no quorate cluster of all {len(everyone)} nodes at the mount") and (
                    device is None or _add_qdevice(plan, device, daemons[-1], startup)):
                qnetd = None if device is None else device.qnetd
                _write_json(plan, {d.node.name: d.proc.pid for d in daemons}, qnetd)
                _print_guide(plan, daemons, note, qnetd)
                _watch(daemons, signals)
            print("pmxfs demo: stopping", flush=True)
            ok = True
        except _StartFailed as exc:
            _report_start_failure(exc)
            ok = False
        finally:
            problems = _stop(plan, daemons)
            for problem in problems:
                print(f"pmxfs: {problem}", file=sys.stderr)
    return 0 if ok and not problems else 1


class _Startup:
    """The start of the demo's daemons until its deadline: each wait ends when what it waits for
    is there, or on a stop signal (the call says so); a daemon that exits meanwhile, or the
    deadline, raises _StartFailed."""

    def __init__(self, daemons: Sequence[_Daemon], signals: _Signals, timeout_s: float) -> None:
        self.daemons = daemons
        self.signals = signals
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def wait(self, waiting: Callable[[], Sequence[_Process]], what: str) -> bool:
        """Until `waiting()`, the nodes not there yet, is empty (True) or a stop signal came
        (False); at the deadline the report names those nodes and `what` they lack."""
        while True:
            self._check_daemons()
            pending = waiting()
            if not pending:
                return True
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _StartFailed(f"{', '.join(n.name for n in pending)}: {what} within "
                                   f"{self.timeout_s:.0f} s", pending)
            if self._stop_requested([], min(READY_POLL_S, left)):
                return False

    def command(self, node: DemoNode, *args: str) -> str | None:
        """Run `pmxfs --run-dir RUN ARGS` for `node` (a child process in its own session, so a
        Ctrl-C reaches only the demo) and return what it printed, or None when a stop signal
        came first (the command is killed). A failure raises _StartFailed with its reason."""
        what = f"`pmxfs {args[0]}`"
        argv = [sys.executable, "-m", "pmxfs", "--run-dir", str(node.run_dir), *args]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise _StartFailed(f"{node.name}: cannot run {what}: {exc.strerror or exc}",
                               [node]) from None
        pidfd = os.pidfd_open(proc.pid)
        try:
            stopped = False
            while not stopped and proc.poll() is None:
                self._check_daemons()
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise _StartFailed(f"{node.name}: {what} did not finish within "
                                       f"{self.timeout_s:.0f} s of the start", [node])
                stopped = self._stop_requested([pidfd], left)
        finally:
            if proc.poll() is None:
                proc.kill()  # by its Popen: never a PID it has already reaped
            out, err = proc.communicate()  # reaps it and closes its pipes
            os.close(pidfd)
        if stopped:
            return None
        if proc.returncode != 0:
            lines = err.decode(errors="replace").split("\n")
            reason = next((line.strip() for line in reversed(lines) if line.strip()),
                          f"exit status {proc.returncode}")
            raise _StartFailed(f"{node.name}: {what} failed: {reason.removeprefix('pmxfs: ')}",
                               [node])
        return out.decode(errors="replace")

    def _check_daemons(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is not None:
                raise _StartFailed(f"{d.node.name} (pid {d.proc.pid}) {d.describe_exit()} while "
                                   "starting", [d.node])

    def _stop_requested(self, fds: Sequence[int], timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a signal, a daemon's exit or one of `fds`; whether it was
        a stop signal."""
        ready = _poll([self.signals.fd, *fds, *(d.pidfd for d in self.daemons)], timeout_s)
        return self.signals.fd in ready and self.signals.stop_requested()


def _build(plan: DemoPlan, joining: Sequence[DemoNode], startup: _Startup) -> bool:
    """Make the `joining` nodes (started standalone) members of the cluster, as the module
    header says; False when a stop signal came first."""
    if not joining:
        return True
    members = [n for n in plan.nodes if n not in joining]
    sponsor = members[0] if members else joining[0]  # it makes the tokens
    asked = list(dict.fromkeys([sponsor, *joining]))
    if not startup.wait(functools.partial(_without_control, asked),
                        "the control socket does not answer"):
        return False
    if not members:
        if not _create_cluster(plan, sponsor, startup):
            return False
        members.append(sponsor)
    for node in (n for n in joining if n is not sponsor):
        names = frozenset(m.name for m in members)
        if not startup.wait(functools.partial(_without_ring, [sponsor], names),
                            f"no quorate cluster of {', '.join(m.name for m in members)}"):
            return False
        token = startup.command(sponsor, "join-token", "--ttl", JOIN_TOKEN_TTL)
        if token is None:
            return False
        add = ["add", "--token", token.strip(), "--link0", node.addr,
               "--nodeid", str(node.nodeid)]
        if startup.command(node, *add) is None:
            return False
        print(f"pmxfs demo: {node.name} joined with a token from {sponsor.name} "
              f"(pmxfs add --token TOKEN --link0 {node.addr} --nodeid {node.nodeid})", flush=True)
        members.append(node)
    return True


def _create_cluster(plan: DemoPlan, node: DemoNode, startup: _Startup) -> bool:
    """`pmxfs create` on `node`, then the demo's timers; False when a stop signal came first."""
    create = ["create", CLUSTER_NAME, "--link0", node.addr, "--nodeid", str(node.nodeid),
              "--port", str(plan.port)]
    if startup.command(node, *create) is None:
        return False
    print(f"pmxfs demo: {node.name} created cluster {CLUSTER_NAME} (pmxfs {shlex.join(create)})",
          flush=True)
    _set_timers(node)
    print(f"pmxfs demo: {node.name} set token {TOKEN_MS} ms in corosync.conf (written through "
          "its mount)", flush=True)
    return True


def _set_timers(node: DemoNode) -> None:
    """Write the demo's timers into the cluster's corosync.conf through `node`'s mount, as
    Proxmox's tools write it: a new file renamed over the old one."""
    path, new = node.mount / "corosync.conf", node.mount / "corosync.conf.new"
    try:
        new.write_text(with_demo_timers(path.read_text()))
        os.rename(new, path)
    except (OSError, UnicodeDecodeError, DemoError) as exc:
        with contextlib.suppress(OSError):
            new.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _StartFailed(f"{node.name}: cannot set the demo's timers in {path}: {reason}",
                           [node]) from None


def _add_qdevice(plan: DemoPlan, device: _Device, qnetd: _Daemon, startup: _Startup) -> bool:
    """Once qnetd listens: its token and `pmxfs qdevice setup` on node1 (unless the cluster has
    the device already), then until every node casts the device's vote; False when a stop
    signal came first."""
    q, first = device.qnetd, plan.nodes[0]
    if not startup.wait(lambda: [] if demo_qnetd.listening(qnetd.proc.pid, q.port) else [q],
                        f"qnetd does not listen on {q.address}"):
        return False
    print(f"pmxfs demo: qnetd listens on {q.address} (pmxfs qnetd --listen {q.address} --dir "
          f"{q.dir})", flush=True)
    if device.set_up:
        token = startup.command(first, *q.token_args())
        if token is None:
            return False
        setup = demo_qnetd.setup_args(q, token.strip(), len(plan.nodes))
        if startup.command(first, *setup) is None:
            return False
        shown = shlex.join(setup).replace(shlex.quote(token.strip()), "TOKEN")
        print(f"pmxfs demo: {first.name} added qnetd as the cluster's QDevice with a token from "
              f"`pmxfs qnetd token` (pmxfs {shown})", flush=True)
    return startup.wait(functools.partial(_not_casting, plan.nodes),
                        "the QDevice's vote is not cast")


def _not_casting(nodes: Sequence[DemoNode]) -> list[DemoNode]:
    """The nodes that do not count the QDevice's vote yet."""
    return [n for n in nodes if not demo_qnetd.casting_vote(n.run_dir)]


def _without_control(nodes: Sequence[DemoNode]) -> list[DemoNode]:
    """The nodes whose control socket does not accept a connection yet."""
    return [n for n in nodes if not _control_answers(n)]


def _control_answers(node: DemoNode) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONTROL_PROBE_TIMEOUT_S)
        try:
            sock.connect(str(node.run_dir / SOCKET_NAME))
        except OSError:
            return False
    return True


def _without_ring(nodes: Sequence[DemoNode], names: Set[str]) -> list[DemoNode]:
    """The nodes whose mount does not show a quorate cluster of exactly `names` online yet."""
    mounted = mount_points()
    return [n for n in nodes if not _ready(n, mounted, names)]


def members_ready(members: bytes, names: Set[str]) -> bool:
    """Whether a node's `.members` (pmxcfs's JSON) shows a quorate cluster with exactly the nodes
    `names` online: the ring has formed and the tree takes writes."""
    try:
        doc = json.loads(members)
        online = {name for name, info in doc["nodelist"].items() if info["online"] == 1}
        return doc["cluster"]["quorate"] == 1 and online == names
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _ready(node: DemoNode, mounted: Set[str], names: Set[str]) -> bool:
    if str(node.mount) not in mounted:
        return False
    try:
        return members_ready((node.mount / ".members").read_bytes(), names)
    except OSError:
        return False


def _report_start_failure(exc: _StartFailed) -> None:
    lines = [f"pmxfs: {exc}"]
    for node in exc.nodes:
        try:
            tail = node.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError as err:
            tail = [f"(cannot read it: {err.strerror})"]
        lines += [f"--- last lines of {node.log}:", *(f"  {line}" for line in tail)]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _watch(daemons: Sequence[_Daemon], signals: _Signals) -> None:
    """Until a stop signal; a daemon that dies meanwhile is reported, the rest keep running."""
    alive = {d.pidfd: d for d in daemons}
    while True:
        ready = _poll([signals.fd, *alive], None)
        for fd in sorted(ready & alive.keys()):
            d = alive.pop(fd)
            d.proc.wait()
            print(f"pmxfs demo: {d.node.name} (pid {d.proc.pid}) {d.describe_exit()}; its argv "
                  "in demo.json restarts it", flush=True)
        if signals.fd in ready and signals.stop_requested():
            return


def _stop(plan: DemoPlan, daemons: Sequence[_Daemon]) -> list[str]:
    """Stop every daemon the demo started and unmount what they left; the problems found."""
    problems: list[str] = []
    stopping = [d for d in daemons if d.proc.poll() is None]
    for d in stopping:
        d.proc.send_signal(signal.SIGTERM)  # Popen never signals a PID it has already reaped
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for d in stopping:
        try:
            rc = d.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.proc.kill()
            problems.append(f"{d.node.name} (pid {d.proc.pid}) did not stop within "
                            f"{STOP_TIMEOUT_S:.0f} s of SIGTERM; killed it")
            try:
                d.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{d.node.name} (pid {d.proc.pid}) survives SIGKILL")
            continue
        if rc not in (0, -signal.SIGTERM):  # killed by it: the daemon was still starting
            problems.append(f"{d.node.name} (pid {d.proc.pid}) {d.describe_exit()} on SIGTERM; "
                            f"see {d.node.log}")
    for d in daemons:
        os.close(d.pidfd)
    mounted = mount_points()
    for node in plan.nodes:
        if str(node.mount) not in mounted:
            continue
        if answers(node.mount):
            print(f"pmxfs demo: {node.mount} stays mounted: a {node.name} daemon this demo did "
                  "not start serves it", flush=True)
        elif not unmount(node.mount):
            problems.append(f"cannot unmount {node.mount}")
    plan.demo_json.unlink(missing_ok=True)
    return problems


# ---------------------------------------------------------------------------- output


def _write_json(plan: DemoPlan, pids: Mapping[str, int],
                qnetd: demo_qnetd.QnetdPlan | None) -> None:
    tmp = plan.demo_json.with_name(f".demo.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(demo_record(plan, pids, qnetd), indent=2) + "\n")
    os.replace(tmp, plan.demo_json)


def _pmxfs_command() -> str:
    """How to call the `pmxfs` command installed next to this Python."""
    script = Path(sys.executable).parent / "pmxfs"
    if os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m pmxfs"


def guide(plan: DemoPlan, pids: Mapping[str, int], note: str = "",
          qnetd: demo_qnetd.QnetdPlan | None = None) -> str:
    """What the demo prints once every node answers; `note` says why the addresses are not the
    defaults; with `qnetd` (its pid in `pids` as "qnetd"), what to try with the QDevice."""
    nodes = plan.nodes
    first, other, victim = nodes[0], nodes[min(1, len(nodes) - 1)], nodes[-1]
    cli = _pmxfs_command()
    q = shlex.quote
    places = [(n.name, n.addr, str(n.mount)) for n in nodes]
    if qnetd is not None:
        places.append((qnetd.name, qnetd.address, f"{qnetd.dir}/  (log {qnetd.log.name})"))
    width = max(len(name) for name, _, _ in places)
    addr_width = max(len(addr) for _, addr, _ in places)
    rows = [f"  {name:<{width}}  {addr:<{addr_width}}  pid {pids[name]:<7}  {where}"
            for name, addr, where in places]
    members = q(str(first.mount / ".members"))
    run_dir = q(str(first.run_dir))
    if qnetd is None:
        while_away = []
        quorum = [
            "  # quorum and membership (as pvecm status); a node left alone writes again after",
            "  # `expected 1`",
            f"  {cli} --run-dir {run_dir} status",
            f"  {cli} --run-dir {run_dir} expected 1",
        ]
    else:
        while_away, quorum = demo_qnetd.guide_tries(cli, run_dir, victim.name, first.name), []
    return "\n".join([
        f"pmxfs demo: {len(nodes)} nodes of cluster {CLUSTER_NAME!r} are up (udpu, port "
        f"{plan.port}, token {TOKEN_MS} ms)",
        *([note] if note else []),
        "",
        *rows,
        "",
        f"Config, authkey, data and daemon.log of each node are in {plan.root}/node<i>/;",
        f"{plan.demo_json} lists each node's pid and the argv that restarts it.",
        "",
        "Try, in another shell:",
        f"  # write on {first.name}, read on {other.name}",
        f"  echo hi > {q(str(first.mount / 'hello'))}",
        f"  cat {q(str(other.mount / 'hello'))}",
        f"  # who is in the ring; crash {victim.name} and watch it leave, then bring it back",
        f"  cat {members}",
        f"  kill -9 {pids[victim.name]}",
        f"  cat {members}",
        *while_away,
        f"  ls {q(str(victim.mount))}   # dead until it is back: Transport endpoint is not "
        "connected",
        f"  {shlex.join(victim.argv())} 2>>{q(str(victim.log))} &",
        *quorum,
        "",
        f"Ctrl-C stops every node{' and qnetd' if qnetd else ''} started here and unmounts; a "
        "later run on this --dir reuses its data.",
    ])


def _print_guide(plan: DemoPlan, daemons: Sequence[_Daemon], note: str,
                 qnetd: demo_qnetd.QnetdPlan | None) -> None:
    print(guide(plan, {d.node.name: d.proc.pid for d in daemons}, note, qnetd), flush=True)
