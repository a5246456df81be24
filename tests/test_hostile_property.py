"""Issue 10 §1: hostile names and control requests against three real daemons with FUSE mounts.

Random names (arbitrary bytes of 0-300, valid UTF-8, names with \\xff, exactly 255/256 bytes,
chains of up to 40 directories of up to 250 bytes) and random control requests (`pmxfs expected
N`, raw garbage, malformed and mistyped frames) go through the real FUSE layer and the control
socket of one 3-node `DaemonCluster` per module. The properties:

* every call returns (success or an errno) within CALL_TIMEOUT_S: each file-system call is made
  by a worker subprocess that the test can abandon (a caller stuck in state D cannot be killed),
  each control request has a deadline;
* the result is the one the rules give: a model of the tree (below a fresh sandbox directory
  per example) says which errno each call must return, with the name rules of the issue (not
  valid UTF-8: EINVAL; a component over 255 bytes or a tree path over 4096 bytes, counted as memdb
  counts it -- relative to the root, no leading slash: ENAMETOOLONG; the fixed root names: EACCES)
  and the kernel's and pmxcfs's usual errnos;
* the daemons stay up (their PIDs are polled after every call);
* what was accepted is on every node: after each example every node's mount, walked with
  dir-fd relative calls (deep trees are beyond PATH_MAX), shows exactly the model's tree, with the
  same mtimes everywhere, and every node reports the same tree checksum.

CI runs a bounded number of examples (about a minute). By hand, for 10 minutes:

    PMXFS_HOSTILE_SECONDS=600 .venv/bin/python -m pytest tests/test_hostile_property.py

A property run stops at its first failing example and reports it with the calls made (the
calls, in Python syntax, replay it). A failure marks the cluster broken: the next test gets a
fresh one.
Teardown aborts the FUSE connection of our own mounts (found by device number in
/proc/self/mountinfo) when a call hung, so that nothing stays blocked, then kills the daemons
by PID and unmounts lazily.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import pytest
from cpg_harness import wait_until
from daemon_harness import PMXFS, DaemonCluster, fuse_unavailable
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pmxfs.runtime.ipc import ControlError, request

pytestmark = [pytest.mark.fuse, pytest.mark.root]

CALL_TIMEOUT_S = 30.0  # any single syscall or control request (token 1000 ms)
CONVERGE_TIMEOUT_S = 30.0
FIRST_ADDRESS = 61  # nodes on 127.0.0.61-63 (test_daemon uses .41-.43)
HOSTILE_SECONDS = float(os.environ.get("PMXFS_HOSTILE_SECONDS", "0") or 0)
CI_NAME_EXAMPLES = 80
CI_CONTROL_EXAMPLES = 20
LONG_ROUND_EXAMPLES = 25

MAX_NAME = 255
MAX_TREE_PATH = 4096
FUSECTL = Path("/sys/fs/fuse/connections")

VIRTUAL_FILES = (b".members", b".vmlist", b".version", b".clusterlog", b".debug")
ROOT_SYMLINKS = (b"local", b"qemu-server", b"lxc", b"openvz")
ROOT_NAMES = VIRTUAL_FILES + ROOT_SYMLINKS
DOTS = (b".", b"..")

Comps = tuple[bytes, ...]  # a path as components from the mount root


# --------------------------------------------------------------------------------------------
# The worker: makes the file-system calls in a process of its own

WORKER_SOURCE = r'''
import os, stat, sys
import msgpack

D = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def opendir(mount, parts):
    fd = os.open(mount, D)
    try:
        for part in parts:
            nxt = os.open(part, D, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def scan(fd, prefix, out):
    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        path = prefix + [name]
        if stat.S_ISDIR(st.st_mode):
            out.append([path, None, st.st_mtime_ns])
            sub = os.open(name, D | os.O_NOFOLLOW, dir_fd=fd)
            try:
                scan(sub, path, out)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            f = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=fd)
            try:
                chunks = []
                while chunk := os.read(f, 1 << 20):
                    chunks.append(chunk)
            finally:
                os.close(f)
            out.append([path, b"".join(chunks), st.st_mtime_ns])
        else:
            out.append([path, "mode %o" % st.st_mode, st.st_mtime_ns])


def run(req, stage):
    op, mount = req["op"], req["mount"]
    stage[0] = "parent"
    fd = opendir(mount, req["parent"])
    try:
        name = req["name"]
        if op == "create":
            stage[0] = "open"
            f = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | req["flags"], 0o640,
                        dir_fd=fd)
            try:
                if req["data"]:
                    stage[0] = "write"
                    os.write(f, req["data"])
            finally:
                stage[0] = "close"
                os.close(f)
        elif op == "mkdir":
            stage[0] = op
            os.mkdir(name, 0o755, dir_fd=fd)
        elif op == "rmdir":
            stage[0] = op
            os.rmdir(name, dir_fd=fd)
        elif op == "unlink":
            stage[0] = op
            os.unlink(name, dir_fd=fd)
        elif op == "utime":
            stage[0] = op
            m = req["mtime"]
            if m is None:  # now
                os.utime(name, dir_fd=fd, follow_symlinks=False)
            else:
                os.utime(name, ns=(m * 10**9, m * 10**9), dir_fd=fd, follow_symlinks=False)
        elif op == "rename":
            stage[0] = "dst parent"
            dfd = opendir(mount, req["dparent"])
            try:
                stage[0] = op
                os.rename(name, req["dname"], src_dir_fd=fd, dst_dir_fd=dfd)
            finally:
                os.close(dfd)
        elif op == "list":
            stage[0] = "open"
            sub = os.open(name, D | os.O_NOFOLLOW, dir_fd=fd)
            try:
                stage[0] = op
                return sorted(os.fsencode(n) for n in os.listdir(sub))
            finally:
                os.close(sub)
        elif op == "walk":
            stage[0] = op
            out = []
            scan(fd, [], out)
            return out
        else:
            raise ValueError("unknown op %r" % op)
    finally:
        os.close(fd)
    return None


def main():
    unpacker = msgpack.Unpacker(raw=False)
    while chunk := os.read(0, 1 << 16):
        unpacker.feed(chunk)
        for req in unpacker:
            stage = ["start"]
            try:
                reply = {"errno": 0, "stage": "done", "result": run(req, stage)}
            except OSError as exc:
                reply = {"errno": exc.errno or -1, "stage": stage[0], "result": str(exc)}
            except Exception as exc:
                reply = {"errno": -1, "stage": stage[0], "result": repr(exc)}
            os.write(1, msgpack.packb(reply, use_bin_type=True))


main()
'''


class CallTimeout(Exception):
    pass


class WorkerDied(Exception):
    pass


class _ExampleFailed(BaseException):  # not an Exception: Hypothesis lets it through
    """Ends a Hypothesis run at its first failing example, without a replay."""


class Worker:
    """One child process making file-system calls for the test, one request at a time."""

    def __init__(self, log: Path) -> None:
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER_SOURCE],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self.unpacker = msgpack.Unpacker(raw=False)

    def call(self, timeout: float = CALL_TIMEOUT_S, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(msgpack.packb(req, use_bin_type=True))
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            for reply in self.unpacker:
                assert isinstance(reply, dict)
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"{req['op']} did not return within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerDied(f"the worker died (status {self.proc.poll()})")
                self.unpacker.feed(chunk)

    def abandon(self) -> None:
        """SIGKILL by PID; a worker in state D dies once the FUSE connection lets it go."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def reap(self, timeout: float) -> None:
        self.abandon()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


