"""`pmxfs add HOST --token TOKEN`: join this standalone node to a cluster, like `pvecm add`
(the daemon does it: runtime/lifecycle.py); then wait for quorum. --link1..--link7 go to the
daemon only when given, so a one-link add still works with an older daemon."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.core.conf.edit import MAX_LINK, links_to_wire
from pmxfs.runtime.ipc_client import ControlError, request

QUORUM_TIMEOUT_S = 120.0
POLL_S = 0.2


def configure(add: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs add` (see `pmxfs.cli`)."""
    add.formatter_class = argparse.RawDescriptionHelpFormatter
    add.description = """\
Join this standalone node to the cluster a token from `pmxfs join-token` belongs to, like `pvecm
add`: the daemon connects to HOST (or the member named in the token) over TLS, refusing any
certificate but the one the token names, proves the token and sends this node's name, its
address on each link and the VMIDs of its guest configs. The member refuses a name, address or
node id already in use, links other than the cluster's (every node needs an address on each of
the cluster's links: --link1 .. --link7 for its redundant links) and VMIDs that exist in the
cluster (naming them). Otherwise it adds this node to corosync.conf and answers with it and the
authkey; this node backs up its database to DATA_DIR/backup/config-<unix time>.sql.gz, writes
both files, switches to the cluster without unmounting, takes the cluster's tree and puts its
own guest configs into it. Then it waits for quorum.""" + ASKS_THE_DAEMON
    add.epilog = """\
examples:
  pmxfs add 10.0.0.1 --token pmxfs-join-1:...
  pmxfs add 10.0.0.1:5406 --token pmxfs-join-1:... --link0 10.0.0.4
  pmxfs add 10.0.0.1 --token pmxfs-join-1:... --link0 10.0.0.4 --link1 10.1.0.4"""
    add.add_argument("host", metavar="HOST", nargs="?",
                     help="a member: ADDR or ADDR:PORT (default: the one in the token)")
    add.add_argument("--token", required=True, metavar="TOKEN",
                     help="from `pmxfs join-token` on a member")
    add.add_argument("--link0", metavar="ADDR",
                     help="this node's address on link 0 (default: the one that reaches "
                          "HOST)")
    for number in range(1, MAX_LINK + 1):
        add.add_argument(f"--link{number}", metavar="ADDR",
                         help=f"this node's address on link {number} (redundant links)")
    add.add_argument("--nodeid", type=int, metavar="N",
                     help="this node's id (default: the lowest free one)")
    add.add_argument("--votes", type=int, default=1, metavar="N",
                     help="this node's votes (default: %(default)s)")
    add.add_argument("--force", action="store_true",
                     help="re-add a node whose name is in the nodelist (it must be offline); "
                          "VMID conflicts are refused all the same")
    add.set_defaults(handler=handler(_add))


def _add(args: argparse.Namespace, path: Path) -> int:
    extra: dict[str, Any] = {}
    links = {n: a for n in range(1, MAX_LINK + 1) if (a := getattr(args, f"link{n}"))}
    if links:
        extra["links"] = links_to_wire(links)
    answer = request(path, "add", host=args.host, token=args.token, link0=args.link0,
                     nodeid=args.nodeid, votes=args.votes, force=args.force, **extra)
    print(f"joined cluster {answer['cluster']} as node {answer['nodeid']}; this node's old "
          f"database is backed up in {answer['backup']}")
    print("waiting for quorum...", end="", flush=True)
    deadline = time.monotonic() + QUORUM_TIMEOUT_S
    while True:
        status = request(path, "status")
        if status["quorum"]["quorate"] and status["fs"]["synced"]:
            print("OK")
            return 0
        if time.monotonic() >= deadline:
            print(file=sys.stdout)
            raise ControlError(f"no quorum within {QUORUM_TIMEOUT_S:g} s; see `pmxfs status` "
                               "and the daemon log")
        time.sleep(POLL_S)
