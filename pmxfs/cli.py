"""The `pmxfs` command line: parses arguments and hands each subcommand to its implementation.

User errors print one line `pmxfs: reason` on stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pmxfs import config_check, control_cli, daemon, db_tools, debug_cpg, demo, keygen


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmxfs", description=__doc__)
    parser.add_argument("--run-dir", dest="global_run_dir", metavar="DIR",
                        default=control_cli.default_run_dir(),
                        help="where the daemon's control socket pmxfs.sock is "
                             f"(default: $PMXFS_RUN_DIR or {control_cli.DEFAULT_RUN_DIR})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config_check.register(subparsers)
    keygen.register(subparsers)
    db_tools.register(subparsers)
    daemon.register(subparsers)
    demo.register(subparsers)
    control_cli.register(subparsers)
    debug = subparsers.add_parser("debug", help="inspect a ring or a running node",
                                  description="Inspect a ring or a running node.")
    debug_commands = debug.add_subparsers(dest="debug_command", metavar="SUBCOMMAND",
                                          required=True)
    debug_cpg.register(debug_commands)
    control_cli.register_debug(debug_commands)
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