# --------------------------------------------------------------------------------------------
# The cluster, started once per module (again after a test broke it)


def _fuse_connection(mount: Path) -> Path | None:
    """/sys/fs/fuse/connections/<dev> of the FUSE mount at `mount` (from mountinfo, which
    never touches the mount itself)."""
    target = os.path.realpath(mount)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            if fields[4] == target and " - fuse" in line:
                major, minor = (int(x) for x in fields[2].split(":"))
                return FUSECTL / str((major << 20) | minor)
    return None


class Hostile:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.started = time.monotonic()
        self.generation = 0
        self.sandboxes = 0
        self.cluster: DaemonCluster | None = None
        self.worker: Worker | None = None
        self.abandoned: list[Worker] = []
        self.broken: str | None = None
        self.hung = False
        self.mounted_fusectl = False
        self.outcomes: Counter[str] = Counter()  # what the calls returned (shown with -s)

    # -- life cycle

    def healthy(self) -> DaemonCluster:
        """The running cluster; a fresh one when the last one was broken."""
        if self.broken is not None or self.cluster is None:
            self.stop_cluster()
            self.start_cluster()
        assert self.cluster is not None
        return self.cluster

    def start_cluster(self) -> None:
        self.generation += 1
        root = self.base / f"c{self.generation}"
        root.mkdir()
        self.cluster = DaemonCluster(root, 3, first=FIRST_ADDRESS)
        self.broken = None
        self.hung = False
        self.cluster.start_all()
        self.worker = Worker(root / "worker.log")

    def stop_cluster(self) -> None:
        if self.cluster is None:
            return
        try:
            if self.hung or self.broken is not None:  # nothing of ours may stay blocked
                self.abort_connections()
        finally:
            self.cluster.close()
            if self.worker is not None:
                self.worker.reap(timeout=10)
            for worker in self.abandoned:
                worker.reap(timeout=30)
            self.cluster, self.worker, self.abandoned = None, None, []

    def close(self) -> None:
        try:
            self.stop_cluster()
        finally:
            if self.mounted_fusectl:
                subprocess.run(["umount", str(FUSECTL)], capture_output=True, check=False,
                               timeout=30)

    def abort_connections(self) -> None:
        """Write 1 to the abort file of each of OUR mounts' FUSE connections."""
        assert self.cluster is not None
        if not FUSECTL.is_dir():
            return
        if not os.path.ismount(FUSECTL):
            done = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                                  capture_output=True, check=False, timeout=30)
            self.mounted_fusectl = done.returncode == 0
        for d in self.cluster.daemons.values():
            conn = _fuse_connection(d.mount)
            if conn is not None and (conn / "abort").exists():
                (conn / "abort").write_text("1")

    # -- calls

    def fs(self, node: str, **req: Any) -> dict[str, Any]:
        """One file-system call through `node`'s mount; a hang or a dead daemon fails the test
        (and marks the cluster broken)."""
        assert self.cluster is not None
        assert self.worker is not None
        req["mount"] = str(self.cluster[node].mount)
        try:
            reply = self.worker.call(**req)
        except WorkerDied as exc:
            self.broken = str(exc)
            self.worker.reap(timeout=10)
            self.worker = Worker(self.cluster.root / "worker.log")
            raise AssertionError(f"{node}: {exc}") from None
        except CallTimeout as exc:
            self.hung = True
            self.broken = f"a call hung: {exc}"
            self.worker.abandon()
            self.abandoned.append(self.worker)
            self.worker = Worker(self.cluster.root / "worker.log")
            raise AssertionError(f"{node}: {exc}\n{self.logs()}") from None
        self.check_alive()
        return reply

    def control(self, node: str, cmd: str, **args: Any) -> Any:
        assert self.cluster is not None
        sock = self.cluster[node].run_dir / "pmxfs.sock"
        started = time.monotonic()
        try:
            return request(sock, cmd, **args)
        finally:
            took = time.monotonic() - started
            assert took < CALL_TIMEOUT_S, f"{cmd} on {node} took {took:.1f} s"

    def check_alive(self) -> None:
        assert self.cluster is not None
        dead = [n for n, d in self.cluster.daemons.items() if not d.running()]
        if dead:
            self.broken = f"daemon(s) {dead} exited"
            raise AssertionError(f"daemon(s) {', '.join(dead)} exited\n{self.logs()}")

    def settle(self, timeout: float = 5.0) -> dict[str, bool]:
        """After a strange answer: give a daemon that is dying the time to exit (bounded), so
        that the report says so; which daemons run."""
        assert self.cluster is not None
        daemons = self.cluster.daemons.values()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not all(d.running() for d in daemons), timeout, "a daemon exit")
        return {n: d.running() for n, d in self.cluster.daemons.items()}

    def logs(self) -> str:
        assert self.cluster is not None
        return "\n".join(f"--- {n} (log tail)\n{d.log_tail(15)}"
                         for n, d in self.cluster.daemons.items())

    def property_run(self, examples: int, body: Callable[[Hostile, st.DataObject], None]) -> None:
        """`examples` random examples of `body`, ending at the first failure: a failure may leave
        the cluster broken, so Hypothesis must neither go on nor replay the example (on a fresh
        cluster it would only call it flaky). The failure carries the calls of its example,
        enough to replay it by hand."""

        @_settings(examples)
        @given(data=st.data())
        def check(data: st.DataObject) -> None:
            self.healthy()
            try:
                body(self, data)
            except (AssertionError, ControlError, OSError) as exc:
                self.broken = self.broken or f"an example failed: {exc}"[:300]
                raise _ExampleFailed(exc) from exc

        try:
            check()
        except _ExampleFailed as stop:
            failure = stop.args[0]
            kind = "" if isinstance(failure, AssertionError) else f"{type(failure).__name__}: "
            raise AssertionError(f"{kind}{failure}") from failure

    def deadline(self, share: float) -> float:
        """The end of the by-hand run for a test that gets `share` of PMXFS_HOSTILE_SECONDS."""
        return self.started + HOSTILE_SECONDS * share


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    h = Hostile(tmp_path_factory.mktemp("hostile"))
    try:
        yield h
    finally:
        h.close()


