"""The content of the virtual files in the root of the tree: `.members`, `.vmlist`, `.version`,
`.clusterlog`, `.debug` and `.rrd`, as the bytes a read returns.

Each renderer is a pure function of the state it shows, so the runtime calls it on every read and
a test compares bytes. The formats are pmxcfs's (JSON objects with the same keys); the layout is
this module's own, chosen to be deterministic and readable like pmxcfs's output:

* the top-level object has one key per line; below it, an object or array that holds objects or
  arrays has one element per line, and one that holds only scalars is written on one line;
  two spaces of indentation per level; a newline at the end;
* key order is fixed where the format shows one (`nodename` before `version` ...), otherwise
  sorted: nodes by node id, guests by VMID (numerically), watched paths by name; log entries are
  newest first;
* text is UTF-8; a lone surrogate (a file name that was not UTF-8) is written as a `\\uXXXX`
  escape, so the output is always valid JSON.

`.version` shows a change counter per watched path (`ChangeCounters`). Like pmxcfs it lists every
watched path, changed or not, starting at 0: a reader compares counters with what it saw last and
re-reads only the files whose counter moved; `starttime` tells it that counters restarted. The
counters are this node's own (not replicated). The watched paths are those of current pmxcfs
(`memdb_change_array` in pve-cluster's src/pmxcfs/status.c, which no longer has priv/ipam.db or
priv/macs.db). After the counters comes pmxcfs's `kvstore` section: the versions of the keys each
node published in pmxcfs's key-value store (pvestatd's status broadcasts). pmxfs has no key-value
store, so the section holds this node with no keys, as pmxcfs shows a node that published none.

`.rrd` is pmxcfs's dump of the RRD data that pvestatd broadcasts ("key:data" lines). pmxfs does
not carry RRD data, so it is empty (`RRD_CONTENT`); it exists so that the name cannot be taken by a
plain file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from pmxfs.core.clusterlog import JSON_ENTRIES, LogEntry

VIRTUAL_FILES = (".members", ".vmlist", ".version", ".clusterlog", ".debug", ".rrd")

# The files whose changes `.version` counts (pmxcfs's list, in its order).
WATCHED_PATHS = (
    "corosync.conf", "corosync.conf.new", "storage.cfg", "user.cfg", "domains.cfg",
    "notifications.cfg", "priv/notifications.cfg", "priv/shadow.cfg", "priv/acme/plugins.cfg",
    "priv/tfa.cfg", "priv/token.cfg", "priv/wg-keys.cfg", "datacenter.cfg", "vzdump.cron",
    "vzdump.conf", "jobs.cfg", "ha/crm_commands", "ha/manager_status", "ha/resources.cfg",
    "ha/rules.cfg", "ha/groups.cfg", "ha/fence.cfg", "status.cfg", "replication.cfg",
    "ceph.conf", "sdn/vnets.cfg", "sdn/zones.cfg", "sdn/controllers.cfg", "sdn/subnets.cfg",
    "sdn/ipams.cfg", "sdn/mac-cache.json", "sdn/pve-ipam-state.json", "sdn/dns.cfg",
    "sdn/fabrics.cfg", "sdn/route-maps.cfg", "sdn/prefix-lists.cfg", "sdn/.running-config",
    "virtual-guest/cpu-models.conf", "virtual-guest/profiles.cfg", "firewall/cluster.fw",
    "mapping/directory.cfg", "mapping/pci.cfg", "mapping/usb.cfg",
)

RRD_CONTENT = b""


# ------------------------------------------------------------------------------------ JSON


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _layout(value: object, depth: int) -> str:
    if isinstance(value, dict):
        items = [(_compact(k) + ": ", v) for k, v in value.items()]
        open_, close = "{", "}"
    elif isinstance(value, list):
        items = [("", v) for v in value]
        open_, close = "[", "]"
    else:
        return _compact(value)
    if not items or (depth > 0 and not any(isinstance(v, dict | list) for _, v in items)):
        return _compact(value)
    inner = "  " * (depth + 1)
    lines = ",\n".join(inner + prefix + _layout(v, depth + 1) for prefix, v in items)
    return f"{open_}\n{lines}\n{'  ' * depth}{close}"


def render_json(value: object) -> bytes:
    """`value` (dicts, lists, str, int, bool, None) laid out as the module comment says."""
    return (_layout(value, 0) + "\n").encode("utf-8", "backslashreplace")


# ------------------------------------------------------------------------------- .members


@dataclass(frozen=True, slots=True)
class MemberNode:
    """A node of the cluster configuration's nodelist. `ip` None: not known, not shown."""

    name: str
    nodeid: int
    ip: str | None = None  # the address it is reached at


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What `.members` shows about the cluster: from the configuration (name, config_version,
    nodelist) and from the current membership (online node ids, quorate)."""

    name: str  # cluster_name
    config_version: int  # corosync.conf's config_version
    nodes: Sequence[MemberNode]  # the nodelist
    online: Set[int]  # node ids in the current membership
    quorate: bool


def render_members(nodename: str, version: int, cluster: ClusterInfo | None) -> bytes:
    """`.members`. `version` counts changes of what it shows; `cluster` None is local mode (no
    cluster configuration), where only the node name and the version appear, as pmxcfs."""
    doc: dict[str, object] = {"nodename": nodename, "version": version}
    if cluster is not None:
        if len({n.name for n in cluster.nodes}) != len(cluster.nodes):
            raise ValueError("duplicate node name in the nodelist")
        doc["cluster"] = {
            "name": cluster.name, "version": cluster.config_version,
            "nodes": len(cluster.nodes), "quorate": int(cluster.quorate),
        }
        nodelist: dict[str, object] = {}
        for node in sorted(cluster.nodes, key=lambda n: n.nodeid):
            online = int(node.nodeid in cluster.online)
            shown: dict[str, object] = {"id": node.nodeid, "online": online}
            if node.ip is not None:
                shown["ip"] = node.ip
            nodelist[node.name] = shown
        doc["nodelist"] = nodelist
    return render_json(doc)


# -------------------------------------------------------------------------------- .vmlist


class GuestInfo(Protocol):
    """One guest of `.vmlist`: the node whose directory holds its config, its kind ("qemu",
    "lxc", "openvz") and the version of its config file."""

    @property
    def node(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def version(self) -> int: ...


def render_vmlist(version: int, guests: Mapping[int, GuestInfo]) -> bytes:
    """`.vmlist`: `version` counts changes of the guest list; guests by VMID, numerically."""
    ids = {
        str(vmid): {"node": g.node, "type": g.kind, "version": g.version}
        for vmid, g in sorted(guests.items())
    }
    return render_json({"version": version, "ids": ids})


# ------------------------------------------------------------------------------- .version


class ChangeCounters:
    """A change counter per watched path, all starting at 0."""

    def __init__(self) -> None:
        self._counters = dict.fromkeys(WATCHED_PATHS, 0)  # watched path -> changes seen

    def note_changed(self, paths: Iterable[str]) -> bool:
        """Count a change of each watched path among `paths` (relative, no leading '/'; a rename
        reports both its paths). A directory counts for every watched path below it, so a
        renamed or removed `ha` moves `ha/resources.cfg`. A path counts once per call however
        often it appears. True when a counter moved."""
        hit: set[str] = set()
        for path in paths:
            if path in self._counters:
                hit.add(path)
            prefix = path + "/"
            hit.update(w for w in self._counters if w.startswith(prefix))
        for watched in hit:
            self._counters[watched] += 1
        return bool(hit)

    def note_reload(self) -> None:
        """The whole tree was replaced (a state sync): any watched file may have changed."""
        for watched in self._counters:
            self._counters[watched] += 1

    def counters(self) -> dict[str, int]:
        """Every watched path with its counter, sorted by path."""
        return dict(sorted(self._counters.items()))


def render_version(
    starttime: int, clinfo_version: int, vmlist_version: int, counters: ChangeCounters,
    nodename: str,
) -> bytes:
    """`.version`: when this node started (seconds), the versions of `.members` and `.vmlist`,
    every watched path's change counter, then the `kvstore` section (this node, no keys)."""
    doc: dict[str, object] = {
        "starttime": starttime, "clinfo": clinfo_version, "vmlist": vmlist_version,
    }
    doc.update(counters.counters())
    doc["kvstore"] = {nodename: {}}
    return render_json(doc)


# ----------------------------------------------------------------- .clusterlog and .debug


def render_clusterlog(newest: Sequence[LogEntry]) -> bytes:
    """`.clusterlog`: the newest entries (50 at most), newest first."""
    return render_json({"data": [e.to_json() for e in newest[:JSON_ENTRIES]]})


def render_debug(enabled: bool) -> bytes:
    return b"1\n" if enabled else b"0\n"


def parse_debug_write(data: bytes) -> bool | None:
    """What a write to `.debug` asks for: "1" on, "0" off (surrounding whitespace allowed);
    None for anything else (the write fails with EINVAL)."""
    value = data.strip(b" \t\r\n")
    if value == b"1":
        return True
    if value == b"0":
        return False
    return None
