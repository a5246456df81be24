"""`pmxfs create` and `pmxfs add` with redundant links (issue 15), in one process: two
standalone `ReplicaNode`s, each with its `Lifecycle` (runtime/lifecycle.py) as the daemon has
it. node1 creates a two-link cluster on 127.0.11.1 (link 0) and 127.0.12.1 (link 1) -- knet,
one UDP socket per link -- and serves joins over TLS; node2 is refused while it lacks link 1 or
brings an address node1 uses, then joins with an address on each link. Nothing is mocked but
the FUSE mount: the corosync.conf, authkey, join token, TLS exchange and knet transport are the
real ones. Addresses of 127.0.0.0/8 exist on every Linux host, so no root or namespace is
needed; ports are picked at random, so parallel runs do not meet."""

from __future__ import annotations

import base64
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cpg_harness import PORT_RANGE
from test_attach import Nodes, settled

from pmxfs import cli
from pmxfs.commands import add as add_command
from pmxfs.commands import create as create_command
from pmxfs.core import conf
from pmxfs.core.fsop import WriteFile
from pmxfs.runtime.cluster_tree import LifecycleError
from pmxfs.runtime.join_service import parse_request
from pmxfs.runtime.lifecycle import Lifecycle, LifecycleSettings
from pmxfs.runtime.replica_node import ReplicaNode

LINK0, LINK1 = "127.0.11", "127.0.12"
TIMEOUT_S = 60.0


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    """As test_attach's: the nodes' nursery is left before their databases close; then the
    transports the lifecycle opened (real UDP sockets) are closed too."""
    async with trio.open_nursery() as nursery:
        n = Nodes(tmp_path, nursery)
        yield n
        nursery.cancel_scope.cancel()
    n.close()
    for node in n.nodes.values():
        node.transport.close()
    assert n.failures == []


def _lifecycle(tmp_path: Path, name: str, node: ReplicaNode, join_port: int) -> Lifecycle:
    home = tmp_path / name
    return Lifecycle(node, LifecycleSettings(
        config=home / "etc" / "corosync.conf", authkey=home / "etc" / "authkey",
        data_dir=home / "data", join_port=join_port, local=False))


async def test_a_node_joins_a_two_link_cluster_with_an_address_on_each_link(
        nodes: Nodes, tmp_path: Path) -> None:
    # below Linux's ephemeral ports, so no outgoing connection holds them
    port = random.randrange(*PORT_RANGE, 2)  # link 0 on port, link 1 on port + 1
    join_port = random.randrange(*PORT_RANGE, 2) + 1
    with trio.fail_after(TIMEOUT_S):
        first = nodes.start("node1", nodes.standalone("node1"))
        joiner = nodes.start("node2", nodes.standalone("node2"))
        await settled(first, 1)
        await settled(joiner, 1)
        one = _lifecycle(tmp_path, "node1", first, join_port)
        two = _lifecycle(tmp_path, "node2", joiner, join_port)
        nodes.nursery.start_soon(one.join_service.run)

        created = await one.create("lab", link0=f"{LINK0}.1", nodeid=1, votes=1, port=port,
                                   links={1: f"{LINK1}.1"})
        assert created == {"cluster": "lab", "nodeid": 1, "address": f"{LINK0}.1",
                           "links": {"0": f"{LINK0}.1", "1": f"{LINK1}.1"},
                           "transport": "knet", "config_version": 1}
        written = conf.check((tmp_path / "node1/etc/corosync.conf").read_text()).config
        assert written is not None
        assert [(s.number, s.port) for s in conf.link_settings(written)] == [
            (0, port), (1, port + 1)]
        await settled(first, 1)
        token = (await one.join_token(600))["token"]

        refusals = {
            "no link 1": (None, r"node2 needs an address on link 1 too \(--link1 ADDR\)"),
            "used": (f"{LINK1}.1", rf"address {LINK1}.1 is already used by node node1 "
                                   r"\(its link 1\)"),
        }
        for link1, reason in refusals.values():
            with pytest.raises(LifecycleError, match=reason):
                await two.add(None, token, link0=f"{LINK0}.2", nodeid=None, votes=1,
                              force=False, links={} if link1 is None else {1: link1})
            assert joiner.standalone
        with pytest.raises(LifecycleError, match="not an address of this host"):
            await two.add(None, token, link0=f"{LINK0}.2", nodeid=None, votes=1, force=False,
                          links={1: "192.0.2.1"})  # TEST-NET-1: never on this host

        answer = await two.add(None, token, link0=f"{LINK0}.2", nodeid=None, votes=1,
                               force=False, links={1: f"{LINK1}.2"})
        assert (answer["cluster"], answer["nodeid"]) == ("lab", 2)
        await settled(joiner, 2)
        await settled(first, 2)
        assert (await joiner.write(WriteFile("from2.txt", b"2", 1, create=True))).errno == 0
        while first.memdb.lookup("from2.txt") is None:  # noqa: ASYNC110 bounded
            await trio.sleep(0.05)

    config = conf.check((tmp_path / "node2/etc/corosync.conf").read_text()).config
    assert config is not None
    assert config.config_version == 2
    assert conf.effective_transport(config) == "knet"
    assert [(n.name, n.addrs) for n in config.nodes] == [
        ("node1", ((0, f"{LINK0}.1"), (1, f"{LINK1}.1"))),
        ("node2", ((0, f"{LINK0}.2"), (1, f"{LINK1}.2")))]
    for node, peer in ((first, 2), (joiner, 1)):
        assert node.status()["cluster"]["transport"] == "knet"
        assert sorted(entry["link"] for entry in node.status()["links"]
                      if entry["nodeid"] == peer) == [0, 1]