# --------------------------------------------------------------------------------------------
# The model of a sandbox and the errno each call must return


@dataclass(frozen=True)
class Op:
    kind: str  # create mkdir rename unlink rmdir utime list
    parent: Comps
    name: bytes
    data: bytes = b""
    mtime: int | None = None
    dparent: Comps = ()
    dname: bytes = b""

    def __str__(self) -> str:
        where = show((*self.parent, self.name))
        if self.kind == "rename":
            return f"rename {where} -> {show((*self.dparent, self.dname))}"
        extra = {"create": f" data={self.data!r}", "utime": f" mtime={self.mtime}"}
        return f"{self.kind} {where}{extra.get(self.kind, '')}"


def show(path: Comps) -> str:
    """A path for people: long names and deep paths shortened, the tree length in brackets."""
    def one(c: bytes) -> str:
        text = repr(c)[2:-1]
        return text if len(text) <= 40 else f"{text[:12]}...({len(c)} bytes)...{text[-6:]}"
    parts = [one(c) for c in path]
    if len(parts) > 5:
        parts[2:-2] = [f"...({len(parts) - 4} more)..."]
    return "/".join(parts) + f" [{tree_len(path)} bytes]"


def tree_len(path: Comps) -> int:
    """A path's length as memdb counts it: relative to the root, '/'-separated."""
    return len(b"/".join(path))


def name_rules(name: bytes, path: Comps) -> set[int]:
    """The errnos the name rules give a new entry at `path` (named `name`); empty if none."""
    out = set()
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        out.add(errno.EINVAL)
    if len(name) > MAX_NAME or tree_len(path) > MAX_TREE_PATH:
        out.add(errno.ENAMETOOLONG)
    return out


@dataclass
class Model:
    """Every entry below (and including) the sandbox: None for a directory, else the content."""

    entries: dict[Comps, bytes | None] = field(default_factory=dict)

    def is_dir(self, p: Comps) -> bool:
        return p == () or (p in self.entries and self.entries[p] is None)

    def is_file(self, p: Comps) -> bool:
        return self.entries.get(p) is not None

    def exists(self, p: Comps) -> bool:
        return p == () or p in self.entries

    def children(self, p: Comps) -> set[bytes]:
        return {q[-1] for q in self.entries if len(q) == len(p) + 1 and q[:-1] == p}

    def parent_errno(self, parent: Comps) -> set[int] | None:
        """Opening `parent` one component at a time: the errnos when it fails."""
        for i in range(1, len(parent) + 1):
            p = parent[:i]
            if self.is_dir(p):
                continue
            if self.is_file(p):
                return {errno.ENOTDIR}
            return {errno.ENOENT} | name_rules(p[-1], p)
        return None


def expected(m: Model, op: Op) -> set[int]:
    """The errnos `op` may return (0: success) on a sandbox path."""
    if op.parent == () or (op.kind == "rename" and op.dparent == ()):
        return expected_at_root(m, op)
    failed = m.parent_errno(op.parent)
    if op.kind == "rename":
        return failed or m.parent_errno(op.dparent) or expected_rename(m, op)
    if failed:
        return failed
    t, name = (*op.parent, op.name), op.name
    if name == b"":
        return {errno.ENOENT}
    rules = name_rules(name, t)
    match op.kind:
        case "create":
            if name in DOTS or m.is_dir(t):
                return {errno.EISDIR}
            return {0} if m.is_file(t) else rules or {0}
        case "mkdir":
            return {errno.EEXIST} if name in DOTS or m.exists(t) else rules or {0}
        case "unlink":
            if name in DOTS or m.is_dir(t):
                return {errno.EISDIR}
            return {0} if m.is_file(t) else {errno.ENOENT} | rules
        case "rmdir":
            if name in DOTS:
                return {errno.EINVAL if name == b"." else errno.ENOTEMPTY}
            if m.is_file(t):
                return {errno.ENOTDIR}
            if m.is_dir(t):
                return {errno.ENOTEMPTY} if m.children(t) else {0}
            return {errno.ENOENT} | rules
        case "utime":
            bad_time = {errno.EINVAL} if op.mtime is not None and op.mtime < 0 else set()
            if name == b".." and len(op.parent) == 1:  # the mount's root
                return {0, errno.EACCES, errno.EPERM} | bad_time
            if name in DOTS or m.exists(t):
                return bad_time or {0}
            return {errno.ENOENT} | rules
        case "list":
            if name in DOTS:
                return {0}
            if m.is_file(t):
                return {errno.ENOTDIR}
            return {0} if m.is_dir(t) else {errno.ENOENT} | rules
    raise AssertionError(op.kind)


