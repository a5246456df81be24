"""`pmxfs daemon`: the command line of a node. Its options become `DaemonSettings`; the node
itself -- directories, lock, config, transport, mount, control socket, in their start-up order --
is assembled by `pmxfs.runtime.daemon`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pmxfs.commands import control
from pmxfs.core.join_token import JOIN_PORT
from pmxfs.core.replica import DEFAULT_VERIFY_INTERVAL_MS
from pmxfs.runtime import log_setup
from pmxfs.runtime.daemon import DaemonSettings, serve
from pmxfs.runtime.metrics_http import MetricsListenError, parse_listen

DEFAULT_CONFIG = "/etc/pmxfs/corosync.conf"
DEFAULT_AUTHKEY = "/etc/pmxfs/authkey"
DEFAULT_MOUNT = "/etc/pve"
DEFAULT_DATA_DIR = "/var/lib/pmxfs"

DESCRIPTION = """\
Run this node of the cluster in the foreground: join the ring described by --config, keep the
replicated tree in DATA_DIR/config.db and mount it with FUSE at --mount. Without --config (a
fresh host) it runs standalone -- a one-node tree, always quorate, as pmxcfs does -- until
`pmxfs create` or `pmxfs add` makes it a cluster node, without a restart. The client commands
(`pmxfs status`, `nodes`, `expected`, `log`, `metrics`, `debug`) talk to it over
RUN_DIR/pmxfs.sock. It logs to stderr, one line per event; a message repeated within 30 s is
written once and then counted ("... last message repeated N times"); under systemd each line
carries its syslog level for the journal. --metrics-listen serves Prometheus metrics over HTTP.
systemd/pmxfs.service runs it with the default paths.

--data-dir, --run-dir and the mount point are created when missing, and the log says so; their
parent directories are not (a mistyped path is refused). The mount point must be an empty
directory: the daemon refuses to hide files under its mount and names them.

SIGTERM or SIGINT unmounts and exits 0. Any other end (an error, which exits 1, or SIGKILL)
leaves the mount dead, answering "Transport endpoint is not connected", so nothing is written
into the directory underneath; the next start takes the dead mount away and mounts again.
Exit 1 with one line `pmxfs: reason` when it cannot start."""

EXAMPLES = f"""\
examples:
  pmxfs daemon                      # as systemd/pmxfs.service: {DEFAULT_CONFIG}, {DEFAULT_MOUNT}
  pmxfs daemon --node pve1 --debug  # this host is pve1 in the nodelist; log debug messages
  pmxfs daemon --local --mount /tmp/pve --data-dir /tmp/pmxfs-data --run-dir /tmp/pmxfs-run"""


def configure(p: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs daemon` (see `pmxfs.cli`)."""
    p.description, p.epilog = DESCRIPTION, EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="the cluster's corosync.conf (default: %(default)s)")
    p.add_argument("--authkey", default=DEFAULT_AUTHKEY, metavar="FILE",
                   help="the cluster's authkey, see `pmxfs keygen` (default: %(default)s)")
    p.add_argument("--node", metavar="NAME",
                   help="this node's name in the nodelist (default: the host name)")
    p.add_argument("--mount", default=DEFAULT_MOUNT, metavar="DIR",
                   help="where the tree is mounted (default: %(default)s)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                   help="the node's database config.db, ring state and lost+found "
                        "(default: %(default)s)")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="where the control socket pmxfs.sock is made (default: the global "
                        f"--run-dir: $PMXFS_RUN_DIR, else {control.DEFAULT_RUN_DIR})")
    p.add_argument("--local", action="store_true",
                   help="run standalone (a one-node tree without network, always quorate) even "
                        "when --config exists; --config and --authkey are not read")
    p.add_argument("--join-port", type=int, default=JOIN_PORT, metavar="PORT",
                   help="TCP port of the join service, served on this node's ring0 address "
                        "while a token from `pmxfs join-token` is valid (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--no-realtime", dest="realtime", action="store_false",
                   help="stay at normal scheduling priority (by default the daemon runs under "
                        "SCHED_RR, as corosync does, so busy cores do not delay the token)")
    p.add_argument("--metrics-listen", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (default: off; "
                        "`pmxfs metrics` prints them without it)")
    p.add_argument("--verify-interval", type=int, default=DEFAULT_VERIFY_INTERVAL_MS // 1000,
                   metavar="SECONDS", help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of `pmxfs daemon`; returns the exit status."""
    metrics_listen = None
    if args.metrics_listen is not None:
        try:
            metrics_listen = parse_listen(args.metrics_listen)
        except MetricsListenError as exc:
            print(f"pmxfs: {exc}", file=sys.stderr)
            return 2
    handler = log_setup.install(debug=args.debug)
    try:
        return _serve(args, metrics_listen)
    finally:
        handler.flush_repeats()


def _serve(args: argparse.Namespace, metrics_listen: tuple[str, int] | None) -> int:
    return serve(DaemonSettings(
        config=Path(args.config).absolute(), authkey=Path(args.authkey), node=args.node,
        mount=Path(os.path.realpath(args.mount)),  # as the mount table names it
        data_dir=Path(args.data_dir).absolute(),
        run_dir=Path(args.run_dir or args.global_run_dir), local=args.local,
        verify_interval_ms=args.verify_interval * 1000, realtime=args.realtime,
        join_port=args.join_port, metrics_listen=metrics_listen))
