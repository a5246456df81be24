"""`pmxfs status [--json]`: quorum and membership as this node sees them, like `pvecm status`.
`--json` prints exactly what the daemon answered (its keys: docs/cli.md, checked by
`check_status_shape`, which the daemon's tests reuse); the text form is rendered with
`pmxfs.core.quorum.render_status`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pmxfs.commands.control import ASKS_THE_DAEMON, Shape, handler, print_json, shape_problems
from pmxfs.core.quorum import ClusterInfo, MemberInfo, QuorumStatus, render_status
from pmxfs.runtime.ipc_client import ControlError, request

MEMBER_SHAPE: Shape = {"nodeid": int, "name": str, "votes": int, "local": bool}
LINK_SHAPE: Shape = {"nodeid": int, "name": str, "link": int, "address": str, "connected": bool,
                     "active": bool}
STATUS_SHAPE: Shape = {
    "cluster": {"name": str, "config_version": int,
                "transport": frozenset({"knet", "udpu", "udp"})},
    "node": {"name": str, "nodeid": int},
    "quorum": {"quorate": bool, "expected_votes": int, "highest_expected": int,
               "total_votes": int, "quorum": int, "flags": [str]},
    "membership": {"ring_id": str, "members": [MEMBER_SHAPE]},
    "fs": {"synced": bool, "version": int},
}
QDEVICE_SHAPE: Shape = {"host": str, "algorithm": frozenset({"ffsplit", "lms"}),
                        "connected": bool, "casting_vote": bool}
# Keys present only while they have something to say; "links" (one entry per peer and link,
# as `pmxfs links`) is always sent by this daemon, optional for the answers of older ones.
OPTIONAL_SHAPE: dict[str, Shape] = {"restart_needed": [str], "qdevice": QDEVICE_SHAPE,
                                    "links": [LINK_SHAPE]}


def configure(status: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs status` (see `pmxfs.cli`)."""
    status.formatter_class = argparse.RawDescriptionHelpFormatter
    status.description = """\
Show the cluster as this node sees it, like `pvecm status`: cluster name and config_version,
this node, votequorum (expected and total votes, quorum, flags, quorate or not), the members
of the current ring and whether the tree is synced. With a quorum device, its line among the
members (its votes while the ring counts them) and the flags Qdevice, QdeviceAlive (this node
is connected to qnetd) and QdeviceCastVote (this node casts the device's vote).""" + ASKS_THE_DAEMON
    status.epilog = ("examples:\n  pmxfs status\n  pmxfs status --json | jq .quorum.quorate\n"
                     "  pmxfs --run-dir ./pmxfs-demo/node1/run status")
    status.add_argument("--json", action="store_true",
                        help="print the daemon's answer as JSON (its keys: docs/cli.md)")
    status.set_defaults(handler=handler(_status))


def check_status_shape(obj: object) -> list[str]:
    """What is wrong with `obj` as an answer of `status` (docs/cli.md); empty when nothing."""
    if not isinstance(obj, dict):
        return list(shape_problems(obj, STATUS_SHAPE, "status"))
    optional = {k: v for k, v in obj.items() if k in OPTIONAL_SHAPE}
    required = {k: v for k, v in obj.items() if k not in OPTIONAL_SHAPE}
    return [*shape_problems(required, STATUS_SHAPE, "status"),
            *shape_problems(optional, {k: OPTIONAL_SHAPE[k] for k in optional}, "status")]


def _status(args: argparse.Namespace, path: Path) -> int:
    status = request(path, "status")
    if args.json:
        print_json(status)
        return 0
    problems = check_status_shape(status)
    if problems:
        raise ControlError(f"unexpected status from the daemon: {problems[0]}")
    sys.stdout.write(render_status_text(status, date=time.ctime()))
    return 0


def render_status_text(status: dict[str, Any], *, date: str) -> str:
    """`pmxfs status` as `pvecm status` shows it, from a `status` answer of the right shape."""
    q = status["quorum"]
    members = sorted(status["membership"]["members"], key=lambda m: m["nodeid"])
    member_votes = tuple((m["nodeid"], m["votes"]) for m in members)
    qdevice_votes = (max(0, q["total_votes"] - sum(v for _, v in member_votes))  # the ring's
                     if "qdevice" in status else 0)
    quorum = QuorumStatus(
        quorate=q["quorate"], expected_votes=q["expected_votes"],
        highest_expected=q["highest_expected"], total_votes=q["total_votes"], quorum=q["quorum"],
        flags=tuple(q["flags"]), members=tuple(m["nodeid"] for m in members),
        member_votes=member_votes, qdevice_votes=qdevice_votes)
    cluster = status["cluster"]
    text = render_status(
        quorum, date=date, local_nodeid=status["node"]["nodeid"],
        ring_id=status["membership"]["ring_id"],
        members=[MemberInfo(m["nodeid"], m["votes"], m["name"]) for m in members],
        cluster=ClusterInfo(cluster["name"], cluster["config_version"], cluster["transport"]))
    if "qdevice" in status and not qdevice_votes:  # configured, but its vote does not count
        text += f"0x{0:08x} {0:>10} Qdevice\n"
    if status.get("restart_needed"):
        text += ("\nRestart needed\n~~~~~~~~~~~~~~\nThe cluster took a corosync.conf whose changes "
                 "below take effect on this node\nonly when pmxfs restarts:\n"
                 + "".join(f"  {reason}\n" for reason in status["restart_needed"]))
    return text