def expected_rename(m: Model, op: Op) -> set[int]:
    if b"" in (op.name, op.dname):
        return {errno.ENOENT}
    if op.name in DOTS or op.dname in DOTS:
        return {errno.EBUSY}
    s, d = (*op.parent, op.name), (*op.dparent, op.dname)
    if not m.exists(s):
        return {errno.ENOENT} | name_rules(op.name, s)
    if s == d:
        return {0}
    rules = set() if m.exists(d) else name_rules(op.dname, d)
    # the kernel's checks, in its order; a daemon that checks names at lookup may say `rules`
    if d[:len(s)] == s:
        return {errno.EINVAL} | rules
    if s[:len(d)] == d:
        return {errno.ENOTEMPTY} | rules
    if m.exists(d) and m.is_dir(s) != m.is_dir(d):
        return {errno.ENOTDIR if m.is_dir(s) else errno.EISDIR}
    # the daemon's: names, then a non-empty source (pmxcfs) or target directory
    daemon = set(rules)
    if (m.is_dir(s) and m.children(s)) or (m.is_dir(d) and m.exists(d) and m.children(d)):
        daemon.add(errno.ENOTEMPTY)
    return daemon or {0}


def expected_at_root(m: Model, op: Op) -> set[int]:
    """Calls naming the fixed root entries (or '' and '.' at the root): never a change."""
    if op.kind == "rename":
        if op.dparent == ():  # a sandbox entry onto a fixed name
            failed = m.parent_errno(op.parent)
            if failed:
                return failed
            if op.dname == b"" or op.name == b"":
                return {errno.ENOENT}
            if op.dname in DOTS or op.name in DOTS:
                return {errno.EBUSY}
            s = (*op.parent, op.name)
            if not m.exists(s):
                return {errno.ENOENT} | name_rules(op.name, s)
            return {errno.ENOTDIR} if m.is_dir(s) else {errno.EACCES}
        failed = m.parent_errno(op.dparent)  # a fixed entry into the sandbox
        if failed:
            return failed
        if b"" in (op.name, op.dname):
            return {errno.ENOENT}
        if op.name in DOTS or op.dname in DOTS:
            return {errno.EBUSY}
        return {errno.EACCES}
    name = op.name
    if name == b"":
        return {errno.ENOENT}
    dot = name == b"."
    match op.kind:
        case "create":  # O_NOFOLLOW
            return {errno.EISDIR} if dot else {errno.ELOOP} if name in ROOT_SYMLINKS \
                else {errno.EACCES}
        case "mkdir":
            return {errno.EEXIST}
        case "unlink":
            return {errno.EISDIR} if dot else {errno.EACCES}
        case "rmdir":
            return {errno.EINVAL} if dot else {errno.ENOTDIR}
        case "utime":
            return {0, errno.EACCES, errno.EPERM, errno.EINVAL} if dot else {errno.EACCES}
        case "list":
            return {0} if dot else {errno.ENOTDIR, errno.ELOOP}
    raise AssertionError(op.kind)


def apply(m: Model, op: Op) -> None:
    """The change a successful `op` made."""
    t = (*op.parent, op.name)
    if op.kind == "create":
        old = m.entries.get(t) or b""
        m.entries[t] = op.data + old[len(op.data):]
    elif op.kind == "mkdir":
        m.entries[t] = None
    elif op.kind in ("unlink", "rmdir"):
        del m.entries[t]
    elif op.kind == "rename":
        d = (*op.dparent, op.dname)
        if t != d:
            m.entries[d] = m.entries.pop(t)


# --------------------------------------------------------------------------------------------
# Running calls against the model


