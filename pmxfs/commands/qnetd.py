"""`pmxfs qnetd`: the quorum device's arbiter (runtime/qnetd_server.py), its directory and tokens.

* `pmxfs qnetd [--listen ADDR:PORT] [--dir DIR]` runs the server in the foreground, logging one
  line per event on stderr; SIGTERM or SIGINT end it (exit 0).
* `pmxfs qnetd init --dir DIR` makes DIR's CA and server certificate (runtime/qnetd_pki.py),
  keeping what exists.
* `pmxfs qnetd token --dir DIR [--address ADDR[:PORT]] [--ttl DURATION]` prints one enrollment
  token (core/qnetd_token.py); qnetd need not run. Without --address the token names this
  host's own address: the source address of its default route when it has one (found by
  connecting a UDP socket, which sends nothing), else 127.0.0.1.

Every problem is one line `pmxfs: reason` on stderr, exit 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import trio

from pmxfs.core.join_token import format_host_port, parse_host_port, parse_ttl
from pmxfs.core.qdevice_wire import QNETD_PORT
from pmxfs.core.qnetd_token import DEFAULT_TTL_S, TokenError, encode_token
from pmxfs.runtime import log_setup
from pmxfs.runtime.qnetd_pki import DEFAULT_DIR, PkiError, init, issue_token, load
from pmxfs.runtime.qnetd_server import QnetdServer

DEFAULT_LISTEN = f"0.0.0.0:{QNETD_PORT}"
_PROBE_ADDRESSES = (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6))


def configure(parser: argparse.ArgumentParser) -> None:
    """Fill in `pmxfs qnetd` (see `pmxfs.cli`)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = f"""\
The quorum device's arbiter, like corosync-qnetd: run it on a machine outside the cluster (a
third host for a two-node cluster). It lends the device's vote to one partition of each cluster
that enrolled with it (`pmxfs qdevice setup`), and keeps no cluster data. It listens on TCP
(default {DEFAULT_LISTEN}) with TLS: cluster nodes present a client certificate signed by
qnetd's CA. Without a subcommand it runs in the foreground, logging one line per event on
stderr, until SIGTERM or SIGINT.

First `pmxfs qnetd init --dir DIR` makes DIR's CA and server certificate; `pmxfs qnetd token
--dir DIR` prints a one-time token for `pmxfs qdevice setup` on a cluster node."""
    parser.epilog = """\
examples:
  pmxfs qnetd init --dir /etc/pmxfs-qnetd
  pmxfs qnetd token --dir /etc/pmxfs-qnetd --address 192.0.2.10
  pmxfs qnetd --listen 0.0.0.0:5403 --dir /etc/pmxfs-qnetd"""
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                        type=_address,
                        help="where to listen (default: %(default)s; [::]:5403 for IPv6)")
    parser.add_argument("--dir", dest="serve_dir", default=str(DEFAULT_DIR), metavar="DIR",
                        help="qnetd's directory, made by `pmxfs qnetd init` "
                             "(default: %(default)s)")
    parser.set_defaults(handler=run_server)
    subcommands = parser.add_subparsers(dest="qnetd_command", metavar="SUBCOMMAND")

    init_parser = subcommands.add_parser(
        "init", help="make qnetd's CA and server certificate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Make DIR (mode 0700) with qnetd's CA (ca.pem, ca.key) and the server certificate it signs
(server.pem, server.key): ECDSA P-256 keys, mode 0600. Whatever exists already is kept, so it
is safe to run again; replacing the CA means every cluster must enroll again.""",
        epilog="examples:\n  pmxfs qnetd init --dir /etc/pmxfs-qnetd")
    init_parser.add_argument("--dir", required=True, metavar="DIR", help="qnetd's directory")
    init_parser.set_defaults(handler=run_init)

    token_parser = subcommands.add_parser(
        "token", help="print a one-time enrollment token for `pmxfs qdevice setup`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Print one line: a token with which one cluster enrolls with this qnetd (`pmxfs qdevice setup
HOST --token TOKEN` on a quorate node). It carries qnetd's address and port (default
{QNETD_PORT}), the fingerprint of qnetd's CA (the node refuses any other) and a one-time
secret, stored in DIR/tokens only as a hash. It can be used once and expires after --ttl
(default {DEFAULT_TTL_S // 3600}h). qnetd need not be running.""",
        epilog="examples:\n  pmxfs qnetd token --dir /etc/pmxfs-qnetd --address 192.0.2.10\n"
               "  pmxfs qnetd token --dir /etc/pmxfs-qnetd --ttl 15m")
    token_parser.add_argument("--dir", required=True, metavar="DIR", help="qnetd's directory")
    token_parser.add_argument("--address", metavar="ADDR[:PORT]", type=_address,
                              help="where cluster nodes reach qnetd (default: this host's "
                                   "address, else 127.0.0.1)")
    token_parser.add_argument("--ttl", default=f"{DEFAULT_TTL_S // 3600}h", type=_ttl,
                              metavar="DURATION",
                              help="how long the token is valid: 30s, 15m, 2h, 1d "
                                   "(default: %(default)s)")
    token_parser.set_defaults(handler=run_token)


def run_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        made = init(directory)
    except PkiError as exc:
        return _fail(str(exc))
    print(f"{directory}: made {', '.join(made)}" if made else f"{directory}: complete already")
    return 0


def run_token(args: argparse.Namespace) -> int:
    host, port = args.address if args.address is not None else (_own_address(), QNETD_PORT)
    try:
        token = issue_token(Path(args.dir), host, port, args.ttl, time.time())
    except (PkiError, TokenError) as exc:
        return _fail(str(exc))
    print(encode_token(token))
    return 0


def run_server(args: argparse.Namespace) -> int:
    handler = log_setup.install(debug=False, program="pmxfs-qnetd")
    try:
        return _run_server(args)
    finally:
        handler.flush_repeats()


def _run_server(args: argparse.Namespace) -> int:
    host, port = args.listen
    try:
        server = QnetdServer(load(Path(args.serve_dir)))
    except PkiError as exc:
        return _fail(str(exc))
    try:
        trio.run(functools.partial(_serve, server, host, port))
    except (OSError, ExceptionGroup) as exc:
        failure = _os_error(exc)
        if failure is None:
            raise
        return _fail(f"cannot listen on {format_host_port(host, port)}: "
                     f"{failure.strerror or failure}")
    return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError in `exc`, also when trio's nursery wrapped it in an exception group."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return next((e for e in map(_os_error, exc.exceptions) if e is not None), None)
    return None


async def _serve(server: QnetdServer, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(server.serve, host, port))
            async for signum in signals:
                logging.getLogger("pmxfs.qnetd").info("stopping (%s)",
                                                     signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _own_address() -> str:
    """The source address of this host's default route, else 127.0.0.1 (module header)."""
    for probe, family in _PROBE_ADDRESSES:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            address: str = s.getsockname()[0]
            if not address.startswith("127.") and address != "::1":
                return address
    return "127.0.0.1"


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, QNETD_PORT)
    except TokenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(text: str) -> int:
    try:
        return parse_ttl(text)
    except TokenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(reason: str) -> int:
    print(f"pmxfs: {reason}", file=sys.stderr)
    return 1
