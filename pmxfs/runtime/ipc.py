"""The local control socket: `serve_control` in the daemon, `request` in the `pmxfs` CLI.

Where and who
-------------
The daemon listens on an AF_UNIX stream socket, `<run-dir>/pmxfs.sock`, mode 0660 and group
www-data when that group exists. A socket file left by a daemon that died is removed at start; a
socket that still answers belongs to a live daemon and is left alone (`ControlError`). Each
connection's peer is identified with SO_PEERCRED (pid, uid, gid):

* uid 0 (or the daemon's own uid) may do everything;
* a peer whose gid, or one of whose supplementary groups (the `Groups:` line of
  /proc/<pid>/status), is www-data may only read: `status`, `nodes`, `links`, `metrics` and the
  `debug` topics other than `verify`. It sees what the mount shows it and no more: the mount
  gives private directories (`priv/`, `nodes/<node>/priv/`) no group permissions, so www-data
  cannot list them, and `debug tree` leaves out every entry inside one too (the other topics and
  `metrics` carry counters, node names and checksums, no file names);
* anyone else is refused: every request gets a "permission denied" answer.

Each class of peer -- root (and the daemon's uid), everyone else -- may hold at most
`MAX_CONNECTIONS` connections at once; one more is answered "too many connections" and closed
at once (counted as `busy`). So a www-data process cannot use up the daemon's file descriptors,
nor keep root out: root's connections are counted on their own.

Framing
-------
Each request and each answer is one frame: a 4-byte big-endian length, then a msgpack map.
Requests are {"cmd": name, ...arguments} and at most `MAX_REQUEST_BYTES`; answers are
{"ok": true, "result": ...} or {"ok": false, "error": "one line"}. A connection may carry several
requests, one after the other. A frame that is too large, is not msgpack, or is not a map with a
string "cmd" is answered with an error when possible, counted (`ControlCounters`), and the
connection is closed; nothing a client sends stops the server. A request with a known frame but
an unknown command or bad arguments gets an error answer and the connection stays usable.

Commands: "status" -> `node.status()`; "nodes" -> `node.nodes()`; "links" -> {"links": the
"links" list of `node.status()`} (one entry per peer and link, `pmxfs links`); "expected"
{"votes": N} -> {"expected_votes": N} or the refusal's reason as error; "log" {"priority",
"tag", "user", "pid", "msg"} -> None; "debug" {"topic"} -> `node.debug(topic)`; "metrics" ->
{"text": the Prometheus text exposition} (the `metrics` callable the daemon passes in,
runtime/node_metrics.py). The cluster's
life (root only, each argument present, null where optional; `LifecycleControl`): "create"
{"cluster_name", "link0", "nodeid", "votes", "port"} and optionally "links" ({"N": "ADDR"}: links
1-7) and "transport", "join-token" {"ttl"}, "add" {"host", "token", "link0", "nodeid", "votes",
"force"} and optionally "links", "delnode" {"name"}; a refusal is the error answer. The quorum
device (root only; `QdeviceControl`, runtime/qdevice_setup.py): "qdevice-setup" {"address",
"token", "algorithm", "tie_breaker", "force"} (algorithm null: pvecm's choice),
"qdevice-remove" {}.

The client, `request(path, cmd, **args)`, is blocking (the CLI has no event loop): one connection
per request, `TIMEOUT_S` for an answer (`EXPECTED_TIMEOUT_S` for "expected", which waits for the
ring to agree). Every failure is a `ControlError` with a one-line message; no daemon listening
is `NoDaemonError`, "no daemon at <path> (is pmxfs running?)".
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack
import trio

from pmxfs.core.conf import edit
from pmxfs.core.errors import LocalError
from pmxfs.core.memdb import mode_of
from pmxfs.runtime.ipc_client import (
    DEBUG_TOPICS,
    EXPECTED_TIMEOUT_S,
    HEADER,
    LIFECYCLE_COMMANDS,
    MAX_ANSWER_BYTES,
    MAX_REQUEST_BYTES,
    READ_TOPICS,
    TIMEOUT_S,
    ControlError,
    NoDaemonError,
    frame,
    request,
)
from pmxfs.runtime.node_api import ControlNode, LifecycleControl

__all__ = ["DEBUG_TOPICS", "EXPECTED_TIMEOUT_S", "MAX_ANSWER_BYTES", "MAX_REQUEST_BYTES",
           "READ_TOPICS", "TIMEOUT_S", "ControlCounters", "ControlError", "NoDaemonError",
           "request", "serve_control"]

log = logging.getLogger("pmxfs.ipc")
_T = TypeVar("_T")

IDLE_TIMEOUT_S = 30.0  # server side: a connection that sends nothing for this long is closed
SEND_TIMEOUT_S = 10.0  # server side: a client that does not read its answer is dropped
SOCKET_MODE = 0o660
MAX_CONNECTIONS = 64  # open at once per class of peer: root, everyone else

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
QDEVICE_COMMANDS = frozenset({"qdevice-setup", "qdevice-remove"})


class QdeviceControl(Protocol):
    """The quorum-device commands of the control socket (runtime/qdevice_setup.py). Each
    returns a JSON-able answer or raises a `LocalError` whose text is the refusal."""

    async def setup(self, address: str, token_text: str, *, algorithm: str | None,
                    tie_breaker: str, force: bool) -> dict[str, Any]: ...

    async def remove(self) -> dict[str, Any]: ...


@dataclass
class ControlCounters:
    """What the server saw, for `pmxfs debug` and tests."""

    connections: int = 0
    requests: int = 0
    refused: int = 0  # requests refused for lack of permission
    busy: int = 0  # connections refused because MAX_CONNECTIONS of that class were open
    garbage: int = 0  # truncated or undecodable frames, frames without a "cmd"
    oversize: int = 0  # frames announcing more than MAX_REQUEST_BYTES
    errors: int = 0  # unexpected exceptions (logged): a node call, an unencodable answer


# --------------------------------------------------------------------------------------------
# Server


async def serve_control(path: Path, node: ControlNode, *, www_data_gid: int | None,
                        lifecycle: LifecycleControl | None = None,
                        qdevice: QdeviceControl | None = None,
                        counters: ControlCounters | None = None,
                        metrics: Callable[[], str] | None = None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` and answer requests for `node` until cancelled; removes the socket then.

    Signals `task_status.started()` once clients can connect. Raises `ControlError` when the
    socket cannot be created or another daemon listens on it.
    """
    sock, inode = await _bind(path, www_data_gid)
    server = _Server(node, lifecycle, qdevice, www_data_gid,
                     counters if counters is not None else ControlCounters(), metrics)
    try:
        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, [listener])
            task_status.started()
    finally:
        _remove_socket(path, inode)