@dataclass
class Run:
    h: Hostile
    node: str
    model: Model
    sandbox: Comps
    log: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def fail(self, message: str) -> NoReturn:
        trail = "\n".join(self.log[-25:])
        calls = ",\n".join(repr(op) for op in self.ops)
        raise AssertionError(f"{message}\n--- calls of this example on {self.node} (last 25):\n"
                             f"{trail}\n--- to replay them (e.g. as a TARGETED case):\n"
                             f"[{calls}]")

    def do(self, op: Op) -> int:
        self.ops.append(op)
        want = expected(self.model, op)
        req: dict[str, Any] = {"op": op.kind, "parent": list(op.parent), "name": op.name}
        if op.kind == "create":
            flags = os.O_NOFOLLOW if op.parent == () else 0  # never through a root symlink
            req |= {"data": op.data, "flags": flags}
        elif op.kind == "utime":
            req["mtime"] = op.mtime
        elif op.kind == "rename":
            req |= {"dparent": list(op.dparent), "dname": op.dname}
        started = time.monotonic()
        try:
            reply = self.h.fs(self.node, **req)
        except AssertionError as exc:
            self.log.append(f"{op} -> no answer (wanted {_codes(want)})")
            self.fail(str(exc))
        got = int(reply["errno"])
        at_root = op.parent == () or (op.kind == "rename" and op.dparent == ())
        self.h.outcomes[f"{'root ' if at_root else ''}{op.kind} -> {_code(got)}"] += 1
        self.log.append(f"{op} -> {_code(got)} at {reply['stage']} in "
                        f"{time.monotonic() - started:.2f} s (wanted {_codes(want)})")
        if got not in want:
            alive = self.h.settle()
            self.fail(f"{op}: got {_code(got)} at {reply['stage']} ({reply['result']}), "
                      f"wanted {_codes(want)}; daemons running: {alive}\n{self.h.logs()}")
        if got == 0 and op.kind == "list":
            self.check_listing(op, reply["result"])
        if got == 0:
            apply(self.model, op)
        return got

    def check_listing(self, op: Op, names: list[bytes]) -> None:
        if op.parent == ():
            missing = set(ROOT_NAMES) - set(names)
            if missing or self.sandbox[0] not in names:
                self.fail(f"{op}: the root lists {names}")
        elif op.name != b"..":
            where = op.parent if op.name == b"." else (*op.parent, op.name)
            if set(names) != self.model.children(where):
                self.fail(f"{op}: lists {sorted(names)}, the model "
                          f"{sorted(self.model.children(where))}")

    def converge(self) -> None:
        """Until every node shows the model's sandbox (same mtimes everywhere) and reports
        the same tree checksum."""
        want = {p[1:]: c for p, c in self.model.entries.items() if p != self.sandbox}
        assert self.h.cluster is not None
        names = list(self.h.cluster.daemons)
        last: list[str] = []

        def together() -> bool:
            views = []
            for name in names:
                reply = self.h.fs(name, op="walk", parent=list(self.sandbox), name=b"")
                if reply["errno"]:
                    last[:] = [f"{name}: walk failed: {_code(reply['errno'])} {reply['result']}"]
                    return False
                views.append({tuple(p): (c, t) for p, c, t in reply["result"]})
            for name, view in zip(names, views, strict=True):
                got = {p: c for p, (c, _) in view.items()}
                if got != want:
                    extra = sorted(set(got) - set(want))[:3]
                    gone = sorted(set(want) - set(got))[:3]
                    diff = [p for p in want if p in got and got[p] != want[p]][:3]
                    last[:] = [f"{name}: unexpected {extra}, missing {gone}, differ {diff}"]
                    return False
            mtimes = [{p: t for p, (_, t) in v.items()} for v in views]
            if any(t != mtimes[0] for t in mtimes):
                last[:] = [f"mtimes differ: {mtimes}"[:2000]]
                return False
            sums = {json.dumps(self.h.control(n, "debug", topic="checksum")["tree"])
                    for n in names}
            if len(sums) != 1:
                last[:] = [f"tree checksums differ: {sums}"]
                return False
            return True

        try:
            wait_until(together, CONVERGE_TIMEOUT_S, "every node to show the accepted tree",
                       lambda: "\n".join(last))
        except AssertionError as exc:
            self.fail(f"{exc}\n{self.h.logs()}")


def _code(n: int) -> str:
    return "ok" if n == 0 else errno.errorcode.get(n, str(n))


def _codes(ns: set[int]) -> str:
    return "|".join(sorted(_code(n) for n in ns))


def new_run(h: Hostile, node: str) -> Run:
    """A fresh sandbox directory at the root, made through `node`."""
    h.healthy()
    h.sandboxes += 1
    sandbox = (f"hp{h.sandboxes}".encode(),)
    run = Run(h, node, Model({sandbox: None}), sandbox)
    reply = h.fs(node, op="mkdir", parent=[], name=sandbox[0])
    assert reply["errno"] == 0, f"mkdir {sandbox}: {reply}"
    return run


# --------------------------------------------------------------------------------------------
# Strategies


def _sanitize(raw: bytes) -> bytes:
    """A name the kernel can carry as one component ('/' and NUL cannot be in one)."""
    return raw.replace(b"/", b"%").replace(b"\0", b"@")


