"""`pmxfs qdevice setup` / `remove` end to end in one process: two nodes on the memory
transport, each with its device client, a real qnetd (runtime/qnetd_server.py) on 127.0.0.1,
and the commands through the control socket (runtime/ipc.py) as the CLI sends them. Setup
enrolls, stores priv/qdevice/ and writes quorum.device; both nodes connect and the device's
vote counts, without a restart; a split keeps exactly the tie-breaker's side quorate; remove
undoes it all."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from test_metrics import parse as parse_exposition
from test_metrics import value as metric_value

from pmxfs.core import conf
from pmxfs.core.conf.edit import new_cluster, with_node
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.core.qnetd_token import encode_token
from pmxfs.runtime import qnetd_pki
from pmxfs.runtime.cluster_tree import ClusterTree
from pmxfs.runtime.database import Database
from pmxfs.runtime.ipc import serve_control
from pmxfs.runtime.ipc_client import ControlError, request
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.node_metrics import render_node
from pmxfs.runtime.qdevice_client import TREE_FILES, TREE_QDEVICE_DIR, QdeviceClient
from pmxfs.runtime.qdevice_setup import QdeviceSetup
from pmxfs.runtime.qnetd_server import QnetdServer
from pmxfs.runtime.replica_node import ReplicaNode
from pmxfs.runtime.ring_seq import RingSeqStore

HOST = "127.0.0.1"
WAIT_S = 60.0


def two_nodes() -> str:
    text = new_cluster("lab", "node1", 1, 1, "127.0.0.1")
    text = text.replace("transport: udpu\n", "transport: udpu\n  token: 1000\n", 1)
    return with_node(text, "node2", "127.0.0.2")[0]


async def eventually(condition: Callable[[], object], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not condition():  # noqa: ASYNC110 polls state that has no event; bounded
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {WAIT_S:g} s waiting for {what}")


@dataclass
class Lab:
    tmp_path: Path
    hub: MemoryHub
    nodes: list[ReplicaNode]
    sockets: list[Path]
    qnetd_dir: Path
    port: int

    def token(self) -> str:
        return encode_token(qnetd_pki.issue_token(self.qnetd_dir, HOST, self.port, 3600,
                                                  time.time()))

    def tokens_left(self) -> int:
        return len(list((self.qnetd_dir / "tokens").glob("*.json")))

    async def ask(self, index: int, cmd: str, **args: Any) -> Any:
        return await trio.to_thread.run_sync(
            functools.partial(request, self.sockets[index], cmd, **args))

    def status(self, index: int) -> dict[str, Any]:
        return self.nodes[index].status()


def _node(tmp_path: Path, hub: MemoryHub, name: str, node_id: int, text: str) -> ReplicaNode:
    home = tmp_path / name
    (home / "data").mkdir(parents=True)
    (home / "run").mkdir()
    (home / "corosync.conf").write_text(text)
    config = conf.parse(text)
    return ReplicaNode(
        node_id=node_id, config=config, config_path=home / "corosync.conf",
        params=conf.totem_params(config), transport=hub.transport(node_id),
        database=Database.open(home / "data"),
        ring_seq_store=RingSeqStore(home / "data", node_id), incarnation=node_id,
        data_dir=home / "data")


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    hub = MemoryHub()
    text = two_nodes()
    nodes = [_node(tmp_path, hub, f"node{i}", i, text) for i in (1, 2)]
    qnetd_dir = tmp_path / "qnetd"
    qnetd_pki.init(qnetd_dir)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(
                QnetdServer(qnetd_pki.load(qnetd_dir)).serve, HOST, 0))
            sockets = []
            for node in nodes:
                nursery.start_soon(node.run)
                nursery.start_soon(QdeviceClient(node, backoff_first_s=0.2,
                                                 backoff_max_s=1.0).run)
                sock = tmp_path / node.node_name / "run" / "pmxfs.sock"
                setup = QdeviceSetup(node, ClusterTree(node), trio.Lock())
                await nursery.start(functools.partial(serve_control, sock, node,
                                                      www_data_gid=None, qdevice=setup))
                sockets.append(sock)
            yield Lab(tmp_path, hub, nodes, sockets, qnetd_dir, port)
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.database.close()


def writable(node: ReplicaNode) -> bool:
    return (node.quorate() and node.replica.synced()
            and node.memdb.lookup(COROSYNC_CONF) is not None)


def casting(status: dict[str, Any]) -> bool:
    return bool(status.get("qdevice", {}).get("casting_vote"))


async def test_setup_split_and_remove(lab: Lab) -> None:
    await eventually(lambda: all(writable(n) and len(n.replica.members) == 2 for n in lab.nodes),
                     "a quorate two-node ring with corosync.conf in the tree")
    before = lab.nodes[0].config.config_version

    answer = await lab.ask(0, "qdevice-setup", address=f"{HOST}:{lab.port}", token=lab.token(),
                           algorithm=None, tie_breaker="lowest", force=False)
    assert answer["host"] == f"{HOST}:{lab.port}"
    assert (answer["algorithm"], answer["tie_breaker"], answer["votes"]) == (
        "ffsplit", "lowest", 1)
    assert answer["config_version"] == before + 1
    assert lab.tokens_left() == 0  # spent
    for path in TREE_FILES:
        assert lab.nodes[1].tree_file(path)

    await eventually(lambda: all(casting(lab.status(i)) for i in (0, 1)),
                     "both nodes counting the device's vote")
    for i in (0, 1):
        status = lab.status(i)
        assert status["qdevice"] == {"host": f"{HOST}:{lab.port}", "algorithm": "ffsplit",
                                     "connected": True, "casting_vote": True}
        quorum = status["quorum"]
        assert (quorum["expected_votes"], quorum["total_votes"], quorum["quorum"]) == (3, 3, 2)
        assert quorum["flags"][-3:] == ["Qdevice", "QdeviceAlive", "QdeviceCastVote"]
        metrics = parse_exposition(render_node(lab.nodes[i]))
        device = {"host": f"{HOST}:{lab.port}", "algorithm": "ffsplit"}
        assert metric_value(metrics, "pmxfs_qdevice_connected", **device) == 1
        assert metric_value(metrics, "pmxfs_qdevice_casting_vote", **device) == 1

    # a second setup is refused before the token is spent
    token = lab.token()
    with pytest.raises(ControlError, match="already configured"):
        await lab.ask(1, "qdevice-setup", address=HOST, token=token, algorithm=None,
                      tie_breaker="lowest", force=False)
    assert lab.tokens_left() == 1

    # split 1|1, both still see qnetd: the tie-breaker (lowest) keeps node 1 quorate only
    lab.hub.isolate(2)
    await eventually(lambda: (len(lab.nodes[0].replica.members) == 1
                              and lab.nodes[0].quorate() and not lab.nodes[1].quorate()),
                     "node 1 quorate alone with the device, node 2 not")
    lab.hub.heal()
    await eventually(lambda: all(len(n.replica.members) == 2 and casting(n.status())
                                 for n in lab.nodes), "the ring whole again, vote counted")

    answer = await lab.ask(1, "qdevice-remove")
    assert answer["removed"] == f"{HOST}:{lab.port}"
    assert answer["config_version"] == before + 2
    assert sorted(answer["files"]) == sorted(TREE_FILES)
    await eventually(lambda: all("qdevice" not in n.status() for n in lab.nodes),
                     "the device gone from every node's status")
    for node in lab.nodes:
        assert node.memdb.lookup(TREE_QDEVICE_DIR) is None
        quorum = node.status()["quorum"]
        assert (quorum["expected_votes"], "Qdevice" in quorum["flags"]) == (2, False)
    with pytest.raises(ControlError, match="no quorum device is configured"):
        await lab.ask(0, "qdevice-remove")


async def test_refusals_are_one_line_and_spend_nothing(lab: Lab) -> None:
    await eventually(lambda: all(writable(n) for n in lab.nodes), "a writable tree")
    token = lab.token()
    cases = [
        ({"address": HOST, "token": "pmxfs-qnetd-1:garbage"}, "token"),
        ({"address": "[::1", "token": token}, "bad address"),
        ({"address": HOST, "token": token, "tie_breaker": "middle"}, "tie-breaker"),
        ({"address": HOST, "token": token, "tie_breaker": "9"}, "tie_breaker"),
        ({"address": HOST, "token": token, "algorithm": "maybe"}, "algorithm"),
    ]
    for args, reason in cases:
        request_args = {"algorithm": None, "tie_breaker": "lowest", "force": False, **args}
        with pytest.raises(ControlError, match=reason):
            await lab.ask(0, "qdevice-setup", **request_args)
    assert lab.tokens_left() == 1
    with pytest.raises(ControlError, match="argument 'force'"):
        await lab.ask(0, "qdevice-setup", address=HOST, token=token, algorithm=None,
                      tie_breaker="lowest", force="yes")
    with pytest.raises(ControlError, match="unknown argument"):
        await lab.ask(0, "qdevice-remove", force=True)
    # a wrong port: enrollment fails, nothing is written
    with pytest.raises(ControlError, match="cannot connect to qnetd"):
        await lab.ask(0, "qdevice-setup", address=f"{HOST}:1", token=token, algorithm=None,
                      tie_breaker="lowest", force=False)
    assert lab.nodes[0].config.quorum.device is None
    assert all(lab.nodes[0].tree_file(path) is None for path in TREE_FILES)
