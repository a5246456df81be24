"""One line for an error of a TLS or TCP connection, whatever trio wrapped it in.

trio raises `BrokenResourceError` with the `ssl.SSLError` or `OSError` that broke the stream as
its cause; a log line or a message for the admin wants that cause, in one line ("certificate
verify failed", "Connection reset by peer"), not trio's wrapper text. Used by every TLS
channel: the join channel, qnetd's enrollment and server, the node's device client.
"""

from __future__ import annotations

import ssl

import trio


def one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace runs made single spaces, cut at `limit` characters."""
    return " ".join(text.split())[:limit]


def reason(exc: BaseException) -> str:
    """One line for `exc`, or for the SSL or OS error trio wrapped in it."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLError):
        return one_line(cause.reason or str(cause))
    if isinstance(cause, OSError):
        return cause.strerror or one_line(str(cause)) or type(cause).__name__
    return one_line(str(exc)) or type(exc).__name__
