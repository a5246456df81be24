"""The corosync.conf edits of a cluster's life (pmxfs/core/conf/edit.py): each result passes the
tree's own update rule, and each refusal says why."""

from __future__ import annotations

import pytest

from pmxfs.core import conf
from pmxfs.core.conf.edit import (
    EditError,
    links_from_wire,
    links_to_wire,
    new_cluster,
    with_node,
    without_node,
)


def _config(text: str) -> conf.ClusterConfig:
    config = conf.check(text).config
    assert config is not None
    return config


def test_a_new_cluster_has_this_node_only_and_version_1() -> None:
    config = _config(new_cluster("lab", "pve1", 1, 1, "10.0.0.1", port=5460))
    assert (config.cluster_name, config.config_version, config.transport) == ("lab", 1, "udpu")
    assert config.port == 5460
    assert [(n.name, n.nodeid, n.ring0_addr, n.votes) for n in config.nodes] == [
        ("pve1", 1, "10.0.0.1", 1)]


@pytest.mark.parametrize(("args", "reason"), [
    (("", "pve1", 1, 1, "10.0.0.1"), "cluster name"),
    (("a" * 16, "pve1", 1, 1, "10.0.0.1"), "cluster name"),
    (("lab_1", "pve1", 1, 1, "10.0.0.1"), "cluster name"),
    (("lab", "pve.example", 1, 1, "10.0.0.1"), "node name"),
    (("lab", "pve1", 0, 1, "10.0.0.1"), "node id"),
    (("lab", "pve1", 1, 0, "10.0.0.1"), "votes"),
    (("lab", "pve1", 1, 1, "pve1.example"), "address"),
])
def test_a_new_cluster_refuses_bad_input(args: tuple[str, str, int, int, str],
                                         reason: str) -> None:
    with pytest.raises(EditError, match=reason):
        new_cluster(*args)


def test_adding_a_node_raises_the_version_by_one_and_passes_the_update_rule() -> None:
    first = new_cluster("lab", "pve1", 1, 1, "10.0.0.1")
    second, nodeid = with_node(first, "pve2", "10.0.0.2")
    assert nodeid == 2
    result = conf.check(second, current=_config(first))
    assert result.ok, result.errors
    assert _config(second).config_version == 2
    third, nodeid = with_node(second, "pve3", "10.0.0.3", nodeid=7, votes=2)
    assert nodeid == 7
    assert [(n.name, n.nodeid, n.votes) for n in _config(third).nodes] == [
        ("pve1", 1, 1), ("pve2", 2, 1), ("pve3", 7, 2)]


def test_the_lowest_free_node_id_is_taken() -> None:
    text, _ = with_node(new_cluster("lab", "pve1", 2, 1, "10.0.0.1"), "pve2", "10.0.0.2")
    assert _config(text).node_by_name("pve2").nodeid == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "address", "nodeid", "reason"), [
    ("pve1", "10.0.0.9", None, "already in the cluster"),
    ("pve2", "10.0.0.1", None, "already used by node pve1"),
    ("pve2", "10.0.0.2", 1, "node id 1 is already used"),
    ("pve_2", "10.0.0.2", None, "node name"),
])
def test_a_name_address_or_node_id_in_use_is_refused(name: str, address: str,
                                                     nodeid: int | None, reason: str) -> None:
    with pytest.raises(EditError, match=reason):
        with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), name, address, nodeid=nodeid)


def test_replace_re_adds_a_node_of_the_same_name_with_its_node_id() -> None:
    two, _ = with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), "pve2", "10.0.0.2",
                       nodeid=5)
    again, nodeid = with_node(two, "pve2", "10.0.0.22", replace=True)
    assert nodeid == 5
    assert [(n.name, n.ring0_addr) for n in _config(again).nodes] == [
        ("pve1", "10.0.0.1"), ("pve2", "10.0.0.22")]


def test_removing_a_node_raises_the_version_and_refuses_the_last_one() -> None:
    two, _ = with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), "pve2", "10.0.0.2")
    one, gone = without_node(two, "pve2")
    assert gone.name == "pve2"
    assert [n.name for n in _config(one).nodes] == ["pve1"]
    assert _config(one).config_version == 3
    with pytest.raises(EditError, match="no node pve9"):
        without_node(two, "pve9")
    with pytest.raises(EditError, match="last node"):
        without_node(one, "pve1")


def test_a_third_node_ends_two_node() -> None:
    two, _ = with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), "pve2", "10.0.0.2")
    two_node = two.replace("provider: corosync_votequorum",
                           "provider: corosync_votequorum\n  two_node: 1")
    assert _config(two_node).quorum.two_node
    three, _ = with_node(two_node, "pve3", "10.0.0.3")
    assert not _config(three).quorum.two_node
    assert conf.check(three, current=_config(two_node)).ok


# -- links (pvecm create/add --link0 .. --link7)

