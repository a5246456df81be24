"""`pmxfs demo --qdevice`: the demo's qnetd and the QDevice of its cluster.

qnetd runs on 127.0.K.10 -- "node 0" of the demo's addresses 127.0.K.(10+i) -- on TCP port
`QNETD_PORT` (5403), with its directory (`pmxfs qnetd init`: CA, server certificate, enrollment
tokens) in DIR/qnetd/ and its output appended to DIR/qnetd/qnetd.log. The demo (commands/demo.py)
runs it as one more process beside the daemons, stopped with them by PID.

Once the cluster is quorate, node1 adds the device as an admin would: `pmxfs qnetd token` makes a
one-time token for qnetd's address, `pmxfs qdevice setup ADDR:PORT --token TOKEN` on node1
enrolls the cluster and writes quorum.device into corosync.conf (ffsplit for an even node count;
an odd one needs `--force` and gets lms, as pvecm's rule says). A DIR whose corosync.conf already
names a device (a later run) keeps it: qnetd starts where it says and nothing is set up again.
The demo is ready once every node casts the device's vote (`status`: qdevice.casting_vote).

Nothing here starts or waits for a process: the plan, the argv, the probes and the text.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmxfs.commands.control import SOCKET_NAME
from pmxfs.core import conf
from pmxfs.core.errors import LocalError
from pmxfs.core.qdevice_wire import QNETD_PORT
from pmxfs.runtime.ipc_client import ControlError, request

NAME = "qnetd"
HOME = "qnetd"  # DIR/qnetd/
TOKEN_TTL = "2m"  # used at once
INIT_TIMEOUT_S = 60.0
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


class QnetdError(LocalError):
    """Why the demo's qnetd cannot be used: one line."""


@dataclass(frozen=True)
class QnetdPlan:
    """The demo's qnetd: where it listens and where its files are (absolute paths)."""

    root: Path  # the demo's DIR
    host: str
    port: int = QNETD_PORT

    @property
    def name(self) -> str:
        return NAME

    @property
    def dir(self) -> Path:
        return self.root / HOME

    @property
    def log(self) -> Path:
        return self.dir / "qnetd.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        """The command line of the demo's qnetd; it restarts qnetd on its own."""
        return [sys.executable, "-m", "pmxfs", "qnetd", "--listen", self.address, "--dir",
                str(self.dir)]

    def token_args(self) -> list[str]:
        """`pmxfs` arguments that print a new enrollment token for this qnetd."""
        return ["qnetd", "token", "--dir", str(self.dir), "--address", self.address,
                "--ttl", TOKEN_TTL]


def plan_qnetd(root: Path, host: str, config_text: str | None) -> QnetdPlan:
    """The demo's qnetd on `host` (127.0.K.10), or where the DIR's corosync.conf
    (`config_text`, None in a new DIR) says the cluster's device is; refused when that is not
    the demo's address."""
    device = configured_device(config_text) if config_text is not None else None
    if device is None:
        return QnetdPlan(root, host)
    where = f"{device[0]}:{device[1]}"
    if device[0] != host:
        raise QnetdError(f"the cluster in {root} has a QDevice at {where}, not at the demo's "
                         f"{host}; use another --dir")
    return QnetdPlan(root, host, device[1])


def configured_device(config_text: str) -> tuple[str, int] | None:
    """(host, port) of the quorum device a corosync.conf names, None without one."""
    config = conf.check(config_text).config
    device = None if config is None else config.quorum.device
    if device is None or device.net is None or device.net.host is None:
        return None
    return device.net.host, device.net.port or QNETD_PORT


def setup_args(plan: QnetdPlan, token: str, node_count: int) -> list[str]:
    """`pmxfs` arguments of `qdevice setup` for a cluster of `node_count` nodes."""
    force = ["--force"] if node_count % 2 else []  # an odd count: lms, as pvecm requires
    return ["qdevice", "setup", plan.address, "--token", token, *force]


def init(plan: QnetdPlan) -> None:
    """`pmxfs qnetd init --dir DIR/qnetd` (keeps what an earlier run made)."""
    argv = [sys.executable, "-m", "pmxfs", "qnetd", "init", "--dir", str(plan.dir)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=INIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QnetdError(f"cannot run `pmxfs qnetd init`: {exc}") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise QnetdError(f"`pmxfs qnetd init --dir {plan.dir}` failed: "
                         f"{reason.removeprefix('pmxfs: ')}")


def bindable(plan: QnetdPlan) -> bool:
    """Whether qnetd's address and port can be bound now (as a listener binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((plan.host, plan.port))
        except OSError:
            return False
    return True


def listening(pid: int, port: int) -> bool:
    """Whether process `pid`'s network namespace has a TCP (IPv4) socket listening on `port`
    (/proc/PID/net/tcp: no connection is made, so qnetd logs nothing for the probe)."""
    try:
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        if len(fields) > 3 and fields[3] == TCP_LISTEN and \
                int(fields[1].rpartition(":")[2], 16) == port:
            return True
    return False


def casting_vote(run_dir: Path) -> bool:
    """Whether the daemon with `run_dir` counts the device's vote (its `status`)."""
    with contextlib.suppress(ControlError, OSError):
        status = request(run_dir / SOCKET_NAME, "status")
        device = status.get("qdevice") if isinstance(status, dict) else None
        return isinstance(device, dict) and device.get("casting_vote") is True
    return False


def record(plan: QnetdPlan, pid: int) -> dict[str, Any]:
    """The `qnetd` entry of demo.json."""
    return {"name": NAME, "address": plan.address, "pid": pid, "argv": plan.argv(),
            "dir": str(plan.dir), "log": str(plan.log)}


def guide_tries(cli: str, run_dir: str, victim: str, first: str) -> list[str]:
    """The guide's lines about quorum with the QDevice (`cli`, `run_dir` quoted for a shell)."""
    return [
        f"  # quorum (as pvecm status): without {victim}, {first} stays quorate with qnetd's vote",
        "  # -- the Qdevice line, flags Qdevice QdeviceAlive QdeviceCastVote",
        f"  {cli} --run-dir {run_dir} status",
    ]