def exact(n: int) -> list[bytes]:
    """Valid UTF-8 names of exactly n bytes (one-, two- and three-byte characters)."""
    return [b"n" * n, ("é" * (n // 2)).encode() + b"e" * (n % 2),
            ("€" * (n // 3)).encode() + b"x" * (n % 3)]


NAMES = st.one_of(
    st.binary(min_size=1, max_size=300),  # the empty name comes with the special ones below
    st.text(min_size=1, max_size=60).map(str.encode),
    st.text(alphabet="abc", min_size=1, max_size=2).map(str.encode),
    st.text(alphabet="abc", min_size=1, max_size=2).map(str.encode),
    st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(
        lambda t: t[0] + b"\xff" + t[1]),
    st.sampled_from([255, 256]).flatmap(lambda n: st.sampled_from(exact(n))),
    st.sampled_from([b"", b".", b"..", b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"a\xffb",
                     b".members", b"local", b"corosync.conf"]),
).map(_sanitize)
PARENT_NAMES = NAMES.filter(lambda n: n not in (b"", b".", b".."))
DEEP_NAMES = st.one_of(
    st.integers(1, 250).flatmap(lambda n: st.sampled_from(exact(n))),
    st.integers(1, 250).flatmap(lambda n: st.sampled_from(exact(n))),
    st.integers(1, 250).flatmap(lambda n: st.sampled_from(exact(n))),
    PARENT_NAMES,
)
DATA = st.binary(max_size=64)
MTIMES = st.one_of(st.none(), st.integers(0, 2**34), st.integers(-(2**33), -1))
KINDS = st.sampled_from(["create"] * 3 + ["mkdir"] * 3 + ["rename"] * 2
                        + ["unlink", "rmdir", "utime", "list", "chain", "root"])


def draw_ops(data: st.DataObject, m: Model, sandbox: Comps) -> list[Op]:
    """One more step of an example (a chain is several mkdirs), drawn against the model."""
    dirs = sorted(p for p, c in m.entries.items() if c is None)
    entries = sorted(p for p in m.entries if p != sandbox)
    files = sorted(p for p, c in m.entries.items() if c is not None)

    subdirs = [p for p in dirs if p != sandbox]
    valid = st.one_of(st.text(alphabet="abc", min_size=1, max_size=2).map(str.encode),
                      st.text(min_size=1, max_size=20).map(str.encode).map(_sanitize))

    def parent() -> Comps:
        """Mostly an existing directory; else a missing path or a file."""
        choices = [st.sampled_from(dirs)] * 6 + [st.lists(PARENT_NAMES, min_size=1, max_size=3)
                                                .map(lambda names: sandbox + tuple(names))]
        if files:
            choices.append(st.sampled_from(files))
        return data.draw(st.one_of(choices), label="parent")

    def target(pool: list[Comps]) -> tuple[Comps, bytes]:
        """Mostly an entry of `pool`, else a new name (often a valid one)."""
        pick = data.draw(st.integers(0, 5), label="pick")
        if pick < 3 and pool:
            path = data.draw(st.sampled_from(pool), label="entry")
            return path[:-1], path[-1]
        return parent(), data.draw(valid if pick % 2 else NAMES, label="name")

    kind = data.draw(KINDS, label="kind")
    if kind == "chain":
        start = data.draw(st.sampled_from(dirs), label="chain from")
        names = data.draw(st.lists(DEEP_NAMES, min_size=1, max_size=40), label="chain")
        ops, here = [], start
        for name in names:
            ops.append(Op("mkdir", here, name))
            here = (*here, name)
        ops.append(Op("create", here, b"leaf", data=b"deep\n"))
        return ops
    if kind == "root":
        op = data.draw(st.sampled_from(["create", "mkdir", "unlink", "rmdir", "utime", "list",
                                        "rename in", "rename out"]), label="root op")
        name = data.draw(st.sampled_from([*ROOT_NAMES, b"", b"."]), label="root name")
        if op == "create" and name == b".debug":
            name = b".members"  # a write of "0"/"1" to .debug is allowed (this node's setting)
        if op == "rename in":
            src, sname = target(entries)
            return [Op("rename", src, sname, dparent=(), dname=name)]
        if op == "rename out":
            return [Op("rename", (), name, dparent=sandbox, dname=b"moved")]
        return [Op(op, (), name, data=b"x", mtime=data.draw(MTIMES, label="mtime"))]
    pools = {"unlink": files, "rmdir": subdirs, "create": files, "list": subdirs}
    where, name = target(pools.get(kind, entries))
    if kind == "list" and data.draw(st.booleans(), label="list a parent"):
        where, name = data.draw(st.sampled_from(dirs), label="listed"), b"."
    if kind == "rename":
        dparent, dname = target(data.draw(st.sampled_from([[], files, subdirs]), label="onto"))
        return [Op("rename", where, name, dparent=dparent, dname=dname)]
    return [Op(kind, where, name, data=data.draw(DATA, label="data") if kind == "create"
               else b"", mtime=data.draw(MTIMES, label="mtime") if kind == "utime" else None)]


def prelude(data: st.DataObject, sandbox: Comps) -> list[Op]:
    """A few files and directories to remove, rename and fill, so that the random steps find
    something in place."""
    short = st.text(alphabet="abc", min_size=1, max_size=2).map(str.encode)
    dirs = data.draw(st.lists(short, max_size=3, unique=True), label="prelude dirs")
    files = data.draw(st.lists(short, max_size=4, unique=True), label="prelude files")
    ops = [Op("mkdir", sandbox, name) for name in dirs]
    for i, name in enumerate(files):  # some inside the first directory
        where = (*sandbox, dirs[0]) if dirs and i % 2 else sandbox
        ops.append(Op("create", where, name, data=b"%d\n" % i))
    return ops


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    phases=(Phase.explicit, Phase.generate),  # no shrinking on live daemons
                    suppress_health_check=list(HealthCheck))


def rounds(h: Hostile, share: float, ci_examples: int) -> Iterator[int]:
    """How many examples to run, round after round: one round of `ci_examples` in CI; by hand
    (PMXFS_HOSTILE_SECONDS), rounds until this test's share of that time is over."""
    if not HOSTILE_SECONDS:
        yield ci_examples
        return
    yield LONG_ROUND_EXAMPLES
    while time.monotonic() < h.deadline(share):
        yield LONG_ROUND_EXAMPLES


# --------------------------------------------------------------------------------------------
# Targeted cases (each on a healthy cluster, so one failure does not hide the next)

LONG_A, LONG_B = b"a" * 250, b"b" * 250


def deep_ops(sandbox: Comps) -> list[Op]:
    """mkdir 250-byte components down to a tree path of exactly 4096 bytes, then one byte more
    (ENAMETOOLONG), a file at 4096 bytes, a rename that would make a path of 4097 bytes."""
    ops, here = [], sandbox
    while MAX_TREE_PATH - tree_len(here) - 1 > MAX_NAME - 1:  # the last one stays below 255
        ops.append(Op("mkdir", here, LONG_A))
        here = (*here, LONG_A)
    fill = MAX_TREE_PATH - tree_len(here) - 1  # the last component reaches exactly 4096
    last = b"c" * fill
    ops += [Op("mkdir", here, b"c" * (fill + 1)),  # 4097 bytes
            Op("mkdir", here, last),  # 4096 bytes
            Op("create", here, b"d" * fill, data=b"at the limit\n"),
            Op("create", here, b"d" * (fill + 1), data=b"x"),
            Op("utime", (*here, last), b".", mtime=1_700_000_000),
            Op("mkdir", (*here, last), b"e"),  # 4098 bytes
            Op("create", sandbox, b"f", data=b"f\n"),
            Op("rename", sandbox, b"f", dparent=here, dname=b"f" * (fill + 1)),
            Op("rename", sandbox, b"f", dparent=here, dname=b"f" * fill),
            Op("list", here, b".")]
    return ops


def forty_levels(sandbox: Comps) -> list[Op]:
    ops, here = [], sandbox
    for i in range(40):
        name = exact(1 + i % 3)[i % 3] + str(i).encode()
        ops.append(Op("mkdir", here, name))
        here = (*here, name)
    ops.append(Op("create", here, b"bottom", data=b"40 levels\n"))
    return ops


TARGETED: dict[str, Callable[[Comps], list[Op]]] = {
    "valid-utf8": lambda s: [
        Op("create", s, "café ☃ 𝄞".encode(), data=b"ok\n"),
        Op("mkdir", s, "répertoire".encode()),
        Op("create", s, b".members", data=b"only reserved at the root\n"),
        Op("mkdir", s, b"local"),
        Op("list", s, b".")],
    "xff-create": lambda s: [Op("create", s, b"bad\xffname", data=b"x\n"), Op("list", s, b".")],
    "xff-mkdir": lambda s: [Op("mkdir", s, b"\xff"), Op("list", s, b".")],
    "invalid-utf8-rename": lambda s: [
        Op("create", s, b"ok", data=b"1\n"),
        Op("rename", s, b"ok", dparent=s, dname=b"\xc0\x80"),  # overlong
        Op("rename", s, b"ok", dparent=s, dname=b"\xed\xa0\x80"),  # a surrogate
        Op("list", s, b".")],
    "name-255-256": lambda s: [
        *(Op("create", s, n, data=b"255\n") for n in exact(255)),
        *(Op("create", s, n, data=b"256\n") for n in exact(256)),
        Op("mkdir", s, exact(255)[1][:-1] + b"d"),
        Op("mkdir", s, exact(256)[2]),
        Op("rename", s, exact(255)[0], dparent=s, dname=exact(256)[0]),
        Op("list", s, b".")],
    "name-300-xff": lambda s: [Op("mkdir", s, b"\xff" * 300), Op("create", s, b"x" * 300)],
    "tree-path-4096": deep_ops,
    "forty-levels": forty_levels,
    "negative-mtime": lambda s: [
        Op("create", s, b"t", data=b"t\n"),
        Op("utime", s, b"t", mtime=-1),
        Op("utime", s, b"t", mtime=0),
        Op("utime", s, b"t", mtime=2**33)],
    "root-names": lambda s: [
        Op("create", s, b"x", data=b"x\n"),
        *(Op(kind, (), name, data=b"1\n", mtime=123)
          for name in ROOT_NAMES if name != b".debug"
          for kind in ("create", "mkdir", "unlink", "rmdir", "utime")),
        *(Op("rename", s, b"x", dparent=(), dname=name) for name in ROOT_NAMES),
        *(Op("rename", (), name, dparent=s, dname=b"moved") for name in ROOT_NAMES),
        Op("list", (), b".")],
}


@pytest.mark.parametrize("case", list(TARGETED))
def test_targeted_names(hostile: Hostile, case: str) -> None:
    try:
        run = new_run(hostile, "node1")
        for op in TARGETED[case](run.sandbox):
            run.do(op)
        run.converge()
    except BaseException:
        hostile.broken = hostile.broken or f"test_targeted_names[{case}] failed"
        raise


# --------------------------------------------------------------------------------------------
# The property over random names


def name_example(h: Hostile, data: st.DataObject) -> None:
    node = data.draw(st.sampled_from(["node1", "node2", "node3"]), label="node")
    run = new_run(h, node)
    for op in prelude(data, run.sandbox):
        run.do(op)
    steps = data.draw(st.integers(1, 12), label="steps")
    for _ in range(steps):
        for op in draw_ops(data, run.model, run.sandbox):
            if run.do(op) != 0 and op.kind == "mkdir":
                break  # a chain ends at its first refusal
    run.converge()


def test_random_names_through_fuse(hostile: Hostile) -> None:
    for examples in rounds(hostile, 0.8, CI_NAME_EXAMPLES):
        hostile.property_run(examples, name_example)
    print("calls and their results:", dict(sorted(hostile.outcomes.items())))


# --------------------------------------------------------------------------------------------
# The property over control requests

EXPECTED_ARGS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-5, 10).map(str),
    st.sampled_from(["3", "+3", "03", " 3 ", "\u0663", "3_0", "0x3", "3.0", "1e3", "", "abc",
                     "-0", "nan", "-1", "0", "4", str(2**31), str(2**32), str(2**63),
                     str(2**64 - 1), str(2**64), str(-(2**63) - 1), "9" * 400]),
    st.text(max_size=20).filter(lambda s: "\0" not in s),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                    st.text(max_size=30), st.binary(max_size=30))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), SCALARS), inner,
                                                  max_size=4)), max_leaves=12)
