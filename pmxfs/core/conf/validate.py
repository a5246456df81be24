"""The rules a corosync.conf must follow (`validate`), and `check`: text -> usable config.

`validate` points at the line and column of the offending key (its docstring lists the rules).
The link rules are corosync 3's (link numbers 0-7, the same links on every node, a name on every
node with more than one link, one link for udpu/udp); pmxfs is stricter than corosync on purpose
elsewhere: every node needs `nodeid` and `ring0_addr` and a name (with one link a host name in
ring0_addr serves, as in Proxmox VE), and timer relations, duplicate addresses and ports, address
families and incompatible quorum options are errors, not log lines.
`check` parses, validates and, given the running config, applies `validate_update`: the single
code path for `pmxfs config check` and for writes to /etc/pve/corosync.conf.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TypeAlias

from pmxfs.core.conf.build import DECIMAL_RE, parse
from pmxfs.core.conf.errors import ConfigError, ConfigSyntaxError, Pos, Reporter, by_position, short
from pmxfs.core.conf.model import (
    DEFAULT_FILENAME,
    MAX_LINKS,
    RING_ADDR_KEYS,
    TOTEM_COUNT_KEYS,
    TOTEM_TIMEOUT_KEYS,
    ClusterConfig,
    DeviceSection,
    InterfaceSection,
    NodeEntry,
    effective_transport,
    key_pos,
    link_numbers,
    link_port,
    link_settings,
    totem_params,
)
from pmxfs.core.conf.syntax import RawEntry, RawItem, item_name
from pmxfs.core.conf.update import UpdateResult, validate_update
from pmxfs.core.totem_params import MIN_TIMEOUT_MS

TRANSPORTS = ("knet", "udpu", "udp")
LINK_MODES = ("passive", "active", "rr")
KNET_MAX_NODEID = 65536  # knet: node ids below this
QUORUM_PROVIDER = "corosync_votequorum"
MIN_NETMTU = 576
MAX_NETMTU = 65507

_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
_RING_KEY_RE = re.compile(r"ring([0-9]+)_addr\Z")
Address: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"


def _ring_number(item: RawItem) -> int | None:
    """N of a kept `ringN_addr: ...` entry, None for anything else."""
    match = _RING_KEY_RE.match(item.key) if isinstance(item, RawEntry) else None
    return int(match.group(1)) if match else None


def is_hostname(name: str) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens; the last
    label is not all digits (so a mistyped IPv4 address is not taken for a name)."""
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL_RE.match(label) for label in labels) and not labels[-1].isdigit()