def _request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "secret": base64.b64encode(b"s" * 16).decode(), "name": "pve2", "address": "10.0.0.2",
        "nodeid": None, "votes": 1, "vmids": [], "force": False}
    request.update(changes)
    return request


def test_a_join_request_without_links_has_link_0_only() -> None:
    """What an older joiner sends: a one-link cluster takes it as before."""
    assert parse_request(_request()).links == ()
    assert parse_request(_request(links={"2": "10.2.0.2", "1": "10.1.0.2"})).links == (
        (1, "10.1.0.2"), (2, "10.2.0.2"))


@pytest.mark.parametrize("links", [["10.1.0.2"], {"one": "10.1.0.2"}, {"1": 2}, "10.1.0.2"])
def test_a_join_request_with_malformed_links_is_refused(links: object) -> None:
    with pytest.raises(LifecycleError, match="malformed join request"):
        parse_request(_request(links=links))


def _sent(monkeypatch: pytest.MonkeyPatch, module: Any, argv: list[str],
          answer: dict[str, Any]) -> dict[str, Any]:
    """The control request `pmxfs ARGV` makes (the daemon's answer given)."""
    sent: dict[str, Any] = {}

    def request(path: Path, cmd: str, **args: Any) -> dict[str, Any]:
        if cmd == "status":
            return {"quorum": {"quorate": True}, "fs": {"synced": True}}
        sent.update(args, cmd=cmd)
        return answer

    monkeypatch.setattr(module, "request", request)
    args = cli.build_parser().parse_args(argv)
    assert args.handler(args) == 0
    return sent


def test_create_sends_further_links_and_the_transport_only_when_given(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    answer = {"cluster": "lab", "nodeid": 1, "address": "10.0.0.1", "config_version": 1}
    one = _sent(monkeypatch, create_command, ["create", "lab", "--link0", "10.0.0.1"], answer)
    assert one == {"cmd": "create", "cluster_name": "lab", "link0": "10.0.0.1", "nodeid": 1,
                   "votes": 1, "port": None}  # what a daemon before links understands
    assert "node 1 on 10.0.0.1, config_version 1" in capsys.readouterr().out
    answer |= {"links": {"0": "10.0.0.1", "1": "10.1.0.1"}, "transport": "knet"}
    two = _sent(monkeypatch, create_command,
                ["create", "lab", "--link0", "10.0.0.1", "--link1", "10.1.0.1",
                 "--transport", "knet"], answer)
    assert (two["links"], two["transport"]) == ({"1": "10.1.0.1"}, "knet")
    assert ("node 1 on 10.0.0.1 (link 0), 10.1.0.1 (link 1), transport knet, config_version 1"
            in capsys.readouterr().out)


def test_add_sends_further_links_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = {"cluster": "lab", "nodeid": 2, "backup": "/var/lib/pmxfs/backup/x.sql.gz"}
    argv = ["add", "10.0.0.1", "--token", "t", "--link0", "10.0.0.2"]
    assert "links" not in _sent(monkeypatch, add_command, argv, answer)
    sent = _sent(monkeypatch, add_command, [*argv, "--link2", "10.2.0.2", "--link1", "10.1.0.2"],
                 answer)
    assert sent["links"] == {"1": "10.1.0.2", "2": "10.2.0.2"}
