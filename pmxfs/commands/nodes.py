"""`pmxfs nodes [--json]`: the nodes of the nodelist, like `pvecm nodes`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pmxfs.commands.control import ASKS_THE_DAEMON, Shape, handler, print_json, shape_problems
from pmxfs.runtime.ipc_client import ControlError, request

NODES_SHAPE: Shape = [{"nodeid": int, "votes": int, "name": str, "local": bool, "online": bool,
                       "joined": (int, type(None))}]


def configure(nodes: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs nodes` (see `pmxfs.cli`)."""
    nodes.formatter_class = argparse.RawDescriptionHelpFormatter
    nodes.description = """\
List the nodes of the cluster's nodelist, like `pvecm nodes`: node id, votes, name, which one
is this node, which are online and since when each online node is in this node's ring
(`Joined`, local time).""" + ASKS_THE_DAEMON
    nodes.epilog = "examples:\n  pmxfs nodes\n  pmxfs nodes --json"
    nodes.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    nodes.set_defaults(handler=handler(_nodes))


def _nodes(args: argparse.Namespace, path: Path) -> int:
    nodes = request(path, "nodes")
    if args.json:
        print_json(nodes)
        return 0
    problems = list(shape_problems(nodes, NODES_SHAPE, "nodes"))
    if problems:
        raise ControlError(f"unexpected node list from the daemon: {problems[0]}")
    sys.stdout.write(render_nodes_text(nodes))
    return 0


def render_nodes_text(nodes: list[dict[str, Any]]) -> str:
    """`pmxfs nodes` as `pvecm nodes` shows it; nodelist entries not in the ring come after,
    then when each online node joined this node's ring."""
    online = [n for n in nodes if n["online"]]
    offline = [n for n in nodes if not n["online"]]
    lines = [*_heading("Membership information"), *_node_rows(online)]
    if offline:
        lines += ["", *_heading("Offline nodes"), *_node_rows(offline)]
    joined = [n for n in online if n["joined"] is not None]
    if joined:
        lines += ["", *_heading("In this node's ring since"), *_joined_rows(joined)]
    return "\n".join(lines) + "\n"


def _heading(title: str) -> list[str]:
    return [title, "-" * len(title)]


def _node_rows(nodes: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'Nodeid':>10} {'Votes':>10} Name"]
    for n in sorted(nodes, key=lambda n: n["nodeid"]):
        local = " (local)" if n["local"] else ""
        rows.append(f"{n['nodeid']:>10} {n['votes']:>10} {n['name']}{local}")
    return rows


def _joined_rows(nodes: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'Nodeid':>10} {'Joined':<19} Name"]
    for n in sorted(nodes, key=lambda n: n["nodeid"]):
        joined = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(n["joined"]))
        rows.append(f"{n['nodeid']:>10} {joined:<19} {n['name']}")
    return rows
