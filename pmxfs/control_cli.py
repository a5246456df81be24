"""The `pmxfs` subcommands that talk to the local daemon over its control socket.

    pmxfs [--run-dir DIR] status [--json]     like `pvecm status`
    pmxfs [--run-dir DIR] nodes [--json]      like `pvecm nodes`
    pmxfs [--run-dir DIR] expected N          like `pvecm expected N`
    pmxfs [--run-dir DIR] log [--tag T] [--priority P] MESSAGE...
    pmxfs [--run-dir DIR] debug ring|transport|quorum|tree|checksum|verify [--json]

The socket is `<run-dir>/pmxfs.sock` (`--run-dir`, else $PMXFS_RUN_DIR, else /run/pmxfs; the
option lives on the top-level parser as `global_run_dir`). `--json` prints exactly what the daemon
answered; the text forms are rendered here (`status` with `pmxfs.core.quorum.render_status`).
No daemon listening: `pmxfs: no daemon at <socket> (is pmxfs running?)`, exit 2. A refusal or any
other failure: `pmxfs: <reason>`, exit 1.

`check_status_shape` checks an answer of `status` against docs/cli.md (exact keys and types); the
text form uses it before rendering, and tests of the daemon reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from pmxfs.core.quorum import ClusterInfo, MemberInfo, QuorumStatus, render_status
from pmxfs.runtime.ipc import READ_TOPICS, ControlError, NoDaemonError, request

DEFAULT_RUN_DIR = "/run/pmxfs"
SOCKET_NAME = "pmxfs.sock"
DEBUG_TOPICS = (*sorted(READ_TOPICS), "verify")
PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}
PRIORITY_NAMES = PRIORITIES | {"panic": 0, "error": 3, "warn": 4}  # logger(1) accepts these too

Action: TypeAlias = Callable[[argparse.Namespace, Path], int]

# --------------------------------------------------------------------------------------------
# The shape of `status --json` (docs/cli.md)

# A shape: a type (int excludes bool), a set of allowed strings, [shape] for a list of them, or
# a dict of exactly these keys.
Shape: TypeAlias = "type | frozenset[str] | list[Shape] | dict[str, Shape]"

MEMBER_SHAPE: Shape = {"nodeid": int, "name": str, "votes": int, "local": bool}
STATUS_SHAPE: Shape = {
    "cluster": {"name": str, "config_version": int, "transport": frozenset({"udpu", "udp"})},
    "node": {"name": str, "nodeid": int},
    "quorum": {"quorate": bool, "expected_votes": int, "highest_expected": int,
               "total_votes": int, "quorum": int, "flags": [str]},
    "membership": {"ring_id": str, "members": [MEMBER_SHAPE]},
    "fs": {"synced": bool, "version": int},
}
NODES_SHAPE: Shape = [{"nodeid": int, "votes": int, "name": str, "local": bool, "online": bool}]


def check_status_shape(obj: object) -> list[str]:
    """What is wrong with `obj` as an answer of `status` (docs/cli.md); empty when nothing."""
    return list(_shape_problems(obj, STATUS_SHAPE, "status"))


def _shape_problems(obj: object, shape: Shape, where: str) -> Iterator[str]:
    if isinstance(shape, dict):
        if not isinstance(obj, dict):
            yield f"{where}: expected an object, got {type(obj).__name__}"
            return
        for key in sorted(set(shape) - set(obj)):
            yield f"{where}: missing key {key!r}"
        for key in sorted(set(obj) - set(shape), key=str):
            yield f"{where}: unexpected key {key!r}"
        for key, sub in shape.items():
            if key in obj:
                yield from _shape_problems(obj[key], sub, f"{where}.{key}")
    elif isinstance(shape, list):
        if not isinstance(obj, list):
            yield f"{where}: expected a list, got {type(obj).__name__}"
            return
        for index, item in enumerate(obj):
            yield from _shape_problems(item, shape[0], f"{where}[{index}]")
    elif isinstance(shape, frozenset):
        if obj not in shape:
            yield f"{where}: expected one of {', '.join(sorted(shape))}, got {obj!r}"
    elif not isinstance(obj, shape) or (shape is int and isinstance(obj, bool)):
        yield f"{where}: expected {shape.__name__}, got {type(obj).__name__}"


# --------------------------------------------------------------------------------------------
# Registration


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status`, `nodes`, `expected` and `log` to the `pmxfs` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    daemon = f"""

It asks the local daemon over RUN_DIR/pmxfs.sock (`pmxfs --run-dir RUN_DIR ...`, default
$PMXFS_RUN_DIR, else {DEFAULT_RUN_DIR}): exit 2 when no daemon answers, 1 when it refuses.
root may do everything, members of group www-data may only read."""
    status = subparsers.add_parser(
        "status", help="quorum and membership (like pvecm status)", formatter_class=raw,
        description="""\
