"""`pmxfs debug ring|transport|quorum|tree|checksum|verify [--json]`: ask the running daemon
about its ring, network, quorum and tree (`debug cpg`, which joins a ring by itself, is
commands/debug_cpg.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmxfs.commands.control import DEFAULT_RUN_DIR, handler, print_json
from pmxfs.runtime.ipc_client import READ_TOPICS, request

DEBUG_TOPICS = (*sorted(READ_TOPICS), "verify")


def register(debug_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        parser.set_defaults(handler=handler(_debug), topic=topic)


def _debug(args: argparse.Namespace, path: Path) -> int:
    result = request(path, "debug", topic=args.topic)
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(render_debug_text(args.topic, result))
    return 0


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
