"""`pmxfs expected N`: set the expected votes of this partition, like `pvecm expected N`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.runtime.ipc_client import request


def configure(expected: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs expected` (see `pmxfs.cli`)."""
    expected.formatter_class = argparse.RawDescriptionHelpFormatter
    expected.description = """\
Set the expected votes of this partition to N, like `pvecm expected N`: a node left alone has
lost quorum, so its tree is read-only; after `pmxfs expected 1` it takes writes again. Refused
when N is not between 1 and the votes that exist, when N is lower than the votes present, or
when a quorate partition would lose quorum.""" + ASKS_THE_DAEMON
    expected.epilog = """\
examples:
  pmxfs expected 1      # this node alone takes writes; what it writes while cut off may be
                        # set aside in lost+found when it meets the others again"""
    expected.add_argument("votes", metavar="N", type=int, help="the new expected votes")
    expected.set_defaults(handler=handler(_expected))


def _expected(args: argparse.Namespace, path: Path) -> int:
    request(path, "expected", votes=args.votes)
    return 0