Show the cluster as this node sees it, like `pvecm status`: cluster name and config_version,
this node, votequorum (expected and total votes, quorum, flags, quorate or not), the members
of the current ring and whether the tree is synced.""" + daemon,
        epilog="examples:\n  pmxfs status\n  pmxfs status --json | jq .quorum.quorate\n"
               "  pmxfs --run-dir ./pmxfs-demo/node1/run status")
    status.add_argument("--json", action="store_true",
                        help="print the daemon's answer as JSON (its keys: docs/cli.md)")
    status.set_defaults(handler=_handler(_status))
    nodes = subparsers.add_parser(
        "nodes", help="the nodes of the cluster (like pvecm nodes)", formatter_class=raw,
        description="""\
List the nodes of the cluster's nodelist, like `pvecm nodes`: node id, votes, name, which one
is this node and which are online.""" + daemon,
        epilog="examples:\n  pmxfs nodes\n  pmxfs nodes --json")
    nodes.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    nodes.set_defaults(handler=_handler(_nodes))
    expected = subparsers.add_parser(
        "expected", help="set the expected votes (like pvecm expected)", formatter_class=raw,
        description="""\
Set the expected votes of this partition to N, like `pvecm expected N`: a node left alone has
lost quorum, so its tree is read-only; after `pmxfs expected 1` it takes writes again. Refused
when N is not between 1 and the votes that exist, when N is lower than the votes present, or
when a quorate partition would lose quorum.""" + daemon,
        epilog="""\
examples:
  pmxfs expected 1      # this node alone takes writes; what it writes while cut off may be
                        # set aside in lost+found when it meets the others again""")
    expected.add_argument("votes", metavar="N", type=int, help="the new expected votes")
    expected.set_defaults(handler=_handler(_expected))
    log = subparsers.add_parser(
        "log", help="add a message to the cluster log", formatter_class=raw,
        description="""\
Add MESSAGE to the cluster log, like logger(1); the ring carries it to every node, and the
newest entries are in /etc/pve/.clusterlog.""" + daemon,
        epilog="examples:\n  pmxfs log maintenance of node2 starts\n"
               "  pmxfs log --tag backup --priority warning 'backup of 100 failed'")
    log.add_argument("--tag", default="pmxfs", help="the entry's tag (default: %(default)s)")
    log.add_argument("--priority", default="info", type=_priority, metavar="P",
                     help="a syslog priority: emerg, alert, crit, err, warning, notice, info, "
                          "debug or 0-7 (default: info)")
    log.add_argument("message", metavar="MESSAGE", nargs="+", help="the message (words are "
                     "joined with spaces)")
    log.set_defaults(handler=_handler(_log))