def _remove_socket(path: Path, inode: int) -> None:
    """Remove the socket file `path` unless someone else replaced it meanwhile. Not async: it runs
    when the server is cancelled, where an await would be cancelled too."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except OSError:
        pass  # already gone, or not ours to remove


async def _bind(path: Path, www_data_gid: int | None) -> tuple[trio.socket.SocketType, int]:
    """The listening socket at `path` and the socket file's inode."""
    await _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # access is decided per peer (SO_PEERCRED); the mode only keeps others from connecting
        os.chmod(path, SOCKET_MODE)
        if www_data_gid is not None:
            os.chown(path, -1, www_data_gid)
        sock.listen(socket.SOMAXCONN)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create the control socket {path}: "
                           f"{exc.strerror or exc}") from None
    return sock, inode


async def _remove_stale(path: Path) -> None:
    try:
        mode = (await trio.Path(path).lstat()).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            await probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                await trio.Path(path).unlink(missing_ok=True)
            except OSError as exc:
                raise ControlError(f"cannot remove the stale socket {path}: "
                                   f"{exc.strerror or exc}") from None
            return
        except OSError:
            pass  # e.g. EAGAIN: a full backlog, so someone listens
    raise ControlError(f"another pmxfs daemon is listening on {path}")


@dataclass(frozen=True)
class _Peer:
    uid: int
    may_read: bool
    may_write: bool


class _BadFrame(Exception):
    """The connection cannot be served (not a request, or too many connections): answer
    (maybe) and close."""


