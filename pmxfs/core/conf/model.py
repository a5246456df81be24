"""The typed corosync.conf model: frozen dataclasses, and the defaults that follow from them.

`ClusterConfig` holds a `TotemSection`, the nodelist's `NodeEntry`s, a `QuorumSection` (with its
`DeviceSection` and `DeviceNetSection`) and a `LoggingSection`; content pmxfs does not use is
kept as raw items (`extras`). Source positions, layout (`SectionMeta`), filename and warnings
live in fields excluded from equality (`field(compare=False)`), so two configs are equal when
their content is. A field left None is not set in the file: `ClusterConfig`'s properties,
`default_mcastaddr`, `device_votes`, `totem_params`, `effective_transport`, `effective_link_mode`
and `link_settings` give the values that then apply.

Links (corosync 3 / knet): a node has up to MAX_LINKS addresses, `ring0_addr` .. `ring7_addr`
(`NodeEntry.addrs`); link N's settings come from the `totem.interface {}` whose linknumber is N
(`InterfaceSection`), else from corosync's defaults (`link_settings`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from pmxfs.core.conf.errors import ConfigError, Pos
from pmxfs.core.conf.syntax import RawEntry, RawItem
from pmxfs.core.totem_params import TotemParams, derive_params

DEFAULT_FILENAME = "corosync.conf"
DEFAULT_PORT = 5405
DEFAULT_QNETD_PORT = 5403
DEFAULT_LMS_WINDOW_MS = 10000
MAX_LINKS = 8  # knet: link numbers 0..7
DEFAULT_LINK_PRIORITY = 1  # knet_link_priority
DEFAULT_PONG_COUNT = 2  # knet_pong_count
RING_ADDR_KEYS = tuple(f"ring{n}_addr" for n in range(MAX_LINKS))

Transport: TypeAlias = Literal["knet", "udpu", "udp"]
LinkMode: TypeAlias = Literal["passive", "active"]

AtbNode: TypeAlias = "Literal['lowest', 'highest'] | tuple[int, ...]"

TOTEM_TIMEOUT_KEYS = ("token", "token_retransmit", "hold", "consensus", "join", "merge",
                      "downcheck")
TOTEM_COUNT_KEYS = ("token_retransmits_before_loss_const", "fail_recv_const",
                    "seqno_unchanged_const", "window_size", "max_messages", "miss_count_const")
TOTEM_TIMER_KEYS = (*TOTEM_TIMEOUT_KEYS, "token_coefficient", *TOTEM_COUNT_KEYS)


@dataclass(frozen=True, eq=False)
class SectionMeta:
    """Where a section and its known keys were in the source, and the order of its items.

    `layout` lists item tokens in source order: a known key's name, `+N` for extras[N],
    `@N` for nodes[N] (nodelist only). Never part of equality.
    """

    pos: Pos | None = None  # where the section opens (None: not in the file, or made by code)
    keys: Mapping[str, Pos] = field(default_factory=dict)  # where each known key stands
    layout: tuple[str, ...] = ()


def _meta() -> SectionMeta:
    return SectionMeta()


def key_pos(meta: SectionMeta, *keys: str) -> Pos | None:
    """Where the first of `keys` that the section has stands, else where the section opens."""
    for key in keys:
        if key in meta.keys:
            return meta.keys[key]
    return meta.pos


@dataclass(frozen=True)
class InterfaceSection:
    """`totem { interface {} }`: the settings of one link (None = not set, default applies)."""

    linknumber: int | None = None
    ringnumber: int | None = None  # corosync 2's name; taken as the link number without linknumber
    mcastaddr: str | None = None  # transport udp only
    mcastport: int | None = None
    bindnetaddr: str | None = None
    knet_link_priority: int | None = None
    knet_ping_interval: int | None = None  # ms
    knet_ping_timeout: int | None = None  # ms
    knet_pong_count: int | None = None
    knet_transport: str | None = None  # only udp
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)

    @property
    def link(self) -> int:
        """The link this section configures: linknumber, else ringnumber, else 0 (corosync)."""
        if self.linknumber is not None:
            return self.linknumber
        return 0 if self.ringnumber is None else self.ringnumber


@dataclass(frozen=True)
class TotemSection:
    """`totem {}`: identity, transport and the timers (None = not set, default applies).
    Fields are the file's keys; the timers mean what `TotemParams` says."""

    cluster_name: str | None = None
    config_version: int | None = None
    transport: str | None = None
    mcastaddr: str | None = None
    port: int | None = None
    netmtu: int | None = None
    token: int | None = None
    token_coefficient: int | None = None
    token_retransmit: int | None = None
    token_retransmits_before_loss_const: int | None = None
    hold: int | None = None
    consensus: int | None = None
    join: int | None = None
    merge: int | None = None
    downcheck: int | None = None
    fail_recv_const: int | None = None
    seqno_unchanged_const: int | None = None
    window_size: int | None = None
    max_messages: int | None = None
    miss_count_const: int | None = None
    link_mode: str | None = None  # passive | active | rr (knet)
    interfaces: tuple[InterfaceSection, ...] = ()  # in file order
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)

    def interface(self, link: int) -> InterfaceSection | None:
        """The (first) interface section of link number `link`."""
        return next((i for i in self.interfaces if i.link == link), None)


