"""The fault harness's clients on one node: a few threads writing and reading keys through that
node's mount, every operation recorded in a history file.

    python tools/faultlab/client.py --node n2 --mount DIR --history FILE --clients 3
        --nodes n1,n2,n3 --seed S --counter-base B [--own-keys 3] [--shared-keys 3]

Client `<node>c<i>` owns the keys `own/<client>-<k>` (only it writes them); every client also
writes `shared/s<k>`. Each thread loops on a random mix: write one of its own keys, write a
shared key, read any key (its own, a shared one, another client's). A write's value is
`<client>:<counter>`, the counter starting at B and growing with every attempt (the harness
gives each run of this process a higher B, so values are unique over the whole run). A write is
open(O_WRONLY|O_CREAT|O_TRUNC) + write + close, its outcome the first errno of those calls or
"ok"; a read returns None when the key does not exist. A read looks the key up in a descriptor of
its directory, opened first: while a restarted daemon replaces its dead mount, the mount point is
a plain empty directory for a moment, and a key missing there must read as an error (ENOENT on
the directory), not as a key missing from the tree -- that would break read-your-writes.

History: one JSON line per event, appended with a single write(2) to an O_APPEND file: a "start"
line before the first syscall (end None, outcome "unknown") and an "end" line when the last one
returned, both with the operation's id; the last line of an id is its record. So an operation
that never returns is in the history even if this process is killed. After an error the thread
waits a little, so a dead mount (ENOTCONN) is not hammered.

SIGTERM or SIGINT: stop starting operations, wait up to --quiesce seconds for those in flight,
write an "end" line with outcome "unknown" for each still running, and exit at once (os._exit:
a thread blocked in a FUSE call of a stopped daemon cannot be joined).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKLOAD = "faults"  # the workload directory at the top of every mount
OWN, SHARED = "own", "shared"
ERROR_PAUSE_S = (0.05, 0.25)
THINK_S = (0.0, 0.03)
READ_LIMIT = 1 << 20


def own_key(client: str, index: int) -> str:
    return f"{OWN}/{client}-{index}"


def shared_key(index: int) -> str:
    return f"{SHARED}/s{index}"


def client_names(node: str, clients: int) -> list[str]:
    return [f"{node}c{i}" for i in range(1, clients + 1)]


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


@dataclass
class Workload:
    node: str
    root: Path  # the workload directory on this node's mount
    keys: list[str]  # every key a read may choose
    shared: list[str]
    history_fd: int
    quiesce_s: float

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.in_flight: dict[str, dict[str, Any]] = {}

    def record(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self.lock:
            if line["phase"] == "start":
                self.in_flight[line["id"]] = line
            else:
                self.in_flight.pop(line["id"], None)
            os.write(self.history_fd, data)

    def write(self, key: str, value: str) -> str:
        fd = -1
        try:
            fd = os.open(self.root / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.write(fd, value.encode())
        except OSError as exc:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return errno_name(exc)
        try:
            os.close(fd)
        except OSError as exc:
            return errno_name(exc)
        return "ok"

    def read(self, key: str) -> tuple[str, str | None]:
        directory, name = key.rsplit("/", 1)
        try:
            dir_fd = os.open(self.root / directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:  # ENOENT here: not the tree's directory (module header)
            return errno_name(exc), None
        try:
            return self._read_in(dir_fd, name)
        finally:
            with contextlib.suppress(OSError):
                os.close(dir_fd)

    @staticmethod
    def _read_in(dir_fd: int, name: str) -> tuple[str, str | None]:
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            return "ok", None
        except OSError as exc:
            return errno_name(exc), None
        try:
            data = os.read(fd, READ_LIMIT)
        except OSError as exc:
            return errno_name(exc), None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return "ok", data.decode(errors="replace")


def run_client(work: Workload, client: str, seed: str, counter_base: int, own: int) -> None:
    rng = random.Random(seed)
    counter = counter_base
    serial = 0
    own_keys = [own_key(client, k) for k in range(own)]
    while not work.stop.is_set():
        serial += 1
        op_id = f"{client}#{counter_base}#{serial}"
        roll = rng.random()
        if roll < 0.6:
            counter += 1
            key = rng.choice(own_keys) if roll < 0.4 else rng.choice(work.shared)
            value: str | None = f"{client}:{counter}"
            kind = "write"
        else:
            key, value, kind = rng.choice(work.keys), None, "read"
        line: dict[str, Any] = {"id": op_id, "phase": "start", "client": client,
                                "node": work.node, "kind": kind, "key": key, "value": value,
                                "start": time.monotonic(), "end": None, "outcome": "unknown"}
        work.record(line)
        if kind == "write":
            assert value is not None
            outcome = work.write(key, value)
        else:
            outcome, value = work.read(key)
        work.record({**line, "phase": "end", "value": value, "end": time.monotonic(),
                     "outcome": outcome})
        pause = ERROR_PAUSE_S if outcome != "ok" else THINK_S
        work.stop.wait(rng.uniform(*pause))


def finish(work: Workload, threads: list[threading.Thread]) -> None:
    """After a stop: wait (bounded) for the operations in flight, record the rest as unknown."""
    deadline = time.monotonic() + work.quiesce_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with work.lock:
        stuck = list(work.in_flight.values())
    for line in stuck:
        work.record({**line, "phase": "end", "end": None, "outcome": "unknown"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--mount", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--nodes", required=True, help="every node's name, comma-separated")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--own-keys", type=int, default=3)
    parser.add_argument("--shared-keys", type=int, default=3)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--counter-base", type=int, default=0)
    parser.add_argument("--quiesce", type=float, default=10.0)
    args = parser.parse_args(argv)
    nodes = args.nodes.split(",")
    shared = [shared_key(k) for k in range(args.shared_keys)]
    keys = shared + [own_key(c, k) for n in nodes for c in client_names(n, args.clients)
                     for k in range(args.own_keys)]
    history_fd = os.open(args.history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    work = Workload(args.node, args.mount / WORKLOAD, keys, shared, history_fd, args.quiesce)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: work.stop.set())
    threads = [threading.Thread(target=run_client, daemon=True, name=client,
                                args=(work, client, f"{args.seed}/{client}/{args.counter_base}",
                                      args.counter_base, args.own_keys))
               for client in client_names(args.node, args.clients)]
    for thread in threads:
        thread.start()
    while not work.stop.wait(1.0):
        pass
    finish(work, threads)
    os._exit(0)


if __name__ == "__main__":
    main()
