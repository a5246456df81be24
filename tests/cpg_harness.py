"""Shared helpers for the real-process tests of `pmxfs debug cpg` (issue 4).

* `render_config` / `write_config`: a corosync.conf for N nodes (addresses, port, transport, token;
  `token_coefficient: 0` unless told otherwise, so the token does not grow with the node count).
* `keygen`: a fresh authkey written by `pmxfs keygen` itself.
* `CpgProcess`: one `pmxfs debug cpg` process. A background thread reads its stdout and keeps every
  JSON line, stamped with the monotonic time it was read, in a thread-safe list; another keeps its
  stderr. Lines are written to its stdin with `send`.
* `ProcessGroup`: every process a test started; `close()` SIGKILLs (by PID) and reaps each one
  that is still running. Tests create it in a fixture so it runs whatever happens.
* `wait_until`: poll a condition every 20 ms until a deadline; nothing here synchronises by
  sleeping a fixed time.
* `start_ring`: write config and key, start the nodes, wait for one ring of all of them; a port
  that cannot be bound (`pmxfs: cannot join the ring: ...`) is retried with another one.
* `check_agreement`: the ordering properties of the delivered messages across processes
  (no duplicates, one total order, same position everywhere, extended virtual synchrony).

Tests only ever use 127.0.0.0/8 or addresses inside network namespaces they created.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from pmxfs.core import conf
from pmxfs.core.totem_params import TotemParams

PMXFS = Path(sys.executable).parent / "pmxfs"
POLL_S = 0.02
CLUSTER_NAME = "pmxtest"
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so a random pick rarely collides
BIND_FAILURE = "cannot join the ring"

T = TypeVar("T")
Event = dict[str, Any]


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Node:
    name: str
    nodeid: int
    addr: str


def loopback_nodes(count: int, first: int = 11) -> list[Node]:
    """Nodes n1..nCOUNT on 127.0.0.FIRST, 127.0.0.FIRST+1, ..."""
    return [Node(f"n{i}", i, f"127.0.0.{first + i - 1}") for i in range(1, count + 1)]


def render_config(nodes: Sequence[Node], *, port: int, transport: str = "udpu", token: int = 1000,
                  token_coefficient: int = 0, mcastaddr: str | None = None,
                  cluster_name: str = CLUSTER_NAME, extra_totem: Mapping[str, int] | None = None
                  ) -> str:
    totem = {"cluster_name": cluster_name, "config_version": 1, "transport": transport,
             "port": port, "token": token, "token_coefficient": token_coefficient}
    if mcastaddr is not None:
        totem["mcastaddr"] = mcastaddr
    totem.update(extra_totem or {})
    out = ["totem {", *(f"  {k}: {v}" for k, v in totem.items()), "}", "", "nodelist {"]
    for n in nodes:
        out += ["  node {", f"    name: {n.name}", f"    nodeid: {n.nodeid}",
                f"    ring0_addr: {n.addr}", "  }"]
    out += ["}", "", "quorum {", "  provider: corosync_votequorum", "}", ""]
    return "\n".join(out)


def write_config(path: Path, nodes: Sequence[Node], **kwargs: Any) -> conf.ClusterConfig:
    """Write a corosync.conf (see `render_config`) and return it parsed; it must be valid."""
    text = render_config(nodes, **kwargs)
    path.write_text(text)
    config = conf.parse(text, str(path))
    problems = conf.validate(config)
    assert not problems, f"the test wrote an invalid config: {[str(p) for p in problems]}"
    return config


def params_of(path: Path) -> TotemParams:
    """The totem parameters a node runs with for the config file at `path`."""
    return conf.totem_params(conf.parse(path.read_text(), str(path)))


def keygen(path: Path) -> bytes:
    """A fresh authkey written by `pmxfs keygen PATH`; returns its bytes."""
    result = subprocess.run([str(PMXFS), "keygen", str(path)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return path.read_bytes()


def random_port(rng: random.Random | None = None) -> int:
    return (rng or random.Random()).randrange(*PORT_RANGE)


# ---------------------------------------------------------------------------- waiting


def wait_until(condition: Callable[[], T | None], timeout: float, what: str,
               details: Callable[[], str] | None = None) -> T:
    """Poll `condition` every POLL_S until it returns something truthy (returned), or fail the
    test after `timeout` seconds saying what was awaited (and `details()`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Line:
    at: float  # time.monotonic() when the reader thread got the line
    event: Event


def is_confchg(event: Event, kind: str | None = None,
               members: Iterable[int] | None = None) -> bool:
    return (event.get("event") == "confchg"
            and (kind is None or event.get("kind") == kind)
            and (members is None or event.get("members") == sorted(members)))


def ring_seq(ring_id: str) -> int:
    """The seq of a ring id printed as "REP.SEQ"."""
    return int(ring_id.split(".")[1])


class CpgProcess:
    """One `pmxfs debug cpg` process (possibly behind a prefix such as `ip netns exec NS`, which
    execs it, so `pid` is the pmxfs process itself)."""

    def __init__(self, name: str, nodeid: int, argv: Sequence[str]) -> None:
        self.name = name
        self.nodeid = nodeid
        self.argv = list(argv)
        self._lock = threading.Lock()
        self._lines: list[Line] = []
        self._garbage: list[str] = []  # stdout lines that are not JSON objects
        self._stderr: list[str] = []
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self.proc.stdout,), daemon=True,
                             name=f"{name}-stdout"),
            threading.Thread(target=self._read_stderr, args=(self.proc.stderr,), daemon=True,
                             name=f"{name}-stderr"),
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return f"<CpgProcess {self.name} pid {self.pid}>"

    # -- readers (background threads)

    def _read_stdout(self, stream: IO[bytes]) -> None:
        for raw in stream:
            at = time.monotonic()
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            with self._lock:
                if isinstance(event, dict):
                    self._lines.append(Line(at, event))
                else:
                    self._garbage.append(text)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._lock:
                self._stderr.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    # -- what it printed

    def lines(self) -> list[Line]:
        with self._lock:
            return list(self._lines)

    def events(self, start: int = 0) -> list[Event]:
        with self._lock:
            return [line.event for line in self._lines[start:]]

    def count(self) -> int:
        with self._lock:
            return len(self._lines)

    def garbage(self) -> list[str]:
        with self._lock:
            return list(self._garbage)

    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self._stderr)

    def deliveries(self, start: int = 0) -> list[Event]:
        return [e for e in self.events(start) if e.get("event") == "deliver"]

    def delivered_data(self, start: int = 0, prefix: str = "") -> list[str]:
        return [e["data"] for e in self.deliveries(start) if e["data"].startswith(prefix)]

    def confchgs(self, start: int = 0, kind: str | None = None) -> list[Event]:
        return [e for e in self.events(start) if is_confchg(e, kind)]

    def last_regular(self, start: int = 0) -> Event | None:
        regular = self.confchgs(start, kind="regular")
        return regular[-1] if regular else None

    def in_ring(self, members: Iterable[int], start: int = 0) -> Event | None:
        """The last regular configuration (printed at line `start` or later) if it has exactly
        `members`."""
        last = self.last_regular(start)
        return last if last is not None and last["members"] == sorted(members) else None

    def find(self, predicate: Callable[[Event], bool], start: int = 0) -> tuple[int, Line] | None:
        """The first line at index >= start whose event satisfies `predicate`."""
        for i, line in enumerate(self.lines()[start:], start):
            if predicate(line.event):
                return i, line
        return None

    def describe(self, tail: int = 12) -> str:
        state = "running" if self.proc.poll() is None else f"exit {self.proc.returncode}"
        lines = [json.dumps(line.event) for line in self.lines()[-tail:]]
        return (f"--- {self.name} (pid {self.pid}, {state}) last stdout lines:\n  "
                + "\n  ".join(lines) + f"\n  stderr: {self.stderr()[-2000:]!r}")

    # -- driving it

    def send(self, *texts: str) -> None:
        """Multicast each text as one message (one stdin line each)."""
        assert self.proc.stdin is not None
        for text in texts:
            assert "\n" not in text
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def counters(self, timeout: float = 10.0) -> Event:
        """SIGUSR1, then the counters line it printed."""
        start = self.count()
        self.signal(signal.SIGUSR1)
        _, line = wait_until(lambda: self.find(lambda e: e.get("event") == "counters", start),
                             timeout, f"{self.name}'s counters", self.describe)
        return line.event

    def wait_exit(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s\n"
                                 f"{self.describe()}") from None
        self._join_readers(timeout)
        return rc

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit status (all its output has been read then)."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too) and reap; a no-op once it has exited."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        self._join_readers(5)

    def _join_readers(self, timeout: float) -> None:
        """Wait for the reader threads, then close the pipes (those a reader still uses stay
        open: it ends at EOF on its own)."""
        for thread in self._threads:
            thread.join(timeout)
        pipes = [self.proc.stdin]
        pipes += [s for s, t in zip((self.proc.stdout, self.proc.stderr), self._threads,
                                    strict=True) if not t.is_alive()]
        for pipe in pipes:
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    @property
    def killed(self) -> bool:
        return self.proc.returncode == -signal.SIGKILL


