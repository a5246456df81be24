"""The virtual files: exact bytes for each rendering (and the same content parsed back), the
change counters behind `.version`, and the `.debug` write parser."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from pmxfs.core.clusterlog import ClusterLog, LogEntry
from pmxfs.core.status import (
    RRD_CONTENT,
    VIRTUAL_FILES,
    WATCHED_PATHS,
    ChangeCounters,
    ClusterInfo,
    MemberNode,
    parse_debug_write,
    render_clusterlog,
    render_debug,
    render_json,
    render_members,
    render_version,
    render_vmlist,
)


def check(rendered: bytes, expected_text: str, expected_doc: Any) -> None:
    assert rendered.decode() == expected_text
    assert json.loads(rendered) == expected_doc


def test_virtual_files() -> None:
    assert VIRTUAL_FILES == (".members", ".vmlist", ".version", ".clusterlog", ".debug", ".rrd")
    assert RRD_CONTENT == b""  # pmxfs carries no RRD data: pmxcfs's dump of none


# ------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(("value", "text"), [
    ({}, "{}\n"),
    ({"a": 1}, '{\n  "a": 1\n}\n'),
    ({"a": [], "b": {}}, '{\n  "a": [],\n  "b": {}\n}\n'),
    ({"a": [1, "x", None, True]}, '{\n  "a": [1, "x", null, true]\n}\n'),
    ({"a": [[1], {"b": [2]}]},
     '{\n  "a": [\n    [1],\n    {\n      "b": [2]\n    }\n  ]\n}\n'),
    ({"q": 'say "hi"\n\\', "ü": "€"}, '{\n  "q": "say \\"hi\\"\\n\\\\",\n  "ü": "€"\n}\n'),
    ({"bad": "\udcff"}, '{\n  "bad": "\\udcff"\n}\n'),
])
def test_render_json_layout(value: Any, text: str) -> None:
    check(render_json(value), text, value)


# ------------------------------------------------------------------------------ .members

LAB = ClusterInfo(
    name="lab", config_version=4,
    nodes=(MemberNode("node3", 3, "10.0.0.3"), MemberNode("node1", 1, "10.0.0.1"),
           MemberNode("node2", 2)),
    online=frozenset({1, 3}), quorate=True,
)


@pytest.mark.parametrize(("nodename", "version", "cluster", "text", "doc"), [
    ("node1", 7, None,
     '{\n  "nodename": "node1",\n  "version": 7\n}\n',
     {"nodename": "node1", "version": 7}),
    ("node1", 7, LAB,
     '{\n'
     '  "nodename": "node1",\n'
     '  "version": 7,\n'
     '  "cluster": {"name": "lab", "version": 4, "nodes": 3, "quorate": 1},\n'
     '  "nodelist": {\n'
     '    "node1": {"id": 1, "online": 1, "ip": "10.0.0.1"},\n'
     '    "node2": {"id": 2, "online": 0},\n'
     '    "node3": {"id": 3, "online": 1, "ip": "10.0.0.3"}\n'
     '  }\n'
     '}\n',
     {"nodename": "node1", "version": 7,
      "cluster": {"name": "lab", "version": 4, "nodes": 3, "quorate": 1},
      "nodelist": {"node1": {"id": 1, "online": 1, "ip": "10.0.0.1"},
                   "node2": {"id": 2, "online": 0},
                   "node3": {"id": 3, "online": 1, "ip": "10.0.0.3"}}}),
    ("b", 2, ClusterInfo("solo", 1, (MemberNode("b", 20, "::1"), MemberNode("a", 10, "::2")),
                         frozenset(), quorate=False),
     '{\n'
     '  "nodename": "b",\n'
     '  "version": 2,\n'
     '  "cluster": {"name": "solo", "version": 1, "nodes": 2, "quorate": 0},\n'
     '  "nodelist": {\n'
     '    "a": {"id": 10, "online": 0, "ip": "::2"},\n'
     '    "b": {"id": 20, "online": 0, "ip": "::1"}\n'
     '  }\n'
     '}\n',
     {"nodename": "b", "version": 2,
      "cluster": {"name": "solo", "version": 1, "nodes": 2, "quorate": 0},
      "nodelist": {"a": {"id": 10, "online": 0, "ip": "::2"},
                   "b": {"id": 20, "online": 0, "ip": "::1"}}}),
    ("x", 0, ClusterInfo("empty", 9, (), frozenset(), quorate=False),
     '{\n'
     '  "nodename": "x",\n'
     '  "version": 0,\n'
     '  "cluster": {"name": "empty", "version": 9, "nodes": 0, "quorate": 0},\n'
     '  "nodelist": {}\n'
     '}\n',
     {"nodename": "x", "version": 0,
      "cluster": {"name": "empty", "version": 9, "nodes": 0, "quorate": 0}, "nodelist": {}}),
])
def test_members(nodename: str, version: int, cluster: ClusterInfo | None, text: str,
                 doc: Any) -> None:
    check(render_members(nodename, version, cluster), text, doc)


def test_members_nodes_are_sorted_by_node_id_not_name() -> None:
    cluster = ClusterInfo("c", 1, (MemberNode("zeta", 1), MemberNode("alpha", 2)), {1}, True)
    rendered = render_members("zeta", 1, cluster).decode()
    assert rendered.index('"zeta"', rendered.index("nodelist")) < rendered.index('"alpha"')


def test_members_refuses_duplicate_names() -> None:
    cluster = ClusterInfo("c", 1, (MemberNode("n", 1), MemberNode("n", 2)), {1}, True)
    with pytest.raises(ValueError, match="duplicate node name"):
        render_members("n", 1, cluster)


# ------------------------------------------------------------------------------- .vmlist


@dataclass(frozen=True)
class Guest:
    node: str
    kind: str
    version: int


@pytest.mark.parametrize(("version", "guests", "text", "doc"), [
    (0, {}, '{\n  "version": 0,\n  "ids": {}\n}\n', {"version": 0, "ids": {}}),
    (12, {1000: Guest("node2", "lxc", 9), 100: Guest("node1", "qemu", 3),
          200: Guest("node1", "openvz", 5)},
     '{\n'
     '  "version": 12,\n'
     '  "ids": {\n'
     '    "100": {"node": "node1", "type": "qemu", "version": 3},\n'
     '    "200": {"node": "node1", "type": "openvz", "version": 5},\n'
     '    "1000": {"node": "node2", "type": "lxc", "version": 9}\n'
     '  }\n'
     '}\n',
     {"version": 12, "ids": {"100": {"node": "node1", "type": "qemu", "version": 3},
                             "200": {"node": "node1", "type": "openvz", "version": 5},
                             "1000": {"node": "node2", "type": "lxc", "version": 9}}}),
    (1, {100: Guest("n\udcff", "qemu", 1)},
     '{\n'
     '  "version": 1,\n'
     '  "ids": {\n'
     '    "100": {"node": "n\\udcff", "type": "qemu", "version": 1}\n'
     '  }\n'
     '}\n',
     {"version": 1, "ids": {"100": {"node": "n\udcff", "type": "qemu", "version": 1}}}),
])
def test_vmlist(version: int, guests: dict[int, Guest], text: str, doc: Any) -> None:
    check(render_vmlist(version, guests), text, doc)


# ------------------------------------------------------------------------------ .version


# memdb_change_array of pve-cluster's src/pmxcfs/status.c (pve-cluster 9.1.6), in its order.
PMXCFS_WATCHED = (
    "corosync.conf",
    "corosync.conf.new",
    "storage.cfg",
    "user.cfg",
    "domains.cfg",
    "notifications.cfg",
    "priv/notifications.cfg",
    "priv/shadow.cfg",
    "priv/acme/plugins.cfg",
    "priv/tfa.cfg",
    "priv/token.cfg",
    "priv/wg-keys.cfg",
    "datacenter.cfg",
    "vzdump.cron",
    "vzdump.conf",
    "jobs.cfg",
    "ha/crm_commands",
    "ha/manager_status",
    "ha/resources.cfg",
    "ha/rules.cfg",
    "ha/groups.cfg",
    "ha/fence.cfg",
    "status.cfg",
    "replication.cfg",
    "ceph.conf",
    "sdn/vnets.cfg",
    "sdn/zones.cfg",
    "sdn/controllers.cfg",
    "sdn/subnets.cfg",
    "sdn/ipams.cfg",
    "sdn/mac-cache.json",
    "sdn/pve-ipam-state.json",
    "sdn/dns.cfg",
    "sdn/fabrics.cfg",
    "sdn/route-maps.cfg",
    "sdn/prefix-lists.cfg",
    "sdn/.running-config",
    "virtual-guest/cpu-models.conf",
    "virtual-guest/profiles.cfg",
    "firewall/cluster.fw",
    "mapping/directory.cfg",
    "mapping/pci.cfg",
    "mapping/usb.cfg",
)


def test_watched_paths_are_those_of_current_pmxcfs() -> None:
    assert WATCHED_PATHS == PMXCFS_WATCHED
    assert {"priv/ipam.db", "priv/macs.db", "mapping/dir.cfg"}.isdisjoint(WATCHED_PATHS)


def test_version_of_fresh_counters_lists_every_watched_path_at_zero() -> None:
    expected = (
        '{\n'
        '  "starttime": 1700000000,\n'
        '  "clinfo": 5,\n'
        '  "vmlist": 12,\n'
        '  "ceph.conf": 0,\n'
        '  "corosync.conf": 0,\n'
        '  "corosync.conf.new": 0,\n'
        '  "datacenter.cfg": 0,\n'
        '  "domains.cfg": 0,\n'
        '  "firewall/cluster.fw": 0,\n'
        '  "ha/crm_commands": 0,\n'
        '  "ha/fence.cfg": 0,\n'
        '  "ha/groups.cfg": 0,\n'
        '  "ha/manager_status": 0,\n'
        '  "ha/resources.cfg": 0,\n'
        '  "ha/rules.cfg": 0,\n'
        '  "jobs.cfg": 0,\n'
        '  "mapping/directory.cfg": 0,\n'
        '  "mapping/pci.cfg": 0,\n'
        '  "mapping/usb.cfg": 0,\n'
        '  "notifications.cfg": 0,\n'
        '  "priv/acme/plugins.cfg": 0,\n'
        '  "priv/notifications.cfg": 0,\n'
        '  "priv/shadow.cfg": 0,\n'
        '  "priv/tfa.cfg": 0,\n'
        '  "priv/token.cfg": 0,\n'
        '  "priv/wg-keys.cfg": 0,\n'
        '  "replication.cfg": 0,\n'
        '  "sdn/.running-config": 0,\n'
        '  "sdn/controllers.cfg": 0,\n'
        '  "sdn/dns.cfg": 0,\n'
        '  "sdn/fabrics.cfg": 0,\n'
        '  "sdn/ipams.cfg": 0,\n'
        '  "sdn/mac-cache.json": 0,\n'
        '  "sdn/prefix-lists.cfg": 0,\n'
        '  "sdn/pve-ipam-state.json": 0,\n'
        '  "sdn/route-maps.cfg": 0,\n'
        '  "sdn/subnets.cfg": 0,\n'
        '  "sdn/vnets.cfg": 0,\n'
        '  "sdn/zones.cfg": 0,\n'
        '  "status.cfg": 0,\n'
        '  "storage.cfg": 0,\n'
        '  "user.cfg": 0,\n'
        '  "virtual-guest/cpu-models.conf": 0,\n'
        '  "virtual-guest/profiles.cfg": 0,\n'
        '  "vzdump.conf": 0,\n'
        '  "vzdump.cron": 0,\n'
        '  "kvstore": {\n'
        '    "node1": {}\n'
        '  }\n'
        '}\n'
    )
    doc = {"starttime": 1700000000, "clinfo": 5, "vmlist": 12, **dict.fromkeys(WATCHED_PATHS, 0),
           "kvstore": {"node1": {}}}
    check(render_version(1700000000, 5, 12, ChangeCounters(), "node1"), expected, doc)
    assert len(WATCHED_PATHS) == len(set(WATCHED_PATHS)) == 43


def test_version_shows_counters() -> None:
    counters = ChangeCounters()
    counters.note_changed(["storage.cfg"])
    counters.note_changed(["storage.cfg", "user.cfg"])
    doc = json.loads(render_version(1, 2, 3, counters, "pve1"))
    assert list(doc)[:3] == ["starttime", "clinfo", "vmlist"]
    assert list(doc)[3:-1] == sorted(WATCHED_PATHS)
    assert doc["kvstore"] == {"pve1": {}}
    assert doc["storage.cfg"] == 2
    assert doc["user.cfg"] == 1
    assert sum(doc[p] for p in WATCHED_PATHS) == 3


@pytest.mark.parametrize(("paths", "moved"), [
    ([], set()),
    (["storage.cfg"], {"storage.cfg"}),
    (["storage.cfg.tmp.123", "nodes/node1/qemu-server/100.conf", "/storage.cfg"], set()),
    (["user.cfg.new", "user.cfg"], {"user.cfg"}),  # a rename reports both paths
    (["storage.cfg", "storage.cfg"], {"storage.cfg"}),  # once per call
    (["ha"], {"ha/crm_commands", "ha/manager_status", "ha/resources.cfg", "ha/groups.cfg",
              "ha/rules.cfg", "ha/fence.cfg"}),  # a directory: every watched path below it
    (["priv/acme"], {"priv/acme/plugins.cfg"}),
    (["sd", "mapping/pci"], set()),  # a name prefix is not a directory
    (["corosync.conf"], {"corosync.conf"}),  # not corosync.conf.new
])
def test_note_changed(paths: list[str], moved: set[str]) -> None:
    counters = ChangeCounters()
    assert counters.note_changed(paths) == bool(moved)
    assert {p for p, n in counters.counters().items() if n} == moved
    assert all(n == 1 for p, n in counters.counters().items() if p in moved)


def test_note_changed_takes_a_generator() -> None:
    counters = ChangeCounters()
    assert counters.note_changed(p for p in ("jobs.cfg", "x"))
    assert counters.counters()["jobs.cfg"] == 1


def test_note_reload_moves_every_counter() -> None:
    counters = ChangeCounters()
    counters.note_changed(["datacenter.cfg"])
    counters.note_reload()
    values = counters.counters()
    assert set(values) == set(WATCHED_PATHS)
    assert values["datacenter.cfg"] == 2
    assert all(n == 1 for p, n in values.items() if p != "datacenter.cfg")


# --------------------------------------------------------------------------- .clusterlog


def log_entry(uid: int, time: int, msg: str, node: str = "node1") -> LogEntry:
    return LogEntry(uid=uid, time=time, pri=6, tag="cluster", pid=1234, node=node, user="root",
                    msg=msg)


def test_clusterlog_empty() -> None:
    check(render_clusterlog(ClusterLog().newest()), '{\n  "data": []\n}\n', {"data": []})


def test_clusterlog_newest_first() -> None:
    log = ClusterLog()
    log.merge([log_entry(1, 1700000000, "starting cluster log"),
               log_entry(7, 1700000005, 'vm "100" → started', node="node2")])
    check(
        render_clusterlog(log.newest()),
        '{\n'
        '  "data": [\n'
        '    {"uid": 7, "time": 1700000005, "pri": 6, "tag": "cluster", "pid": 1234,'
        ' "node": "node2", "user": "root", "msg": "vm \\"100\\" → started"},\n'
        '    {"uid": 1, "time": 1700000000, "pri": 6, "tag": "cluster", "pid": 1234,'
        ' "node": "node1", "user": "root", "msg": "starting cluster log"}\n'
        '  ]\n'
        '}\n',
        {"data": [
            {"uid": 7, "time": 1700000005, "pri": 6, "tag": "cluster", "pid": 1234,
             "node": "node2", "user": "root", "msg": 'vm "100" → started'},
            {"uid": 1, "time": 1700000000, "pri": 6, "tag": "cluster", "pid": 1234,
             "node": "node1", "user": "root", "msg": "starting cluster log"},
        ]},
    )


def test_clusterlog_shows_the_newest_50() -> None:
    log = ClusterLog()
    log.merge(log_entry(i, 1000 + i, f"m{i}") for i in range(80))
    doc = json.loads(render_clusterlog(log.newest()))
    assert [d["uid"] for d in doc["data"]] == list(range(79, 29, -1))
    assert render_clusterlog(log.newest()).count(b"\n") == 50 + 4


# -------------------------------------------------------------------------------- .debug


def test_render_debug() -> None:
    assert (render_debug(False), render_debug(True)) == (b"0\n", b"1\n")


@pytest.mark.parametrize(("data", "expected"), [
    (b"1\n", True), (b"0\n", False), (b"1", True), (b"0", False), (b" 1 \r\n", True),
    (b"\t0\n\n", False), (b"", None), (b"\n", None), (b"2\n", None), (b"10\n", None),
    (b"01\n", None), (b"true\n", None), (b"1\n1\n", None), (b"\xff", None), (b"1\x00", None),
    (b"-1", None),
])
def test_parse_debug_write(data: bytes, expected: bool | None) -> None:
    assert parse_debug_write(data) is expected