ARG_NAMES = st.sampled_from(["votes", "topic", "priority", "tag", "user", "pid", "msg", "cmd",
                             "verbose", ""])
CMDS = st.sampled_from(["status", "nodes", "expected", "log", "debug", "reboot", ""])
VALID_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "votes": st.integers(-5, 10) | VALUES,
    "topic": st.sampled_from(["ring", "transport", "quorum", "tree", "checksum", "verify",
                              "nope"]) | VALUES,
    "priority": st.integers(-2, 9) | VALUES,
    "tag": st.text(max_size=20) | VALUES, "user": st.text(max_size=20) | VALUES,
    "pid": st.integers(-2, 2**33) | VALUES, "msg": st.text(max_size=200) | VALUES,
}


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def typed_request(draw: st.DrawFn) -> dict[Any, Any]:
    """A well-formed frame: a known (or unknown) command with arguments of any type."""
    req: dict[Any, Any] = {"cmd": draw(CMDS)}
    for name in draw(st.lists(ARG_NAMES, max_size=5, unique=True)):
        if name != "cmd":
            req[name] = draw(VALID_ARGS.get(name, VALUES))
    if draw(st.booleans()):
        req[draw(SCALARS)] = draw(VALUES)  # a key of any type
    return req


RAW = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, body: struct.pack(">I", n) + body, st.integers(0, 2**32 - 1),
              st.binary(max_size=100)),
    st.builds(lambda n, body: struct.pack(">I", n) + body, st.integers(0, 200),
              st.binary(max_size=200)),
    VALUES.map(_frame),
    st.integers(1, 20000).map(lambda n: _frame_raw(b"\x91" * n + b"\xc0")),  # deep nesting
    st.sampled_from([_frame_raw(b"\xdd\xff\xff\xff\xff"), _frame_raw(b"\xdf\xff\xff\xff\xff"),
                     _frame_raw(b"\xc1"), b"\x00\x00", b"\xff\xff\xff\xff"]),
)