class ProcessGroup:
    """Every process a test started; `close()` kills and reaps all of them, by PID."""

    def __init__(self) -> None:
        self.procs: list[CpgProcess] = []

    def start(self, name: str, nodeid: int, argv: Sequence[str]) -> CpgProcess:
        proc = CpgProcess(name, nodeid, argv)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)


def cpg_argv(config: Path, authkey: Path, node: str, data_dir: Path,
             prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, str(PMXFS), "debug", "cpg", "--config", str(config), "--authkey",
            str(authkey), "--node", node, "--data-dir", str(data_dir)]


def send_concurrently(messages: Mapping[CpgProcess, Sequence[str]], timeout: float = 30.0
                      ) -> None:
    """Write each process's messages from its own thread, all threads released at once."""
    barrier = threading.Barrier(len(messages))
    errors: list[BaseException] = []

    def writer(proc: CpgProcess, texts: Sequence[str]) -> None:
        try:
            barrier.wait(timeout)
            for text in texts:
                proc.send(text)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=item, daemon=True)
               for item in messages.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a writer thread hung"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- a ring


@dataclass
class Ring:
    """Config, key and processes of one test cluster; `procs[name]` is the current process of a
    node (restarts replace it; every process ever started stays in `group`)."""

    group: ProcessGroup
    nodes: list[Node]
    config: Path
    authkey: Path
    root: Path
    prefix: Callable[[Node], Sequence[str]]
    procs: dict[str, CpgProcess] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def data_dir(self, node: Node) -> Path:
        return self.root / "data" / node.name

    def start(self, name: str) -> CpgProcess:
        node = self.node(name)
        argv = cpg_argv(self.config, self.authkey, name, self.data_dir(node), self.prefix(node))
        proc = self.group.start(name, node.nodeid, argv)
        self.procs[name] = proc
        return proc

    def params(self) -> TotemParams:
        return params_of(self.config)

    @property
    def port(self) -> int:
        return conf.parse(self.config.read_text(), str(self.config)).port

    def describe(self) -> str:
        return self.group.describe()

    def marks(self) -> dict[str, int]:
        """How many lines each current process has printed so far (for `since`)."""
        return {name: proc.count() for name, proc in self.procs.items()}

    def wait_ring(self, names: Sequence[str], timeout: float,
                  since: Mapping[str, int] | None = None) -> dict[str, Event]:
        """Wait until each named node's latest regular configuration (printed after line
        `since[name]`) is exactly these nodes, the same ring on all of them; returns each one's
        regular confchg."""
        members = sorted(self.node(n).nodeid for n in names)
        start = dict(since or {})

        def formed() -> dict[str, Event] | None:
            got = {n: self.procs[n].in_ring(members, start.get(n, 0)) for n in names}
            if any(e is None for e in got.values()):
                return None
            if len({e["ring_id"] for e in got.values() if e is not None}) != 1:
                return None
            return {n: e for n, e in got.items() if e is not None}

        return wait_until(formed, timeout, f"one ring of {names}", self.describe)


