"""`pmxfs links [--json]`: this node's links to every peer, like `corosync-cfgtool -n`.

The daemon answers the control command "links" with {"links": [...]}: one entry per peer and
link, {"nodeid", "name", "link", "address", "connected", "active"} (`LINKS_SHAPE`; `active`: the
link carries the traffic to that peer now). With knet that is the transport's link health; with
udpu and udp it is the one link 0, connected while the peer is in this node's ring. `--json`
prints the answer as it came; the text form is a table, one row per peer and link.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pmxfs.commands.control import ASKS_THE_DAEMON, Shape, handler, print_json, shape_problems
from pmxfs.commands.status import LINK_SHAPE
from pmxfs.runtime.ipc_client import ControlError, request

LINKS_SHAPE: Shape = {"links": [LINK_SHAPE]}


def configure(links: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs links` (see `pmxfs.cli`)."""
    links.formatter_class = argparse.RawDescriptionHelpFormatter
    links.description = """\
Show this node's links to every other node of the cluster, like `corosync-cfgtool -n`: per
node and link, the peer's address on it, whether the link is connected (its heartbeats are
answered) and whether it carries the traffic to that node now (knet's passive mode: the
connected link of highest priority; active mode: every connected link). With transport udpu
or udp there is one link, 0, connected while the node is in this node's ring.""" + \
        ASKS_THE_DAEMON
    links.epilog = ("examples:\n  pmxfs links\n  pmxfs links --json | "
                    "jq '.links[] | select(.connected | not)'")
    links.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    links.set_defaults(handler=handler(_links))


def check_links_shape(obj: object) -> list[str]:
    """What is wrong with `obj` as an answer of `links`; empty when nothing."""
    return list(shape_problems(obj, LINKS_SHAPE, "links"))


def _links(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "links")
    if args.json:
        print_json(answer)
        return 0
    problems = check_links_shape(answer)
    if problems:
        raise ControlError(f"unexpected link list from the daemon: {problems[0]}")
    sys.stdout.write(render_links_text(answer["links"]))
    return 0


def render_links_text(links: list[dict[str, Any]]) -> str:
    """The table `pmxfs links` prints, rows by node id and link number."""
    if not links:
        return "No other nodes: this node has no links (standalone, or alone in its cluster).\n"
    rows = sorted(links, key=lambda entry: (entry["nodeid"], entry["link"]))
    width = max(len("Address"), *(len(entry["address"]) for entry in rows))
    name_width = max(len("Name"), *(len(entry["name"]) for entry in rows))
    lines = ["Links to the other nodes", "-" * len("Links to the other nodes"),
             f"{'Nodeid':>10} {'Name':<{name_width}} {'Link':>4} {'Address':<{width}} Status"]
    for entry in rows:
        status = "connected" if entry["connected"] else "down"
        if entry["active"]:
            status += ", carries traffic"
        lines.append(f"{entry['nodeid']:>10} {entry['name']:<{name_width}} {entry['link']:>4} "
                     f"{entry['address']:<{width}} {status}")
    return "\n".join(lines) + "\n"
