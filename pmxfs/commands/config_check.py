"""`pmxfs config check FILE [--against CURRENT]`: validate a corosync.conf, and an update of one.

The command reads the file(s) and hands the text to `pmxfs.core.conf.check` -- the same code path
the file system uses for writes to /etc/pve/corosync.conf -- then reports:

* valid: exit 0; on stdout a summary line (cluster name, config_version, node count, expected
  votes, the derived token and consensus timeouts and, with --against, which changes apply at
  run time and which need a restart), then the transport and its links (knet: each link's port,
  priority and health-check timers, from `conf.link_settings`), what each host name in a
  ringX_addr resolves to here (in totem.ip_version's order), and -- once, when the file sets
  secauth or crypto_* -- that pmxfs always encrypts. Warnings go to stderr as
  `FILE:LINE:COL: warning:`, and so does a host name that does not resolve (the daemon refuses
  to start on it; the file itself is valid).
* invalid: exit 1 and every problem on stderr, one per line, `FILE:LINE:COL: reason`.
* a file that cannot be read: exit 2 and one line `pmxfs: cannot read FILE: reason`.

Bytes that are not UTF-8 text (or contain NUL) are reported as one error at their position; no
input produces a traceback.
"""

from __future__ import annotations

import argparse
import socket
import sys

from pmxfs.core import conf
from pmxfs.core.quorum import QuorumConfig
from pmxfs.runtime.config_file import ConfigUnreadable, load, report


def configure(config: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs config` (see `pmxfs.cli`), with its `check` subcommand."""
    config.description = ("Cluster configuration (corosync.conf) tools; they work on files and "
                          "need no daemon.")
    config.epilog = "examples:\n  pmxfs config check /etc/pmxfs/corosync.conf"
    config.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = commands.add_parser(
        "check", help="validate a corosync.conf (and an update of one)",
        description="""\
Parse and validate FILE as pmxfs does when corosync.conf is written in the tree (/etc/pve).
With --against, also check FILE as an update of the running config CURRENT (config_version
must grow); the summary then says which changes apply at run time and which need a restart.

Valid: exit 0; stdout: one summary line (cluster name, config_version, nodes, expected votes,
token and consensus timeouts), the transport and each link's settings, what host names in
ringX_addr resolve to; warnings (and host names that do not resolve) on stderr. Invalid:
exit 1 and every problem on stderr, one per line, FILE:LINE:COL: reason. A file that
cannot be read: exit 2.""",
        epilog="""\
examples:
  pmxfs config check /etc/pmxfs/corosync.conf
  pmxfs config check new.conf --against /etc/pmxfs/corosync.conf
  cp new.conf /etc/pve/corosync.conf     # then take it: every node rewrites its own copy""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("file", metavar="FILE", help="the corosync.conf to check")
    check.add_argument("--against", metavar="CURRENT",
                       help="the current corosync.conf; FILE must be a valid update of it "
                            "(default: FILE is checked on its own)")
    check.set_defaults(handler=run_check)


def summary(config: conf.ClusterConfig, update: conf.UpdateResult | None,
            current: conf.ClusterConfig | None) -> str:
    """The one-line description of a valid config (and of the update, with `current`)."""
    params = conf.totem_params(config)
    expected = QuorumConfig.from_config(config).configured_expected
    count = len(config.nodes)
    line = (f"{config.filename}: ok: cluster {config.cluster_name}, config_version "
            f"{config.config_version}, {count} node{'s' if count != 1 else ''}, expected votes "
            f"{expected}, token {params.token} ms, consensus {params.consensus} ms")
    if update is not None and current is not None:
        runtime = ", ".join(c.key for c in update.runtime_changes) or "none"
        restart = ", ".join(c.key for c in update.restart_changes) or "none"
        line += (f"; update from config_version {current.config_version}: run time: {runtime}; "
                 f"needs restart: {restart}")
    return line


def links_lines(config: conf.ClusterConfig) -> list[str]:
    """The transport and, one line each, the links it runs with."""
    transport = conf.effective_transport(config)
    settings = conf.link_settings(config)
    count = len(settings)
    head = f"transport {transport}, {count} link{'s' if count != 1 else ''}"
    if transport != "knet":
        return [head] + [f"link {s.number}: port {s.port}" for s in settings]
    lines = [f"{head}, link_mode {conf.effective_link_mode(config)}"]
    for s in settings:
        lines.append(f"link {s.number}: port {s.port}, priority {s.priority}, ping every "
                     f"{s.ping_interval_ms} ms, down after {s.ping_timeout_ms} ms without a pong, "
                     f"up after {s.pong_count} pongs")
    return lines


_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def resolve(host: str, versions: tuple[int, ...]) -> str:
    """The address `host` resolves to, trying the IP versions in order (as the daemon does at
    start); raises OSError with the resolver's reason when none does."""
    last: OSError = OSError(f"no IPv{' or IPv'.join(str(v) for v in versions)} address")
    for version in versions:
        try:
            infos = socket.getaddrinfo(host, None, _FAMILIES[version], socket.SOCK_DGRAM)
        except OSError as exc:
            last = exc
            continue
        if infos:
            return str(infos[0][4][0])
    raise last


def resolution_lines(config: conf.ClusterConfig) -> tuple[list[str], list[str]]:
    """(stdout lines saying what each host name in a ringX_addr resolves to, stderr warnings
    for those that do not resolve)."""
    versions = conf.ip_versions(config)
    out: list[str] = []
    warnings: list[str] = []
    for node in config.nodes:
        for number, addr in node.addrs:
            if conf.parse_address(addr) is not None:
                continue
            where = f"node {node.node_name} ring{number}_addr {addr}"
            try:
                out.append(f"{where} resolves to {resolve(addr, versions)}")
            except OSError as exc:
                reason = exc.strerror or str(exc)
                warnings.append(f"{config.filename}: warning: {where} does not resolve here "
                                f"({reason}); the daemon does not start until it does")
    return out, warnings


ENCRYPTION_NOTE = ("pmxfs always encrypts and authenticates cluster traffic with the cluster's "
                   "authkey; secauth and crypto_* are accepted and not used")


def run_check(args: argparse.Namespace) -> int:
    """Handler of `pmxfs config check`; returns the exit status."""
    try:
        current: conf.ClusterConfig | None = None
        if args.against is not None:
            base = load(args.against, None)
            if base.config is None:
                report(base.errors + base.warnings)
                print(f"pmxfs: the current config {args.against} is not valid", file=sys.stderr)
                return 1
            current = base.config
        result = load(args.file, current)
    except ConfigUnreadable as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 2
    if result.config is None:
        report(result.errors + result.warnings)
        return 1
    config = result.config
    report(result.warnings)
    print(summary(config, result.update, current))
    for line in links_lines(config):
        print(line)
    resolved, unresolved = resolution_lines(config)
    for line in resolved:
        print(line)
    for line in unresolved:
        print(line, file=sys.stderr)
    if conf.uses_crypto_options(config):
        print(ENCRYPTION_NOTE)
    return 0
