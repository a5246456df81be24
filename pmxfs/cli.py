"""The `pmxfs` command line: parses arguments and hands each subcommand to its implementation.

User errors print one line `pmxfs: reason` on stderr and exit non-zero; no tracebacks.

Start-up time is mostly imports, and it matters: `pmxfs expected 1` is what an operator types on
a node that lost quorum, and scripts call `pmxfs status` in loops. So a subcommand's module (with
everything it imports: trio, the core, SQLite, FUSE) is imported only when that subcommand is
parsed. `COMMANDS` lists every subcommand with its one-line help, which is all `pmxfs --help`
shows; each one's parser is a `_LazyParser` that hands itself to its module's
`configure(parser)` (description, examples, arguments, handler) the first time it parses or
formats its help. `debug` is configured here: its subcommands come from `commands/debug_cpg.py`
and `commands/debug.py`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from pmxfs.commands import control
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

# (subcommand, its line in `pmxfs --help`, the module under pmxfs.commands that configures it;
# None: `_configure_debug`), in the order `pmxfs --help` lists them. keygen's 256 is
# frame_crypto.AUTHKEY_BYTES (tests/test_cli_help.py checks it).
COMMANDS: tuple[tuple[str, str, str | None], ...] = (
    ("config", "cluster configuration (corosync.conf) tools", "config_check"),
    ("keygen", "write a new 256-byte cluster authkey (mode 0400)", "keygen"),
    ("db", "offline tools for a node's database (DIR/config.db)", "db"),
    ("daemon", "run this node: ring, replicated tree, mount", "daemon"),
    ("demo", "run a cluster of N daemons on this machine, each with its own mount", "demo"),
    ("status", "quorum and membership (like pvecm status)", "status"),
    ("nodes", "the nodes of the cluster (like pvecm nodes)", "nodes"),
    ("expected", "set the expected votes (like pvecm expected)", "expected"),
    ("create", "create a cluster on this standalone node (like pvecm create)", "create"),
    ("join-token", "print a one-time token for `pmxfs add`", "join_token"),
    ("add", "join this standalone node to a cluster (like pvecm add)", "add"),
    ("delnode", "remove a powered-off node from the cluster (like pvecm delnode)", "delnode"),
    ("links", "each peer's links and which carries the traffic (like corosync-cfgtool -n)",
     "links"),
    ("qdevice", "set up or remove a quorum device (like pvecm qdevice)", "qdevice"),
    ("qnetd", "the quorum device's arbiter, on a machine outside the cluster", "qnetd"),
    ("log", "add a message to the cluster log", "log"),
    ("metrics", "the daemon's metrics in Prometheus text format", "metrics"),
    ("debug", "inspect a ring or a running node", None),
)


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser, configured by its module only once it is needed."""

    def __init__(self, *args: Any, module: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module
        self._configured = False

    def _configure(self) -> None:
        if self._configured:
            return
        self._configured = True
        if self._module is None:
            _configure_debug(self)
        else:
            importlib.import_module(f"pmxfs.commands.{self._module}").configure(self)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", argparse.ArgumentParser)  # below here: no laziness
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:  # argparse's own overloads
        self._configure()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self._configure()
        return super().format_usage()

    def format_help(self) -> str:
        self._configure()
        return super().format_help()


def _configure_debug(parser: argparse.ArgumentParser) -> None:
    from pmxfs.commands import debug, debug_cpg

    parser.description = DEBUG_DESCRIPTION
    parser.epilog = DEBUG_EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    debug_commands = parser.add_subparsers(dest="debug_command", metavar="SUBCOMMAND",
                                           required=True)
    debug_cpg.register(debug_commands)
    debug.register(debug_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmxfs", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", dest="global_run_dir", metavar="DIR",
                        default=control.default_run_dir(),
                        help="where the daemon's control socket pmxfs.sock is "
                             f"(default: $PMXFS_RUN_DIR or {control.DEFAULT_RUN_DIR})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=_LazyParser)
    for name, summary, module in COMMANDS:
        subparsers.add_parser(name, help=summary, module=module)
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
