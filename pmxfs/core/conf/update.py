"""Rules for replacing the running corosync.conf with a new one (`validate_update`).

The new config is refused when its config_version does not grow, or when it changes the cluster
name or the transport that runs (`effective_transport`: no line and `knet` are the same); every
other difference is a `Change` that either applies at run time or needs a restart of pmxfs on
every node (`UpdateResult` sorts them). Links (knet: a node's ringX_addr, the interface sections,
link_mode, the ports) change at run time, as corosync 3 reloads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmxfs.core.conf.errors import ConfigError, Reporter, by_position
from pmxfs.core.conf.model import (
    RING_ADDR_KEYS,
    TOTEM_TIMER_KEYS,
    ClusterConfig,
    effective_transport,
    key_pos,
)
from pmxfs.core.conf.render import format_value


@dataclass(frozen=True)
class Change:
    """One difference between the running config and a new one."""

    key: str  # the dotted key or section that differs ("totem.token", "nodelist")
    description: str  # "key: old -> new", for a human
    runtime: bool  # applies while running; False: needs a restart of pmxfs on every node


@dataclass(frozen=True)
class UpdateResult:
    """What `validate_update` found: refusals, and the changes sorted by when they apply."""

    errors: tuple[ConfigError, ...]  # why the new config is refused (empty: accepted)
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


def validate_update(current: ClusterConfig, new: ClusterConfig) -> UpdateResult:
    """Rules for replacing the running `current` config with `new` (both already valid).

    Refused: config_version not greater than the current one; a different cluster_name; a
    different transport. Run-time changes: nodes added or removed, a node's votes and addresses
    (ringX_addr: links added, removed or moved -- for udpu/udp the node whose own address
    changes needs a restart; the others take it), the interface sections, link_mode and (knet)
    totem.port, expected_votes, two_node, the quorum device (added, changed or removed), totem
    timers and counts, logging. Everything else (node names, netmtu, mcastaddr, port with
    udpu/udp, wait_for_all, last_man_standing(_window), auto_tie_breaker(_node), unknown/kept
    keys) needs a restart of pmxfs on every node.
    """
    rep = Reporter(new.filename)
    tm = new.totem.meta
    if new.config_version <= current.config_version:
        rep.error(key_pos(tm, "config_version"),
                  f"totem.config_version must be greater than the current {current.config_version}"
                  f" (got {new.config_version})")
    if new.cluster_name != current.cluster_name:
        rep.error(key_pos(tm, "cluster_name"),
                  f"totem.cluster_name cannot change on a running cluster (current "
                  f"'{current.cluster_name}', new '{new.cluster_name}')")
    old_transport, new_transport = effective_transport(current), effective_transport(new)
    if new_transport != old_transport:
        rep.error(key_pos(tm, "transport"),
                  f"totem.transport cannot change on a running cluster (current "
                  f"{old_transport}, new {new_transport})")
    knet = new_transport == "knet"
    changes: list[Change] = []

    def diff(key: str, old: object, new_value: object, runtime: bool) -> None:
        if old != new_value:
            changes.append(Change(key, f"{key}: {format_value(old)} -> "
                                       f"{format_value(new_value)}", runtime))

    ct, nt = current.totem, new.totem
    for key in TOTEM_TIMER_KEYS:
        diff(f"totem.{key}", getattr(ct, key), getattr(nt, key), True)
    for key in ("netmtu", "mcastaddr"):
        diff(f"totem.{key}", getattr(ct, key), getattr(nt, key), False)
    diff("totem.port", ct.port, nt.port, knet)
    diff("totem.link_mode", ct.link_mode, nt.link_mode, True)
    if ct.interfaces != nt.interfaces:
        changes.append(Change("totem.interface", "totem.interface sections changed", True))
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
    if cq.device != nq.device:  # the device client and votequorum follow it at run time
        changes.append(Change("quorum.device", "quorum.device changed", True))
    if cq.extras != nq.extras:
        changes.append(Change("quorum", "quorum: other (kept) keys changed", False))
    if current.logging != new.logging:
        changes.append(Change("logging", "logging changed", True))
    if current.extras != new.extras:
        changes.append(Change("extras", "other (kept) top-level sections changed", False))
    return UpdateResult(tuple(by_position(rep.errors)), tuple(changes))


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
            for key, runtime in (("name", False), *((k, True) for k in RING_ADDR_KEYS)):
                if getattr(o, key) != getattr(n, key):
                    changes.append(Change(f"nodelist.{nid}.{key}",
                                          f"nodelist: {label} {key} {getattr(o, key)} -> "
                                          f"{getattr(n, key)}", runtime))
            if o.extras != n.extras:
                changes.append(Change(f"nodelist.{nid}", f"nodelist: {label} other (kept) keys "
                                                         "changed", False))
