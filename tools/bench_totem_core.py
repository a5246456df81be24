"""CPU ceiling of the ordered broadcast: 3 totem cores in one process, no faults, no network.

Frames are handed from node to node in memory (still encoded and decoded, as on the wire), so
the figure is how many messages per second of CPU the protocol code itself can order: every node
sends, every node delivers every message. Prints JSON and a table.

    python tools/bench_totem_core.py [--seconds 3] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pmxfs.core.totem import Deliver, McastResult, Send, State, Totem
from pmxfs.core.totem_params import derive_params

NODES = (1, 2, 3)
SIZES = {"64 B": 64, "1 KiB": 1024, "64 KiB": 65536}


class Bench:
    def __init__(self) -> None:
        self.now = 0
        params = derive_params(len(NODES))
        self.cores = {n: Totem(n, NODES, params, self.now) for n in NODES}
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.delivered = dict.fromkeys(NODES, 0)

    def pump(self, node: int) -> None:
        for out in self.cores[node].drain():
            if isinstance(out, Send):
                targets = [out.to] if out.to is not None else [n for n in NODES if n != node]
                self.queue.extend((node, t, out.data) for t in targets)
            elif isinstance(out, Deliver):
                self.delivered[node] += 1

    def run_queue(self) -> None:
        while self.queue:
            src, dst, data = self.queue.popleft()
            self.cores[dst].receive(self.now, src, data)
            self.pump(dst)

    def fire_timers(self) -> None:
        deadline = min(d for c in self.cores.values() if (d := c.next_deadline()) is not None)
        self.now = max(self.now, deadline)
        for n, core in self.cores.items():
            d = core.next_deadline()
            if d is not None and d <= self.now:
                core.on_timer(self.now)
                self.pump(n)

    def form_ring(self) -> None:
        for n in NODES:
            self.pump(n)
        while not all(c.state is State.OPERATIONAL and len(c.ring.members) == len(NODES)
                      for c in self.cores.values()):
            self.run_queue()
            self.fire_timers()

    def measure(self, size: int, seconds: float) -> dict[str, float]:
        payload = bytes(size)
        start_delivered = sum(self.delivered.values())
        cpu0 = time.process_time()
        sent = 0
        while time.process_time() - cpu0 < seconds:
            for n, core in self.cores.items():
                while core.mcast(self.now, payload) is McastResult.ACCEPTED:
                    sent += 1
                    if len(core.pending) >= 200:
                        break
                self.pump(n)
            self.run_queue()
        # drain what is in flight so every sent message is counted as delivered everywhere
        while any(c.pending for c in self.cores.values()) or self.queue:
            self.run_queue()
            for n in NODES:
                self.pump(n)
            if not self.queue:
                self.fire_timers()
        cpu = time.process_time() - cpu0
        delivered = (sum(self.delivered.values()) - start_delivered) / len(NODES)
        return {"messages": sent, "delivered_per_node": delivered, "cpu_seconds": round(cpu, 3),
                "messages_per_cpu_second": round(delivered / cpu),
                "mb_per_cpu_second": round(delivered * size / cpu / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per size")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    results = {}
    for label, size in SIZES.items():
        bench = Bench()
        bench.form_ring()
        results[label] = bench.measure(size, args.seconds)
    print(json.dumps({"benchmark": "totem_core", "nodes": len(NODES), "results": results}))
    if not args.json_only:
        print(f"\n{'payload':>8} {'msgs/CPU s':>12} {'MB/CPU s':>10} {'delivered':>10}")
        for label, r in results.items():
            print(f"{label:>8} {r['messages_per_cpu_second']:>12,} {r['mb_per_cpu_second']:>10} "
                  f"{int(r['delivered_per_node']):>10}")
        ref = 78_000
        print(f"\n64 B: {results['64 B']['messages_per_cpu_second'] / ref:.2f} x corosync's "
              f"~{ref:,} msgs/s (3 processes, real network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
