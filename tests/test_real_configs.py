"""Real corosync.conf files (tests/data/, origins in tests/data/README.md) through the validator.

Each file is accepted -- and then renders back to a config equal to it -- or refused with the
reason corosync would give (or, where pmxfs is stricter on purpose, its own, as the README says).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pmxfs.core import conf

DATA = Path(__file__).parent / "data"

# (file, transport, link numbers, expected votes) of the accepted files
ACCEPTED = [
    ("pvecm-single-link-hostnames.conf", "knet", (0,), 3),
    ("pvecm-single-link.conf", "knet", (0,), 3),
    ("pvecm-two-links.conf", "knet", (0, 1), 3),
    ("pvecm-two-links-ipv6.conf", "knet", (0, 1), 3),
    ("pvecm-qdevice.conf", "knet", (0,), 3),
    ("pve-cluster-single-node.conf", "knet", (0,), 1),
    ("pve-cluster-old.conf", "knet", (0,), 1),
]

# (file, reasons that must be among the errors)
REFUSED = [
    ("pve-cluster-multiple-nodes.conf", [
        "16:5: node prox2: nodeid 1 is already used by node prox1 (line 7)",
        "23:5: node prox3: nodeid 1 is already used by node prox1 (line 7)",
        "30:5: node prox4: nodeid 1 is already used by node prox1 (line 7)"]),
    ("corosync-example.conf", [
        "39:1: no node has a ring0_addr, so there is no link (corosync: No interfaces defined)"]),
    ("corosync-2-example-udpu.conf", [
        "2:1: totem.cluster_name is required",
        "31:2: node #1: name is required",
        "41:2: node #3: nodeid is required"]),
    ("corosync-2-example-udp.conf", [
        "1:1: the nodelist needs at least one node (nodelist { node { name, nodeid, "
        "ring0_addr } })",
        "2:1: totem.cluster_name is required"]),
]


def checked(name: str) -> conf.CheckResult:
    path = DATA / name
    return conf.check(path.read_text(), name)


def test_every_file_is_in_a_table_and_in_the_readme() -> None:
    files = {p.name for p in DATA.glob("*.conf")}
    assert files == {r[0] for r in ACCEPTED} | {r[0] for r in REFUSED}
    readme = (DATA / "README.md").read_text()
    for name in files:
        assert f"`{name}`" in readme


@pytest.mark.parametrize(("name", "transport", "links", "votes"), ACCEPTED,
                         ids=[r[0] for r in ACCEPTED])
def test_accepted(name: str, transport: str, links: tuple[int, ...], votes: int) -> None:
    result = checked(name)
    assert result.ok, [str(e) for e in result.errors]
    config = result.config
    assert config is not None
    assert conf.effective_transport(config) == transport
    assert conf.link_numbers(config) == links
    assert config.expected_votes == votes
    assert all(len(n.addrs) == len(links) for n in config.nodes)
    assert conf.parse(conf.render(config)) == config
    assert conf.check(conf.render(config)).ok


@pytest.mark.parametrize(("name", "reasons"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(name: str, reasons: list[str]) -> None:
    result = checked(name)
    assert not result.ok
    found = [f"{e.line}:{e.col}: {e.reason}" for e in result.errors]
    for reason in reasons:
        assert reason in found


def test_the_old_pve_cluster_file_names_its_node_after_ring0_addr() -> None:
    result = checked("pve-cluster-old.conf")
    assert result.config is not None
    assert [(i.nodeid, i.name, i.addr) for i in result.config.node_infos()] == [
        (1, "prox1", "prox1")]
    assert ("7:3: node prox1: no name; pmxfs names the node after its ring0_addr prox1 (as "
            "Proxmox VE does)") in [f"{w.line}:{w.col}: {w.reason}" for w in result.warnings]


def test_corosync_2_interface_keys_are_named_in_warnings() -> None:
    result = checked("pve-cluster-single-node.conf")
    assert [f"{w.line}:{w.col}: {w.reason}" for w in result.warnings] == [
        "23:5: totem.interface (link 0): bindnetaddr is not used: each node binds the link to "
        "its own ringX_addr",
        "24:5: totem.interface.ringnumber is corosync 2's key: taken as linknumber 0 (as "
        "Proxmox VE does; use linknumber)"]


def test_two_links_settings_from_the_docs() -> None:
    result = checked("pvecm-two-links.conf")
    assert result.config is not None
    token = conf.totem_params(result.config).token
    assert [(s.number, s.port, s.priority, s.ping_interval_ms, s.ping_timeout_ms, s.pong_count)
            for s in conf.link_settings(result.config)] == [
        (0, 5405, 1, token // 4, token // 2, 2), (1, 5406, 1, token // 4, token // 2, 2)]
    uno = result.config.node_by_name("uno")
    assert uno is not None
    assert uno.addrs == ((0, "10.10.10.1"), (1, "10.20.20.1"))
