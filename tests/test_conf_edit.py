"""The corosync.conf edits of a cluster's life (pmxfs/core/conf/edit.py): each result passes the
tree's own update rule, and each refusal says why."""

from __future__ import annotations

import pytest

from pmxfs.core import conf
from pmxfs.core.conf.edit import EditError, new_cluster, with_node, without_node


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