def test_a_new_cluster_with_two_links_runs_knet_passive_with_an_interface_per_link() -> None:
    config = _config(new_cluster("lab", "pve1", 1, 1, "10.0.0.1", links={1: "10.1.0.1"}))
    assert (conf.effective_transport(config), config.totem.transport) == ("knet", "knet")
    assert conf.effective_link_mode(config) == "passive"
    assert [i.linknumber for i in config.totem.interfaces] == [0, 1]
    assert config.nodes[0].addrs == ((0, "10.0.0.1"), (1, "10.1.0.1"))
    assert [(s.number, s.port) for s in conf.link_settings(config)] == [(0, 5405), (1, 5406)]


def test_a_new_cluster_with_one_link_stays_udpu_unless_knet_is_asked_for() -> None:
    assert _config(new_cluster("lab", "pve1", 1, 1, "10.0.0.1")).transport == "udpu"
    knet = _config(new_cluster("lab", "pve1", 1, 1, "10.0.0.1", transport="knet", port=5460))
    assert (knet.totem.transport, knet.totem.link_mode) == ("knet", "passive")
    assert [i.linknumber for i in knet.totem.interfaces] == [0]
    assert [(s.number, s.port) for s in conf.link_settings(knet)] == [(0, 5460)]


@pytest.mark.parametrize(("links", "transport", "reason"), [
    ({1: "10.1.0.1"}, "udpu", "udpu carries one link only"),
    ({8: "10.8.0.1"}, None, "numbered 1-7"),
    ({0: "10.8.0.1"}, None, "numbered 1-7"),
    ({1: "pve1.example"}, None, "not an IPv4 or IPv6 address"),
    ({}, "udp", "not one of knet, udpu"),
])
def test_a_new_cluster_refuses_bad_links(links: dict[int, str], transport: str | None,
                                         reason: str) -> None:
    with pytest.raises(EditError, match=reason):
        new_cluster("lab", "pve1", 1, 1, "10.0.0.1", links=links, transport=transport)


def _two_links() -> str:
    return new_cluster("lab", "pve1", 1, 1, "10.0.0.1", links={1: "10.1.0.1"})


def test_a_node_joins_a_two_link_cluster_with_an_address_on_each_link() -> None:
    first = _two_links()
    second, nodeid = with_node(first, "pve2", "10.0.0.2", links={1: "10.1.0.2"})
    assert nodeid == 2
    assert conf.check(second, current=_config(first)).ok
    config = _config(second)
    assert config.config_version == 2
    assert [n.addrs for n in config.nodes] == [((0, "10.0.0.1"), (1, "10.1.0.1")),
                                               ((0, "10.0.0.2"), (1, "10.1.0.2"))]
    again, _ = with_node(second, "pve2", "10.0.0.22", links={1: "10.1.0.22"}, replace=True)
    assert _config(again).node_by_name("pve2").addrs == (  # type: ignore[union-attr]
        (0, "10.0.0.22"), (1, "10.1.0.22"))


@pytest.mark.parametrize(("links", "reason"), [
    ({}, r"links 0, 1 \(corosync: every node lists the same links\): pve3 needs an address on "
         r"link 1 too \(--link1 ADDR\)$"),
    ({1: "10.1.0.3", 2: "10.2.0.3"}, r"the cluster has no link 2 \(leave out --link2\)$"),
    ({2: "10.2.0.3"}, r"pve3 needs an address on link 1 too \(--link1 ADDR\); the cluster has "
                      r"no link 2"),
    ({1: "10.1.0.2"}, r"address 10.1.0.2 is already used by node pve2 \(its link 1\)$"),
    ({1: "10.0.0.1"}, r"address 10.0.0.1 is already used by node pve1 \(its link 0\)$"),
])
def test_a_joiner_without_the_cluster_s_links_or_with_a_used_address_is_refused(
        links: dict[int, str], reason: str) -> None:
    two, _ = with_node(_two_links(), "pve2", "10.0.0.2", links={1: "10.1.0.2"})
    with pytest.raises(EditError, match=reason):
        with_node(two, "pve3", "10.0.0.3", links=links)


def test_a_second_link_is_refused_by_a_one_link_cluster() -> None:
    with pytest.raises(EditError, match=r"have link 0 .*the cluster has no link 1"):
        with_node(new_cluster("lab", "pve1", 1, 1, "10.0.0.1"), "pve2", "10.0.0.2",
                  links={1: "10.1.0.2"})


def test_removing_a_node_removes_all_its_addresses() -> None:
    two, _ = with_node(_two_links(), "pve2", "10.0.0.2", links={1: "10.1.0.2"})
    one, gone = without_node(two, "pve2")
    assert gone.addrs == ((0, "10.0.0.2"), (1, "10.1.0.2"))
    assert [n.addrs for n in _config(one).nodes] == [((0, "10.0.0.1"), (1, "10.1.0.1"))]


def test_links_travel_as_an_object_of_link_numbers() -> None:
    assert links_to_wire({2: "10.2.0.1", 1: "10.1.0.1"}) == {"1": "10.1.0.1", "2": "10.2.0.1"}
    assert links_from_wire({"1": "10.1.0.1"}) == {1: "10.1.0.1"}
    assert links_from_wire(None) == {}
    for bad in ([["1", "10.1.0.1"]], {"x": "10.1.0.1"}, {"10": "a"}, {"1": 5}, {"\u0661": "a"}):
        with pytest.raises(EditError, match="links must be an object"):
            links_from_wire(bad)
