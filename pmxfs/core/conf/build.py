"""corosync.conf raw tree -> typed model, and `parse` (text -> model).

Each section has a `_Spec`: its known keys and how their values read (numbers are decimal only,
booleans are corosync's `yes/no/on/off/1/0`), its known subsections (`repeated` ones, such as
`totem.interface`, may appear more than once), and the keys that real (Proxmox) corosync.conf
files carry but pmxfs does not use (`version`, `secauth`, `crypto_*`, `ip_version`, ...), which are
kept silently; any other unknown key or section -- a knet option pmxfs does not implement
included, named as such -- is kept with a warning, as corosync does. Everything kept is rendered
back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from pmxfs.core.conf.errors import ConfigError, ConfigSyntaxError, Pos, Reporter, by_position, short
from pmxfs.core.conf.model import (
    DEFAULT_FILENAME,
    RING_ADDR_KEYS,
    TOTEM_TIMER_KEYS,
    ClusterConfig,
    DeviceNetSection,
    DeviceSection,
    InterfaceSection,
    LoggingSection,
    NodeEntry,
    QuorumSection,
    SectionMeta,
    TotemSection,
)
from pmxfs.core.conf.syntax import RawEntry, RawItem, RawSection, item_name, lex

MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1

DECIMAL_RE = re.compile(r"[0-9]+\Z")
_BOOLS = {"yes": True, "on": True, "1": True, "true": True,
          "no": False, "off": False, "0": False, "false": False}

_Kind: TypeAlias = Literal["int", "u64", "bool", "str", "atb"]


def _convert(rep: Reporter, path: str, entry: RawEntry, kind: _Kind) -> tuple[bool, Any]:
    value = entry.value
    if kind in ("int", "u64"):
        if not DECIMAL_RE.match(value):
            rep.error(entry.pos, f"{path}: '{short(value)}' is not a decimal number")
            return False, None
        number = int(value)
        limit = MAX_U64 if kind == "u64" else MAX_U32
        if number > limit:
            rep.error(entry.pos, f"{path}: {short(value)} is out of range (at most {limit})")
            return False, None
        return True, number
    if kind == "bool":
        flag = _BOOLS.get(value.lower())
        if flag is None:
            rep.error(entry.pos, f"{path}: '{short(value)}' is not a boolean "
                                 "(use yes/no, on/off or 1/0)")
            return False, None
        return True, flag
    if kind == "atb":
        if value in ("lowest", "highest"):
            return True, value
        parts = value.split()
        if parts and all(DECIMAL_RE.match(p) and 0 < int(p) <= MAX_U32 for p in parts):
            return True, tuple(int(p) for p in parts)
        rep.error(entry.pos, f"{path}: '{short(value)}' is not 'lowest', 'highest' "
                             "or a space-separated list of node ids")
        return False, None
    return True, value


_IgnoredCheck: TypeAlias = "frozenset[str] | Literal['bool']"


@dataclass
class _Spec:
    """What one section may contain and how each part is read."""

    path: str  # the section's dotted path, for messages ("quorum.device")
    values: Mapping[str, _Kind]  # known keys and how their values read
    sections: Mapping[str, Callable[[RawSection], Any]] = field(default_factory=dict)  # builders
    # sections that may repeat: name -> (the model's field, holding a tuple; the builder)
    repeated: Mapping[str, tuple[str, Callable[[RawSection], Any]]] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()  # known, unused keys/sections: kept without a warning
    ignored_prefixes: tuple[str, ...] = ()  # the same, by name prefix
    ignored_checks: Mapping[str, _IgnoredCheck] = field(default_factory=dict)  # values they allow
    unknown_warning: Callable[[RawItem], str] | None = None  # the warning for anything else


def _item_pos(item: RawItem) -> Pos | None:
    return item.pos


class _Builder:
    """Builds the typed sections from the raw tree, one `_Spec` per section, reporting every
    problem to `rep` and carrying on, so one pass finds them all."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep

    def collect(
        self, spec: _Spec, section: RawSection | None, items: Iterable[RawItem]
    ) -> tuple[dict[str, Any], list[RawItem], SectionMeta]:
        values: dict[str, Any] = {}
        extras: list[RawItem] = []
        keys: dict[str, Pos] = {}
        layout: list[str] = []
        for item in items:
            name = item_name(item)
            pos = _item_pos(item)
            path = f"{spec.path}.{name}"
            if name in spec.repeated:
                if isinstance(item, RawEntry):
                    self.rep.error(pos, f"'{path}' is a section ('{name} {{ ... }}'), not a key")
                    continue
                key, build = spec.repeated[name]
                built = values.setdefault(key, [])
                layout.append(f"{name}#{len(built)}")
                built.append(build(item))
                continue
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
        for key, _ in spec.repeated.values():
            if key in values:
                values[key] = tuple(values[key])
        meta = SectionMeta(section.pos if section else None, keys, tuple(layout))
        return values, extras, meta

    def _check_ignored(self, path: str, entry: RawEntry, check: _IgnoredCheck) -> None:
        if check == "bool":
            if entry.value.lower() not in _BOOLS:
                self.rep.error(entry.pos, f"{path}: '{short(entry.value)}' is not a boolean "
                                          "(use yes/no, on/off or 1/0)")
        elif entry.value not in check:
            allowed = ", ".join(sorted(check))
            self.rep.error(entry.pos, f"{path}: '{short(entry.value)}' is not one of {allowed}")

    # -- sections

    def totem(self, section: RawSection) -> TotemSection:
        spec = replace(TOTEM_SPEC, repeated={"interface": ("interfaces", self.interface)})
        values, extras, meta = self.collect(spec, section, section.items)
        return TotemSection(**values, extras=tuple(extras), meta=meta)

    def interface(self, section: RawSection) -> InterfaceSection:
        values, extras, meta = self.collect(INTERFACE_SPEC, section, section.items)
        return InterfaceSection(**values, extras=tuple(extras), meta=meta)

    def node(self, section: RawSection) -> NodeEntry:
        values, extras, meta = self.collect(_NODE_SPEC, section, section.items)
        return NodeEntry(**values, extras=tuple(extras), meta=meta)

    def quorum(self, section: RawSection) -> QuorumSection:
        spec = _Spec(
            "quorum",
            QUORUM_VALUES,
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
            name = item_name(item)
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
            self.rep.warn(item.pos, f"unknown {kind} 'nodelist.{item_name(item)}' is kept but "
                                    "not used by pmxfs")
            layout.append(f"+{len(extras)}")
            extras.append(item)
        return nodes, extras, SectionMeta(section.pos, {}, tuple(layout))


_TOP_SECTIONS = frozenset({"totem", "nodelist", "quorum", "logging"})

TOTEM_SPEC = _Spec(
    "totem",
    {
        "cluster_name": "str",
        "config_version": "u64",
        "transport": "str",
        "mcastaddr": "str",
        "port": "int",
        "netmtu": "int",
        **{k: "int" for k in TOTEM_TIMER_KEYS},
        "link_mode": "str",
    },
    ignored=frozenset({
        "version", "secauth", "crypto_cipher", "crypto_hash", "crypto_model", "ip_version",
        "keyfile", "key", "clear_node_high_bit", "threads", "rrp_mode", "nodeid", "vsftype",
        "token_warning", "send_join", "max_network_delay",
        "heartbeat_failures_allowed", "cancel_token_hold_on_retransmit", "block_unlisted_ips",
        "rrp_problem_count_timeout", "rrp_problem_count_threshold", "rrp_token_expired_timeout",
        "rrp_autorecovery_check_timeout",
    }),
    ignored_prefixes=("crypto_",),
    ignored_checks={
        "version": frozenset({"2"}),
        "secauth": "bool",
        "crypto_cipher": frozenset({"none", "aes256", "aes192", "aes128"}),
        "crypto_hash": frozenset({"none", "md5", "sha1", "sha256", "sha384", "sha512"}),
        "ip_version": frozenset({"ipv4", "ipv6", "ipv4-6", "ipv6-4"}),
    },
    unknown_warning=lambda item: _unused_warning("totem", item),
)

# corosync's options of a link that pmxfs does not implement: kept, with a warning naming them
_UNIMPLEMENTED_LINK_OPTIONS = frozenset({"ttl", "broadcast"})


def _unused_warning(path: str, item: RawItem) -> str:
    """The warning for an item pmxfs keeps but does not use; a knet option says it is one."""
    name = item_name(item)
    if name.startswith("knet_") or name in _UNIMPLEMENTED_LINK_OPTIONS:
        return f"'{path}.{name}' is a corosync option pmxfs does not implement; it is kept and " \
               "ignored"
    kind = "key" if isinstance(item, RawEntry) else "section"
    return f"unknown {kind} '{path}.{name}' is kept but not used by pmxfs"


INTERFACE_SPEC = _Spec(
    "totem.interface",
    {
        "linknumber": "int",
        "ringnumber": "int",
        "mcastaddr": "str",
        "mcastport": "int",
        "bindnetaddr": "str",
        "knet_link_priority": "int",
        "knet_ping_interval": "int",
        "knet_ping_timeout": "int",
        "knet_pong_count": "int",
        "knet_transport": "str",
    },
    unknown_warning=lambda item: _unused_warning("totem.interface", item),
)


def _node_unknown(item: RawItem) -> str:
    name = item_name(item)
    if re.fullmatch(r"ring[0-9]+_addr", name):
        return f"'nodelist.node.{name}' is kept but not used: link numbers are 0-7"
    kind = "key" if isinstance(item, RawEntry) else "section"
    return f"unknown {kind} 'nodelist.node.{name}' is kept but not used by pmxfs"


_NODE_SPEC = _Spec(
    "nodelist.node",
    {"name": "str", "nodeid": "int", "quorum_votes": "int", **{k: "str" for k in RING_ADDR_KEYS}},
    unknown_warning=_node_unknown,
)

QUORUM_VALUES: Mapping[str, _Kind] = {
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
    name = item_name(item)
    if name in ("allow_downscale", "expected_votes_tracking"):
        return f"'quorum.{name}' is not supported by pmxfs and is ignored"
    kind = "key" if isinstance(item, RawEntry) else "section"
    return f"unknown {kind} 'quorum.{name}' is kept but not used by pmxfs"


def parse(text: str, filename: str = DEFAULT_FILENAME) -> ClusterConfig:
    """Parse corosync.conf text into the model.

    Raises `ConfigSyntaxError` with every syntax and value error found. Warnings (unknown keys,
    kept) are in the result's `warnings`. Does not validate: see `validate` and `check`.
    """
    rep = Reporter(filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    items = lex(text, rep)
    config = _Builder(rep).config(items, filename)
    if rep.errors:
        raise ConfigSyntaxError(by_position(rep.errors))
    return _with_warnings(config, rep.warnings)


def _with_warnings(config: ClusterConfig, warnings: Sequence[ConfigError]) -> ClusterConfig:
    return replace(config, warnings=tuple(by_position(warnings)))
