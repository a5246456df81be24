"""The lab's user-space switch: one TUN device per node namespace, IPv4 packets forwarded between
them by a thread of the harness, with the faults of `rules.Rules` applied.

This kernel has no sch_netem, no u32/matchall classifiers and no iptables/nft, but /dev/net/tun
works. `Switch.add_port(node, ifname)` opens a TUN device (IFF_TUN | IFF_NO_PI: bare IPv4
packets) in the root namespace; the lab then moves it into the node's namespace (`ip link set
IF netns NS`), where it gets the node's address -- the descriptor keeps working. Closing the
descriptor removes the device, so nothing outlives the harness's process.

The forwarding thread polls every port's descriptor (and a wake-up pipe): a packet read from
node A's port with destination address D goes to the port of the node that owns D (unknown
destinations are dropped and counted). `Rules.fate` says how many copies go out and after what
delay; delayed copies wait in a heap ordered by due time (bounded: `MAX_QUEUED`, beyond which
copies are dropped and counted). The rules are replaced as a whole (`set_rules`), so the thread
always sees one consistent set. Every chance comes from `random.Random(seed)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import random
import select
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from faultlab.rules import Rules

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_QUEUED = 20000  # delayed copies waiting at once
MAX_PACKET = 65536
READS_PER_WAKE = 64  # packets read from one port before the others get their turn
JOIN_TIMEOUT_S = 5.0


@dataclass
class Port:
    node: str
    ifname: str
    fd: int


class Switch:
    """Ports, the forwarding thread and its counters (module header)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._rules = Rules()
        self._ports: dict[str, Port] = {}  # node -> port
        self._by_addr: dict[bytes, Port] = {}
        self._by_fd: dict[int, Port] = {}
        self._queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, fd, packet)
        self._seq = 0
        self.counters: Counter[str] = Counter()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ set-up

    def add_port(self, node: str, ifname: str, addr: str) -> Port:
        """A TUN device `ifname` for `node`, whose address is `addr` (not yet configured)."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        port = Port(node, ifname, fd)
        self._ports[node] = port
        self._by_addr[bytes(int(x) for x in addr.split("."))] = port
        self._by_fd[fd] = port
        return port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="switch", daemon=True)
        self._thread.start()

    def set_rules(self, rules: Rules) -> None:
        self._rules = rules
        self._wake()

    def close(self) -> None:
        """Stop the thread and close every port (their devices go with them)."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        for port in self._ports.values():
            with contextlib.suppress(OSError):
                os.close(port.fd)
        self._ports.clear()
        self._by_fd.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ forwarding

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in self._by_fd:
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            timeout_ms = None
            if self._queue:
                timeout_ms = max(0, int((self._queue[0][0] - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(timeout_ms):
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                else:
                    self._read_port(fd)
            self._send_due()

    def _read_port(self, fd: int) -> None:
        port = self._by_fd[fd]
        for _ in range(READS_PER_WAKE):
            try:
                packet = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                self.counters["read_errors"] += 1
                return
            self._route(port, packet)

    def _route(self, src: Port, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            self.counters["not_ipv4"] += 1
            return
        dst = self._by_addr.get(packet[16:20])
        if dst is None:
            self.counters["unroutable"] += 1
            return
        delays = self._rules.fate(src.node, dst.node, self._rng)
        if not delays:
            self.counters["dropped"] += 1
            return
        if len(delays) > 1:
            self.counters["duplicated"] += 1
        now = time.monotonic()
        for delay in delays:
            if delay <= 0:
                self._write(dst.fd, packet)
            elif len(self._queue) >= MAX_QUEUED:
                self.counters["overflow"] += 1
            else:
                self._seq += 1
                heapq.heappush(self._queue, (now + delay, self._seq, dst.fd, packet))
                self.counters["delayed"] += 1

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            _, _, fd, packet = heapq.heappop(self._queue)
            self._write(fd, packet)

    def _write(self, fd: int, packet: bytes) -> None:
        try:
            os.write(fd, packet)
            self.counters["forwarded"] += 1
        except OSError:  # the port's link is down, or its queue full
            self.counters["write_errors"] += 1
