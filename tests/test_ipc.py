"""pmxfs.runtime.ipc and the control commands (pmxfs/commands/): the control socket served
in-process for a fake node, used through the blocking client (from a worker thread), the CLI
in-process, the CLI as a subprocess (also as an unprivileged user) and raw frames."""

from __future__ import annotations

import copy
import errno
import functools
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from pmxfs import cli
from pmxfs.commands.status import check_status_shape
from pmxfs.core.replica import Reply
from pmxfs.runtime.ipc import (
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    ControlCounters,
    ControlError,
    NoDaemonError,
    request,
    serve_control,
)

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

STATUS: dict[str, Any] = {
    "cluster": {"name": "lab", "config_version": 3, "transport": "udpu"},
    "node": {"name": "pve1", "nodeid": 1},
    "quorum": {"quorate": True, "expected_votes": 3, "highest_expected": 3, "total_votes": 2,
               "quorum": 2, "flags": ["Quorate"]},
    "membership": {"ring_id": "1.2c", "members": [
        {"nodeid": 2, "name": "pve2", "votes": 1, "local": False},
        {"nodeid": 1, "name": "pve1", "votes": 1, "local": True},
    ]},
    "fs": {"synced": True, "version": 17},
}
NODES: list[dict[str, Any]] = [
    {"nodeid": 1, "votes": 1, "name": "pve1", "local": True, "online": True,
     "joined": 1_700_000_000},
    {"nodeid": 2, "votes": 1, "name": "pve2", "local": False, "online": True,
     "joined": 1_700_000_100},
    {"nodeid": 3, "votes": 1, "name": "pve3", "local": False, "online": False, "joined": None},
]
DEBUG: dict[str, dict[str, Any]] = {
    "ring": {"node_id": 1, "state": "OPERATIONAL", "ring_id": "1.2c", "members": [1, 2],
             "seq": 40, "aru": 40, "pending_messages": 0, "counters": {"tokens": 812}},
    "transport": {"frames_sealed": 90, "auth_failed": 0},
    "quorum": STATUS["quorum"],
    "tree": {"entries": [
        {"path": "/", "type": "dir", "size": 0, "version": 1, "writer": 0, "mtime": 0},
        {"path": "/corosync.conf", "type": "file", "size": 512, "version": 9, "writer": 1,
         "mtime": 1700000000},
        *({"path": path, "type": kind, "size": 0, "version": 10 + i, "writer": 1,
           "mtime": 1700000000} for i, (path, kind) in enumerate([
               ("priv", "dir"), ("priv/authkey.key", "file"), ("priv/lock", "dir"),
               ("priv/lock/qemu-server-100.conf", "dir"), ("nodes", "dir"),
               ("nodes/pve1", "dir"), ("nodes/pve1/qemu-server", "dir"),
               ("nodes/pve1/qemu-server/100.conf", "file"), ("nodes/pve1/priv", "dir"),
               ("nodes/pve1/priv/ssh_known_hosts", "file"), ("nodes/privileged", "file")])),
    ]},
    "checksum": {"tree": "ab" * 32, "state": "cd" * 32, "version": 17, "synced": True},
}


@dataclass
class LogCall:
    priority: int
    tag: str
    user: str
    pid: int
    msg: str


class FakeNode:
    """A ControlNode with canned answers; `expected` is refused below the 2 votes present."""

    def __init__(self) -> None:
        self.expected: list[int] = []
        self.logged: list[LogCall] = []
        self.verifications = 0
        self.broken = False

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("status exploded")
        return copy.deepcopy(STATUS)

    def nodes(self) -> list[dict[str, Any]]:
        return copy.deepcopy(NODES)

    async def set_expected(self, expected: int) -> Reply:
        await trio.lowlevel.checkpoint()
        if expected < 2:
            return Reply(0, errno.EINVAL, f"expected votes {expected} is lower than the 2 votes "
                                          "present")
        self.expected.append(expected)
        return Reply(0, 0)

    async def log(self, *, priority: int, tag: str, user: str, pid: int, msg: str) -> None:
        await trio.lowlevel.checkpoint()
        self.logged.append(LogCall(priority, tag, user, pid, msg))

    def debug(self, topic: str) -> dict[str, Any]:
        if topic == "verify":
            self.verifications += 1
            return {"started": True}
        return copy.deepcopy(DEBUG[topic])


