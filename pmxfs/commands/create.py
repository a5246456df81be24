"""`pmxfs create CLUSTERNAME`: make this standalone node the first member of a new cluster, like
`pvecm create` (the daemon does it: runtime/lifecycle.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import request


def configure(create: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs create` (see `pmxfs.cli`)."""
    create.formatter_class = argparse.RawDescriptionHelpFormatter
    create.description = """\
Create a cluster on this standalone node, like `pvecm create`: the daemon writes a new authkey
and the cluster's corosync.conf (this node only, transport udpu, config_version 1) to its
--authkey and --config paths, switches to a one-member ring without unmounting, and puts
corosync.conf into the tree. Other nodes join with a token from `pmxfs join-token`. Refused on a
node that is already in a cluster, for an invalid name and for an address not on this host."""\
        + ASKS_THE_DAEMON
    create.epilog = """\
examples:
  pmxfs create lab --link0 10.0.0.1
  pmxfs create lab --link0 10.0.0.1 --nodeid 1 --votes 1"""
    create.add_argument("cluster_name", metavar="CLUSTERNAME",
                        help="1-15 letters, digits and hyphens")
    create.add_argument("--link0", metavar="ADDR",
                        help="this node's cluster address (default: the address the host name "
                             "resolves to)")
    create.add_argument("--nodeid", type=int, default=1, metavar="N",
                        help="this node's id (default: %(default)s)")
    create.add_argument("--votes", type=int, default=1, metavar="N",
                        help="this node's votes (default: %(default)s)")
    create.add_argument("--port", type=int, metavar="PORT",
                        help="the cluster's UDP port (default: corosync's 5405)")
    create.set_defaults(handler=handler(_create))


def _create(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "create", cluster_name=args.cluster_name, link0=args.link0,
                     nodeid=args.nodeid, votes=args.votes, port=args.port)
    print(f"created cluster {answer['cluster']}: this node is node {answer['nodeid']} on "
          f"{answer['address']}, config_version {answer['config_version']}")
    print("add nodes with a token from `pmxfs join-token`")
    return 0
