"""`pmxfs debug cpg`: join a ring and watch it, like corosync's testcpg.

    pmxfs debug cpg --config FILE --authkey FILE --node NAME [--data-dir DIR]

Joins the ring described by FILE as node NAME and prints one JSON object per line on stdout:

    {"event": "confchg", "kind": "transitional"|"regular", "ring_id": "1.8",
     "members": [1, 2], "left": [3], "joined": []}
    {"event": "deliver", "from": 2, "ring_id": "1.8", "seq": 17, "data": "hello"}
    {"event": "counters", "totem": {...}, "transport": {...}}   (on SIGUSR1 and when leaving)

Each line read on stdin is multicast as one message (UTF-8 text, without its newline); after
end of input it keeps watching. SIGINT or SIGTERM leave cleanly (exit 0). A bad FILE is reported
as `pmxfs config check` reports it, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import trio

from pmxfs.core import conf
from pmxfs.core.totem import ConfChange, Deliver, Stable
from pmxfs.runtime.attachments import open_cluster_transport
from pmxfs.runtime.boot_id import BootIdFileError, next_boot_id
from pmxfs.runtime.config_file import load_checked
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.ring_seq import RingSeqFileError, RingSeqStore
from pmxfs.runtime.totem_node import TotemNode
from pmxfs.runtime.transport import AuthkeyError, load_authkey

DEFAULT_DATA_DIR = "/var/lib/pmxfs"


DESCRIPTION = """\
Join the ring described by --config as node --node, without a tree or a mount, and print what
the ring delivers, like corosync's testcpg: one JSON object per line on stdout.

  {"event": "confchg", "kind": "transitional"|"regular", "ring_id": "1.8",
   "members": [1, 2], "left": [3], "joined": []}
  {"event": "deliver", "from": 2, "ring_id": "1.8", "seq": 17, "data": "hello"}
  {"event": "counters", "totem": {...}, "transport": {...}}   (on SIGUSR1 and when leaving)

Each line typed on stdin is sent to the ring as one message. SIGINT (Ctrl-C) or SIGTERM leave
cleanly, exit 0. A bad config is reported as `pmxfs config check` reports it, exit 1. It binds
the node's address and port, so it cannot run beside that node's daemon."""

EXAMPLES = """\
examples (each node in its own shell):
  pmxfs keygen ./authkey
  pmxfs debug cpg --config corosync.conf --authkey ./authkey --node node1 --data-dir ./d1
  pmxfs debug cpg --config corosync.conf --authkey ./authkey --node node2 --data-dir ./d2"""


def register(debug_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `cpg` to the `pmxfs debug` parser."""
    cpg = debug_commands.add_parser(
        "cpg", help="join a ring and print deliveries and configuration changes as JSON lines",
        description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cpg.add_argument("--config", required=True, metavar="FILE", help="the corosync.conf")
    cpg.add_argument("--authkey", required=True, metavar="FILE", help="the cluster authkey")
    cpg.add_argument("--node", required=True, metavar="NAME", help="this node's name in FILE")
    cpg.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                     help=f"where the ring seq is kept (default: {DEFAULT_DATA_DIR})")
    cpg.set_defaults(handler=run)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def event_json(event: Deliver | ConfChange) -> dict[str, Any]:
    if isinstance(event, Deliver):
        return {"event": "deliver", "from": event.sender, "ring_id": str(event.ring_id),
                "seq": event.seq, "data": event.payload.decode("utf-8", errors="replace")}
    return {"event": "confchg", "kind": event.kind.value, "ring_id": str(event.ring_id),
            "members": list(event.members), "left": list(event.left),
            "joined": list(event.joined)}


def run(args: argparse.Namespace) -> int:
    config = load_checked(args.config)
    if config is None:
        return 1
    me = config.node_by_name(args.node)
    if me is None or me.nodeid is None:
        print(f"pmxfs: node {args.node!r} is not in {args.config}", file=sys.stderr)
        return 1
    try:
        authkey = load_authkey(args.authkey)
        ring_seq_store = RingSeqStore(args.data_dir, me.nodeid)
        ring_seq_store.load()
        boot_id = next_boot_id(args.data_dir, me.nodeid)
    except (AuthkeyError, RingSeqFileError, BootIdFileError) as exc:
        print(f"pmxfs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pmxfs: cannot use data directory {args.data_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_watch, config, me.nodeid, authkey, boot_id, ring_seq_store)
    except (OSError, ValueError) as exc:
        print(f"pmxfs: cannot join the ring: {exc}", file=sys.stderr)
        return 1
    return 0


async def _watch(config: conf.ClusterConfig, node_id: int, authkey: bytes, boot_id: bytes,
                 store: RingSeqStore) -> None:
    infos = config.node_infos()
    nodes = [i.nodeid for i in infos]
    crypto = FrameCrypto(authkey, config.cluster_name, node_id, nodes, boot_id=boot_id)
    transport = await open_cluster_transport(config, node_id, crypto)
    node = TotemNode(node_id, nodes, conf.totem_params(config), transport, store)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                nursery.start_soon(_print_events, node)
                nursery.start_soon(_read_stdin, node)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        _emit_counters(node)
                        continue
                    break
                nursery.cancel_scope.cancel()
        _emit_counters(node)
    finally:
        transport.close()


def _emit_counters(node: TotemNode) -> None:
    status = node.status()
    _emit({"event": "counters", "totem": status.totem.counters,
           "transport": status.transport_counters})


async def _print_events(node: TotemNode) -> None:
    async for batch in node.events():
        for event in batch:
            if not isinstance(event, Stable):
                _emit(event_json(event))


async def _read_stdin(node: TotemNode) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffered = b""
    async with stdin:
        while chunk := await stdin.receive_some(65536):
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                await node.mcast(line)
    if buffered:
        await node.mcast(buffered)