@dataclass
class Daemon:
    run_dir: Path
    sock: Path
    node: FakeNode
    counters: ControlCounters


def www_data_gid() -> int | None:
    try:
        return grp.getgrnam("www-data").gr_gid
    except KeyError:
        return None


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short directory (AF_UNIX paths are limited to 108 bytes) that every user may enter."""
    path = Path(tempfile.mkdtemp(prefix="pmxfs-ipc-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
async def daemon(run_dir: Path, nursery: trio.Nursery) -> Daemon:
    sock = run_dir / "pmxfs.sock"
    node = FakeNode()
    counters = ControlCounters()
    await nursery.start(functools.partial(serve_control, sock, node, www_data_gid=www_data_gid(),
                                          counters=counters))
    return Daemon(run_dir, sock, node, counters)


async def call(path: Path, cmd: str, **args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(request, path, cmd, **args))


async def run_cli(capsys: pytest.CaptureFixture[str], run_dir: Path,
                  *argv: str) -> tuple[int, str, str]:
    """`pmxfs --run-dir RUN_DIR argv...` in-process (in a worker thread): exit, stdout, stderr."""
    code = await trio.to_thread.run_sync(cli.main, ["--run-dir", str(run_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def run_cli_process(run_dir: Path | None, *argv: str,
                          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """`pmxfs [--run-dir RUN_DIR] argv...` as a subprocess."""
    prefix = ["--run-dir", str(run_dir)] if run_dir is not None else []
    return await trio.run_process(
        [sys.executable, "-m", "pmxfs.cli", *prefix, *argv], cwd=REPO, check=False,
        capture_stdout=True, capture_stderr=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})


async def run_cli_as(run_dir: Path, *argv: str, uid: int, gid: int,
                     groups: tuple[int, ...] = ()) -> tuple[int, str, str]:
    """`pmxfs --run-dir RUN_DIR argv...` in a forked child that switched to uid/gid/groups.

    A fork rather than a new interpreter: the interpreter may live where that user cannot go
    (e.g. under /root). The child runs `cli.main` and reports through inherited temp files.
    """
    def fork_and_wait() -> tuple[int, str, str]:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                code = 99
                try:
                    os.setgroups(list(groups))
                    os.setgid(gid)
                    os.setuid(uid)
                    sys.stdout = open(out.fileno(), "w", closefd=False)  # noqa: SIM115
                    sys.stderr = open(err.fileno(), "w", closefd=False)  # noqa: SIM115
                    code = cli.main(["--run-dir", str(run_dir), *argv])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 98
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()

    return await trio.to_thread.run_sync(fork_and_wait)


# --------------------------------------------------------------------------------------------
# The client API


async def test_every_command(daemon: Daemon) -> None:
    assert await call(daemon.sock, "status") == STATUS
    assert await call(daemon.sock, "nodes") == NODES
    assert await call(daemon.sock, "expected", votes=3) == {"expected_votes": 3}
    assert daemon.node.expected == [3]
    assert await call(daemon.sock, "log", priority=3, tag="vzdump", user="root", pid=42,
                      msg="backup failed") is None
    assert daemon.node.logged == [LogCall(3, "vzdump", "root", 42, "backup failed")]
    for topic, answer in DEBUG.items():
        assert await call(daemon.sock, "debug", topic=topic) == answer
    assert await call(daemon.sock, "debug", topic="verify") == {"started": True}
    assert daemon.node.verifications == 1


async def test_refusals_and_bad_requests(daemon: Daemon) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("expected", {"votes": 1}, "expected votes 1 is lower than the 2 votes present"),
        ("expected", {"votes": "3"}, "argument 'votes' must be of type int"),
        ("expected", {"votes": True}, "argument 'votes' must be of type int"),
        ("expected", {}, "argument 'votes' must be of type int"),
        ("status", {"verbose": 1}, "unknown argument(s) for status: verbose"),
        ("reboot", {}, "unknown command 'reboot'"),
        ("debug", {"topic": "secrets"},
         "unknown debug topic 'secrets' (one of checksum, quorum, ring, transport, tree, verify)"),
        ("log", {"priority": 9, "tag": "t", "user": "u", "pid": 1, "msg": "m"},
         "priority must be 0 to 7, not 9"),
        ("log", {"priority": 6, "tag": "t", "user": "u", "pid": -1, "msg": "m"}, "bad pid -1"),
    ]
    for cmd, args, message in cases:
        with pytest.raises(ControlError) as caught:
            await call(daemon.sock, cmd, **args)
        assert str(caught.value) == message, (cmd, args)
    assert daemon.node.expected == []
    assert daemon.node.logged == []
    with pytest.raises(ControlError, match="request too large"):
        await call(daemon.sock, "log", priority=6, tag="t", user="u", pid=1,
                   msg="x" * MAX_REQUEST_BYTES)


async def test_node_failure_is_an_error_answer(daemon: Daemon) -> None:
    daemon.node.broken = True
    with pytest.raises(ControlError) as caught:
        await call(daemon.sock, "status")
    assert str(caught.value) == "internal error in the daemon: RuntimeError: status exploded"
    assert daemon.counters.errors == 1
    assert await call(daemon.sock, "nodes") == NODES


def test_status_shape() -> None:
    assert check_status_shape(STATUS) == []
    bad = copy.deepcopy(STATUS)
    del bad["fs"]["synced"]
    bad["fs"]["extra"] = 1
    bad["cluster"]["transport"] = "sctp"
    bad["quorum"]["quorum"] = True
    bad["quorum"]["flags"] = ["Quorate", 3]
    bad["membership"]["members"][1]["local"] = "yes"
    assert check_status_shape(bad) == [
        "status.cluster.transport: expected one of knet, udp, udpu, got 'sctp'",
        "status.quorum.quorum: expected int, got bool",
        "status.quorum.flags[1]: expected str, got int",
        "status.membership.members[1].local: expected bool, got str",
        "status.fs: missing key 'synced'",
        "status.fs: unexpected key 'extra'",
    ]
    assert check_status_shape([]) == ["status: expected an object, got list"]


async def test_status_answer_has_the_design_shape(daemon: Daemon) -> None:
    assert check_status_shape(await call(daemon.sock, "status")) == []


# --------------------------------------------------------------------------------------------
# The CLI


async def test_cli_status(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_cli(capsys, daemon.run_dir, "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    for line in ["Cluster information", "Name:             lab", "Config Version:   3",
                 "Transport:        udpu", "Quorum information",
                 "Quorum provider:  corosync_votequorum", "Nodes:            2",
                 "Node ID:          0x00000001", "Ring ID:          1.2c",
                 "Quorate:          Yes", "Votequorum information", "Expected votes:   3",
                 "Highest expected: 3", "Total votes:      2", "Quorum:           2",
                 "Flags:            Quorate", "Membership information",
                 "    Nodeid      Votes Name"]:
        assert line in lines
    assert any(line.startswith("Date:             ") for line in lines)
    assert lines[-2:] == ["0x00000001          1 pve1 (local)", "0x00000002          1 pve2"]

    code, out, err = await run_cli(capsys, daemon.run_dir, "status", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == STATUS


async def test_cli_status_refuses_a_malformed_answer(daemon: Daemon,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon.node, "status", lambda: {"cluster": {}})
    code, out, err = await run_cli(capsys, daemon.run_dir, "status")
    assert (code, out) == (1, "")
    assert err == "pmxfs: unexpected status from the daemon: status: missing key 'fs'\n"


def _local(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


async def test_cli_nodes(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_cli(capsys, daemon.run_dir, "nodes")
    assert (code, err) == (0, "")
    assert out == ("Membership information\n"
                   "----------------------\n"
                   "    Nodeid      Votes Name\n"
                   "         1          1 pve1 (local)\n"
                   "         2          1 pve2\n"
                   "\n"
                   "Offline nodes\n"
                   "-------------\n"
                   "    Nodeid      Votes Name\n"
                   "         3          1 pve3\n"
                   "\n"
                   "In this node's ring since\n"
                   "-------------------------\n"
                   "    Nodeid Joined              Name\n"
                   f"         1 {_local(1_700_000_000)} pve1\n"
                   f"         2 {_local(1_700_000_100)} pve2\n")
    code, out, err = await run_cli(capsys, daemon.run_dir, "nodes", "--json")
    assert (code, err, json.loads(out)) == (0, "", NODES)


async def test_cli_expected(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(capsys, daemon.run_dir, "expected", "3") == (0, "", "")
    assert daemon.node.expected == [3]
    assert await run_cli(capsys, daemon.run_dir, "expected", "1") == (
        1, "", "pmxfs: expected votes 1 is lower than the 2 votes present\n")
    assert daemon.node.expected == [3]


async def test_cli_log(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(capsys, daemon.run_dir, "log", "hello", "world") == (0, "", "")
    assert await run_cli(capsys, daemon.run_dir, "log", "--tag", "vzdump", "--priority", "err",
                         "backup failed") == (0, "", "")
    assert await run_cli(capsys, daemon.run_dir, "log", "--priority", "7", "x") == (0, "", "")
    user = pwd.getpwuid(os.getuid()).pw_name
    assert [(c.priority, c.tag, c.msg) for c in daemon.node.logged] == [
        (6, "pmxfs", "hello world"), (3, "vzdump", "backup failed"), (7, "pmxfs", "x")]
    assert {(c.user, c.pid) for c in daemon.node.logged} == {(user, os.getpid())}
    proc = await run_cli_process(daemon.run_dir, "log", "--priority", "loud", "x")
    assert proc.returncode == 2
    assert b"unknown priority 'loud'" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert len(daemon.node.logged) == 3


async def test_cli_debug(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_cli(capsys, daemon.run_dir, "debug", "ring")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "state:            OPERATIONAL" in lines
    assert "members:          1 2" in lines
    assert "counters.tokens:  812" in lines
    code, out, err = await run_cli(capsys, daemon.run_dir, "debug", "tree")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["TYPE", "SIZE", "VERSION", "WRITER", "MTIME", "PATH"]
    assert lines[2].split()[:4] == ["file", "512", "9", "1"]
    assert lines[2].endswith(" /corosync.conf")
    assert lines[-1] == "13 entries"
    for topic, answer in DEBUG.items():
        code, out, err = await run_cli(capsys, daemon.run_dir, "debug", topic, "--json")
        assert (code, err, json.loads(out)) == (0, "", answer)
    assert await run_cli(capsys, daemon.run_dir, "debug", "verify") == (0, "started: true\n", "")
    assert daemon.node.verifications == 1


async def test_no_daemon(run_dir: Path) -> None:
    sock = run_dir / "pmxfs.sock"
    with pytest.raises(NoDaemonError) as caught:
        await call(sock, "status")
    assert str(caught.value) == f"no daemon at {sock} (is pmxfs running?)"
    expected = f"pmxfs: no daemon at {sock} (is pmxfs running?)\n".encode()
    proc = await run_cli_process(run_dir, "status")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, b"", expected)
    # the run dir from the environment
    proc = await run_cli_process(None, "nodes", env={"PMXFS_RUN_DIR": str(run_dir)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, b"", expected)
    # a socket file left behind, nobody listening
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    proc = await run_cli_process(run_dir, "expected", "2")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, b"", expected)


@pytest.mark.skipif(os.path.lexists("/run/pmxfs/pmxfs.sock"), reason="a daemon runs here")
async def test_default_run_dir() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PMXFS_RUN_DIR"}
    proc = await trio.run_process([sys.executable, "-m", "pmxfs.cli", "status"], cwd=REPO,
                                  check=False, capture_stdout=True, capture_stderr=True, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, b"", b"pmxfs: no daemon at /run/pmxfs/pmxfs.sock (is pmxfs running?)\n")


# --------------------------------------------------------------------------------------------
# The socket file


async def test_socket_file_lifecycle(run_dir: Path) -> None:
    sock = run_dir / "pmxfs.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    gid = www_data_gid()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, sock, FakeNode(),
                                              www_data_gid=gid))
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        if gid is not None and os.getuid() == 0:
            assert info.st_gid == gid
        assert await call(sock, "nodes") == NODES
        # a second server must not steal a live socket
        with pytest.raises(ControlError) as caught:
            await serve_control(sock, FakeNode(), www_data_gid=None)
        assert str(caught.value) == f"another pmxfs daemon is listening on {sock}"
        nursery.cancel_scope.cancel()
    assert not sock.exists()
    sock.write_text("not a socket")
    with pytest.raises(ControlError) as caught:
        await serve_control(sock, FakeNode(), www_data_gid=None)
    assert str(caught.value) == f"{sock} exists and is not a socket"
    assert sock.read_text() == "not a socket"


# --------------------------------------------------------------------------------------------
# Raw frames


async def exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Connect, send `data`, close the sending side, and decode every answer frame until EOF."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(str(path))
        view = memoryview(data)
        while view:
            view = view[await sock.send(view):]
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := await sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # the server closed without reading all we sent
            pass
    answers = []
    while received:
        (length,) = struct.unpack(">I", received[:4])
        answers.append(msgpack.unpackb(received[4:4 + length], raw=False))
        received = received[4 + length:]
    return answers


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def test_garbage_does_not_stop_the_server(daemon: Daemon) -> None:
    malformed = {"ok": False,
                 "error": 'malformed request: expected a msgpack map with a string "cmd"'}
    assert await exchange(daemon.sock, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1") == [
        malformed]
    assert await exchange(daemon.sock, frame([1, 2, 3])) == [malformed]
    assert await exchange(daemon.sock, frame({"cmd": 7})) == [malformed]
    assert await exchange(daemon.sock, frame({"cmd": "status"})[:-3]) == [
        {"ok": False, "error": "truncated request"}]
    assert await exchange(daemon.sock, b"\x00\x00") == [{"ok": False, "error": "truncated request"}]
    assert daemon.counters.garbage == 5
    # oversize: answered and closed without reading the body
    big = MAX_REQUEST_BYTES + 1
    assert await exchange(daemon.sock, struct.pack(">I", big) + b"x" * 100) == [
        {"ok": False, "error": f"request too large: {big} bytes (at most {MAX_REQUEST_BYTES})"}]
    assert await exchange(daemon.sock, b"\xff\xff\xff\xff") == [
        {"ok": False, "error": f"request too large: {2**32 - 1} bytes (at most "
                               f"{MAX_REQUEST_BYTES})"}]
    assert daemon.counters.oversize == 2
    # the garbage ended its connection only: a later one is served, and so are several
    # requests on one connection, while an empty connection just ends
    assert await exchange(daemon.sock, b"") == []
    answers = await exchange(daemon.sock, frame({"cmd": "nodes"}) + frame({"cmd": "status"}))
    assert answers == [{"ok": True, "result": NODES}, {"ok": True, "result": STATUS}]
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.counters.errors == 0
    assert daemon.counters.connections == 9


async def test_idle_connection_is_closed(daemon: Daemon,
                                         autojump_clock: trio.testing.MockClock) -> None:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(str(daemon.sock))
        await sock.send(b"\x00\x00")  # half a header, then silence
        start = trio.current_time()
        assert await sock.recv(100) == b""
        assert trio.current_time() - start >= 30


# --------------------------------------------------------------------------------------------
# Permissions


needs_root_and_www_data = pytest.mark.skipif(
    os.getuid() != 0 or www_data_gid() is None,
    reason="needs root (to run clients as another user) and a www-data group")


@pytest.mark.root
@needs_root_and_www_data
@pytest.mark.parametrize("primary", [True, False], ids=["gid", "supplementary"])
async def test_www_data_may_only_read(daemon: Daemon, primary: bool) -> None:
    www = www_data_gid()
    assert www is not None
    ident: dict[str, Any] = ({"uid": NOBODY, "gid": www} if primary
                             else {"uid": NOBODY, "gid": NOBODY, "groups": (www,)})
    code, out, err = await run_cli_as(daemon.run_dir, "status", **ident)
    assert (code, err) == (0, "")
    assert "Quorate:          Yes\n" in out
    code, out, err = await run_cli_as(daemon.run_dir, "nodes", "--json", **ident)
    assert (code, err, json.loads(out)) == (0, "", NODES)
    code, out, err = await run_cli_as(daemon.run_dir, "debug", "ring", "--json", **ident)
    assert (code, err, json.loads(out)) == (0, "", DEBUG["ring"])
    for argv, what in [(["expected", "3"], "expected"), (["log", "hi"], "log"),
                       (["debug", "verify"], "debug verify")]:
        assert await run_cli_as(daemon.run_dir, *argv, **ident) == (
            1, "", f"pmxfs: permission denied: {what} needs root "
                   "(group www-data may only read)\n")
    assert daemon.node.expected == []
    assert daemon.node.logged == []
    assert daemon.node.verifications == 0
    assert daemon.counters.refused == 3


@pytest.mark.root
@needs_root_and_www_data
async def test_other_users_are_refused(daemon: Daemon) -> None:
    ident: dict[str, Any] = {"uid": NOBODY, "gid": NOBODY}
    # the socket's mode keeps them out ...
    assert await run_cli_as(daemon.run_dir, "status", **ident) == (
        1, "", f"pmxfs: permission denied: cannot connect to {daemon.sock} "
               "(only root and group www-data may)\n")
    # ... and so does the daemon when the mode would let them in
    daemon.sock.chmod(0o666)
    for argv in (["status"], ["nodes"], ["debug", "tree"], ["expected", "3"]):
        assert await run_cli_as(daemon.run_dir, *argv, **ident) == (
            1, "", f"pmxfs: permission denied: uid {NOBODY} may not use the control socket "
                   "(only root and group www-data)\n")
    assert daemon.counters.refused == 4
    assert daemon.node.expected == []


async def test_client_gone_before_the_error_answer(daemon: Daemon) -> None:
    for data in (b"\x00\x00", b"\xff\xff\xff\xff", frame({"cmd": 1})):
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.connect(str(daemon.sock))
            await sock.send(data)
        await trio.testing.wait_all_tasks_blocked()
    assert (daemon.counters.garbage, daemon.counters.oversize) == (2, 1)
    assert await call(daemon.sock, "nodes") == NODES


# names the mount hides from www-data (inside priv/ and nodes/*/priv/), and those it shows
PRIVATE = {"priv/authkey.key", "priv/lock", "priv/lock/qemu-server-100.conf",
           "nodes/pve1/priv/ssh_known_hosts"}


@pytest.mark.root
@needs_root_and_www_data
async def test_www_data_sees_no_private_names(daemon: Daemon) -> None:
    """FUSE gives priv/ and nodes/*/priv/ mode 0700: www-data cannot list them, so `debug tree`
    must not list them either; root sees everything."""
    www = www_data_gid()
    assert www is not None
    code, out, err = await run_cli_as(daemon.run_dir, "debug", "tree", "--json", uid=NOBODY,
                                      gid=www)
    assert (code, err) == (0, "")
    shown = [e["path"] for e in json.loads(out)["entries"]]
    everything = [e["path"] for e in DEBUG["tree"]["entries"]]
    assert shown == [p for p in everything if p not in PRIVATE]
    assert {"priv", "nodes/pve1/priv", "nodes/privileged"} <= set(shown)
    assert await call(daemon.sock, "debug", topic="tree") == DEBUG["tree"]


async def hold_connections(path: Path, count: int) -> list[trio.socket.SocketType]:
    """`count` idle connections, each one taken in by the server before this returns."""
    socks = []
    for _ in range(count):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        socks.append(sock)
    await trio.testing.wait_all_tasks_blocked()
    return socks


BUSY = {"ok": False, "error": f"too many connections to the daemon (at most {MAX_CONNECTIONS} "
                              "at once); try again later"}


async def test_connections_are_bounded(daemon: Daemon) -> None:
    held = await hold_connections(daemon.sock, MAX_CONNECTIONS)
    try:
        assert await exchange(daemon.sock, frame({"cmd": "nodes"})) == [BUSY]
        with pytest.raises(ControlError, match="too many connections"):
            await call(daemon.sock, "nodes")
        assert daemon.counters.busy == 2
        held.pop().close()
        await trio.testing.wait_all_tasks_blocked()
        assert await call(daemon.sock, "nodes") == NODES
    finally:
        for sock in held:
            sock.close()


@pytest.mark.root
@needs_root_and_www_data
async def test_www_data_cannot_keep_root_out(daemon: Daemon) -> None:
    """A www-data process that opens connection after connection gets refused beyond the bound,
    and root is still served meanwhile."""
    www = www_data_gid()
    assert www is not None
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(report_r)
            os.close(release_w)
            os.setgroups([])
            os.setgid(www)
            os.setuid(NOBODY)
            held = []
            for _ in range(MAX_CONNECTIONS + 1):  # bounded: one more than the daemon allows
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(daemon.sock))
                held.append(sock)
            held[-1].settimeout(10)
            os.write(report_w, held[-1].recv(4096))  # the refusal, then EOF
            os.read(release_r, 1)  # keep the others open until the parent is done
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(release_r)
    try:
        answer = await trio.to_thread.run_sync(os.read, report_r, 4096)
        assert msgpack.unpackb(answer[4:], raw=False) == BUSY
        assert daemon.counters.busy == 1
        assert await call(daemon.sock, "nodes") == NODES  # root has connections of its own
    finally:
        os.close(release_w)
        os.close(report_r)
        _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