@dataclass(frozen=True)
class NodeEntry:
    """One `node {}` of the nodelist."""

    name: str | None = None
    nodeid: int | None = None
    ring0_addr: str | None = None
    quorum_votes: int | None = None
    ring1_addr: str | None = None
    ring2_addr: str | None = None
    ring3_addr: str | None = None
    ring4_addr: str | None = None
    ring5_addr: str | None = None
    ring6_addr: str | None = None
    ring7_addr: str | None = None
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)

    @property
    def addrs(self) -> tuple[tuple[int, str], ...]:
        """(link number, ringX_addr as written) for every link the node has, by link number."""
        out = []
        for number, key in enumerate(RING_ADDR_KEYS):
            value = getattr(self, key)
            if value is not None:
                out.append((number, value))
        return tuple(out)

    def addr(self, link: int) -> str | None:
        """The node's address on link number `link` (ringX_addr as written), None without one."""
        return dict(self.addrs).get(link)

    @property
    def node_name(self) -> str | None:
        """The name pmxfs knows the node by: `name`, else (one link only, as Proxmox VE does) a
        ring0_addr that is a host name, not an IP literal."""
        if self.name is not None or len(self.addrs) != 1 or self.ring0_addr is None:
            return self.name
        try:
            ipaddress.ip_address(self.ring0_addr)
        except ValueError:
            return self.ring0_addr
        return None

    @property
    def votes(self) -> int:
        """The node's votes (`quorum_votes`, default 1)."""
        return 1 if self.quorum_votes is None else self.quorum_votes


@dataclass(frozen=True)
class DeviceNetSection:
    """`quorum { device { net {} } }`: where the qnetd server is and how it decides."""

    host: str | None = None
    port: int | None = None
    algorithm: str | None = None
    tie_breaker: str | None = None
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class DeviceSection:
    """`quorum { device {} }`: a quorum device."""

    model: str | None = None
    votes: int | None = None
    net: DeviceNetSection | None = None
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class QuorumSection:
    """`quorum {}`: votequorum options (None = not set)."""

    provider: str | None = None
    expected_votes: int | None = None
    two_node: bool | None = None
    wait_for_all: bool | None = None
    last_man_standing: bool | None = None
    last_man_standing_window: int | None = None
    auto_tie_breaker: bool | None = None
    auto_tie_breaker_node: AtbNode | None = None
    device: DeviceSection | None = None
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class LoggingSection:
    """`logging {}`: accepted and kept as written (logging is the daemon's business)."""

    items: tuple[RawItem, ...] = ()  # the whole section, as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class NodeInfo:
    """A validated node: what the replica and the daemon work with."""

    nodeid: int
    name: str
    addr: str  # ring0_addr
    votes: int  # quorum_votes, default applied


