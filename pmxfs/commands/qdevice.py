"""`pmxfs qdevice setup|remove`: a quorum device for the cluster, like `pvecm qdevice` (the
daemon does it: runtime/qdevice_setup.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import request


def configure(qdevice: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs qdevice` (see `pmxfs.cli`)."""
    raw = argparse.RawDescriptionHelpFormatter
    qdevice.formatter_class = raw
    qdevice.description = """\
Set up or remove a quorum device, like `pvecm qdevice`: a qnetd on a machine outside the
cluster (`pmxfs qnetd`) lends one vote to one side, so that a two-node cluster stays quorate
when a node stops. Both take effect at once on every node, without a restart.""" \
        + ASKS_THE_DAEMON
    qdevice.epilog = """\
examples:
  pmxfs qdevice setup 192.0.2.10 --token pmxfs-qnetd-1:...
  pmxfs qdevice remove"""
    commands = qdevice.add_subparsers(dest="qdevice_command", metavar="SUBCOMMAND",
                                      required=True)
    setup = commands.add_parser(
        "setup", help="enroll the cluster with a qnetd and configure the device",
        description="""\
Enroll the cluster with the qnetd at HOST[:PORT] using a one-time token from `pmxfs qnetd
token` on that machine, and write quorum.device into corosync.conf (config_version + 1). Run it
on a quorate member. As pvecm: an even node count uses algorithm ffsplit (the device has one
vote); an odd count is refused unless --force, and then uses lms (the device has node count - 1
votes). Refused while a device is configured and together with two_node, last_man_standing or
auto_tie_breaker. The cluster's qnetd certificate and key go to priv/qdevice/ in the tree, so
every node has them.""" + ASKS_THE_DAEMON,
        epilog="""\
examples:
  pmxfs qdevice setup 192.0.2.10 --token pmxfs-qnetd-1:...
  pmxfs qdevice setup qnetd.example.com:5403 --token pmxfs-qnetd-1:... --tie-breaker highest
  pmxfs qdevice setup 192.0.2.10 --token pmxfs-qnetd-1:... --force   # odd node count: lms""",
        formatter_class=raw)
    setup.add_argument("address", metavar="HOST[:PORT]",
                       help="where qnetd listens, as the nodes reach it (port default: the "
                            "token's, normally 5403); it goes into corosync.conf")
    setup.add_argument("--token", required=True, metavar="TOKEN",
                       help="the enrollment token printed by `pmxfs qnetd token`")
    setup.add_argument("--algorithm", choices=("ffsplit", "lms"),
                       help="who gets the vote (default: ffsplit for an even node count, lms "
                            "for an odd one)")
    setup.add_argument("--tie-breaker", default="lowest", metavar="lowest|highest|NODEID",
                       help="which half wins an even split (default: %(default)s)")
    setup.add_argument("--force", action="store_true",
                       help="set up a device for an odd number of nodes")
    setup.set_defaults(handler=handler(_setup))
    remove = commands.add_parser(
        "remove", help="remove the quorum device",
        description="""\
Remove quorum.device from corosync.conf (config_version + 1) and the cluster's qnetd
certificate and key from priv/qdevice/. Expected votes drop by the device's votes at once on
every node. qnetd forgets the cluster by itself once no node connects.""" + ASKS_THE_DAEMON,
        epilog="examples:\n  pmxfs qdevice remove", formatter_class=raw)
    remove.set_defaults(handler=handler(_remove))


def _setup(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "qdevice-setup", address=args.address, token=args.token,
                     algorithm=args.algorithm, tie_breaker=args.tie_breaker, force=args.force)
    print(f"enrolled the cluster with qnetd at {answer['host']} (cluster id "
          f"{answer['cluster_id']})")
    print(f"quorum device configured: algorithm {answer['algorithm']}, tie-breaker "
          f"{answer['tie_breaker']}, {answer['votes']} vote(s); config_version "
          f"{answer['config_version']}")
    return 0


def _remove(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "qdevice-remove")
    if answer["removed"] is not None:
        print(f"removed the quorum device (qnetd {answer['removed']}); config_version "
              f"{answer['config_version']}")
    if answer["files"]:
        print(f"removed {', '.join(answer['files'])} from the tree")
    return 0
