"""The harness's side of the clients: one tools/faultlab/client.py process per node, started for
a cycle and stopped (quiesced) before the checks, and the history they leave.

`ClientSet.start(cycle)` starts every node's client process with a counter base of
`cycle * COUNTER_STRIDE`, so write values keep growing and stay unique over the run.
`ClientSet.stop()` sends SIGTERM (the process stops starting operations, waits up to
`quiesce_s` for those in flight and records the rest as unknown), waits a little longer than
that, then SIGKILLs by PID what is left; its in-flight operations stay "start" lines, which
read as unknown.

`History` reads the clients' JSON-lines files incrementally (only what was appended since the
last read) into `Op`s keyed by operation id, the last line of an id winning: a "start" line
alone is an operation with end None and outcome "unknown".
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from faultlab.client import SHARED, WORKLOAD
from faultlab.history import Op

CLIENT = Path(__file__).resolve().parent / "client.py"
COUNTER_STRIDE = 1_000_000
CLIENTS_PER_NODE = 3
OWN_KEYS = 3
SHARED_KEYS = 3
QUIESCE_S = 10.0
STOP_GRACE_S = 5.0


def prepare(mount: Path) -> None:
    """The workload directories, made once through one node's mount."""
    for sub in ("", "own", SHARED):
        (mount / WORKLOAD / sub).mkdir(exist_ok=True)


class ClientSet:
    def __init__(self, root: Path, mounts: dict[str, Path], seed: int,
                 quiesce_s: float = QUIESCE_S) -> None:
        self.root = root
        self.mounts = mounts
        self.seed = seed
        self.quiesce_s = quiesce_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def history_file(self, node: str) -> Path:
        return self.root / f"history-{node}.jsonl"

    def start(self, cycle: int) -> None:
        nodes = ",".join(self.mounts)
        for node, mount in self.mounts.items():
            with open(self.root / f"client-{node}.log", "ab") as log:
                self.procs[node] = subprocess.Popen(
                    [sys.executable, str(CLIENT), "--node", node, "--mount", str(mount),
                     "--history", str(self.history_file(node)), "--nodes", nodes,
                     "--clients", str(CLIENTS_PER_NODE), "--own-keys", str(OWN_KEYS),
                     "--shared-keys", str(SHARED_KEYS), "--seed", str(self.seed),
                     "--counter-base", str(cycle * COUNTER_STRIDE),
                     "--quiesce", str(self.quiesce_s)],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def stop(self) -> list[str]:
        """Quiesce every client process; the nodes whose process had to be killed."""
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        killed = []
        for node, proc in self.procs.items():
            try:
                proc.wait(self.quiesce_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_GRACE_S)
                killed.append(node)
        self.procs.clear()
        return killed

    def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE_S)
        self.procs.clear()


class History:
    """Every operation the clients recorded (module header)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self._offsets = dict.fromkeys(self.files, 0)
        self._ops: dict[str, Op] = {}

    def ops(self) -> list[Op]:
        for path in self.files:
            self._read_new(path)
        return list(self._ops.values())

    def _read_new(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                f.seek(self._offsets[path])
                data = f.read()
        except FileNotFoundError:
            return
        complete = data.rfind(b"\n") + 1  # a line being written is read next time
        self._offsets[path] += complete
        for raw in data[:complete].splitlines():
            line: dict[str, Any] = json.loads(raw)
            self._ops[line["id"]] = Op(line["client"], line["node"], line["kind"], line["key"],
                                       line["value"], line["start"], line["end"],
                                       line["outcome"])

    def dump(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for op in sorted(self._ops.values(), key=lambda o: o.start):
                f.write(json.dumps(asdict(op)) + "\n")
