"""The `pmxfs` command line: parses arguments and hands each subcommand to its implementation.

User errors print one line `pmxfs: reason` on stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pmxfs.commands import (
    config_check,
    control,
    daemon,
    db,
    debug,
    debug_cpg,
    demo,
    expected,
    keygen,
    log,
    nodes,
    status,
)
from pmxfs.core.errors import LocalError


class UsageError(LocalError):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


DESCRIPTION = """\
pmxfs: a replicated cluster configuration file system in the style of Proxmox's pmxcfs. Every
node runs `pmxfs daemon`, which mounts the cluster's shared tree (default /etc/pve) with FUSE;
a change made there is on every node. The other commands ask the local daemon (status, nodes,
expected, log, debug), or work without one (config check, keygen, db, demo, debug cpg).
`pmxfs COMMAND --help` describes each command.

A problem is reported as one line `pmxfs: reason` on stderr, with a non-zero exit status."""

EXAMPLES = """\
examples:
  pmxfs demo                          # try it: a 3-node cluster on this machine
  pmxfs status                        # quorum and membership, as `pvecm status`
  pmxfs --run-dir ./pmxfs-demo/node1/run nodes
  pmxfs config check corosync.conf --against /etc/pmxfs/corosync.conf"""

DEBUG_DESCRIPTION = """\
Inspect a ring or a running node. `debug cpg` joins a ring by itself, like corosync's testcpg;
the other subcommands ask the local daemon (at RUN_DIR/pmxfs.sock, see `pmxfs --help`) and print
its answer, as JSON with --json."""

DEBUG_EXAMPLES = """\
examples:
  pmxfs debug ring                    # totem state, ring id, members, token counters
  pmxfs debug tree --json
  pmxfs debug cpg --config corosync.conf --authkey authkey --node node1 --data-dir ./d1"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmxfs", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", dest="global_run_dir", metavar="DIR",
                        default=control.default_run_dir(),
                        help="where the daemon's control socket pmxfs.sock is "
                             f"(default: $PMXFS_RUN_DIR or {control.DEFAULT_RUN_DIR})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config_check.register(subparsers)
    keygen.register(subparsers)
    db.register(subparsers)
    daemon.register(subparsers)
    demo.register(subparsers)
    for command in (status, nodes, expected, log):
        command.register(subparsers)
    debug_parser = subparsers.add_parser("debug", help="inspect a ring or a running node",
                                  description=DEBUG_DESCRIPTION, epilog=DEBUG_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_commands = debug_parser.add_subparsers(dest="debug_command", metavar="SUBCOMMAND",
                                          required=True)
    debug_cpg.register(debug_commands)
    debug.register(debug_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"unknown command {args.command}")
    try:
        result: int = handler(args)
    except UsageError as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