@dataclass(frozen=True)
class ClusterConfig:
    """A whole corosync.conf. Equality ignores positions, layout, filename and warnings."""

    totem: TotemSection = TotemSection()
    nodes: tuple[NodeEntry, ...] = ()
    quorum: QuorumSection = QuorumSection()
    logging: LoggingSection = LoggingSection()
    nodelist_extras: tuple[RawItem, ...] = ()  # items of `nodelist {}` other than nodes
    extras: tuple[RawItem, ...] = ()  # unknown top-level items, kept as written
    nodelist_meta: SectionMeta = field(default_factory=_meta, compare=False)
    meta: SectionMeta = field(default_factory=_meta, compare=False)  # the file's top level
    filename: str = field(default=DEFAULT_FILENAME, compare=False)  # for messages
    warnings: tuple[ConfigError, ...] = field(default=(), compare=False)  # found by `parse`

    @property
    def cluster_name(self) -> str:
        return self.totem.cluster_name or ""

    @property
    def config_version(self) -> int:
        return self.totem.config_version or 0

    @property
    def transport(self) -> str:
        """The transport that runs (`effective_transport`: knet without a transport line)."""
        return effective_transport(self)

    @property
    def mcastaddr(self) -> str:
        """The multicast address for `udp`: totem.mcastaddr, else link 0's interface mcastaddr,
        else derived from the cluster name."""
        iface = self.totem.interface(0)
        explicit = self.totem.mcastaddr or (iface.mcastaddr if iface is not None else None)
        return explicit or default_mcastaddr(self.cluster_name)

    @property
    def port(self) -> int:
        """Link 0's UDP port (the only one of udpu/udp): see `link_port`."""
        return link_port(self, 0)

    @property
    def expected_votes(self) -> int:
        """Configured expected votes: quorum.expected_votes, else nodelist votes + device votes."""
        if self.quorum.expected_votes is not None:
            return self.quorum.expected_votes
        return sum(n.votes for n in self.nodes) + (device_votes(self) or 0)

    def node_infos(self) -> tuple[NodeInfo, ...]:
        """The nodelist as complete records, sorted by node id (config must be valid)."""
        out = []
        for n in self.nodes:
            name = n.node_name
            if n.nodeid is None or name is None or n.ring0_addr is None:
                raise ValueError("node_infos() needs a validated config (a node lacks "
                                 "nodeid, name or ring0_addr)")
            out.append(NodeInfo(n.nodeid, name, n.ring0_addr, n.votes))
        return tuple(sorted(out, key=lambda i: i.nodeid))

    def node_by_name(self, name: str) -> NodeEntry | None:
        for n in self.nodes:
            own = n.node_name
            if own is not None and own.lower() == name.lower():
                return n
        return None

    def node_by_id(self, nodeid: int) -> NodeEntry | None:
        for n in self.nodes:
            if n.nodeid == nodeid:
                return n
        return None


def default_mcastaddr(cluster_name: str) -> str:
    """The `udp` multicast address derived from the cluster name (239.192.0.0/16)."""
    digest = hashlib.sha256(cluster_name.encode("utf-8")).digest()
    return f"239.192.{digest[0]}.{digest[1]}"


def device_votes(config: ClusterConfig) -> int | None:
    """The quorum device's votes, None without a device.

    As votequorum: explicit `votes`, else (nodelist votes all 1, no expected_votes) node count - 1.
    """
    dev = config.quorum.device
    if dev is None:
        return None
    if dev.votes is not None:
        return dev.votes
    if config.quorum.expected_votes is None and all(n.votes == 1 for n in config.nodes):
        return max(1, len(config.nodes) - 1)
    return None


def totem_params(config: ClusterConfig) -> TotemParams:
    """The running totem parameters: the file's values, corosync defaults and derived timers."""
    t = config.totem
    return derive_params(
        len(config.nodes),
        token=t.token,
        token_coefficient=t.token_coefficient,
        token_retransmits_before_loss_const=t.token_retransmits_before_loss_const,
        token_retransmit=t.token_retransmit,
        hold=t.hold,
        consensus=t.consensus,
        join=t.join,
        merge=t.merge,
        downcheck=t.downcheck,
        fail_recv_const=t.fail_recv_const,
        seqno_unchanged_const=t.seqno_unchanged_const,
        window_size=t.window_size,
        max_messages=t.max_messages,
        miss_count_const=t.miss_count_const,
        netmtu=t.netmtu,
    )