def parse_address(text: str) -> Address | None:
    """An IPv4/IPv6 literal, or None when `text` is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class _Validator:
    """Runs every rule of `validate` over one config, section by section, and reports each
    violation to `rep` at the offending key, so one run finds them all."""

    def __init__(self, config: ClusterConfig) -> None:
        self.c = config  # the config being validated
        self.rep = Reporter(config.filename)

    def run(self) -> None:
        self.totem()
        self.nodes()
        self.quorum()
        self.timers()

    # -- totem

    def totem(self) -> None:
        t = self.c.totem
        m = t.meta
        if "totem" not in self.c.meta.keys and self.c.meta.layout:
            self.rep.error(Pos(1, 1), "the totem section is missing (totem { cluster_name: ... })")
        elif t.cluster_name is None:
            self.rep.error(m.pos, "totem.cluster_name is required")
        elif not _CLUSTER_NAME_RE.match(t.cluster_name):
            self.rep.error(key_pos(m, "cluster_name"),
                           f"totem.cluster_name '{short(t.cluster_name)}' is not valid: use "
                           "letters, digits, '-', '_' and '.' (at most 64 characters)")
        if t.config_version is None:
            self.rep.warn(m.pos, "totem.config_version is not set (taken as 0); an update must "
                                 "set a greater one")
        if t.transport is not None and t.transport not in TRANSPORTS:
            self.rep.error(key_pos(m, "transport"),
                           f"totem.transport: unknown transport '{short(t.transport)}' (use knet, "
                           "the default, udpu or udp)")
        if t.link_mode == "rr":
            self.rep.warn(key_pos(m, "link_mode"), "totem.link_mode: rr (round robin) is not "
                                                   "implemented by pmxfs; it runs as active "
                                                   "(every frame on every connected link)")
        elif t.link_mode is not None and t.link_mode not in LINK_MODES:
            self.rep.error(key_pos(m, "link_mode"), f"totem.link_mode '{short(t.link_mode)}' is "
                                                    "not one of passive, active, rr")
        if effective_transport(self.c) != "knet":
            for item in t.extras:
                if (isinstance(item, RawEntry) and item.key in ("crypto_cipher", "crypto_hash")
                        and item.value != "none"):
                    self.rep.warn(item.pos, f"totem.{item.key}: corosync accepts it with "
                                            "transport knet only; pmxfs encrypts every "
                                            "transport and ignores it")
        if t.port is not None and not 1 <= t.port <= 65535:
            self.rep.error(key_pos(m, "port"), f"totem.port: {t.port} is not a port number "
                                               "(1-65535)")
        if t.netmtu is not None and not MIN_NETMTU <= t.netmtu <= MAX_NETMTU:
            self.rep.error(key_pos(m, "netmtu"), f"totem.netmtu: {t.netmtu} is out of range "
                                                 f"({MIN_NETMTU}-{MAX_NETMTU})")
        if t.mcastaddr is not None:
            addr = parse_address(t.mcastaddr)
            if addr is None or not addr.is_multicast:
                self.rep.error(key_pos(m, "mcastaddr"), f"totem.mcastaddr: '{short(t.mcastaddr)}'"
                                                        " is not a multicast IP address")
            elif effective_transport(self.c) != "udp":
                self.rep.warn(key_pos(m, "mcastaddr"),
                              f"totem.mcastaddr is ignored with transport "
                              f"{effective_transport(self.c)}")

    # -- nodes

    def nodes(self) -> None:
        c = self.c
        if not c.nodes:
            self.rep.error(c.nodelist_meta.pos, "the nodelist needs at least one node "
                                                "(nodelist { node { name, nodeid, ring0_addr } })")
            return
        ids: dict[int, NodeEntry] = {}
        names: dict[str, NodeEntry] = {}
        multi_link = len(link_numbers(c)) > 1
        any_link = bool(link_numbers(c))
        if not any_link:
            self.rep.error(c.nodelist_meta.pos, "no node has a ring0_addr, so there is no link "
                                                "(corosync: No interfaces defined)")
        knet = effective_transport(c) == "knet"
        for index, n in enumerate(c.nodes, 1):
            m = n.meta
            label = n.node_name or f"#{index}"
            if n.nodeid is None:
                self.rep.error(m.pos, f"node {label}: nodeid is required")
            elif n.nodeid == 0:
                self.rep.error(key_pos(m, "nodeid"), f"node {label}: nodeid must be greater than 0")
            elif n.nodeid in ids:
                self.rep.error(key_pos(m, "nodeid"),
                               f"node {label}: nodeid {n.nodeid} is already used by node "
                               f"{self._where(ids[n.nodeid])}")
            else:
                ids[n.nodeid] = n
                if knet and n.nodeid >= KNET_MAX_NODEID:
                    self.rep.error(key_pos(m, "nodeid"),
                                   f"node {label}: nodeid {n.nodeid} is too large for knet "
                                   f"(at most {KNET_MAX_NODEID - 1})")
            name = self._node_name(n, label, multi_link)
            if name is not None:
                if name.lower() in names:
                    self.rep.error(key_pos(m, "name", "ring0_addr"),
                                   f"node {label}: name is already used by node "
                                   f"{self._where(names[name.lower()])}")
                else:
                    names[name.lower()] = n
            if n.quorum_votes is not None and n.quorum_votes > 1000:
                self.rep.error(key_pos(m, "quorum_votes"),
                               f"node {label}: quorum_votes {n.quorum_votes} is out of range "
                               "(0-1000)")
            if n.ring0_addr is None and any_link:
                self.rep.error(m.pos, f"node {label}: ring0_addr is required")
            for item in n.extras:
                number = _ring_number(item)
                if number is not None and number >= MAX_LINKS:
                    self.rep.error(item.pos, f"node {label}: {item_name(item)}: link number "
                                             f"{number} is above the maximum {MAX_LINKS - 1}")
        if sum(n.votes for n in c.nodes) < 1:
            self.rep.error(c.nodelist_meta.pos, "the nodes' quorum_votes add up to 0; at least "
                                                "one vote is needed")
        self.links()

    def _node_name(self, n: NodeEntry, label: str, multi_link: bool) -> str | None:
        """The node's valid name (reporting why it has none), as `NodeEntry.node_name`."""
        m = n.meta
        if n.name is not None:
            if is_hostname(n.name):
                return n.name
            self.rep.error(key_pos(m, "name"),
                           f"node {label}: name '{short(n.name)}' is not a valid host name")
            return None
        if multi_link:
            self.rep.error(m.pos, f"node {label}: name is required with more than one link "
                                  "(corosync: for a multi-link configuration, all nodes must "
                                  "have a 'name' attribute)")
            return None
        if n.ring0_addr is not None and parse_address(n.ring0_addr) is None \
                and is_hostname(n.ring0_addr):
            self.rep.warn(m.pos, f"node {label}: no name; pmxfs names the node after its "
                                 f"ring0_addr {n.ring0_addr} (as Proxmox VE does)")
            return n.ring0_addr
        if n.ring0_addr is not None:
            self.rep.error(m.pos, f"node {label}: name is required")
        return None

    # -- links

    def links(self) -> None:
        """Every node's ringX_addr (per link: literal or host name, unique, one family), the
        same links on every node, one link for udpu/udp, and the interface sections."""
        c = self.c
        transport = effective_transport(c)
        numbers = link_numbers(c)
        families: dict[int, tuple[int, NodeEntry]] = {}
        for number in numbers:
            key = RING_ADDR_KEYS[number]
            addrs: dict[str, NodeEntry] = {}
            for index, n in enumerate(c.nodes, 1):
                value = n.addr(number)
                label = n.node_name or f"#{index}"
                pos = key_pos(n.meta, key)
                if value is None:
                    continue
                if number > 0 and transport != "knet":
                    self.rep.error(pos, f"node {label}: {key}: transport {transport} supports "
                                        "one link only; use transport knet (or leave the "
                                        "transport line out) for redundant links")
                    continue
                addr = parse_address(value)
                if addr is None:
                    if not is_hostname(value):
                        self.rep.error(pos, f"node {label}: {key} '{short(value)}' is neither "
                                            "an IP address nor a valid host name")
                        continue
                    unique = value.lower()
                else:
                    if addr.is_unspecified or addr.is_multicast:
                        self.rep.error(pos, f"node {label}: {key} {addr} cannot be a node "
                                            "address (unspecified or multicast)")
                        continue
                    unique = str(addr)
                    first = families.setdefault(number, (addr.version, n))
                    if first[0] != addr.version:
                        self.rep.error(pos, f"node {label}: {key} {addr} is IPv{addr.version} "
                                            f"but node {self._where(first[1])} uses "
                                            f"IPv{first[0]}; all node addresses of link "
                                            f"{number} must be of one family")
                if unique in addrs:
                    self.rep.error(pos, f"node {label}: {key} {value} is already used by "
                                        f"node {self._where(addrs[unique])}")
                else:
                    addrs[unique] = n
        if len(numbers) > 1:
            self._same_links(numbers)
        self.interfaces(numbers)
        family = families.get(0)
        if transport == "udp" and family is not None:
            mcast = parse_address(c.mcastaddr)
            if mcast is not None and mcast.version != family[0]:
                where = key_pos(c.totem.meta, "mcastaddr", "transport")
                if c.totem.mcastaddr is None and c.totem.interface(0) is None:
                    self.rep.error(where, "transport udp with IPv6 node addresses needs an "
                                          "explicit IPv6 totem.mcastaddr")
                else:
                    self.rep.error(where, f"totem.mcastaddr {mcast} is IPv{mcast.version} but the "
                                          f"node addresses are IPv{family[0]}")

    def _same_links(self, numbers: tuple[int, ...]) -> None:
        for index, n in enumerate(self.c.nodes, 1):
            own = tuple(number for number, _ in n.addrs)
            if own and own != numbers:
                missing = ", ".join(RING_ADDR_KEYS[x] for x in numbers if x not in own)
                self.rep.error(n.meta.pos, f"node {n.node_name or f'#{index}'}: {missing} "
                                           "missing: every node needs an address on every link "
                                           "(corosync: Not all nodes have the same number of "
                                           "links)")

    def interfaces(self, numbers: tuple[int, ...]) -> None:
        """The `totem.interface` sections: link numbers, ports, knet options."""
        c = self.c
        knet = effective_transport(c) == "knet"
        seen: dict[int, Pos | None] = {}
        for iface in c.totem.interfaces:
            m = iface.meta
            number = iface.link
            pos = key_pos(m, "linknumber", "ringnumber")
            if iface.linknumber is None and iface.ringnumber is not None:
                self.rep.warn(key_pos(m, "ringnumber"),
                              f"totem.interface.ringnumber is corosync 2's key: taken as "
                              f"linknumber {iface.ringnumber} (as Proxmox VE does; use "
                              "linknumber)")
            elif iface.ringnumber is not None:
                self.rep.warn(key_pos(m, "ringnumber"), "totem.interface.ringnumber is ignored "
                                                        "(linknumber is set)")
            if number >= MAX_LINKS:
                self.rep.error(pos, f"totem.interface: link number {number} is above the "
                                    f"maximum {MAX_LINKS - 1}")
                continue
            if number in seen:
                first = seen[number]
                line = f" (line {first.line})" if first is not None else ""
                self.rep.error(pos, f"totem.interface: link {number} is configured twice{line}")
                continue
            seen[number] = m.pos
            if numbers and number not in numbers:
                self.rep.warn(pos, f"totem.interface: no node has {RING_ADDR_KEYS[number]}, so "
                                   f"link {number} is not used")
            self._interface_values(iface, knet)
        ports: dict[int, int] = {}
        for number in numbers:
            port = link_port(c, number)
            section = c.totem.interface(number)
            where = key_pos(c.totem.meta, "port") if section is None or section.mcastport is None \
                else key_pos(section.meta, "mcastport")
            if not 1 <= port <= 65535:
                self.rep.error(where, f"link {number}: port {port} is not a port number "
                                      "(1-65535)")
            elif port in ports:
                self.rep.error(where, f"link {number}: port {port} is also link "
                                      f"{ports[port]}'s port; every link needs its own")
            else:
                ports[port] = number

    def _interface_values(self, iface: InterfaceSection, knet: bool) -> None:
        m = iface.meta
        path = f"totem.interface (link {iface.link})"
        if iface.bindnetaddr is not None:
            if parse_address(iface.bindnetaddr) is None:
                self.rep.error(key_pos(m, "bindnetaddr"),
                               f"{path}: bindnetaddr '{short(iface.bindnetaddr)}' is not an IP "
                               "address")
            else:
                self.rep.warn(key_pos(m, "bindnetaddr"),
                              f"{path}: bindnetaddr is not used: each node binds the link to "
                              "its own ringX_addr")
        if iface.mcastaddr is not None:
            addr = parse_address(iface.mcastaddr)
            if addr is None or not addr.is_multicast:
                self.rep.error(key_pos(m, "mcastaddr"), f"{path}: mcastaddr "
                                                        f"'{short(iface.mcastaddr)}' is not a "
                                                        "multicast IP address")
            elif effective_transport(self.c) != "udp" or iface.link != 0:
                self.rep.warn(key_pos(m, "mcastaddr"),
                              f"{path}: mcastaddr is used with transport udp only")
        if iface.mcastport is not None and not 1 <= iface.mcastport <= 65535:
            self.rep.error(key_pos(m, "mcastport"), f"{path}: mcastport {iface.mcastport} is not "
                                                    "a port number (1-65535)")
        priority = iface.knet_link_priority
        if priority is not None:
            if priority > 255:
                self.rep.error(key_pos(m, "knet_link_priority"),
                               f"{path}: knet_link_priority {priority} is out of range (0-255)")
            elif not knet and priority != 1:
                self.rep.error(key_pos(m, "knet_link_priority"),
                               f"{path}: knet_link_priority can only be set with transport knet")
        if iface.knet_transport is not None:
            if iface.knet_transport == "sctp":
                self.rep.error(key_pos(m, "knet_transport"),
                               f"{path}: knet_transport sctp is not supported by pmxfs (use udp)")
            elif iface.knet_transport != "udp":
                self.rep.error(key_pos(m, "knet_transport"),
                               f"{path}: knet_transport '{short(iface.knet_transport)}' is not "
                               "known (use udp)")
        timers = ("knet_ping_interval", "knet_ping_timeout", "knet_pong_count")
        if not knet:
            for key in (*timers, "knet_transport"):
                if getattr(iface, key) is not None:
                    self.rep.warn(key_pos(m, key), f"{path}: {key} is used with transport knet "
                                                   "only")
            return
        settings = next((s for s in link_settings(self.c) if s.number == iface.link), None)
        if settings is not None and settings.ping_interval_ms >= settings.ping_timeout_ms:
            self.rep.error(key_pos(m, "knet_ping_interval", "knet_ping_timeout"),
                           f"{path}: the ping interval ({settings.ping_interval_ms} ms) must be "
                           f"less than the ping timeout ({settings.ping_timeout_ms} ms)")

    @staticmethod
    def _where(n: NodeEntry) -> str:
        line = f" (line {n.meta.pos.line})" if n.meta.pos else ""
        return f"{n.name or n.nodeid}{line}"

    # -- quorum

    def quorum(self) -> None:
        c = self.c
        q = c.quorum
        m = q.meta
        node_count = len(c.nodes)
        node_votes = sum(n.votes for n in c.nodes)
        if q.provider is not None and q.provider != QUORUM_PROVIDER:
            self.rep.error(key_pos(m, "provider"), f"quorum.provider: '{short(q.provider)}' is "
                                                   f"not supported (use {QUORUM_PROVIDER})")
        if q.expected_votes is not None:
            if q.expected_votes < 1:
                self.rep.error(key_pos(m, "expected_votes"),
                               "quorum.expected_votes must be at least 1")
            elif q.expected_votes < node_votes and q.device is None:
                self.rep.warn(key_pos(m, "expected_votes"),
                              f"quorum.expected_votes ({q.expected_votes}) is lower than the "
                              f"nodelist's votes ({node_votes}): two partitions could be quorate")
        if q.last_man_standing_window is not None and q.last_man_standing_window < 1:
            self.rep.error(key_pos(m, "last_man_standing_window"),
                           "quorum.last_man_standing_window must be at least 1 ms")
        two_node = bool(q.two_node)
        lms = bool(q.last_man_standing)
        atb = bool(q.auto_tie_breaker)
        wfa = q.wait_for_all if q.wait_for_all is not None else two_node
        if two_node and node_count != 2:
            self.rep.error(key_pos(m, "two_node"), "quorum.two_node needs exactly two nodes in "
                                                   f"the nodelist (found {node_count})")
        if two_node and atb:
            self.rep.error(key_pos(m, "two_node"), "quorum.two_node cannot be combined with "
                                                   "auto_tie_breaker")
        if lms and any(n.votes != 1 for n in c.nodes):
            self.rep.error(key_pos(m, "last_man_standing"),
                           "quorum.last_man_standing needs every node to have quorum_votes 1")
        if atb and node_votes % 2 == 1 and not wfa:
            if lms:
                self.rep.error(key_pos(m, "auto_tie_breaker"),
                               "quorum.auto_tie_breaker with last_man_standing needs "
                               "wait_for_all when the votes add up to an odd number")
            else:
                self.rep.warn(key_pos(m, "auto_tie_breaker"),
                              "quorum.auto_tie_breaker has no effect with an odd number of votes "
                              "unless wait_for_all is set")
        if q.auto_tie_breaker_node is not None:
            pos = key_pos(m, "auto_tie_breaker_node")
            if not atb:
                self.rep.warn(pos, "quorum.auto_tie_breaker_node has no effect without "
                                   "auto_tie_breaker: 1")
            if isinstance(q.auto_tie_breaker_node, tuple):
                if atb:
                    self.rep.warn(pos, "quorum.auto_tie_breaker_node: a list relies on each "
                                       "node's previous membership (as in votequorum), so after "
                                       "a node was cut off two partitions can each hold a listed "
                                       "node; 'lowest' or 'highest' cannot")
                known = {n.nodeid for n in c.nodes}
                ids = q.auto_tie_breaker_node
                for nid in ids:
                    if nid not in known:
                        self.rep.error(pos, f"quorum.auto_tie_breaker_node: node id {nid} is not "
                                            "in the nodelist")
                if len(set(ids)) != len(ids):
                    self.rep.error(pos, "quorum.auto_tie_breaker_node lists a node id twice")
        if q.device is not None:
            self.device(q.device, two_node=two_node, lms=lms, atb=atb)

    def device(self, d: DeviceSection, *, two_node: bool, lms: bool, atb: bool) -> None:
        c = self.c
        q = c.quorum
        m = d.meta
        for flag, name in ((two_node, "two_node"), (lms, "last_man_standing"),
                           (atb, "auto_tie_breaker")):
            if flag:
                self.rep.error(key_pos(q.meta, name), f"quorum.device cannot be combined with "
                                                      f"{name}")
        if d.model is None:
            self.rep.error(m.pos, "quorum.device.model is required (model: net)")
        elif d.model != "net":
            self.rep.error(key_pos(m, "model"), f"quorum.device.model: '{short(d.model)}' is "
                                                "not supported (use net)")
        if d.votes is not None and d.votes < 1:
            self.rep.error(key_pos(m, "votes"), "quorum.device.votes must be at least 1")
        if d.votes is None:
            if q.expected_votes is not None:
                self.rep.error(m.pos, "quorum.device.votes must be set when "
                                      "quorum.expected_votes is set")
            elif any(n.votes != 1 for n in c.nodes):
                self.rep.error(m.pos, "quorum.device.votes must be set when not every node has "
                                      "quorum_votes 1")
        if d.votes is not None and q.expected_votes is not None and q.expected_votes - d.votes < 2:
            self.rep.error(key_pos(m, "votes"), "quorum.device.votes is too high for "
                                                f"quorum.expected_votes {q.expected_votes}")
        net = d.net
        if net is None:
            if d.model == "net":
                self.rep.error(m.pos, "quorum.device.net { host: ... } is required for model net")
            return
        nm = net.meta
        if net.host is None:
            self.rep.error(nm.pos, "quorum.device.net.host is required")
        elif parse_address(net.host) is None and not is_hostname(net.host):
            self.rep.error(key_pos(nm, "host"), f"quorum.device.net.host '{short(net.host)}' is "
                                                "neither an IP address nor a valid host name")
        if net.port is not None and not 1 <= net.port <= 65535:
            self.rep.error(key_pos(nm, "port"), f"quorum.device.net.port: {net.port} is not a "
                                                "port number (1-65535)")
        if net.algorithm is not None and net.algorithm not in ("ffsplit", "lms"):
            self.rep.error(key_pos(nm, "algorithm"), f"quorum.device.net.algorithm: "
                                                     f"'{short(net.algorithm)}' is not one of "
                                                     "ffsplit, lms")
        tb = net.tie_breaker
        if tb is not None and tb not in ("lowest", "highest"):
            known = {n.nodeid for n in c.nodes}
            if not DECIMAL_RE.match(tb) or int(tb) not in known:
                self.rep.error(key_pos(nm, "tie_breaker"), f"quorum.device.net.tie_breaker: "
                                                           f"'{short(tb)}' is not lowest, "
                                                           "highest or a node id of the nodelist")

    # -- timers (checked on the derived values, as the ring will run them)

    def timers(self) -> None:
        t = self.c.totem
        m = t.meta
        explicit_bad: set[str] = set()
        for key in TOTEM_TIMEOUT_KEYS:
            value = getattr(t, key)
            if value is not None and value < MIN_TIMEOUT_MS:
                explicit_bad.add(key)
                self.rep.error(key_pos(m, key), f"totem.{key}: {value} ms is below the minimum "
                                                f"of {MIN_TIMEOUT_MS} ms")
        for key in TOTEM_COUNT_KEYS:
            value = getattr(t, key)
            if value is not None and value < 1:
                self.rep.error(key_pos(m, key), f"totem.{key} must be at least 1")
        if explicit_bad:
            return
        p = totem_params(self.c)

        def where(*keys: str) -> Pos | None:
            return key_pos(m, *keys, "token")

        for key in TOTEM_TIMEOUT_KEYS:
            value = getattr(p, key)
            if value < MIN_TIMEOUT_MS:
                self.rep.error(where(key), f"totem.{key}: the derived value {value} ms is below "
                                           f"the minimum of {MIN_TIMEOUT_MS} ms")
        if p.consensus < p.join:
            self.rep.error(where("consensus", "join"),
                           f"totem.consensus ({p.consensus} ms) must be at least join "
                           f"({p.join} ms)")
        if p.hold >= p.token:
            self.rep.error(where("hold"), f"totem.hold ({p.hold} ms) must be less than token "
                                          f"({p.token} ms)")
        elif p.hold >= p.token_retransmit:
            self.rep.warn(where("hold"),
                          f"totem.hold ({p.hold} ms) is not below token_retransmit "
                          f"({p.token_retransmit} ms): an idle ring's held token is "
                          f"retransmitted before it moves on")
        if p.token_retransmit >= p.token:
            self.rep.error(where("token_retransmit"),
                           f"totem.token_retransmit ({p.token_retransmit} ms) must be less than "
                           f"token ({p.token} ms)")
        if p.max_messages > p.window_size:
            self.rep.warn(where("max_messages", "window_size"),
                          f"totem.max_messages ({p.max_messages}) is larger than window_size "
                          f"({p.window_size}); window_size limits it")