def start_ring(group: ProcessGroup, root: Path, nodes: Sequence[Node], *,
               run: Sequence[str] | None = None, timeout: float = 30.0, attempts: int = 5,
               prefix: Callable[[Node], Sequence[str]] = lambda _node: (),
               **config_kwargs: Any) -> Ring:
    """Write `root/corosync.conf` (random port) and `root/authkey`, start `run` (default: all
    nodes) and wait for one ring of them. Retries with another port when one cannot be bound."""
    root.mkdir(parents=True, exist_ok=True)
    authkey = root / "authkey"
    if not authkey.exists():
        keygen(authkey)
    names = list(run) if run is not None else [n.name for n in nodes]
    rng = random.Random()
    for _attempt in range(attempts):
        port = random_port(rng)
        config = root / "corosync.conf"
        write_config(config, nodes, port=port, **config_kwargs)
        ring = Ring(group, list(nodes), config, authkey, root, prefix)
        for name in names:
            ring.start(name)
        deadline = time.monotonic() + timeout

        def settled(ring: Ring = ring) -> str | None:
            if any(not p.alive() for p in ring.procs.values()):
                return "exited"
            members = sorted(ring.node(n).nodeid for n in names)
            got = [ring.procs[n].in_ring(members) for n in names]
            if all(e is not None for e in got) and len({e["ring_id"] for e in got if e}) == 1:
                return "formed"
            return None

        outcome = wait_until(settled, max(0.0, deadline - time.monotonic()),
                             f"one ring of {names}", ring.describe)
        if outcome == "formed":
            return ring
        dead = [p for p in ring.procs.values() if not p.alive()]
        for proc in ring.procs.values():
            proc.kill()
        if not all(BIND_FAILURE in p.stderr() for p in dead):
            raise AssertionError(f"a node exited while the ring formed\n{ring.describe()}")
    raise AssertionError(f"no free port found in {attempts} attempts")