@dataclass(frozen=True)
class LinkSettings:
    """One knet link as it runs: its number, UDP port and health-check parameters."""

    number: int  # 0..7
    port: int  # UDP port of this link on every node
    priority: int  # knet_link_priority: passive mode sends on the highest connected one
    ping_interval_ms: int  # a ping to each peer this often
    ping_timeout_ms: int  # no pong for this long: the link to that peer is down
    pong_count: int  # this many pongs in a row: the link to that peer is up


def effective_transport(config: ClusterConfig) -> Transport:
    """The transport that runs: the file's `transport`, knet when there is no such line (as
    corosync 3). Only meaningful for a validated config (knet, udpu or udp)."""
    value = config.totem.transport
    if value == "udpu":
        return "udpu"
    if value == "udp":
        return "udp"
    return "knet"


def effective_link_mode(config: ClusterConfig) -> LinkMode:
    """knet's link mode: passive (default) or active; `rr` runs as active (see validation)."""
    return "passive" if config.totem.link_mode in (None, "passive") else "active"


def link_numbers(config: ClusterConfig) -> tuple[int, ...]:
    """Every link number a node has an address on, sorted (a valid config: the same on all)."""
    return tuple(sorted({number for n in config.nodes for number, _ in n.addrs}))


def link_port(config: ClusterConfig, link: int) -> int:
    """Link `link`'s UDP port: its interface's mcastport, else totem.port (default 5405) + link."""
    iface = config.totem.interface(link)
    if iface is not None and iface.mcastport is not None:
        return iface.mcastport
    base = DEFAULT_PORT if config.totem.port is None else config.totem.port
    return base + link


def link_settings(config: ClusterConfig) -> tuple[LinkSettings, ...]:
    """The settings of every link in use (`link_numbers`), by link number, as corosync derives
    them: priority knet_link_priority (default 1); pong count knet_pong_count (default 2); ping
    timeout knet_ping_timeout, else token / pong count; ping interval knet_ping_interval, else
    token / (2 * pong count) -- token/2 and token/4 by default, `token` being the derived totem
    token timeout (`totem_params`)."""
    token = totem_params(config).token
    out = []
    for number in link_numbers(config):
        iface = config.totem.interface(number) or InterfaceSection(linknumber=number)
        pongs = iface.knet_pong_count or DEFAULT_PONG_COUNT
        timeout = iface.knet_ping_timeout or max(1, token // pongs)
        interval = iface.knet_ping_interval or max(1, token // (2 * pongs))
        priority = (DEFAULT_LINK_PRIORITY if iface.knet_link_priority is None
                    else iface.knet_link_priority)
        out.append(LinkSettings(number, link_port(config, number), priority, interval, timeout,
                                pongs))
    return tuple(out)


def ip_versions(config: ClusterConfig) -> tuple[Literal[4, 6], ...]:
    """The IP versions a host name in ringX_addr resolves to, in the order tried: totem.ip_version
    (ipv4, ipv6, ipv4-6, ipv6-4; corosync 3's default ipv6-4)."""
    value = next((x.value for x in config.totem.extras
                  if isinstance(x, RawEntry) and x.key == "ip_version"), "ipv6-4")
    orders: dict[str, tuple[Literal[4, 6], ...]] = {
        "ipv4": (4,), "ipv6": (6,), "ipv4-6": (4, 6), "ipv6-4": (6, 4)}
    return orders.get(value, (6, 4))


def uses_crypto_options(config: ClusterConfig) -> bool:
    """Whether totem sets secauth or a crypto_* option (pmxfs encrypts regardless)."""
    return any(isinstance(x, RawEntry) and (x.key == "secauth" or x.key.startswith("crypto_"))
               for x in config.totem.extras)
