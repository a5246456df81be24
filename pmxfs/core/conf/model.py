"""The typed corosync.conf model: frozen dataclasses, and the defaults that follow from them.

`ClusterConfig` holds a `TotemSection`, the nodelist's `NodeEntry`s, a `QuorumSection` (with its
`DeviceSection` and `DeviceNetSection`) and a `LoggingSection`; content pmxfs does not use is
kept as raw items (`extras`). Source positions, layout (`SectionMeta`), filename and warnings
live in fields excluded from equality (`field(compare=False)`), so two configs are equal when
their content is. A field left None is not set in the file: `ClusterConfig`'s properties,
`default_mcastaddr`, `device_votes` and `totem_params` give the values that then apply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from pmxfs.core.conf.errors import ConfigError, Pos
from pmxfs.core.conf.syntax import RawItem
from pmxfs.core.totem_params import TotemParams, derive_params

DEFAULT_FILENAME = "corosync.conf"
DEFAULT_PORT = 5405
DEFAULT_QNETD_PORT = 5403
DEFAULT_LMS_WINDOW_MS = 10000

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
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class NodeEntry:
    """One `node {}` of the nodelist."""

    name: str | None = None
    nodeid: int | None = None
    ring0_addr: str | None = None
    quorum_votes: int | None = None
    extras: tuple[RawItem, ...] = ()  # unknown or unused items, kept as written
    meta: SectionMeta = field(default_factory=_meta, compare=False)

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
        """The transport pmxfs runs: `udpu` unless the file says `udp`."""
        return self.totem.transport or "udpu"

    @property
    def mcastaddr(self) -> str:
        """The multicast address for `udp` (explicit, or derived from the cluster name)."""
        return self.totem.mcastaddr or default_mcastaddr(self.cluster_name)

    @property
    def port(self) -> int:
        return DEFAULT_PORT if self.totem.port is None else self.totem.port

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
            if n.nodeid is None or n.name is None or n.ring0_addr is None:
                raise ValueError("node_infos() needs a validated config (a node lacks "
                                 "nodeid, name or ring0_addr)")
            out.append(NodeInfo(n.nodeid, n.name, n.ring0_addr, n.votes))
        return tuple(sorted(out, key=lambda i: i.nodeid))

    def node_by_name(self, name: str) -> NodeEntry | None:
        for n in self.nodes:
            if n.name is not None and n.name.lower() == name.lower():
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
