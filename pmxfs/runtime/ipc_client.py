"""The client side of the control socket (`pmxfs.runtime.ipc` is the daemon's side): the frame
format both share and `request`, which the `pmxfs` CLI calls. It imports no more than the socket,
struct and msgpack modules, so a client command starts fast (see `pmxfs.cli`).

Each request and each answer is one frame: a 4-byte big-endian length, then a msgpack map.
`request(path, cmd, **args)` is blocking: one connection per request, `TIMEOUT_S` for an answer
(`EXPECTED_TIMEOUT_S` for "expected", which waits for the ring to agree, `LIFECYCLE_TIMEOUT_S`
for the lifecycle commands). Every failure is a
`ControlError` with a one-line message; no daemon listening is `NoDaemonError`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
TIMEOUT_S = 10.0
EXPECTED_TIMEOUT_S = 60.0
LIFECYCLE_COMMANDS = frozenset({"create", "join-token", "add", "delnode"})
# commands that may wait for quorum, a remote exchange or a switch of the ring: the long timeout
SLOW_COMMANDS = LIFECYCLE_COMMANDS | {"qdevice-setup", "qdevice-remove"}
LIFECYCLE_TIMEOUT_S = 180.0  # they wait for quorum, a join exchange and a switch of the ring
HEADER = struct.Struct(">I")
READ_TOPICS = frozenset({"ring", "transport", "quorum", "tree", "checksum"})
DEBUG_TOPICS = READ_TOPICS | {"verify"}


class ControlError(Exception):
    """A control request failed; the message is one line for the user."""


class NoDaemonError(ControlError):
    """Nothing listens on the control socket."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no daemon at {path} (is pmxfs running?)")


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body




def request(path: Path, cmd: str, **args: Any) -> Any:
    """Send one request to the daemon at `path` and return its result; `ControlError` if not."""
    try:
        data = frame({"cmd": cmd, **args})
    except (TypeError, ValueError, OverflowError) as exc:
        raise ControlError(f"cannot encode the {cmd} request: {exc}") from None
    if len(data) - HEADER.size > MAX_REQUEST_BYTES:
        raise ControlError(f"request too large: {len(data) - HEADER.size} bytes "
                           f"(at most {MAX_REQUEST_BYTES})")
    timeout = (EXPECTED_TIMEOUT_S if cmd == "expected" else
               LIFECYCLE_TIMEOUT_S if cmd in SLOW_COMMANDS else TIMEOUT_S)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path)
        try:
            # A daemon that refuses the connection may answer and close without reading.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            header = _recv_exactly(sock, HEADER.size)
            if len(header) < HEADER.size:
                raise ControlError(f"the daemon at {path} closed the connection without an "
                                   "answer")
            (length,) = HEADER.unpack(header)
            if length > MAX_ANSWER_BYTES:
                raise ControlError(f"answer from the daemon too large: {length} bytes")
            body = _recv_exactly(sock, length)
        except TimeoutError:
            raise ControlError(f"no answer from the daemon at {path} within {timeout:g} s") \
                from None
        except OSError as exc:
            raise ControlError(f"lost the connection to the daemon at {path}: "
                               f"{exc.strerror or exc}") from None
    if len(body) < length:
        raise ControlError(f"the daemon at {path} closed the connection in the middle of an "
                           "answer")
    try:
        answer = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"malformed answer from the daemon at {path}")
    if not answer["ok"]:
        raise ControlError(str(answer.get("error") or "the daemon refused the request"))
    return answer.get("result")


def _connect(sock: socket.socket, path: Path) -> None:
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise NoDaemonError(path) from None
    except PermissionError:
        raise ControlError(f"permission denied: cannot connect to {path} "
                           "(only root and group www-data may)") from None
    except TimeoutError:
        raise ControlError(f"the daemon at {path} does not accept connections") from None
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise ControlError(f"the daemon at {path} does not accept connections") from None
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)
