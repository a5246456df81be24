"""corosync.conf for pmxfs: parse, typed model, validation, update rules and canonical rendering.

How it works
------------
1. `parse(text, filename)` reads corosync.conf syntax line by line into a raw tree
   (`RawSection`/`RawEntry`): `name {` opens a section, `}` on a line of its own closes it,
   `key: value` is an entry (the value is everything after the first colon, trimmed), and a line
   whose first non-blank character is `#` is a comment (as in corosync, `#` later on a line is part
   of the value). A line that fits none of these is reported and skipped, so one pass reports
   every error it can; an unclosed section is reported at the line that opened it.
2. The raw tree is turned into the typed model (`ClusterConfig` with `TotemSection`,
   `NodeEntry`s, `QuorumSection`, `LoggingSection`). Numbers are decimal only, booleans are
   corosync's `yes/no/on/off/1/0`. Keys that real (Proxmox) corosync.conf files carry but pmxfs
   does not use (`version`, `secauth`, `crypto_*`, `ip_version`, `link_mode`, `interface {}`,
   `knet_*`, ...) are kept silently; any other unknown key or section is kept with a warning, as
   corosync does. Everything kept is rendered back.
3. `validate(config)` applies the rules (see `validate`), pointing at the line and column of the
   offending key. `validate_update(current, new)` adds the rules for replacing the running config
   and sorts the differences into run-time changes and changes that need a restart.
4. `render(config)` writes canonical text: two-space indentation, a blank line between top-level
   sections, entries in the order of the parsed file (keys that were not in a file, e.g. set by
   code, in alphabetical order -- the order Proxmox writes). Hence `parse(render(m)) == m`, and
   rendering a parsed comment-free file in that style gives back the same text.

Source positions, layout and warnings live in fields excluded from equality
(`field(compare=False)`), so two configs are equal when their content is.

pmxfs differences from corosync, on purpose:
* `totem.transport` missing means `udpu` (corosync 3 defaults to knet, which pmxfs does not
  implement; `transport: knet` is refused with a message saying so).
* With `transport: udp` and no `mcastaddr`, the address is derived from the cluster name:
  `239.192.H0.H1` where H0, H1 are the first two bytes of SHA-256(cluster_name in UTF-8)
  (`default_mcastaddr`). The port defaults to 5405.
* Every node needs `name`, `nodeid` and `ring0_addr` (pmxfs keys the tree and the ring on them).
* Validation is stricter: timer relations, duplicate keys and sections, address families,
  incompatible quorum options are errors, not log lines.

This module is pure (no file access): the caller reads the file and passes its text.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from pmxfs.core.totem_params import MIN_TIMEOUT_MS, TotemParams, derive_params

DEFAULT_FILENAME = "corosync.conf"
DEFAULT_PORT = 5405
DEFAULT_QNETD_PORT = 5403
DEFAULT_LMS_WINDOW_MS = 10000
TRANSPORTS = ("udpu", "udp")
QUORUM_PROVIDER = "corosync_votequorum"
MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
MIN_NETMTU = 576
MAX_NETMTU = 65507

Severity: TypeAlias = Literal["error", "warning"]
AtbNode: TypeAlias = "Literal['lowest', 'highest'] | tuple[int, ...]"


# --------------------------------------------------------------------------------------------
# Errors and positions


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a key or a section opening in the source text."""

    line: int
    col: int


@dataclass(frozen=True)
class ConfigError:
    """One problem in a config file: `FILE:LINE:COL: reason` (warnings say `warning:` first)."""

    filename: str
    line: int
    col: int
    reason: str
    severity: Severity = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.filename}:{self.line}:{self.col}: {prefix}{self.reason}"