def register_debug(debug_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `pmxfs debug <topic>` subcommands that ask the running daemon."""
    helps = {"ring": "totem state, ring id, members and token counters",
             "transport": "frame counters of the cluster network",
             "quorum": "votequorum inputs and result",
             "tree": "every entry of the tree: path, type, size, version, writer, mtime",
             "checksum": "checksums of the tree and the replicated state",
             "verify": "start a verification round of the tree checksums now"}
    descriptions = {
        "ring": "Show the local daemon's totem state: ring id, members, token counters.",
        "transport": "Show the frame counters of the local daemon's cluster network: sent,\n"
                     "received, and dropped by reason (authentication, replay, ...).",
        "quorum": "Show the local daemon's votequorum inputs and result.",
        "tree": "List every entry of the local daemon's tree: path, type, size, version,\n"
                "writer, mtime.",
        "checksum": "Show the checksums of the local daemon's tree and replicated state; equal\n"
                    "checksums on two nodes mean equal trees.",
        "verify": "Start a verification round now: the members of the ring compare their tree\n"
                  "checksums, and a mismatch makes them sync (it also runs periodically)."}
    for topic in DEBUG_TOPICS:
        parser = debug_commands.add_parser(
            topic, help=f"running daemon: {helps[topic]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"""\
{descriptions[topic]}

It asks the local daemon over RUN_DIR/pmxfs.sock (`pmxfs --run-dir RUN_DIR ...`, default
$PMXFS_RUN_DIR, else {DEFAULT_RUN_DIR}); exit 2 when no daemon answers.""",
            epilog=f"examples:\n  pmxfs debug {topic}\n  pmxfs debug {topic} --json")
        parser.add_argument("--json", action="store_true",
                            help="print the daemon's answer as JSON")
        parser.set_defaults(handler=_handler(_debug), topic=topic)


def _priority(text: str) -> int:
    value = text.strip().lower()
    if value.isdigit() and int(value) <= 7:
        return int(value)
    if value in PRIORITY_NAMES:
        return PRIORITY_NAMES[value]
    raise argparse.ArgumentTypeError(f"unknown priority {text!r} (use {', '.join(PRIORITIES)} "
                                     "or 0-7)")


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket chosen by the global --run-dir (or its default)."""
    run_dir = getattr(args, "global_run_dir", None) or default_run_dir()
    return Path(run_dir) / SOCKET_NAME


def default_run_dir() -> str:
    return os.environ.get("PMXFS_RUN_DIR") or DEFAULT_RUN_DIR


def _handler(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args, socket_path(args))
        except NoDaemonError as exc:
            print(f"pmxfs: {exc}", file=sys.stderr)
            return 2
        except ControlError as exc:
            print(f"pmxfs: {exc}", file=sys.stderr)
            return 1
    return run


# --------------------------------------------------------------------------------------------
# The subcommands


def _status(args: argparse.Namespace, path: Path) -> int:
    status = request(path, "status")
    if args.json:
        _print_json(status)
        return 0
    problems = check_status_shape(status)
    if problems:
        raise ControlError(f"unexpected status from the daemon: {problems[0]}")
    sys.stdout.write(render_status_text(status, date=time.ctime()))
    return 0


def _nodes(args: argparse.Namespace, path: Path) -> int:
    nodes = request(path, "nodes")
    if args.json:
        _print_json(nodes)
        return 0
    problems = list(_shape_problems(nodes, NODES_SHAPE, "nodes"))
    if problems:
        raise ControlError(f"unexpected node list from the daemon: {problems[0]}")
    sys.stdout.write(render_nodes_text(nodes))
    return 0


def _expected(args: argparse.Namespace, path: Path) -> int:
    request(path, "expected", votes=args.votes)
    return 0


def _log(args: argparse.Namespace, path: Path) -> int:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    request(path, "log", priority=args.priority, tag=args.tag, user=user, pid=os.getpid(),
            msg=" ".join(args.message))
    return 0


def _debug(args: argparse.Namespace, path: Path) -> int:
    result = request(path, "debug", topic=args.topic)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(render_debug_text(args.topic, result))
    return 0


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Text output


def render_status_text(status: dict[str, Any], *, date: str) -> str:
    """`pmxfs status` as `pvecm status` shows it, from a `status` answer of the right shape."""
    q = status["quorum"]
    members = sorted(status["membership"]["members"], key=lambda m: m["nodeid"])
    member_votes = tuple((m["nodeid"], m["votes"]) for m in members)
    casting = "QdeviceCastVote" in q["flags"]
    qdevice_votes = max(0, q["total_votes"] - sum(v for _, v in member_votes)) if casting else 0
    quorum = QuorumStatus(
        quorate=q["quorate"], expected_votes=q["expected_votes"],
        highest_expected=q["highest_expected"], total_votes=q["total_votes"], quorum=q["quorum"],
        flags=tuple(q["flags"]), members=tuple(m["nodeid"] for m in members),
        member_votes=member_votes, qdevice_votes=qdevice_votes)
    cluster = status["cluster"]
    return render_status(
        quorum, date=date, local_nodeid=status["node"]["nodeid"],
        ring_id=status["membership"]["ring_id"],
        members=[MemberInfo(m["nodeid"], m["votes"], m["name"]) for m in members],
        cluster=ClusterInfo(cluster["name"], cluster["config_version"], cluster["transport"]))


def render_nodes_text(nodes: list[dict[str, Any]]) -> str:
    """`pmxfs nodes` as `pvecm nodes` shows it; nodelist entries not in the ring come after."""
    online = [n for n in nodes if n["online"]]
    offline = [n for n in nodes if not n["online"]]
    lines = [*_heading("Membership information"), *_node_rows(online)]
    if offline:
        lines += ["", *_heading("Offline nodes"), *_node_rows(offline)]
    return "\n".join(lines) + "\n"


def _heading(title: str) -> list[str]:
    return [title, "-" * len(title)]


def _node_rows(nodes: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'Nodeid':>10} {'Votes':>10} Name"]
    for n in sorted(nodes, key=lambda n: n["nodeid"]):
        local = " (local)" if n["local"] else ""
        rows.append(f"{n['nodeid']:>10} {n['votes']:>10} {n['name']}{local}")
    return rows


def render_debug_text(topic: str, result: Any) -> str:
    """A `debug` answer for people: the tree as a table, anything else as `key: value` lines."""
    entries = result.get("entries") if isinstance(result, dict) else None
    if topic == "tree" and isinstance(entries, list):
        return _tree_table(entries)
    pairs = list(_flatten(result, ""))
    width = max((len(key) for key, _ in pairs), default=0)
    return "".join(f"{key + ':':<{width + 1}} {value}\n" for key, value in pairs)


def _tree_table(entries: list[Any]) -> str:
    lines = [f"{'TYPE':<4} {'SIZE':>8} {'VERSION':>8} {'WRITER':>6} {'MTIME':<19} PATH"]
    for e in entries:
        if not isinstance(e, dict):
            continue
        mtime = e.get("mtime")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime))
                if isinstance(mtime, int) else "?")
        cell = {key: str(e.get(key, "?")) for key in ("type", "size", "version", "writer", "path")}
        lines.append(f"{cell['type']:<4} {cell['size']:>8} {cell['version']:>8} "
                     f"{cell['writer']:>6} {when:<19} {cell['path']}")
    lines.append(f"{len(lines) - 1} entries")
    return "\n".join(lines) + "\n"


def _flatten(value: Any, key: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for sub, item in value.items():
            yield from _flatten(item, f"{key}.{sub}" if key else str(sub))
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{key}[{index}]")
    elif isinstance(value, list):
        yield key or "value", " ".join(_scalar(item) for item in value)
    else:
        yield key or "value", _scalar(value)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
