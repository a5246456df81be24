"""`pmxfs log [--tag T] [--priority P] MESSAGE...`: add an entry to the cluster log."""

from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import request

PRIORITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5,
              "info": 6, "debug": 7}
PRIORITY_NAMES = PRIORITIES | {"panic": 0, "error": 3, "warn": 4}  # logger(1) accepts these too


def configure(log: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs log` (see `pmxfs.cli`)."""
    log.formatter_class = argparse.RawDescriptionHelpFormatter
    log.description = """\
Add MESSAGE to the cluster log, like logger(1); the ring carries it to every node, and the
newest entries are in /etc/pve/.clusterlog.""" + ASKS_THE_DAEMON
    log.epilog = ("examples:\n  pmxfs log maintenance of node2 starts\n"
                  "  pmxfs log --tag backup --priority warning 'backup of 100 failed'")
    log.add_argument("--tag", default="pmxfs", help="the entry's tag (default: %(default)s)")
    log.add_argument("--priority", default="info", type=_priority, metavar="P",
                     help="a syslog priority: emerg, alert, crit, err, warning, notice, info, "
                          "debug or 0-7 (default: info)")
    log.add_argument("message", metavar="MESSAGE", nargs="+", help="the message (words are "
                     "joined with spaces)")
    log.set_defaults(handler=handler(_log))


def _priority(text: str) -> int:
    value = text.strip().lower()
    if value.isdigit() and int(value) <= 7:
        return int(value)
    if value in PRIORITY_NAMES:
        return PRIORITY_NAMES[value]
    raise argparse.ArgumentTypeError(f"unknown priority {text!r} (use {', '.join(PRIORITIES)} "
                                     "or 0-7)")


def _log(args: argparse.Namespace, path: Path) -> int:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    request(path, "log", priority=args.priority, tag=args.tag, user=user, pid=os.getpid(),
            msg=" ".join(args.message))
    return 0
