"""`pmxfs create CLUSTERNAME`: make this standalone node the first member of a new cluster, like
`pvecm create` (the daemon does it: runtime/lifecycle.py). --link1..--link7 and --transport go
to the daemon only when given, so a one-link create still works with an older daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.core.conf.edit import MAX_LINK, links_to_wire
from pmxfs.runtime.ipc_client import request


def configure(create: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs create` (see `pmxfs.cli`)."""
    create.formatter_class = argparse.RawDescriptionHelpFormatter
    create.description = """\
Create a cluster on this standalone node, like `pvecm create`: the daemon writes a new authkey
and the cluster's corosync.conf (this node only, config_version 1) to its --authkey and --config
paths, switches to a one-member ring without unmounting, and puts corosync.conf into the tree.
Other nodes join with a token from `pmxfs join-token`. One link runs transport udpu unless
--transport knet; redundant links (--link1 .. --link7, link N on UDP port PORT + N) run knet in
passive mode, with an interface section per link. Refused on a node that is already in a
cluster, for an invalid name and for an address not on this host."""\
        + ASKS_THE_DAEMON
    create.epilog = """\
examples:
  pmxfs create lab --link0 10.0.0.1
  pmxfs create lab --link0 10.0.0.1 --nodeid 1 --votes 1
  pmxfs create lab --link0 10.0.0.1 --link1 10.1.0.1"""
    create.add_argument("cluster_name", metavar="CLUSTERNAME",
                        help="1-15 letters, digits and hyphens")
    create.add_argument("--link0", metavar="ADDR",
                        help="this node's address on link 0 (default: the address the host "
                             "name resolves to)")
    for number in range(1, MAX_LINK + 1):
        create.add_argument(f"--link{number}", metavar="ADDR",
                            help=f"this node's address on link {number} (redundant links)")
    create.add_argument("--transport", choices=("knet", "udpu"),
                        help="default: udpu with one link, knet with more")
    create.add_argument("--nodeid", type=int, default=1, metavar="N",
                        help="this node's id (default: %(default)s)")
    create.add_argument("--votes", type=int, default=1, metavar="N",
                        help="this node's votes (default: %(default)s)")
    create.add_argument("--port", type=int, metavar="PORT",
                        help="the cluster's UDP port (default: corosync's 5405)")
    create.set_defaults(handler=handler(_create))


def _create(args: argparse.Namespace, path: Path) -> int:
    extra: dict[str, Any] = {}
    links = {n: a for n in range(1, MAX_LINK + 1) if (a := getattr(args, f"link{n}"))}
    if links:
        extra["links"] = links_to_wire(links)
    if args.transport is not None:
        extra["transport"] = args.transport
    answer = request(path, "create", cluster_name=args.cluster_name, link0=args.link0,
                     nodeid=args.nodeid, votes=args.votes, port=args.port, **extra)
    print(f"created cluster {answer['cluster']}: this node is node {answer['nodeid']} on "
          f"{_where(answer)}, config_version {answer['config_version']}")
    print("add nodes with a token from `pmxfs join-token`")
    return 0


def _where(answer: dict[str, Any]) -> str:
    """Where a create answer puts this node: "10.0.0.1", or with more links "10.0.0.1
    (link 0), 10.1.0.1 (link 1)"; ", transport knet" added when it runs knet."""
    links = answer.get("links") or {"0": answer["address"]}
    ordered = sorted(links.items(), key=lambda item: int(item[0]))
    shown = (str(answer["address"]) if len(links) == 1 else
             ", ".join(f"{a} (link {n})" for n, a in ordered))
    return shown + (", transport knet" if answer.get("transport") == "knet" else "")