def _validate(config: ClusterConfig) -> tuple[list[ConfigError], list[ConfigError]]:
    v = _Validator(config)
    v.run()
    return by_position(v.rep.errors), by_position(v.rep.warnings)


def validate(config: ClusterConfig) -> list[ConfigError]:
    """Every rule violation of a parsed config, sorted by position (empty when valid).

    Rules: cluster_name required and well-formed; transport knet|udpu|udp (none: knet);
    link_mode passive|active (rr: a warning, runs as active); mcastaddr a multicast address of
    the nodes' family; port 1-65535; netmtu 576-65507; at least one node; every node has name
    (RFC 1123 host name, unique; with one link a host name in ring0_addr serves, with a warning;
    required with more than one link), nodeid (> 0, unique, < 65536 with knet) and ring0_addr;
    every ringX_addr (X 0-7) an IP literal or host name, unique on its link, the literals of a
    link all of one family, not unspecified/multicast; every node has the same links; udpu/udp
    have one link; `totem.interface` sections: link number 0-7 (linknumber, else ringnumber
    with a warning), one per link, mcastport 1-65535 and every link's port distinct,
    bindnetaddr an IP address (not used: a warning), knet_link_priority 0-255 (knet only),
    knet_transport udp, ping interval below the ping timeout;
    quorum_votes <= 1000, total > 0; provider corosync_votequorum; expected_votes >= 1;
    two_node only with exactly two nodes and not with auto_tie_breaker; last_man_standing only
    with all votes 1; auto_tie_breaker + last_man_standing with an odd vote total needs
    wait_for_all; auto_tie_breaker_node ids in the nodelist; a device (model net, net.host,
    algorithm ffsplit|lms, port, tie_breaker) not combined with two_node, last_man_standing or
    auto_tie_breaker, with votes set when expected_votes is set or votes are uneven, and
    expected_votes - device votes >= 2; every timeout >= 30 ms (explicit and derived), counts
    >= 1, consensus >= join, hold < token (a warning unless below token_retransmit),
    token_retransmit < token.
    """
    return _validate(config)[0]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check`: the config when it is valid, every error and warning otherwise."""

    config: ClusterConfig | None  # None when there is any error
    errors: tuple[ConfigError, ...]
    warnings: tuple[ConfigError, ...]
    update: UpdateResult | None = None  # what replacing the running config would do, if given

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.errors


def check(text: str, filename: str = DEFAULT_FILENAME,
          current: ClusterConfig | None = None) -> CheckResult:
    """Parse and validate `text`; with `current`, also apply `validate_update`. Never raises.

    This is the single code path for `pmxfs config check` and for writes to
    /etc/pve/corosync.conf.
    """
    try:
        config = parse(text, filename)
    except ConfigSyntaxError as exc:
        return CheckResult(None, exc.errors, ())
    errors, warnings = _validate(config)
    all_warnings = tuple(by_position([*config.warnings, *warnings]))
    update = None
    if current is not None and not errors:
        update = validate_update(current, config)
        errors = [*errors, *update.errors]
    if errors:
        return CheckResult(None, tuple(errors), all_warnings, update)
    return CheckResult(config, (), all_warnings, update)
