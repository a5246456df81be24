"""corosync.conf for pmxfs: parse, typed model, validation, update rules and canonical rendering.

How it works
------------
`parse(text, filename)` goes from text to the model; `check` goes all the way to a usable config.
1. `syntax` reads corosync.conf syntax line by line into a raw tree (`RawSection`/`RawEntry`),
   reporting every malformed line in one pass; `errors` holds what every step reports with
   (`Pos`, `ConfigError`, `ConfigSyntaxError`).
2. `build` turns the raw tree into the typed model of `model` (`ClusterConfig` with
   `TotemSection`, `NodeEntry`s, `QuorumSection`, `LoggingSection`), and holds `parse`. Unknown
   keys and sections are kept (with a warning unless real Proxmox files carry them) and rendered
   back.
3. `validate` applies the rules (`validate(config)`), pointing at the line and column of the
   offending key, and holds `check`. `update` adds the rules for replacing the running config
   (`validate_update(current, new)`) and sorts the differences into run-time changes and changes
   that need a restart.
4. `render` writes canonical text (`render(config)`): hence `parse(render(m)) == m`, and
   rendering a parsed comment-free file in that style gives back the same text.

Two configs are equal when their content is: source positions, layout and warnings are not part
of equality (see `model`).

Links: `totem.transport` missing means knet, as in corosync 3 (`effective_transport`, also
`ClusterConfig.transport`).
knet has up to 8 links (`NodeEntry.addrs`, `totem.interface {}`), whose settings
`link_settings` derives as corosync does; udpu and udp have one.

pmxfs differences from corosync, on purpose:
* With `transport: udp` and no `mcastaddr`, the address is derived from the cluster name:
  `239.192.H0.H1` where H0, H1 are the first two bytes of SHA-256(cluster_name in UTF-8)
  (`default_mcastaddr`). The port defaults to 5405.
* Every node needs `nodeid`, `ring0_addr` and a name (pmxfs keys the tree and the ring on them);
  with one link a host name in ring0_addr serves as the name, as in Proxmox VE.
* `link_mode: rr` runs as active; `secauth`/`crypto_*` are accepted and not used (pmxfs always
  encrypts); knet options pmxfs does not implement are kept with a warning naming them.
* Validation is stricter: timer relations, duplicate keys and sections, address families,
  incompatible quorum options are errors, not log lines.

This package is pure (no file access): the caller reads the file and passes its text. Import
from the package (`from pmxfs.core import conf`); its modules are internal.
"""

from pmxfs.core.conf.build import MAX_U32, MAX_U64, parse
from pmxfs.core.conf.errors import ConfigError, ConfigSyntaxError, Pos, Severity
from pmxfs.core.conf.model import (
    DEFAULT_FILENAME,
    DEFAULT_LINK_PRIORITY,
    DEFAULT_LMS_WINDOW_MS,
    DEFAULT_PONG_COUNT,
    DEFAULT_PORT,
    DEFAULT_QNETD_PORT,
    MAX_LINKS,
    AtbNode,
    ClusterConfig,
    DeviceNetSection,
    DeviceSection,
    InterfaceSection,
    LinkMode,
    LinkSettings,
    LoggingSection,
    NodeEntry,
    NodeInfo,
    QuorumSection,
    SectionMeta,
    TotemSection,
    Transport,
    default_mcastaddr,
    device_votes,
    effective_link_mode,
    effective_transport,
    ip_versions,
    link_numbers,
    link_port,
    link_settings,
    totem_params,
    uses_crypto_options,
)
from pmxfs.core.conf.render import render
from pmxfs.core.conf.syntax import RawEntry, RawItem, RawSection
from pmxfs.core.conf.update import Change, UpdateResult, validate_update
from pmxfs.core.conf.validate import (
    MAX_NETMTU,
    MIN_NETMTU,
    QUORUM_PROVIDER,
    TRANSPORTS,
    Address,
    CheckResult,
    check,
    is_hostname,
    parse_address,
    validate,
)

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_LINK_PRIORITY",
    "DEFAULT_LMS_WINDOW_MS",
    "DEFAULT_PONG_COUNT",
    "DEFAULT_PORT",
    "DEFAULT_QNETD_PORT",
    "MAX_LINKS",
    "MAX_NETMTU",
    "MAX_U32",
    "MAX_U64",
    "MIN_NETMTU",
    "QUORUM_PROVIDER",
    "TRANSPORTS",
    "Address",
    "AtbNode",
    "Change",
    "CheckResult",
    "ClusterConfig",
    "ConfigError",
    "ConfigSyntaxError",
    "DeviceNetSection",
    "DeviceSection",
    "InterfaceSection",
    "LinkMode",
    "LinkSettings",
    "LoggingSection",
    "NodeEntry",
    "NodeInfo",
    "Pos",
    "QuorumSection",
    "RawEntry",
    "RawItem",
    "RawSection",
    "SectionMeta",
    "Severity",
    "TotemSection",
    "Transport",
    "UpdateResult",
    "check",
    "default_mcastaddr",
    "device_votes",
    "effective_link_mode",
    "effective_transport",
    "ip_versions",
    "is_hostname",
    "link_numbers",
    "link_port",
    "link_settings",
    "parse",
    "parse_address",
    "render",
    "totem_params",
    "uses_crypto_options",
    "validate",
    "validate_update",
]