def exchange(sock_path: Path, data: bytes) -> list[Any]:
    """Send `data`, close our sending side, read until the daemon closes: the answers. The
    daemon must answer or close within CALL_TIMEOUT_S."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    received = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT_S)
        sock.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, (f"no answer and no close within {CALL_TIMEOUT_S:g} s for "
                                   f"{data[:80]!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
    answers = []
    while received:
        assert len(received) >= 4, f"half a header from the daemon: {received!r}"
        (length,) = struct.unpack(">I", received[:4])
        assert len(received) >= 4 + length, f"half an answer: {received[:200]!r}"
        answers.append(msgpack.unpackb(received[4:4 + length], raw=False))
        received = received[4 + length:]
    for answer in answers:
        assert isinstance(answer, dict), answer
        assert isinstance(answer.get("ok"), bool), answer
        if not answer["ok"]:
            error = answer.get("error")
            assert isinstance(error, str), answer
            assert "\n" not in error, answer
    return answers


def cli_expected(h: Hostile, node: str, arg: str) -> list[str]:
    """`pmxfs expected -- ARG` as a subprocess; checks its exit and messages, returns a log."""
    assert h.cluster is not None
    argv = [str(PMXFS), "--run-dir", str(h.cluster[node].run_dir), "expected", "--", arg]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=CALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pmxfs expected {arg!r} did not end within "
                             f"{CALL_TIMEOUT_S:g} s") from None
    took = time.monotonic() - started
    what = f"pmxfs expected {arg!r} -> {done.returncode} in {took:.2f} s: {done.stderr!r}"
    assert "Traceback" not in done.stderr, what
    assert "no answer" not in done.stderr, what
    try:
        votes: int | None = int(arg)
    except ValueError:
        votes = None
    lines = done.stderr.splitlines()
    if votes is None:  # argparse refuses it
        assert done.returncode == 2, what
        assert lines, what
        assert lines[-1].startswith("pmxfs expected: error: "), what
    elif votes == 3:  # the only valid value with 3 nodes of 1 vote present: no change
        assert (done.returncode, done.stderr) == (0, ""), what
    else:
        assert done.returncode == 1, what
        assert len(lines) == 1, what
        assert lines[0].startswith("pmxfs: "), what
    return [what]


def control_example(h: Hostile, data: st.DataObject) -> None:
    cluster = h.healthy()
    log: list[str] = []
    try:
        for _ in range(data.draw(st.integers(1, 4), label="requests")):
            node = data.draw(st.sampled_from(list(cluster.daemons)), label="node")
            kind = data.draw(st.sampled_from(["cli", "raw", "typed", "several"]), label="kind")
            sock = cluster[node].run_dir / "pmxfs.sock"
            if kind == "cli":
                log += cli_expected(h, node, data.draw(EXPECTED_ARGS, label="N"))
            elif kind == "raw":
                raw = data.draw(RAW, label="raw")
                log.append(f"{node} raw {raw[:60]!r} -> {exchange(sock, raw)!r:.300}")
            else:
                count = 1 if kind == "typed" else data.draw(st.integers(2, 4), label="count")
                reqs = [data.draw(typed_request(), label="request") for _ in range(count)]
                frames = b"".join(_frame(r) for r in reqs)
                answers = exchange(sock, frames[:60000])
                log.append(f"{node} {reqs!r:.200} -> {answers!r:.300}")
                assert len(answers) <= len(reqs), answers
            h.check_alive()
            status = h.control(node, "status")  # still served
            assert status["quorum"]["expected_votes"] == 3, status["quorum"]
            assert status["quorum"]["quorate"], status["quorum"]
    except (AssertionError, ControlError, OSError) as exc:
        h.settle()
        raise AssertionError(f"{exc}\n--- requests of this example:\n" + "\n".join(log)
                             + f"\n{h.logs()}") from exc


def test_random_control_requests(hostile: Hostile) -> None:
    for examples in rounds(hostile, 1.0, CI_CONTROL_EXAMPLES):
        hostile.property_run(examples, control_example)
    cluster = hostile.healthy()
    for name in cluster.daemons:
        quorum = hostile.control(name, "status")["quorum"]
        assert quorum["expected_votes"] == 3, (name, quorum)
        assert quorum["quorate"], (name, quorum)


def test_cluster_still_agrees(hostile: Hostile) -> None:
    """After everything above: one ring of three, synced, one tree."""
    cluster = hostile.healthy()
    cluster.wait_synced(list(cluster.daemons), timeout=CONVERGE_TIMEOUT_S)
    hostile.check_alive()

