"""`pmxfs daemon --metrics-listen ADDR:PORT`: `/metrics` over HTTP for a Prometheus scraper.

How it works. A tiny HTTP/1.0 responder on trio: one request per connection, answered and
closed. It reads at most `MAX_REQUEST_BYTES` until the blank line that ends the headers, within
`REQUEST_TIMEOUT_S`; sends the answer within `SEND_TIMEOUT_S`; and serves at most
`MAX_CONNECTIONS` connections at once (one more is closed at once). `GET /metrics` (a query
string is ignored) answers 200 with the text exposition, `Content-Type: text/plain;
version=0.0.4`; `HEAD` the same headers; another path 404, another method 405, a request that
is not HTTP, too large or too slow 400 (or nothing, when the client is gone). Nothing a client
does raises out of a connection's handler: a failure of the renderer is logged and answered
500, so the daemon never stops because of a scrape.

Why not http.server or a framework: the daemon is one trio program, and a thread-based server
would run the renderer beside the trio thread that changes the state it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger("pmxfs.metrics")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsListenError(Exception):
    """The listening address is malformed or cannot be bound; one line."""


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT` (`[v6]:PORT` for IPv6) as (host, port); `MetricsListenError` when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MetricsListenError(f"--metrics-listen wants ADDR:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """The listening sockets for `host:port` (port 0: any); `MetricsListenError` when they
    cannot be bound. The daemon binds them before it mounts, so a refusal leaves nothing."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MetricsListenError(f"cannot listen for metrics on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None


def bound_port(listeners: list[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve_metrics(listeners: list[trio.SocketListener], render: Callable[[], str], *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `render()` at /metrics on `listeners` until cancelled (closes them then)."""
    log.info("serving metrics on port %d at /metrics", bound_port(listeners))
    server = _Server(render)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started()


class _Server:
    def __init__(self, render: Callable[[], str]) -> None:
        self.render = render
        self.open = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (trio.serve_listeners closes it after)."""
        if self.open >= MAX_CONNECTIONS:
            return
        self.open += 1
        try:
            answer = await self._answer(stream)
            if answer is not None:
                with trio.move_on_after(SEND_TIMEOUT_S):
                    await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # never let one connection stop the daemon
            log.exception("metrics connection failed")
        finally:
            self.open -= 1

    async def _answer(self, stream: trio.SocketStream) -> bytes | None:
        head = None
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            head = await _read_head(stream)
        if head is None:
            return _response(400, "Bad Request", "request too large, too slow or not HTTP\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, "Bad Request", "not an HTTP request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, "Method Not Allowed", "only GET and HEAD\n",
                             extra="Allow: GET, HEAD\r\n")
        if target != b"/metrics":
            return _response(404, "Not Found", "metrics are at /metrics\n",
                             head_only=method == b"HEAD")
        try:
            body = self.render()
        except Exception:
            log.exception("rendering the metrics failed")
            return _response(500, "Internal Server Error", "rendering the metrics failed\n")
        return _response(200, "OK", body, content_type=CONTENT_TYPE,
                         head_only=method == b"HEAD")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers; None when the client closed first or sent too much."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) >= MAX_REQUEST_BYTES:
            return None
        chunk = await stream.receive_some(MAX_REQUEST_BYTES - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _response(code: int, reason: str, body: str, *, content_type: str = "text/plain",
              extra: str = "", head_only: bool = False) -> bytes:
    payload = body.encode("utf-8")
    header = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n")
    return header.encode("ascii") + (b"" if head_only else payload)