class ConfigSyntaxError(ValueError):
    """`parse` found errors; `errors` holds every one of them (never empty)."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


# --------------------------------------------------------------------------------------------
# Raw tree: what the file literally says (also how unknown content is kept)


@dataclass(frozen=True)
class RawEntry:
    """A `key: value` line kept as text."""

    key: str
    value: str
    pos: Pos | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RawSection:
    """A `name { ... }` block kept as text."""

    name: str
    items: tuple[RawEntry | RawSection, ...] = ()
    pos: Pos | None = field(default=None, compare=False)


RawItem: TypeAlias = "RawEntry | RawSection"


@dataclass(frozen=True, eq=False)
class SectionMeta:
    """Where a section and its known keys were in the source, and the order of its items.

    `layout` lists item tokens in source order: a known key's name, `+N` for extras[N],
    `@N` for nodes[N] (nodelist only). Never part of equality.
    """

    pos: Pos | None = None
    keys: Mapping[str, Pos] = field(default_factory=dict)
    layout: tuple[str, ...] = ()


def _meta() -> SectionMeta:
    return SectionMeta()


# --------------------------------------------------------------------------------------------
# Typed model


@dataclass(frozen=True)
class TotemSection:
    """`totem {}`: identity, transport and the timers (None = not set, default applies)."""

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
    extras: tuple[RawItem, ...] = ()
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class NodeEntry:
    """One `node {}` of the nodelist."""

    name: str | None = None
    nodeid: int | None = None
    ring0_addr: str | None = None
    quorum_votes: int | None = None
    extras: tuple[RawItem, ...] = ()
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
    extras: tuple[RawItem, ...] = ()
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class DeviceSection:
    """`quorum { device {} }`: a quorum device."""

    model: str | None = None
    votes: int | None = None
    net: DeviceNetSection | None = None
    extras: tuple[RawItem, ...] = ()
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
    extras: tuple[RawItem, ...] = ()
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class LoggingSection:
    """`logging {}`: accepted and kept as written (logging is the daemon's business)."""

    items: tuple[RawItem, ...] = ()
    meta: SectionMeta = field(default_factory=_meta, compare=False)


@dataclass(frozen=True)
class NodeInfo:
    """A validated node: what the replica and the daemon work with."""

    nodeid: int
    name: str
    addr: str
    votes: int


@dataclass(frozen=True)
class ClusterConfig:
    """A whole corosync.conf. Equality ignores positions, layout, filename and warnings."""

    totem: TotemSection = TotemSection()
    nodes: tuple[NodeEntry, ...] = ()
    quorum: QuorumSection = QuorumSection()
    logging: LoggingSection = LoggingSection()
    nodelist_extras: tuple[RawItem, ...] = ()
    extras: tuple[RawItem, ...] = ()
    nodelist_meta: SectionMeta = field(default_factory=_meta, compare=False)
    meta: SectionMeta = field(default_factory=_meta, compare=False)
    filename: str = field(default=DEFAULT_FILENAME, compare=False)
    warnings: tuple[ConfigError, ...] = field(default=(), compare=False)

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


# --------------------------------------------------------------------------------------------
# Lexical layer: text -> raw tree

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_DEC_RE = re.compile(r"[0-9]+\Z")
_CTRL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BOOLS = {"yes": True, "on": True, "1": True, "true": True,
          "no": False, "off": False, "0": False, "false": False}


class _Reporter:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []

    def error(self, pos: Pos | None, reason: str) -> None:
        p = pos or Pos(1, 1)
        self.errors.append(ConfigError(self.filename, p.line, p.col, reason))

    def warn(self, pos: Pos | None, reason: str) -> None:
        p = pos or Pos(1, 1)
        self.warnings.append(ConfigError(self.filename, p.line, p.col, reason, "warning"))


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Open:
    def __init__(self, name: str, pos: Pos, valid: bool) -> None:
        self.name = name
        self.pos = pos
        self.valid = valid
        self.items: list[RawItem] = []


def _lex(text: str, rep: _Reporter) -> list[RawItem]:
    root: list[RawItem] = []
    stack: list[_Open] = []

    def close() -> None:
        top = stack.pop()
        if top.valid:
            target = stack[-1].items if stack else root
            target.append(RawSection(top.name, tuple(top.items), top.pos))

    lines = text.split("\n")
    for lineno, raw_line in enumerate(lines, 1):
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        stripped = line.strip()
        if not stripped:
            continue
        col = len(line) - len(line.lstrip()) + 1
        bad = _CTRL_RE.search(line)
        if bad is not None:
            rep.error(Pos(lineno, bad.start() + 1),
                      f"control character U+{ord(bad.group()):04X} is not allowed")
            continue
        if stripped.startswith("#"):
            continue
        pos = Pos(lineno, col)
        target = stack[-1].items if stack else root
        if stripped == "}":
            if not stack:
                rep.error(pos, "unknown section end")
            else:
                close()
        elif stripped.endswith("{") and "}" not in stripped and stripped.count("{") == 1:
            name = stripped[:-1].rstrip()
            valid = bool(_NAME_RE.match(name))
            if not name:
                rep.error(pos, "section name missing before '{'")
            elif not valid:
                rep.error(pos, f"invalid section name '{_short(name)}'")
            stack.append(_Open(name, pos, valid))
        elif "{" in stripped or "}" in stripped:
            rep.error(pos, "'{' and '}' must end or stand on a line of their own "
                           "(one 'key: value' per line)")
        elif ":" in stripped:
            key, _, value = stripped.partition(":")
            key = key.rstrip()
            value = value.strip()
            if not key:
                rep.error(pos, "missing key name before ':'")
            elif not _NAME_RE.match(key):
                rep.error(pos, f"invalid key name '{_short(key)}'")
            elif not value:
                rep.error(pos, f"missing value for '{key}'")
            else:
                target.append(RawEntry(key, value, pos))
        else:
            rep.error(pos, f"expected 'key: value', 'name {{' or '}}', got '{_short(stripped)}'")
    while stack:
        top = stack[-1]
        rep.error(top.pos, f"missing closing brace for section '{top.name}'")
        close()
    return root


# --------------------------------------------------------------------------------------------
# Typed layer: raw tree -> model

_Kind: TypeAlias = Literal["int", "u64", "bool", "str", "atb"]


def _convert(rep: _Reporter, path: str, entry: RawEntry, kind: _Kind) -> tuple[bool, Any]:
    value = entry.value
    if kind in ("int", "u64"):
        if not _DEC_RE.match(value):
            rep.error(entry.pos, f"{path}: '{_short(value)}' is not a decimal number")
            return False, None
        number = int(value)
        limit = MAX_U64 if kind == "u64" else MAX_U32
        if number > limit:
            rep.error(entry.pos, f"{path}: {_short(value)} is out of range (at most {limit})")
            return False, None
        return True, number
    if kind == "bool":
        flag = _BOOLS.get(value.lower())
        if flag is None:
            rep.error(entry.pos, f"{path}: '{_short(value)}' is not a boolean "
                                 "(use yes/no, on/off or 1/0)")
            return False, None
        return True, flag
    if kind == "atb":
        if value in ("lowest", "highest"):
            return True, value
        parts = value.split()
        if parts and all(_DEC_RE.match(p) and 0 < int(p) <= MAX_U32 for p in parts):
            return True, tuple(int(p) for p in parts)
        rep.error(entry.pos, f"{path}: '{_short(value)}' is not 'lowest', 'highest' "
                             "or a space-separated list of node ids")
        return False, None
    return True, value


_IgnoredCheck: TypeAlias = "frozenset[str] | Literal['bool']"


@dataclass
class _Spec:
    path: str
    values: Mapping[str, _Kind]
    sections: Mapping[str, Callable[[RawSection], Any]] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    ignored_prefixes: tuple[str, ...] = ()
    ignored_checks: Mapping[str, _IgnoredCheck] = field(default_factory=dict)
    unknown_warning: Callable[[RawItem], str] | None = None


def _item_name(item: RawItem) -> str:
    return item.key if isinstance(item, RawEntry) else item.name


def _item_pos(item: RawItem) -> Pos | None:
    return item.pos


class _Builder:
    def __init__(self, rep: _Reporter) -> None:
        self.rep = rep

    def collect(
        self, spec: _Spec, section: RawSection | None, items: Iterable[RawItem]
    ) -> tuple[dict[str, Any], list[RawItem], SectionMeta]:
        values: dict[str, Any] = {}
        extras: list[RawItem] = []
        keys: dict[str, Pos] = {}
        layout: list[str] = []
        for item in items:
            name = _item_name(item)
            pos = _item_pos(item)
            path = f"{spec.path}.{name}"
            is_value = name in spec.values
            is_section = name in spec.sections
            if is_value or is_section:
                if name in keys:
                    self.rep.error(pos, f"duplicate {'key' if is_value else 'section'} "
                                        f"'{path}' (first at line {keys[name].line})")
                    continue
                if is_value and isinstance(item, RawSection):
                    self.rep.error(pos, f"'{path}' is a key ('{name}: value'), not a section")
                    continue
                if is_section and isinstance(item, RawEntry):
                    self.rep.error(pos, f"'{path}' is a section ('{name} {{ ... }}'), not a key")
                    continue
                keys[name] = pos or Pos(1, 1)
                layout.append(name)
                if isinstance(item, RawEntry):
                    ok, value = _convert(self.rep, path, item, spec.values[name])
                    if ok:
                        values[name] = value
                else:
                    values[name] = spec.sections[name](item)
                continue
            if name in spec.ignored or name.startswith(spec.ignored_prefixes):
                check = spec.ignored_checks.get(name)
                if check is not None and isinstance(item, RawEntry):
                    self._check_ignored(path, item, check)
            else:
                if spec.unknown_warning is not None:
                    self.rep.warn(pos, spec.unknown_warning(item))
                else:
                    kind = "key" if isinstance(item, RawEntry) else "section"
                    self.rep.warn(pos, f"unknown {kind} '{path}' is kept but not used by pmxfs")
            layout.append(f"+{len(extras)}")
            extras.append(item)
        meta = SectionMeta(section.pos if section else None, keys, tuple(layout))
        return values, extras, meta

    def _check_ignored(self, path: str, entry: RawEntry, check: _IgnoredCheck) -> None:
        if check == "bool":
            if entry.value.lower() not in _BOOLS:
                self.rep.error(entry.pos, f"{path}: '{_short(entry.value)}' is not a boolean "
                                          "(use yes/no, on/off or 1/0)")
        elif entry.value not in check:
            allowed = ", ".join(sorted(check))
            self.rep.error(entry.pos, f"{path}: '{_short(entry.value)}' is not one of {allowed}")

    # -- sections

    def totem(self, section: RawSection) -> TotemSection:
        values, extras, meta = self.collect(_TOTEM_SPEC, section, section.items)
        return TotemSection(**values, extras=tuple(extras), meta=meta)

    def node(self, section: RawSection) -> NodeEntry:
        values, extras, meta = self.collect(_NODE_SPEC, section, section.items)
        return NodeEntry(**values, extras=tuple(extras), meta=meta)

    def quorum(self, section: RawSection) -> QuorumSection:
        spec = _Spec(
            "quorum",
            _QUORUM_VALUES,
            sections={"device": self.device},
            ignored=frozenset({"votes"}),
            unknown_warning=_quorum_unknown,
        )
        values, extras, meta = self.collect(spec, section, section.items)
        return QuorumSection(**values, extras=tuple(extras), meta=meta)

    def device(self, section: RawSection) -> DeviceSection:
        spec = _Spec(
            "quorum.device",
            {"model": "str", "votes": "int"},
            sections={"net": self.device_net},
            ignored=frozenset({"timeout", "sync_timeout", "master_wins", "heuristics"}),
        )
        values, extras, meta = self.collect(spec, section, section.items)
        return DeviceSection(**values, extras=tuple(extras), meta=meta)

    def device_net(self, section: RawSection) -> DeviceNetSection:
        spec = _Spec(
            "quorum.device.net",
            {"host": "str", "port": "int", "algorithm": "str", "tie_breaker": "str"},
            ignored=frozenset({"tls", "connect_timeout", "force_ip_version",
                               "keep_active_partition_tie_breaker"}),
        )
        values, extras, meta = self.collect(spec, section, section.items)
        return DeviceNetSection(**values, extras=tuple(extras), meta=meta)

    def config(self, items: Sequence[RawItem], filename: str) -> ClusterConfig:
        seen: dict[str, Pos] = {}
        layout: list[str] = []
        extras: list[RawItem] = []
        totem = TotemSection()
        quorum = QuorumSection()
        logging = LoggingSection()
        nodes: list[NodeEntry] = []
        nodelist_extras: list[RawItem] = []
        nodelist_meta = SectionMeta()
        for item in items:
            name = _item_name(item)
            if name in _TOP_SECTIONS:
                if isinstance(item, RawEntry):
                    self.rep.error(item.pos,
                                   f"'{name}' is a section ('{name} {{ ... }}'), not a key")
                    continue
                if name in seen:
                    self.rep.error(item.pos, f"duplicate section '{name}' "
                                             f"(first at line {seen[name].line})")
                    continue
                seen[name] = item.pos or Pos(1, 1)
                layout.append(name)
                if name == "totem":
                    totem = self.totem(item)
                elif name == "quorum":
                    quorum = self.quorum(item)
                elif name == "logging":
                    logging = LoggingSection(item.items, SectionMeta(item.pos))
                else:
                    nodes, nodelist_extras, nodelist_meta = self.nodelist(item)
                continue
            kind = "key" if isinstance(item, RawEntry) else "section"
            hint = " (node {} belongs inside nodelist {})" if name == "node" else ""
            self.rep.warn(item.pos, f"unknown top-level {kind} '{name}' is kept but not used "
                                    f"by pmxfs{hint}")
            layout.append(f"+{len(extras)}")
            extras.append(item)
        return ClusterConfig(
            totem=totem,
            nodes=tuple(nodes),
            quorum=quorum,
            logging=logging,
            nodelist_extras=tuple(nodelist_extras),
            extras=tuple(extras),
            nodelist_meta=nodelist_meta,
            meta=SectionMeta(None, dict(seen), tuple(layout)),
            filename=filename,
        )

    def nodelist(self, section: RawSection) -> tuple[list[NodeEntry], list[RawItem], SectionMeta]:
        nodes: list[NodeEntry] = []
        extras: list[RawItem] = []
        layout: list[str] = []
        for item in section.items:
            if isinstance(item, RawSection) and item.name == "node":
                layout.append(f"@{len(nodes)}")
                nodes.append(self.node(item))
                continue
            if isinstance(item, RawEntry) and item.key == "node":
                self.rep.error(item.pos, "'nodelist.node' is a section ('node { ... }'), not a key")
                continue
            kind = "key" if isinstance(item, RawEntry) else "section"
            self.rep.warn(item.pos, f"unknown {kind} 'nodelist.{_item_name(item)}' is kept but "
                                    "not used by pmxfs")
            layout.append(f"+{len(extras)}")
            extras.append(item)
        return nodes, extras, SectionMeta(section.pos, {}, tuple(layout))


_TOP_SECTIONS = frozenset({"totem", "nodelist", "quorum", "logging"})

_TOTEM_TIMEOUT_KEYS = ("token", "token_retransmit", "hold", "consensus", "join", "merge",
                       "downcheck")
_TOTEM_COUNT_KEYS = ("token_retransmits_before_loss_const", "fail_recv_const",
                     "seqno_unchanged_const", "window_size", "max_messages", "miss_count_const")
_TOTEM_TIMER_KEYS = (*_TOTEM_TIMEOUT_KEYS, "token_coefficient", *_TOTEM_COUNT_KEYS)

_TOTEM_SPEC = _Spec(
    "totem",
    {
        "cluster_name": "str",
        "config_version": "u64",
        "transport": "str",
        "mcastaddr": "str",
        "port": "int",
        "netmtu": "int",
        **{k: "int" for k in _TOTEM_TIMER_KEYS},
    },
    ignored=frozenset({
        "version", "secauth", "crypto_cipher", "crypto_hash", "crypto_model", "ip_version",
        "link_mode", "keyfile", "key", "clear_node_high_bit", "threads", "rrp_mode", "interface",
        "nodeid", "vsftype", "token_warning", "send_join", "max_network_delay",
        "heartbeat_failures_allowed", "cancel_token_hold_on_retransmit", "block_unlisted_ips",
        "rrp_problem_count_timeout", "rrp_problem_count_threshold", "rrp_token_expired_timeout",
        "rrp_autorecovery_check_timeout",
    }),
    ignored_prefixes=("knet_", "crypto_"),
    ignored_checks={
        "version": frozenset({"2"}),
        "secauth": "bool",
        "crypto_cipher": frozenset({"none", "aes256", "aes192", "aes128"}),
        "crypto_hash": frozenset({"none", "md5", "sha1", "sha256", "sha384", "sha512"}),
        "ip_version": frozenset({"ipv4", "ipv6", "ipv4-6", "ipv6-4"}),
        "link_mode": frozenset({"passive", "active", "rr"}),
    },
)


def _node_unknown(item: RawItem) -> str:
    name = _item_name(item)
    if re.fullmatch(r"ring[1-7]_addr", name):
        return f"'nodelist.node.{name}' is kept but ignored: pmxfs runs a single ring (ring0_addr)"
    kind = "key" if isinstance(item, RawEntry) else "section"
    return f"unknown {kind} 'nodelist.node.{name}' is kept but not used by pmxfs"


_NODE_SPEC = _Spec(
    "nodelist.node",
    {"name": "str", "nodeid": "int", "ring0_addr": "str", "quorum_votes": "int"},
    unknown_warning=_node_unknown,
)

_QUORUM_VALUES: Mapping[str, _Kind] = {
    "provider": "str",
    "expected_votes": "int",
    "two_node": "bool",
    "wait_for_all": "bool",
    "last_man_standing": "bool",
    "last_man_standing_window": "int",
    "auto_tie_breaker": "bool",
    "auto_tie_breaker_node": "atb",
}


def _quorum_unknown(item: RawItem) -> str:
    name = _item_name(item)
    if name in ("allow_downscale", "expected_votes_tracking"):
        return f"'quorum.{name}' is not supported by pmxfs and is ignored"
    kind = "key" if isinstance(item, RawEntry) else "section"
    return f"unknown {kind} 'quorum.{name}' is kept but not used by pmxfs"


def parse(text: str, filename: str = DEFAULT_FILENAME) -> ClusterConfig:
    """Parse corosync.conf text into the model.

    Raises `ConfigSyntaxError` with every syntax and value error found. Warnings (unknown keys,
    kept) are in the result's `warnings`. Does not validate: see `validate` and `check`.
    """
    rep = _Reporter(filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    items = _lex(text, rep)
    config = _Builder(rep).config(items, filename)
    if rep.errors:
        raise ConfigSyntaxError(_sorted(rep.errors))
    return _with_warnings(config, rep.warnings)


def _with_warnings(config: ClusterConfig, warnings: Sequence[ConfigError]) -> ClusterConfig:
    return replace(config, warnings=tuple(_sorted(warnings)))


def _sorted(errors: Iterable[ConfigError]) -> list[ConfigError]:
    return sorted(errors, key=lambda e: (e.line, e.col))


# --------------------------------------------------------------------------------------------
# Validation

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
    def __init__(self, config: ClusterConfig) -> None:
        self.c = config
        self.rep = _Reporter(config.filename)

    @staticmethod
    def at(meta: SectionMeta, *keys: str) -> Pos | None:
        for key in keys:
            if key in meta.keys:
                return meta.keys[key]
        return meta.pos

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
            self.rep.error(self.at(m, "cluster_name"),
                           f"totem.cluster_name '{_short(t.cluster_name)}' is not valid: use "
                           "letters, digits, '-', '_' and '.' (at most 64 characters)")
        if t.config_version is None:
            self.rep.warn(m.pos, "totem.config_version is not set (taken as 0); an update must "
                                 "set a greater one")
        if t.transport is not None and t.transport not in TRANSPORTS:
            pos = self.at(m, "transport")
            if t.transport == "knet":
                self.rep.error(pos, "totem.transport: knet is not supported by pmxfs "
                                    "(use udpu, the default, or udp)")
            else:
                self.rep.error(pos, f"totem.transport: unknown transport '{_short(t.transport)}' "
                                    "(use udpu or udp)")
        if t.port is not None and not 1 <= t.port <= 65535:
            self.rep.error(self.at(m, "port"), f"totem.port: {t.port} is not a port number "
                                               "(1-65535)")
        if t.netmtu is not None and not MIN_NETMTU <= t.netmtu <= MAX_NETMTU:
            self.rep.error(self.at(m, "netmtu"), f"totem.netmtu: {t.netmtu} is out of range "
                                                 f"({MIN_NETMTU}-{MAX_NETMTU})")
        if t.mcastaddr is not None:
            addr = parse_address(t.mcastaddr)
            if addr is None or not addr.is_multicast:
                self.rep.error(self.at(m, "mcastaddr"), f"totem.mcastaddr: '{_short(t.mcastaddr)}'"
                                                        " is not a multicast IP address")
            elif self.c.transport == "udpu":
                self.rep.warn(self.at(m, "mcastaddr"),
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
                self.rep.error(self.at(m, "nodeid"), f"node {label}: nodeid must be greater than 0")
            elif n.nodeid in ids:
                self.rep.error(self.at(m, "nodeid"),
                               f"node {label}: nodeid {n.nodeid} is already used by node "
                               f"{self._where(ids[n.nodeid])}")
            else:
                ids[n.nodeid] = n
            if n.name is None:
                self.rep.error(m.pos, f"node {label}: name is required")
            elif not is_hostname(n.name):
                self.rep.error(self.at(m, "name"),
                               f"node {label}: name '{_short(n.name)}' is not a valid host name")
            elif n.name.lower() in names:
                self.rep.error(self.at(m, "name"), f"node {label}: name is already used by node "
                                                   f"{self._where(names[n.name.lower()])}")
            else:
                names[n.name.lower()] = n
            if n.quorum_votes is not None and n.quorum_votes > 1000:
                self.rep.error(self.at(m, "quorum_votes"),
                               f"node {label}: quorum_votes {n.quorum_votes} is out of range "
                               "(0-1000)")
            if n.ring0_addr is None:
                self.rep.error(m.pos, f"node {label}: ring0_addr is required")
                continue
            pos = self.at(m, "ring0_addr")
            addr = parse_address(n.ring0_addr)
            if addr is None:
                if not is_hostname(n.ring0_addr):
                    self.rep.error(pos, f"node {label}: ring0_addr '{_short(n.ring0_addr)}' is "
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
                where = self.at(c.totem.meta, "mcastaddr", "transport")
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
            self.rep.error(self.at(m, "provider"), f"quorum.provider: '{_short(q.provider)}' is "
                                                   f"not supported (use {QUORUM_PROVIDER})")
        if q.expected_votes is not None:
            if q.expected_votes < 1:
                self.rep.error(self.at(m, "expected_votes"),
                               "quorum.expected_votes must be at least 1")
            elif q.expected_votes < node_votes and q.device is None:
                self.rep.warn(self.at(m, "expected_votes"),
                              f"quorum.expected_votes ({q.expected_votes}) is lower than the "
                              f"nodelist's votes ({node_votes}): two partitions could be quorate")
        if q.last_man_standing_window is not None and q.last_man_standing_window < 1:
            self.rep.error(self.at(m, "last_man_standing_window"),
                           "quorum.last_man_standing_window must be at least 1 ms")
        two_node = bool(q.two_node)
        lms = bool(q.last_man_standing)
        atb = bool(q.auto_tie_breaker)
        wfa = q.wait_for_all if q.wait_for_all is not None else two_node
        if two_node and node_count != 2:
            self.rep.error(self.at(m, "two_node"), "quorum.two_node needs exactly two nodes in "
                                                   f"the nodelist (found {node_count})")
        if two_node and atb:
            self.rep.error(self.at(m, "two_node"), "quorum.two_node cannot be combined with "
                                                   "auto_tie_breaker")
        if lms and any(n.votes != 1 for n in c.nodes):
            self.rep.error(self.at(m, "last_man_standing"),
                           "quorum.last_man_standing needs every node to have quorum_votes 1")
        if atb and node_votes % 2 == 1 and not wfa:
            if lms:
                self.rep.error(self.at(m, "auto_tie_breaker"),
                               "quorum.auto_tie_breaker with last_man_standing needs "
                               "wait_for_all when the votes add up to an odd number")
            else:
                self.rep.warn(self.at(m, "auto_tie_breaker"),
                              "quorum.auto_tie_breaker has no effect with an odd number of votes "
                              "unless wait_for_all is set")
        if q.auto_tie_breaker_node is not None:
            pos = self.at(m, "auto_tie_breaker_node")
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
                self.rep.error(self.at(q.meta, name), f"quorum.device cannot be combined with "
                                                      f"{name}")
        if d.model is None:
            self.rep.error(m.pos, "quorum.device.model is required (model: net)")
        elif d.model != "net":
            self.rep.error(self.at(m, "model"), f"quorum.device.model: '{_short(d.model)}' is "
                                                "not supported (use net)")
        if d.votes is not None and d.votes < 1:
            self.rep.error(self.at(m, "votes"), "quorum.device.votes must be at least 1")
        if d.votes is None:
            if q.expected_votes is not None:
                self.rep.error(m.pos, "quorum.device.votes must be set when "
                                      "quorum.expected_votes is set")
            elif any(n.votes != 1 for n in c.nodes):
                self.rep.error(m.pos, "quorum.device.votes must be set when not every node has "
                                      "quorum_votes 1")
        if d.votes is not None and q.expected_votes is not None and q.expected_votes - d.votes < 2:
            self.rep.error(self.at(m, "votes"), "quorum.device.votes is too high for "
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
            self.rep.error(self.at(nm, "host"), f"quorum.device.net.host '{_short(net.host)}' is "
                                                "neither an IP address nor a valid host name")
        if net.port is not None and not 1 <= net.port <= 65535:
            self.rep.error(self.at(nm, "port"), f"quorum.device.net.port: {net.port} is not a "
                                                "port number (1-65535)")
        if net.algorithm is not None and net.algorithm not in ("ffsplit", "lms"):
            self.rep.error(self.at(nm, "algorithm"), f"quorum.device.net.algorithm: "
                                                     f"'{_short(net.algorithm)}' is not one of "
                                                     "ffsplit, lms")
        tb = net.tie_breaker
        if tb is not None and tb not in ("lowest", "highest"):
            known = {n.nodeid for n in c.nodes}
            if not _DEC_RE.match(tb) or int(tb) not in known:
                self.rep.error(self.at(nm, "tie_breaker"), f"quorum.device.net.tie_breaker: "
                                                           f"'{_short(tb)}' is not lowest, "
                                                           "highest or a node id of the nodelist")

    # -- timers (checked on the derived values, as the ring will run them)

    def timers(self) -> None:
        t = self.c.totem
        m = t.meta
        explicit_bad: set[str] = set()
        for key in _TOTEM_TIMEOUT_KEYS:
            value = getattr(t, key)
            if value is not None and value < MIN_TIMEOUT_MS:
                explicit_bad.add(key)
                self.rep.error(self.at(m, key), f"totem.{key}: {value} ms is below the minimum "
                                                f"of {MIN_TIMEOUT_MS} ms")
        for key in _TOTEM_COUNT_KEYS:
            value = getattr(t, key)
            if value is not None and value < 1:
                self.rep.error(self.at(m, key), f"totem.{key} must be at least 1")
        if explicit_bad:
            return
        p = totem_params(self.c)

        def where(*keys: str) -> Pos | None:
            return self.at(m, *keys, "token")

        for key in _TOTEM_TIMEOUT_KEYS:
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
    return _sorted(v.rep.errors), _sorted(v.rep.warnings)


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
    >= 1, consensus >= join, hold < token, token_retransmit < token.
    """
    return _validate(config)[0]


# --------------------------------------------------------------------------------------------
# Updates of a running cluster


@dataclass(frozen=True)
class Change:
    """One difference between the running config and a new one."""

    key: str
    description: str
    runtime: bool


@dataclass(frozen=True)
class UpdateResult:
    """What `validate_update` found: refusals, and the changes sorted by when they apply."""

    errors: tuple[ConfigError, ...]
    changes: tuple[Change, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def runtime_changes(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.runtime)

    @property
    def restart_changes(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if not c.runtime)

    @property
    def needs_restart(self) -> bool:
        return any(not c.runtime for c in self.changes)


_RUNTIME_QUORUM_KEYS = ("expected_votes", "two_node")
_RESTART_QUORUM_KEYS = ("provider", "wait_for_all", "last_man_standing",
                        "last_man_standing_window", "auto_tie_breaker", "auto_tie_breaker_node")


def _show(value: object) -> str:
    if value is None:
        return "(default)"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def validate_update(current: ClusterConfig, new: ClusterConfig) -> UpdateResult:
    """Rules for replacing the running `current` config with `new` (both already valid).

    Refused: config_version not greater than the current one; a different cluster_name; a
    different transport. Run-time changes: nodes added or removed, a node's votes, expected_votes,
    two_node, totem timers and counts, logging. Everything else (node names and addresses,
    netmtu, mcastaddr, port, wait_for_all, last_man_standing(_window), auto_tie_breaker(_node),
    quorum device, unknown/kept keys) needs a restart of pmxfs on every node.
    """
    rep = _Reporter(new.filename)
    tm = new.totem.meta
    if new.config_version <= current.config_version:
        rep.error(_Validator.at(tm, "config_version"),
                  f"totem.config_version must be greater than the current {current.config_version}"
                  f" (got {new.config_version})")
    if new.cluster_name != current.cluster_name:
        rep.error(_Validator.at(tm, "cluster_name"),
                  f"totem.cluster_name cannot change on a running cluster (current "
                  f"'{current.cluster_name}', new '{new.cluster_name}')")
    if new.transport != current.transport:
        rep.error(_Validator.at(tm, "transport"),
                  f"totem.transport cannot change on a running cluster (current "
                  f"{current.transport}, new {new.transport})")
    changes: list[Change] = []

    def diff(key: str, old: object, new_value: object, runtime: bool) -> None:
        if old != new_value:
            changes.append(Change(key, f"{key}: {_show(old)} -> {_show(new_value)}", runtime))

    ct, nt = current.totem, new.totem
    for key in _TOTEM_TIMER_KEYS:
        diff(f"totem.{key}", getattr(ct, key), getattr(nt, key), True)
    for key in ("netmtu", "mcastaddr", "port"):
        diff(f"totem.{key}", getattr(ct, key), getattr(nt, key), False)
    if ct.extras != nt.extras:
        changes.append(Change("totem", "totem: other (kept) keys changed", False))
    _diff_nodes(current, new, changes)
    if current.nodelist_extras != new.nodelist_extras:
        changes.append(Change("nodelist", "nodelist: other (kept) keys changed", False))
    cq, nq = current.quorum, new.quorum
    for key in _RUNTIME_QUORUM_KEYS:
        diff(f"quorum.{key}", getattr(cq, key), getattr(nq, key), True)
    for key in _RESTART_QUORUM_KEYS:
        diff(f"quorum.{key}", getattr(cq, key), getattr(nq, key), False)
    if cq.device != nq.device:
        changes.append(Change("quorum.device", "quorum.device changed", False))
    if cq.extras != nq.extras:
        changes.append(Change("quorum", "quorum: other (kept) keys changed", False))
    if current.logging != new.logging:
        changes.append(Change("logging", "logging changed", True))
    if current.extras != new.extras:
        changes.append(Change("extras", "other (kept) top-level sections changed", False))
    return UpdateResult(tuple(_sorted(rep.errors)), tuple(changes))


def _diff_nodes(current: ClusterConfig, new: ClusterConfig, changes: list[Change]) -> None:
    old_nodes = {n.nodeid: n for n in current.nodes}
    new_nodes = {n.nodeid: n for n in new.nodes}
    for nid in sorted(set(old_nodes) | set(new_nodes), key=lambda i: -1 if i is None else i):
        o, n = old_nodes.get(nid), new_nodes.get(nid)
        label = f"node {nid}"
        if o is None and n is not None:
            changes.append(Change(f"nodelist.{nid}", f"nodelist: {label} ({n.name}) added", True))
        elif n is None and o is not None:
            changes.append(Change(f"nodelist.{nid}", f"nodelist: {label} ({o.name}) removed",
                                  True))
        elif o is not None and n is not None:
            if o.votes != n.votes:
                changes.append(Change(f"nodelist.{nid}.quorum_votes",
                                      f"nodelist: {label} quorum_votes {o.votes} -> {n.votes}",
                                      True))
            for key in ("name", "ring0_addr"):
                if getattr(o, key) != getattr(n, key):
                    changes.append(Change(f"nodelist.{nid}.{key}",
                                          f"nodelist: {label} {key} {getattr(o, key)} -> "
                                          f"{getattr(n, key)}", False))
            if o.extras != n.extras:
                changes.append(Change(f"nodelist.{nid}", f"nodelist: {label} other (kept) keys "
                                                         "changed", False))


# --------------------------------------------------------------------------------------------
# One entry point for the CLI and the file system


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check`: the config when it is valid, every error and warning otherwise."""

    config: ClusterConfig | None
    errors: tuple[ConfigError, ...]
    warnings: tuple[ConfigError, ...]
    update: UpdateResult | None = None

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
    all_warnings = tuple(_sorted([*config.warnings, *warnings]))
    update = None
    if current is not None and not errors:
        update = validate_update(current, config)
        errors = [*errors, *update.errors]
    if errors:
        return CheckResult(None, tuple(errors), all_warnings, update)
    return CheckResult(config, (), all_warnings, update)


# --------------------------------------------------------------------------------------------
# Rendering

_INDENT = "  "


@dataclass(frozen=True)
class _Item:
    name: str
    token: str
    lines: tuple[str, ...]


def _entry(key: str, value: object) -> _Item:
    return _Item(key, key, (f"{key}: {_show(value)}",))


def _block(name: str, inner: Sequence[str]) -> tuple[str, ...]:
    return (f"{name} {{", *(_INDENT + line for line in inner), "}")


def _raw_lines(item: RawItem) -> tuple[str, ...]:
    if isinstance(item, RawEntry):
        return (f"{item.key}: {item.value}",)
    inner = [line for sub in item.items for line in _raw_lines(sub)]
    return _block(item.name, inner)


def _ordered(items: Sequence[_Item], layout: Sequence[str]) -> list[_Item]:
    """Items in source order (`layout`); the others after them: known keys alphabetically,
    merged with the kept extras, which never change their relative order."""
    index = {token: i for i, token in enumerate(layout)}
    placed = sorted((it for it in items if it.token in index), key=lambda it: index[it.token])
    known = sorted((it for it in items if it.token not in index and not it.token.startswith("+")),
                   key=lambda it: it.name)
    kept = [it for it in items if it.token not in index and it.token.startswith("+")]
    merged: list[_Item] = []
    while known and kept:
        merged.append(known.pop(0) if known[0].name <= kept[0].name else kept.pop(0))
    return placed + merged + known + kept


def _extras_items(extras: Sequence[RawItem]) -> list[_Item]:
    return [_Item(_item_name(x), f"+{i}", _raw_lines(x)) for i, x in enumerate(extras)]


def _fields_items(obj: object, keys: Iterable[str]) -> list[_Item]:
    out = []
    for key in keys:
        value = getattr(obj, key)
        if value is not None:
            out.append(_entry(key, value))
    return out


def _section_lines(items: Sequence[_Item], meta: SectionMeta) -> list[str]:
    return [line for it in _ordered(items, meta.layout) for line in it.lines]


def _render_net(net: DeviceNetSection) -> tuple[str, ...]:
    items = _fields_items(net, ("host", "port", "algorithm", "tie_breaker"))
    items += _extras_items(net.extras)
    return _block("net", _section_lines(items, net.meta))


def _render_device(dev: DeviceSection) -> tuple[str, ...]:
    items = _fields_items(dev, ("model", "votes"))
    if dev.net is not None:
        items.append(_Item("net", "net", _render_net(dev.net)))
    items += _extras_items(dev.extras)
    return _block("device", _section_lines(items, dev.meta))


def _totem_items(t: TotemSection) -> list[_Item]:
    keys = [k for k in _TOTEM_SPEC.values]
    return _fields_items(t, keys) + _extras_items(t.extras)


def _node_lines(n: NodeEntry) -> tuple[str, ...]:
    items = _fields_items(n, ("name", "nodeid", "quorum_votes", "ring0_addr"))
    items += _extras_items(n.extras)
    return _block("node", _section_lines(items, n.meta))


def render(config: ClusterConfig) -> str:
    """Canonical corosync.conf text for `config` (see the module comment for the layout)."""
    top: list[_Item] = []
    totem = _totem_items(config.totem)
    if totem:
        top.append(_Item("totem", "totem",
                         _block("totem", _section_lines(totem, config.totem.meta))))
    if config.nodes or config.nodelist_extras:
        nl_items = [_Item("node", f"@{i}", _node_lines(n)) for i, n in enumerate(config.nodes)]
        nl_items += _extras_items(config.nodelist_extras)
        # nodes keep their order; extras without a layout go after the nodes
        index = {tok: i for i, tok in enumerate(config.nodelist_meta.layout)}
        nl_sorted = sorted(
            enumerate(nl_items),
            key=lambda p: (p[1].token not in index, index.get(p[1].token, 0),
                           p[1].token.startswith("+"), p[0]),
        )
        inner = [line for _, it in nl_sorted for line in it.lines]
        top.append(_Item("nodelist", "nodelist", _block("nodelist", inner)))
    q = config.quorum
    q_items = _fields_items(q, tuple(_QUORUM_VALUES))
    if q.device is not None:
        q_items.append(_Item("device", "device", _render_device(q.device)))
    q_items += _extras_items(q.extras)
    if q_items:
        top.append(_Item("quorum", "quorum", _block("quorum", _section_lines(q_items, q.meta))))
    if config.logging.items:
        inner = [line for x in config.logging.items for line in _raw_lines(x)]
        top.append(_Item("logging", "logging", _block("logging", inner)))
    top += _extras_items(config.extras)
    blocks = ["\n".join(it.lines) for it in _ordered(top, config.meta.layout)]
    return "\n\n".join(blocks) + "\n" if blocks else ""
