"""The rules a corosync.conf must follow (`validate`), and `check`: text -> usable config.

`validate` points at the line and column of the offending key (its docstring lists the rules).
pmxfs is stricter than corosync on purpose: knet is refused, every node needs `name`, `nodeid`
and `ring0_addr` (pmxfs keys the tree and the ring on them), and timer relations, duplicate
addresses, address families and incompatible quorum options are errors, not log lines.
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
    TOTEM_COUNT_KEYS,
    TOTEM_TIMEOUT_KEYS,
    ClusterConfig,
    DeviceSection,
    NodeEntry,
    key_pos,
    totem_params,
)
from pmxfs.core.conf.update import UpdateResult, validate_update
from pmxfs.core.totem_params import MIN_TIMEOUT_MS

TRANSPORTS = ("udpu", "udp")
QUORUM_PROVIDER = "corosync_votequorum"
MIN_NETMTU = 576
MAX_NETMTU = 65507

_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")
Address: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"


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
            pos = key_pos(m, "transport")
            if t.transport == "knet":
                self.rep.error(pos, "totem.transport: knet is not supported by pmxfs "
                                    "(use udpu, the default, or udp)")
            else:
                self.rep.error(pos, f"totem.transport: unknown transport '{short(t.transport)}' "
                                    "(use udpu or udp)")
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
            elif self.c.transport == "udpu":
                self.rep.warn(key_pos(m, "mcastaddr"),
                              "totem.mcastaddr is ignored with transport udpu")

    # -- nodes

    def nodes(self) -> None:
        c = self.c
        if not c.nodes:
            self.rep.error(c.nodelist_meta.pos, "the nodelist needs at least one node "
                                                "(nodelist { node { name, nodeid, ring0_addr } })")
            return
        ids: dict[int, NodeEntry] = {}
        names: dict[str, NodeEntry] = {}
        addrs: dict[str, NodeEntry] = {}
        family: tuple[int, NodeEntry] | None = None
        for index, n in enumerate(c.nodes, 1):
            m = n.meta
            label = n.name or f"#{index}"
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
            if n.name is None:
                self.rep.error(m.pos, f"node {label}: name is required")
            elif not is_hostname(n.name):
                self.rep.error(key_pos(m, "name"),
                               f"node {label}: name '{short(n.name)}' is not a valid host name")
            elif n.name.lower() in names:
                self.rep.error(key_pos(m, "name"), f"node {label}: name is already used by node "
                                                   f"{self._where(names[n.name.lower()])}")
            else:
                names[n.name.lower()] = n
            if n.quorum_votes is not None and n.quorum_votes > 1000:
                self.rep.error(key_pos(m, "quorum_votes"),
                               f"node {label}: quorum_votes {n.quorum_votes} is out of range "
                               "(0-1000)")
            if n.ring0_addr is None:
                self.rep.error(m.pos, f"node {label}: ring0_addr is required")
                continue
            pos = key_pos(m, "ring0_addr")
            addr = parse_address(n.ring0_addr)
            if addr is None:
                if not is_hostname(n.ring0_addr):
                    self.rep.error(pos, f"node {label}: ring0_addr '{short(n.ring0_addr)}' is "
                                        "neither an IP address nor a valid host name")
                    continue
                key = n.ring0_addr.lower()
            else:
                if addr.is_unspecified or addr.is_multicast:
                    self.rep.error(pos, f"node {label}: ring0_addr {addr} cannot be a node "
                                        "address (unspecified or multicast)")
                    continue
                key = str(addr)
                if family is None:
                    family = (addr.version, n)
                elif family[0] != addr.version:
                    self.rep.error(pos, f"node {label}: ring0_addr {addr} is IPv{addr.version} "
                                        f"but node {self._where(family[1])} uses "
                                        f"IPv{family[0]}; all node addresses must be of one "
                                        "family")
            if key in addrs:
                self.rep.error(pos, f"node {label}: ring0_addr {n.ring0_addr} is already used by "
                                    f"node {self._where(addrs[key])}")
            else:
                addrs[key] = n
        if sum(n.votes for n in c.nodes) < 1:
            self.rep.error(c.nodelist_meta.pos, "the nodes' quorum_votes add up to 0; at least "
                                                "one vote is needed")
        if c.transport == "udp" and family is not None:
            mcast = parse_address(c.mcastaddr)
            if mcast is not None and mcast.version != family[0]:
                where = key_pos(c.totem.meta, "mcastaddr", "transport")
                if c.totem.mcastaddr is None:
                    self.rep.error(where, "transport udp with IPv6 node addresses needs an "
                                          "explicit IPv6 totem.mcastaddr")
                else:
                    self.rep.error(where, f"totem.mcastaddr {mcast} is IPv{mcast.version} but the "
                                          f"node addresses are IPv{family[0]}")

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

    Rules: cluster_name required and well-formed; transport udpu|udp (knet refused); mcastaddr a
    multicast address of the nodes' family; port 1-65535; netmtu 576-65507; at least one node;
    every node has name (RFC 1123 host name, unique), nodeid (> 0, unique) and ring0_addr (IP
    literal or host name, unique, literals all of one family, not unspecified/multicast);
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
