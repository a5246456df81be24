"""`pmxfs delnode NAME`: remove a node that is powered off from the cluster, like `pvecm
delnode` (the daemon does it: runtime/lifecycle.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import request


def configure(delnode: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs delnode` (see `pmxfs.cli`)."""
    delnode.formatter_class = argparse.RawDescriptionHelpFormatter
    delnode.description = """\
Remove node NAME from the cluster, like `pvecm delnode`: refused while NAME is a member of the
ring (power it off first) and for this node itself. Otherwise corosync.conf loses its entry
(config_version + 1), expected votes are recomputed, and every member refuses the node's frames
from then on. Its directory nodes/NAME in the tree is kept, as pvecm keeps it; remove it by hand
once nothing needs it. Do not start the removed node again with its old configuration on the
same network: it is refused, but reinstall it (or `pmxfs add` it anew) to use it again."""\
        + ASKS_THE_DAEMON
    delnode.epilog = "examples:\n  pmxfs delnode pve3"
    delnode.add_argument("name", metavar="NAME", help="the node's name in the nodelist")
    delnode.set_defaults(handler=handler(_delnode))


def _delnode(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "delnode", name=args.name)
    print(f"removed node {answer['removed']} (id {answer['nodeid']}); config_version "
          f"{answer['config_version']}, expected votes {answer['expected_votes']}")
    print(f"its directory {answer['kept']} is kept in the tree")
    return 0
