"""A node's quorum-device settings, read from corosync.conf's `quorum.device` -- pure.

The conf model knows `model`, `votes`, `net.host`, `net.port`, `net.algorithm` and
`net.tie_breaker`; corosync-qdevice's other keys are kept as raw items (`extras`): `timeout`,
`sync_timeout` (device), `keep_active_partition_tie_breaker` and `tls` (net). `device_settings`
fills in corosync-qdevice's defaults for what is not set, and for a value it cannot read (one
the config validator does not check): a timeout that is not a number, or outside what qnetd
accepts, is clamped or defaulted here rather than refused, so a node always knows what it
would tell qnetd. The result is what the node's device client says in its `Hello` and what
`pmxfs status` shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pmxfs.core.conf import ClusterConfig, RawEntry, RawItem
from pmxfs.core.join_token import format_host_port
from pmxfs.core.qdevice_wire import (
    DEFAULT_SYNC_TIMEOUT_MS,
    DEFAULT_TIMEOUT_MS,
    MAX_TIMEOUT_MS,
    MIN_TIMEOUT_MS,
    QNETD_PORT,
)

ON = ("on", "1", "yes", "true")


@dataclass(frozen=True)
class DeviceSettings:
    host: str
    port: int
    algorithm: str  # ffsplit or lms
    tie_breaker: str  # lowest, highest or a node id
    keep_active: bool  # keep_active_partition_tie_breaker
    timeout_ms: int
    sync_timeout_ms: int

    @property
    def address(self) -> str:
        """HOST:PORT ([HOST]:PORT for an IPv6 address), as `status` shows it."""
        return format_host_port(self.host, self.port)


def device_settings(config: ClusterConfig) -> DeviceSettings | None:
    """The settings of `config`'s quorum device; None without a `model: net` device."""
    device = config.quorum.device
    if device is None or device.model != "net" or device.net is None or not device.net.host:
        return None
    net = device.net
    return DeviceSettings(
        host=net.host or "", port=net.port or QNETD_PORT, algorithm=net.algorithm or "ffsplit",
        tie_breaker=net.tie_breaker or "lowest",
        keep_active=_raw(net.extras, "keep_active_partition_tie_breaker", "off").lower() in ON,
        timeout_ms=_ms(device.extras, "timeout", DEFAULT_TIMEOUT_MS),
        sync_timeout_ms=_ms(device.extras, "sync_timeout", DEFAULT_SYNC_TIMEOUT_MS))


def _raw(extras: Sequence[RawItem], key: str, default: str) -> str:
    for item in extras:
        if isinstance(item, RawEntry) and item.key == key:
            return item.value.strip()
    return default


def _ms(extras: Sequence[RawItem], key: str, default: int) -> int:
    text = _raw(extras, key, "")
    if not text.isdecimal():
        return default
    return min(MAX_TIMEOUT_MS, max(MIN_TIMEOUT_MS, int(text)))
