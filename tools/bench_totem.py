"""Ordered-broadcast benchmark: 3 node processes on loopback, real encrypted UDP (udpu).

Prints JSON and a table:
* ordered messages/s and MB/s per node for 64 B, 1 KiB, 64 KiB and 1 MiB messages, all nodes
  sending as fast as back-pressure allows, and the CPU time the three processes spent per
  ordered message meanwhile (less disturbed than the rates by other work on a shared machine);
* mcast -> self-delivery latency p50/p99 at low load (one message every 10 ms);
* time from SIGKILL of one node to the survivors' regular configuration change, with
  `token: 1000` and with the defaults;
* the two figures issue 12 sets targets for (`figures`): ordered 1 KiB messages/s and ordered
  large messages in MB/s (the better of 64 KiB and 1 MiB), each per node.

    python tools/bench_totem.py [--seconds 3] [--json-only]

Each node is this same script run with `--worker`: it joins the ring, then follows JSON
commands on stdin and answers on stdout. Times are CLOCK_MONOTONIC, shared by all processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from pmxfs.core.totem import ConfChange, ConfChangeKind, Deliver
from pmxfs.core.totem_params import derive_params
from pmxfs.runtime.boot_id import next_boot_id
from pmxfs.runtime.frame_crypto import FrameCrypto
from pmxfs.runtime.ring_seq import RingSeqStore
from pmxfs.runtime.totem_node import TotemNode
from pmxfs.runtime.transport import UdpTransport

NODES = (1, 2, 3)
ADDRESSES = {n: f"127.0.0.{30 + n}" for n in NODES}
SIZES = {"64 B": 64, "1 KiB": 1024, "64 KiB": 65536, "1 MiB": 1 << 20}
REFERENCE = {"msgs_64": 78_000, "mb_s_large": 112.0, "kill_to_ring_default_s": 7.4}
TARGETS = {"ordered_1k_msgs_per_s": 20_000, "ordered_large_mb_per_s": 40.0}  # issue 12


# ---------------------------------------------------------------------------------- worker


class Worker:
    def __init__(self, node: TotemNode) -> None:
        self.node = node
        self.window: tuple[float, float] | None = None
        self.phase = b"none----"
        self.delivered = 0
        self.own_delivered = 0
        self.latency_sent: dict[bytes, float] = {}
        self.latencies: list[float] = []
        self.ready = trio.Event()
        self.counted = trio.Event()  # set (and replaced) when own_delivered or latencies grows

    async def consume(self) -> None:
        own = self.node.totem.node_id
        async for batch in self.node.events():
            now = time.monotonic()
            for event in batch:
                if isinstance(event, Deliver):
                    self._count(event, now, own)
                elif isinstance(event, ConfChange) and event.kind is ConfChangeKind.REGULAR:
                    if len(event.members) == len(NODES):
                        self.ready.set()
                    answer({"confchg": list(event.members), "t": now})

    def _count(self, event: Deliver, now: float, own: int) -> None:
        if event.payload.startswith(self.phase):
            if self.window is not None and self.window[0] <= now <= self.window[1]:
                self.delivered += 1
            if event.sender == own:
                self.own_delivered += 1
                self._counted()
        sent_at = self.latency_sent.pop(event.payload[:16], None)
        if sent_at is not None:
            self.latencies.append(now - sent_at)
            self._counted()

    def _counted(self) -> None:
        self.counted.set()
        self.counted = trio.Event()

    async def load(self, size: int, start_at: float, seconds: float) -> dict[str, Any]:
        """Send as fast as back-pressure allows during the window; count this phase's
        deliveries inside it; then wait until every own message was delivered (drained)."""
        self.phase = b"%08d" % random.randrange(10**8)
        payload = self.phase + bytes(max(0, size - len(self.phase)))
        self.delivered = 0
        self.own_delivered = 0
        self.window = (start_at, start_at + seconds)
        await trio.sleep(max(0.0, start_at - time.monotonic()))
        cpu_at_start = time.process_time()
        sent = 0
        while time.monotonic() < start_at + seconds:
            await self.node.mcast(payload)
            sent += 1
        cpu_s = time.process_time() - cpu_at_start
        with trio.move_on_after(300):
            while self.own_delivered < sent:
                await self.counted.wait()
        status = self.node.status()
        return {"sent": sent, "delivered": self.delivered, "cpu_s": cpu_s,
                "totem": status.totem.counters,
                "transport": status.transport_counters}

    async def latency(self, count: int, interval: float) -> dict[str, Any]:
        self.latencies = []
        for i in range(count):
            key = b"lat%013d" % i
            self.latency_sent[key] = time.monotonic()
            await self.node.mcast(key + bytes(48))
            await trio.sleep(interval)
        with trio.move_on_after(5):
            while len(self.latencies) < count:
                await self.counted.wait()
        return {"latencies": self.latencies}


def answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def worker_main(node_id: int, port: int, token: int | None, authkey_path: str,
                      data_dir: str) -> None:
    authkey = await trio.Path(authkey_path).read_bytes()
    crypto = FrameCrypto(authkey, "bench", node_id, NODES,
                         boot_id=next_boot_id(data_dir, node_id))
    transport = await UdpTransport.open(node_id=node_id, addresses=ADDRESSES, port=port,
                                        mode="udpu", mcastaddr=None, crypto=crypto)
    params = derive_params(len(NODES), token=token, token_coefficient=0 if token else None)
    node = TotemNode(node_id, NODES, params, transport, RingSeqStore(data_dir, node_id))
    worker = Worker(node)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.run)
        nursery.start_soon(worker.consume)
        await worker.ready.wait()
        answer({"ready": node_id})
        buffered = b""
        while chunk := await stdin.receive_some(65536):
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                cmd = json.loads(line)
                if cmd["cmd"] == "load":
                    answer(await worker.load(cmd["size"], cmd["start_at"], cmd["seconds"]))
                elif cmd["cmd"] == "latency":
                    answer(await worker.latency(cmd["count"], cmd["interval"]))
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------- controller


class Cluster:
    def __init__(self, token: int | None, workdir: Path) -> None:
        self.port = random.randint(20_000, 60_000)
        authkey = workdir / "authkey"
        if not authkey.exists():
            authkey.write_bytes(os.urandom(256))
        self.procs = {
            n: subprocess.Popen(
                [sys.executable, __file__, "--worker", str(n), "--port", str(self.port),
                 "--authkey", str(authkey), "--data-dir", str(workdir / f"n{n}{token}")]
                + (["--token", str(token)] if token else []),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for n in NODES
        }
        for n in NODES:
            self.expect(n, "ready", timeout=60)

    def expect(self, node: int, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        proc = self.procs[node]
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"node {node} exited")
            msg: dict[str, Any] = json.loads(line)
            if key in msg:
                return msg
        raise TimeoutError(f"node {node}: no {key} within {timeout} s")

    def command(self, node: int, cmd: dict[str, Any]) -> None:
        stdin = self.procs[node].stdin
        assert stdin is not None
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()

    def load(self, size: int, seconds: float) -> dict[str, float]:
        start_at = time.monotonic() + 0.5
        for n in NODES:
            self.command(n, {"cmd": "load", "size": size, "start_at": start_at,
                             "seconds": seconds})
        results = [self.expect(n, "delivered", timeout=seconds + 120) for n in NODES]
        delivered = min(r["delivered"] for r in results)
        per_node = delivered / seconds
        cpu_s = sum(r["cpu_s"] for r in results)
        return {"msgs_per_s": round(per_node), "mb_per_s": round(per_node * size / 1e6, 1),
                "cpu_us_per_msg": round(cpu_s / max(1, delivered) * 1e6, 1)}

    def latency(self) -> dict[str, float]:
        self.command(1, {"cmd": "latency", "count": 300, "interval": 0.01})
        lat = sorted(self.expect(1, "latencies", timeout=60)["latencies"])
        return {"p50_ms": round(statistics.median(lat) * 1000, 2),
                "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2), "samples": len(lat)}

    def kill_to_ring(self) -> float:
        killed_at = time.monotonic()
        self.procs[3].send_signal(signal.SIGKILL)
        times: list[float] = []
        for n in (1, 2):
            while True:
                msg = self.expect(n, "confchg", timeout=60)
                if msg["confchg"] == [1, 2]:
                    times.append(float(msg["t"]) - killed_at)
                    break
        return round(max(times), 2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per payload size")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--authkey", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trio.run(worker_main, args.worker, args.port, args.token, args.authkey, args.data_dir)
        return 0

    results: dict[str, Any] = {"throughput": {}}
    with tempfile.TemporaryDirectory(prefix="pmxfs-bench-") as tmp:
        cluster = Cluster(1000, Path(tmp))
        try:
            for label, size in SIZES.items():
                results["throughput"][label] = cluster.load(size, args.seconds)
            results["latency_low_load"] = cluster.latency()
            results["kill_to_ring_s_token_1000"] = cluster.kill_to_ring()
        finally:
            cluster.stop()
        cluster = Cluster(None, Path(tmp))
        try:
            results["kill_to_ring_s_defaults"] = cluster.kill_to_ring()
        finally:
            cluster.stop()
    t = results["throughput"]
    results["figures"] = {
        "ordered_1k_msgs_per_s": t["1 KiB"]["msgs_per_s"],
        "ordered_large_mb_per_s": max(t["64 KiB"]["mb_per_s"], t["1 MiB"]["mb_per_s"]),
    }
    results["ratios_to_corosync"] = {
        "msgs_64B": round(t["64 B"]["msgs_per_s"] / REFERENCE["msgs_64"], 3),
        "mb_s_large": round(max(t["64 KiB"]["mb_per_s"], t["1 MiB"]["mb_per_s"])
                            / REFERENCE["mb_s_large"], 3),
        "kill_to_ring_defaults": round(results["kill_to_ring_s_defaults"]
                                       / REFERENCE["kill_to_ring_default_s"], 3),
    }
    print(json.dumps({"benchmark": "totem", "nodes": len(NODES), **results}))
    if not args.json_only:
        print(f"\n{'payload':>8} {'msgs/s':>10} {'MB/s':>8} {'CPU us/msg':>11}")
        for label, r in t.items():
            print(f"{label:>8} {r['msgs_per_s']:>10,} {r['mb_per_s']:>8} "
                  f"{r['cpu_us_per_msg']:>11,}")
        lat = results["latency_low_load"]
        print(f"\nlatency mcast->self-delivery: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
        print(f"SIGKILL -> new ring: {results['kill_to_ring_s_token_1000']} s (token 1000), "
              f"{results['kill_to_ring_s_defaults']} s (defaults)")
        for key, value in results["figures"].items():
            print(f"{key}: {value} (target {TARGETS[key]})")
        r = results["ratios_to_corosync"]
        print(f"ratios to corosync 3.1: 64 B msgs/s {r['msgs_64B']}, large MB/s "
              f"{r['mb_s_large']}, kill->ring with defaults {r['kill_to_ring_defaults']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
