"""`pmxfs config check FILE [--against CURRENT]`: validate a corosync.conf, and an update of one.

The command reads the file(s) and hands the text to `pmxfs.core.conf.check` -- the same code path
the file system uses for writes to /etc/pve/corosync.conf -- then reports:

* valid: exit 0 and one line on stdout: cluster name, config_version, node count, expected
  votes, the derived token and consensus timeouts (and, with --against, which changes apply at
  run time and which need a restart); warnings, if any, go to stderr as `FILE:LINE:COL: warning:`.
* invalid: exit 1 and every problem on stderr, one per line, `FILE:LINE:COL: reason`.
* a file that cannot be read: exit 2 and one line `pmxfs: cannot read FILE: reason`.

Bytes that are not UTF-8 text (or contain NUL) are reported as one error at their position; no
input produces a traceback.
"""

from __future__ import annotations

import argparse
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

Valid: exit 0 and one line on stdout (cluster name, config_version, nodes, expected votes,
token and consensus timeouts); warnings on stderr. Invalid: exit 1 and every problem on stderr,
one per line, FILE:LINE:COL: reason. A file that cannot be read: exit 2.""",
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
    report(result.warnings)
    print(summary(result.config, result.update, current))
    return 0