class _Server:
    def __init__(self, node: ControlNode, lifecycle: LifecycleControl | None,
                 qdevice: QdeviceControl | None, www_data_gid: int | None,
                 counters: ControlCounters, metrics: Callable[[], str] | None = None) -> None:
        self.node = node
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.qdevice = qdevice
        self.www_data_gid = www_data_gid
        self.counters = counters
        self.own_uid = os.geteuid()
        self._open = {True: 0, False: 0}  # connections open now, by peer.may_write

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (run by `trio.serve_listeners`, which closes the stream after)."""
        self.counters.connections += 1
        try:
            peer = self._peer(stream.socket)
            if self._open[peer.may_write] >= MAX_CONNECTIONS:
                self.counters.busy += 1
                raise _BadFrame(f"too many connections to the daemon (at most "
                                f"{MAX_CONNECTIONS} at once); try again later")
            self._open[peer.may_write] += 1
            try:
                await self._requests(stream, peer)
            finally:
                self._open[peer.may_write] -= 1
        except _BadFrame as exc:
            await _send(stream, frame(_error(str(exc))))
        except trio.BrokenResourceError:  # the client went away
            pass
        except Exception:  # never let one connection stop the server
            self.counters.errors += 1
            log.exception("control connection failed")

    async def _requests(self, stream: trio.SocketStream, peer: _Peer) -> None:
        """Answer requests until the client closes, idles too long or sends garbage."""
        while True:
            request = None
            with trio.move_on_after(IDLE_TIMEOUT_S):
                request = await self._receive(stream)
            if request is None:  # closed, or idle for too long
                return
            if not await _send(stream, await self._answer(peer, request)):
                return

    def _peer(self, sock: trio.socket.SocketType) -> _Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        if uid in (0, self.own_uid):
            return _Peer(uid, may_read=True, may_write=True)
        www = self.www_data_gid
        reader = www is not None and (gid == www or www in _supplementary_groups(pid))
        return _Peer(uid, may_read=reader, may_write=False)

    async def _receive(self, stream: trio.SocketStream) -> dict[str, Any] | None:
        """The next request; None at a clean end of the connection."""
        header = await _receive_exactly(stream, HEADER.size)
        if not header:
            return None
        if len(header) < HEADER.size:
            self.counters.garbage += 1
            raise _BadFrame("truncated request")
        (length,) = HEADER.unpack(header)
        if length > MAX_REQUEST_BYTES:
            self.counters.oversize += 1
            raise _BadFrame(f"request too large: {length} bytes (at most {MAX_REQUEST_BYTES})")
        body = await _receive_exactly(stream, length)
        if len(body) < length:
            self.counters.garbage += 1
            raise _BadFrame("truncated request")
        try:
            request = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException):
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self.counters.garbage += 1
            raise _BadFrame("malformed request: expected a msgpack map with a string \"cmd\"")
        return request

    async def _answer(self, peer: _Peer, request: dict[str, Any]) -> bytes:
        """The answer frame to `request`."""
        self.counters.requests += 1
        cmd: str = request.pop("cmd")
        try:
            answer = {"ok": True, "result": await self._dispatch(peer, cmd, request)}
        except ControlError as exc:
            answer = _error(str(exc))
        except Exception as exc:
            self.counters.errors += 1
            log.exception("control request %r failed", cmd)
            answer = _error(f"internal error in the daemon: {type(exc).__name__}: {exc}")
        try:
            return frame(answer)
        except (TypeError, ValueError, OverflowError) as exc:
            self.counters.errors += 1
            log.error("control request %r: answer not encodable: %s", cmd, exc)
            return frame(_error(f"internal error in the daemon: answer not encodable: {exc}"))

    async def _dispatch(self, peer: _Peer, cmd: str, args: dict[str, Any]) -> Any:
        self._allow(peer, cmd, write=False)
        if cmd == "status":
            _expect_args(cmd, args)
            return self.node.status()
        if cmd == "nodes":
            _expect_args(cmd, args)
            return self.node.nodes()
        if cmd == "metrics":
            _expect_args(cmd, args)
            if self.metrics is None:
                raise ControlError("this daemon serves no metrics")
            return {"text": self.metrics()}
        if cmd == "links":
            _expect_args(cmd, args)
            return {"links": self.node.status().get("links", [])}
        if cmd == "debug":
            _expect_args(cmd, args, "topic")
            topic = _arg(args, "topic", str)
            if topic not in DEBUG_TOPICS:
                raise ControlError(f"unknown debug topic {topic!r} "
                                   f"(one of {', '.join(sorted(DEBUG_TOPICS))})")
            if topic not in READ_TOPICS:
                self._allow(peer, f"debug {topic}", write=True)
            try:
                answer = self.node.debug(topic)
            except KeyError:
                raise ControlError(f"unknown debug topic {topic!r}") from None
            return answer if peer.may_write or topic != "tree" else _readable_tree(answer)
        if cmd == "expected":
            self._allow(peer, cmd, write=True)
            _expect_args(cmd, args, "votes")
            votes = _arg(args, "votes", int)
            reply = await self.node.set_expected(votes)
            if reply.errno:
                raise ControlError(reply.message or os.strerror(reply.errno))
            return {"expected_votes": votes}
        if cmd == "log":
            self._allow(peer, cmd, write=True)
            _expect_args(cmd, args, "priority", "tag", "user", "pid", "msg")
            priority = _arg(args, "priority", int)
            if not 0 <= priority <= 7:
                raise ControlError(f"priority must be 0 to 7, not {priority}")
            pid = _arg(args, "pid", int)
            if not 0 <= pid < 2**32:
                raise ControlError(f"bad pid {pid}")
            await self.node.log(priority=priority, tag=_arg(args, "tag", str),
                                user=_arg(args, "user", str), pid=pid, msg=_arg(args, "msg", str))
            return None
        if cmd in LIFECYCLE_COMMANDS and self.lifecycle is not None:
            self._allow(peer, cmd, write=True)
            try:
                return await self._lifecycle(self.lifecycle, cmd, args)
            except LocalError as exc:
                raise ControlError(str(exc)) from None
        if cmd in QDEVICE_COMMANDS and self.qdevice is not None:
            self._allow(peer, cmd, write=True)
            try:
                return await self._qdevice(self.qdevice, cmd, args)
            except LocalError as exc:
                raise ControlError(str(exc)) from None
        raise ControlError(f"unknown command {cmd!r}")

    @staticmethod
    async def _qdevice(qdevice: QdeviceControl, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "qdevice-remove":
            _expect_args(cmd, args)
            return await qdevice.remove()
        _expect_args(cmd, args, "address", "token", "algorithm", "tie_breaker", "force")
        force = args.get("force")
        if not isinstance(force, bool):
            raise ControlError("argument 'force' must be of type bool")
        return await qdevice.setup(
            _arg(args, "address", str), _arg(args, "token", str),
            algorithm=_optional(args, "algorithm", str),
            tie_breaker=_arg(args, "tie_breaker", str), force=force)

    @staticmethod
    async def _lifecycle(lifecycle: LifecycleControl, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "create":
            _expect_args(cmd, args, "cluster_name", "link0", "nodeid", "votes", "port", "links",
                         "transport")
            return await lifecycle.create(
                _arg(args, "cluster_name", str), link0=_optional(args, "link0", str),
                nodeid=_arg(args, "nodeid", int), votes=_arg(args, "votes", int),
                port=_optional(args, "port", int), links=edit.links_from_wire(args.get("links")),
                transport=_optional(args, "transport", str))
        if cmd == "join-token":
            _expect_args(cmd, args, "ttl")
            return await lifecycle.join_token(_arg(args, "ttl", int))
        if cmd == "add":
            _expect_args(cmd, args, "host", "token", "link0", "nodeid", "votes", "force",
                         "links")
            force = args.get("force")
            if not isinstance(force, bool):
                raise ControlError("argument 'force' must be of type bool")
            return await lifecycle.add(
                _optional(args, "host", str), _arg(args, "token", str),
                link0=_optional(args, "link0", str), nodeid=_optional(args, "nodeid", int),
                votes=_arg(args, "votes", int), force=force,
                links=edit.links_from_wire(args.get("links")))
        _expect_args(cmd, args, "name")
        return await lifecycle.delnode(_arg(args, "name", str))

    def _allow(self, peer: _Peer, what: str, *, write: bool) -> None:
        if peer.may_write or (peer.may_read and not write):
            return
        self.counters.refused += 1
        if peer.may_read:
            raise ControlError(f"permission denied: {what} needs root "
                               "(group www-data may only read)")
        raise ControlError(f"permission denied: uid {peer.uid} may not use the control socket "
                           "(only root and group www-data)")


def _readable_tree(answer: dict[str, Any]) -> dict[str, Any]:
    """`debug tree` for www-data: without the entries the mount does not let it list."""
    return {**answer, "entries": [e for e in answer["entries"] if _listable(e["path"])]}


def _listable(path: str) -> bool:
    """Is the entry at `path` in a directory the group (www-data) may list? The mount's own
    rule: every entry's group is www-data, modes from `memdb.mode_of`."""
    parent = path.strip("/").rpartition("/")[0]
    return mode_of(parent, is_dir=True, quorate=True) & 0o050 == 0o050


def _supplementary_groups(pid: int) -> set[int]:
    """The groups of process `pid` from /proc (empty when it is gone or not visible here)."""
    if pid <= 0:
        return set()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def _expect_args(cmd: str, args: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ControlError(f"unknown argument(s) for {cmd}: {', '.join(map(str, unknown))}")


def _optional(args: dict[str, Any], name: str, kind: type[_T]) -> _T | None:
    return None if args.get(name) is None else _arg(args, name, kind)


def _arg(args: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = args.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ControlError(f"argument {name!r} must be of type {kind.__name__}")
    return value


async def _send(stream: trio.SocketStream, frame: bytes) -> bool:
    """Send `frame`; False when the client is gone or did not take it within SEND_TIMEOUT_S."""
    with trio.move_on_after(SEND_TIMEOUT_S):
        try:
            await stream.send_all(frame)
        except trio.BrokenResourceError:
            return False
        return True
    return False


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    """`size` bytes, or fewer when the peer closed the connection first."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": " ".join(message.split())}