# ---------------------------------------------------------------------------- ordering checks


class Transcript(Protocol):
    """What `check_agreement` reads: a `CpgProcess`, or a hand-made transcript."""

    name: str
    pid: int

    def events(self) -> list[Event]: ...


def check_agreement(procs: Sequence[Transcript]) -> None:
    """What CPG promises, across every process given (killed ones included):

    * no process delivers a message twice (every test message text is unique);
    * a message has the same sender, ring id and seq wherever it is delivered;
    * within one ring a process delivers in seq order;
    * any two processes deliver the messages they have in common in the same relative order;
    * extended virtual synchrony: processes that install the same new ring with the same
      transitional membership delivered the same set of messages of the ring they came from.
    """
    where: dict[str, tuple[int, str, int]] = {}
    order: dict[str, dict[str, int]] = {}
    evs: dict[tuple[str, tuple[int, ...]], tuple[str, str | None, frozenset[str]]] = {}
    for proc in procs:
        events = proc.events()
        position: dict[str, int] = {}
        last_seq: dict[str, int] = {}
        by_ring: dict[str, set[str]] = {}
        ring: str | None = None
        for event in events:
            if event.get("event") == "deliver":
                data, rid, seq = event["data"], event["ring_id"], event["seq"]
                assert data not in position, f"{proc.name} delivered {data!r} twice"
                position[data] = len(position)
                assert seq >= last_seq.get(rid, 0), (
                    f"{proc.name} delivered seq {seq} after {last_seq[rid]} in ring {rid}")
                last_seq[rid] = seq
                by_ring.setdefault(rid, set()).add(data)
                stamp = (event["from"], rid, seq)
                seen = where.setdefault(data, stamp)
                assert seen == stamp, (
                    f"{data!r} delivered as (from, ring, seq) {seen} and as {stamp} on "
                    f"{proc.name}")
            elif is_confchg(event, "transitional"):
                key = (event["ring_id"], tuple(event["members"]))
                old = frozenset(by_ring.get(ring, set())) if ring is not None else frozenset()
                other = evs.setdefault(key, (proc.name, ring, old))
                assert (other[1], other[2]) == (ring, old), (
                    f"virtual synchrony: {proc.name} and {other[0]} moved together to ring "
                    f"{key[0]} (transitional members {list(key[1])}) from rings {ring} and "
                    f"{other[1]} but delivered different sets of old-ring messages: "
                    f"{sorted(old ^ other[2])[:10]} differ")
            elif is_confchg(event, "regular"):
                ring = event["ring_id"]
        order[proc.name + f"#{proc.pid}"] = position
    names = list(order)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [d for d in order[a] if d in order[b]]
            in_b = sorted(common, key=order[b].__getitem__)
            if common != in_b:
                first = next(k for k, (x, y) in enumerate(zip(common, in_b, strict=True))
                             if x != y)
                raise AssertionError(f"{a} and {b} delivered in different orders from common "
                                     f"message {first}: {common[first:first + 5]} vs "
                                     f"{in_b[first:first + 5]}")


def assert_exactly_once(procs: Iterable[CpgProcess], messages: Iterable[str]) -> None:
    """Each process delivered each of `messages` exactly once."""
    wanted = list(messages)
    for proc in procs:
        data = proc.delivered_data()
        counts = {m: 0 for m in wanted}
        for d in data:
            if d in counts:
                counts[d] += 1
        wrong = {m: c for m, c in counts.items() if c != 1}
        sample = dict(list(wrong.items())[:10])
        assert not wrong, f"{proc.name}: delivery counts other than 1: {sample}"


def all_delivered(procs: Iterable[CpgProcess], messages: Iterable[str]) -> Callable[[], bool]:
    """A condition for `wait_until`: every process has delivered every message."""
    wanted = set(messages)
    procs = list(procs)

    def check() -> bool:
        return all(wanted <= set(p.delivered_data()) for p in procs)

    return check
