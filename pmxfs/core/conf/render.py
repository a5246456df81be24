"""Canonical corosync.conf text for a model (`render`).

Two-space indentation, a blank line between top-level sections, entries in the order of the
parsed file (keys that were not in a file, e.g. set by code, in alphabetical order -- the order
Proxmox writes). Hence `parse(render(m)) == m`, and rendering a parsed comment-free file in that
style gives back the same text. `format_value` writes one typed value as corosync.conf says it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pmxfs.core.conf.build import INTERFACE_SPEC, QUORUM_VALUES, TOTEM_SPEC
from pmxfs.core.conf.model import (
    RING_ADDR_KEYS,
    ClusterConfig,
    DeviceNetSection,
    DeviceSection,
    InterfaceSection,
    NodeEntry,
    SectionMeta,
    TotemSection,
)
from pmxfs.core.conf.syntax import RawEntry, RawItem, item_name

_INDENT = "  "


def format_value(value: object) -> str:
    """A typed value as corosync.conf text (booleans 1/0, node-id lists space-separated); a key
    not set (None) reads `(default)`."""
    if value is None:
        return "(default)"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class _Item:
    """One key or subsection, rendered, with what places it among its siblings."""

    name: str  # the key or section name (the order for items not from the file)
    token: str  # its name in the section's layout: the key, or "+N" for the N-th kept extra
    lines: tuple[str, ...]  # its text, unindented


def _entry(key: str, value: object) -> _Item:
    return _Item(key, key, (f"{key}: {format_value(value)}",))


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
    return [_Item(item_name(x), f"+{i}", _raw_lines(x)) for i, x in enumerate(extras)]


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


def _render_interface(iface: InterfaceSection) -> tuple[str, ...]:
    items = _fields_items(iface, tuple(INTERFACE_SPEC.values)) + _extras_items(iface.extras)
    return _block("interface", _section_lines(items, iface.meta))


def _totem_items(t: TotemSection) -> list[_Item]:
    keys = [k for k in TOTEM_SPEC.values]
    interfaces = [_Item("interface", f"interface#{i}", _render_interface(iface))
                  for i, iface in enumerate(t.interfaces)]
    return _fields_items(t, keys) + interfaces + _extras_items(t.extras)


def _node_lines(n: NodeEntry) -> tuple[str, ...]:
    items = _fields_items(n, ("name", "nodeid", "quorum_votes", *RING_ADDR_KEYS))
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
    q_items = _fields_items(q, tuple(QUORUM_VALUES))
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
