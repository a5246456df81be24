"""`pmxfs join-token [--ttl DURATION]`: a one-time token for `pmxfs add` (runtime/lifecycle.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmxfs.commands.control import ASKS_THE_DAEMON, handler
from pmxfs.core.join_token import DEFAULT_TTL_S, MIN_TTL_S, TokenError, parse_ttl
from pmxfs.runtime.ipc_client import request


def configure(token: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs join-token` (see `pmxfs.cli`)."""
    token.formatter_class = argparse.RawDescriptionHelpFormatter
    token.description = f"""\
Print one line: a token with which one new node joins the cluster (`pmxfs add HOST --token
TOKEN` on that node), without SSH or a root password. It carries this node's join address and
port, the fingerprint of the cluster's join TLS certificate (the joiner refuses any other) and a
one-time secret. Tokens are stored in the tree only as hashes, so every member can serve them;
they can be used once and expire after --ttl (default {DEFAULT_TTL_S // 60}m, at least
{MIN_TTL_S}s). Every member serves joins (TCP, `pmxfs daemon --join-port`, 5406 by default) only
while an unexpired token exists. Needs a quorate member.""" + ASKS_THE_DAEMON
    token.epilog = """\
examples:
  pmxfs join-token
  pmxfs join-token --ttl 2h"""
    token.add_argument("--ttl", default=f"{DEFAULT_TTL_S // 60}m", metavar="DURATION",
                       type=_ttl, help="how long the token is valid: 30s, 15m, 2h, 1d "
                                       "(default: %(default)s)")
    token.set_defaults(handler=handler(_join_token))


def _ttl(text: str) -> int:
    try:
        return parse_ttl(text)
    except TokenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _join_token(args: argparse.Namespace, path: Path) -> int:
    answer = request(path, "join-token", ttl=args.ttl)
    print(answer["token"])
    return 0
