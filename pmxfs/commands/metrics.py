"""`pmxfs metrics`: the running daemon's metrics in Prometheus text exposition format 0.0.4,
as its `--metrics-listen` endpoint serves them (names: docs/cli.md). The daemon renders the
text (runtime/node_metrics.py); this command prints it unchanged, so a node without an HTTP
listener can be scraped through a textfile collector or a cron job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import ControlError, request


def configure(metrics: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs metrics` (see `pmxfs.cli`)."""
    metrics.formatter_class = argparse.RawDescriptionHelpFormatter
    metrics.description = """\
Print the daemon's metrics in Prometheus text format (0.0.4): ring id and membership changes,
token rotations and retransmissions, frames dropped by reason, writes proposed, applied and
refused by errno, write latency and database commit latency (histograms, seconds), syncs and
their duration, quorum state and votes, link state per peer and link, pending writes. The same
text is served at http://ADDR:PORT/metrics by `pmxfs daemon --metrics-listen ADDR:PORT`.""" \
        + ASKS_THE_DAEMON
    metrics.epilog = ("examples:\n  pmxfs metrics\n"
                      "  pmxfs metrics | grep ^pmxfs_quorum_quorate\n"
                      "  pmxfs metrics > /var/lib/node_exporter/pmxfs.prom.$$ && "
                      "mv /var/lib/node_exporter/pmxfs.prom.$$ /var/lib/node_exporter/pmxfs.prom")
    metrics.set_defaults(handler=handler(_metrics))


def _metrics(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "metrics")
    text = answer.get("text") if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise ControlError("unexpected metrics answer from the daemon")
    sys.stdout.write(text)
    return 0
