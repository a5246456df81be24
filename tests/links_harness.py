"""Real `pmxfs daemon` processes on two (or more) independent networks, for the redundant-link
tests and benchmark (issue 15: knet links).

`LinksLab(root, names, links=2)` is lifecycle_harness's `NetnsLab` (a "switch" namespace, one
namespace per node, daemons started with `nsenter --net` so their FUSE mounts stay visible) with
one bridge per link: link 0 is NetnsLab's own br0 (node i on 10.213.0.i, its switch port
`vb<i>`, its interface eth0), link L > 0 is brL in the same switch namespace (node i on
10.213+L.0.i, switch port `vl<L>n<i>`, interface ethL). A link is cut the way a cable is pulled
at the switch: `set_link(name, link, up=False)` sets that node's switch port of brL down (its
ethL loses carrier), so nothing else about the node changes.

The cluster is not made through `create`/`add` (those write one link): `start_cluster` writes
the same corosync.conf (`links_config`: `transport: knet` with one `interface { linknumber: L }`
per link and ring<L>_addr per node, or a single-link udpu/udp file) and one authkey into every
node's home, starts every daemon and waits for one synced ring.

`set_loss(name, link, percent)` drops that share of the frames the node sends on ethL: with
netem where the kernel has it, otherwise with an htb qdisc whose classic-BPF classifier sends a
random share of the packets into a class that holds none (`_random_drop`);
`loss_unavailable()` says why neither works here.

`WriteLoad` runs one lifecycle `Writer` per node (appending 1, 2, 3, ... to its own file through
that node's mount) and, once stopped, `verify` checks nothing was lost, failed, doubled or
reordered, and that every node holds the same files. Latencies are read from the writer's
attempt times: a writer starts its next write as soon as the previous one returned.

Everything is torn down by NetnsLab.close (daemons by PID, mounts, namespaces); qdiscs live on
interfaces inside those namespaces and go with them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpg_harness import keygen, wait_until
from lifecycle_harness import (
    CLUSTER,
    RING_TIMEOUT_S,
    TOKEN_MS,
    LabNode,
    NetnsLab,
    running_token,
)
from test_cpg_netns import _ip
from test_lifecycle_netns import Writer

__all__ = ["CLUSTER", "DEFAULT_PORT", "RING_TIMEOUT_S", "TOKEN_MS", "LinkEntry", "LinksLab",
           "WriteLoad", "knet_timeouts_ms", "links_config", "lossy_load", "percentile",
           "running_token", "summary"]

DEFAULT_PORT = 5405  # corosync's totem.port; link L listens on port + L
RANDOM_WORD = 0xFFFFF000 + 56  # classic BPF's ancillary load SKF_AD_OFF + SKF_AD_RANDOM
PASS_CLASS, DROP_CLASS = 0x10001, 0x10002  # htb classes 1:1 and 1:2
WRITER_JOIN_S = 60.0


def link_subnet(link: int) -> str:
    """The /24 of link `link`: 10.213.0 for link 0 (NetnsLab's), 10.214.0 for link 1, ..."""
    return f"10.{213 + link}.0"


def knet_timeouts_ms(token_ms: int, nodes: int) -> tuple[int, int]:
    """(ping interval, ping timeout) of a link with corosync's knet defaults: token/4 and
    token/2 of the token the ring runs with (issue 15)."""
    token = running_token(token_ms, nodes)
    return token // 4, token // 2


@dataclass(frozen=True)
class LinkEntry:
    """One entry of `pmxfs links --json`: a peer's link as this node sees it."""

    nodeid: int
    name: str
    link: int
    address: str
    connected: bool
    active: bool

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> LinkEntry:
        return cls(int(raw["nodeid"]), str(raw["name"]), int(raw["link"]),
                   str(raw["address"]), bool(raw["connected"]), bool(raw["active"]))


def links_config(nodes: Sequence[tuple[str, int, Sequence[str]]], *, transport: str = "knet",
                 link_mode: str | None = "passive", priorities: Sequence[int] | None = None,
                 token_ms: int = TOKEN_MS, port: int = DEFAULT_PORT,
                 mcastaddr: str | None = None, config_version: int = 1) -> str:
    """A corosync.conf for `nodes` (name, nodeid, one address per link): for knet one
    `interface` per link (with `knet_link_priority` when `priorities` is given) and
    ring<L>_addr lines; for udpu/udp only the first address of each node is used."""
    links = len(nodes[0][2]) if transport == "knet" else 1
    totem = [f"cluster_name: {CLUSTER}", f"config_version: {config_version}", "version: 2",
             f"transport: {transport}", f"token: {token_ms}", f"port: {port}"]
    if transport == "knet" and link_mode is not None:
        totem.append(f"link_mode: {link_mode}")
    if mcastaddr is not None:
        totem.append(f"mcastaddr: {mcastaddr}")
    out = ["totem {", *(f"  {line}" for line in totem)]
    if transport == "knet":
        for link in range(links):
            out += ["  interface {", f"    linknumber: {link}"]
            if priorities is not None:
                out.append(f"    knet_link_priority: {priorities[link]}")
            out.append("  }")
    out += ["}", "", "nodelist {"]
    for name, nodeid, addrs in nodes:
        out += ["  node {", f"    name: {name}", f"    nodeid: {nodeid}", "    quorum_votes: 1"]
        out += [f"    ring{link}_addr: {addrs[link]}" for link in range(links)]
        out.append("  }")
    out += ["}", "", "quorum {", "  provider: corosync_votequorum", "}", ""]
    return "\n".join(out)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile of `values` (nearest rank), None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


class LinksLab(NetnsLab):
    """A NetnsLab with one bridge per link (module header)."""

    def __init__(self, root: Path, names: Sequence[str], links: int = 2) -> None:
        self.link_count = links  # read by _make_switch/_make_node, which NetnsLab.__init__ calls
        super().__init__(root, names)

    def _make_switch(self) -> None:
        super()._make_switch()
        for link in range(1, self.link_count):
            _ip("-n", self.switch, "link", "add", f"br{link}", "type", "bridge")
            _ip("-n", self.switch, "link", "set", f"br{link}", "up")

    def _make_node(self, name: str, nodeid: int) -> LabNode:
        node = super()._make_node(name, nodeid)
        for link in range(1, self.link_count):
            port, dev = f"vl{link}n{nodeid}", f"eth{link}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", dev,
                "netns", node.ns)
            _ip("-n", self.switch, "link", "set", port, "master", f"br{link}")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", node.ns, "addr", "add", f"{link_subnet(link)}.{nodeid}/24", "dev", dev)
            _ip("-n", node.ns, "link", "set", dev, "up")
        return node

    # ------------------------------------------------------------------ addresses and links

    def addr(self, name: str, link: int) -> str:
        return f"{link_subnet(link)}.{self.nodes[name].nodeid}"

    def addrs(self, name: str) -> tuple[str, ...]:
        return tuple(self.addr(name, link) for link in range(self.link_count))

    def port(self, name: str, link: int) -> str:
        """The switch-side veth of `name` on link `link` (NetnsLab names link 0's `vb<id>`)."""
        nodeid = self.nodes[name].nodeid
        return f"vb{nodeid}" if link == 0 else f"vl{link}n{nodeid}"

    def set_link(self, name: str, link: int, *, up: bool) -> None:
        """Pull (or plug back) `name`'s cable of link `link` at the switch."""
        _ip("-n", self.switch, "link", "set", self.port(name, link), "up" if up else "down")

    def loss_unavailable(self) -> str | None:
        """Why `set_loss` cannot work here, or None (tried on the switch's loopback)."""
        if shutil.which("tc") is None:
            return "no `tc` (iproute2) on this machine"
        netem = self._netem(self.switch, "lo", 0.5)
        self._tc(self.switch, "qdisc", "del", "dev", "lo", "root")
        if netem is None:
            return None
        fallback = self._random_drop(self.switch, "lo", 0.5)
        self._tc(self.switch, "qdisc", "del", "dev", "lo", "root")
        if fallback is None:
            return None
        return f"neither tc netem ({netem}) nor htb with a bpf classifier ({fallback}) works"

    def set_loss(self, name: str, link: int, percent: float) -> None:
        """Drop `percent` % of the frames `name` sends on link `link` (0: no loss)."""
        ns, dev = self.nodes[name].ns, f"eth{link}"
        self._tc(ns, "qdisc", "del", "dev", dev, "root")
        if percent <= 0:
            return
        netem = self._netem(ns, dev, percent)
        if netem is None:
            return
        self._tc(ns, "qdisc", "del", "dev", dev, "root")
        fallback = self._random_drop(ns, dev, percent)
        assert fallback is None, f"no loss on {name} link {link}: {netem}; {fallback}"

    def _netem(self, ns: str, dev: str, percent: float) -> str | None:
        """netem loss on `dev`; None when done, else tc's error."""
        done = self._tc(ns, "qdisc", "replace", "dev", dev, "root", "netem", "loss",
                        f"{percent}%")
        return None if done.returncode == 0 else done.stderr.strip()

    def _random_drop(self, ns: str, dev: str, percent: float) -> str | None:
        """The same loss without sch_netem (kernels built without it): an htb root whose
        classic-BPF classifier sends a random `percent` % of the packets to a class whose
        pfifo holds nothing (limit 0), the rest to a class that passes everything. None when
        done, else tc's error."""
        threshold = round((1 - percent / 100) * 2**32)
        program = [(0x20, 0, 0, RANDOM_WORD),  # A = a random 32-bit word
                   (0x35, 0, 1, threshold),  # A >= threshold ?
                   (0x06, 0, 0, DROP_CLASS),  # yes: class 1:2
                   (0x06, 0, 0, PASS_CLASS)]  # no: class 1:1
        bytecode = ",".join([str(len(program)), *(" ".join(map(str, op)) for op in program)])
        steps = [("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"),
                 ("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
                  "10gbit", "quantum", "60000"),
                 ("class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate",
                  "10gbit", "quantum", "60000"),
                 ("qdisc", "add", "dev", dev, "parent", "1:2", "handle", "2:", "pfifo", "limit",
                  "0"),
                 ("filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1",
                  "bpf", "bytecode", bytecode)]
        for step in steps:
            done = self._tc(ns, *step)
            if done.returncode != 0:
                return f"tc {' '.join(step)}: {done.stderr.strip()}"
        return None

    @staticmethod
    def _tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True,
                              timeout=30, check=False)

    # ------------------------------------------------------------------ the cluster

    def config_text(self, links: int | None = None, **options: Any) -> str:
        """`links_config` for every node of the lab with its addresses on its first `links`
        links (default all)."""
        count = self.link_count if links is None else links
        nodes = [(name, node.nodeid, self.addrs(name)[:count])
                 for name, node in self.nodes.items()]
        return links_config(nodes, **options)

    def start_cluster(self, text: str, names: Sequence[str] | None = None) -> None:
        """Write `text` and one fresh authkey into every node's home, start the daemons of
        `names` (default all) and wait for one synced ring of them."""
        names = list(names or self.nodes)
        key = self.root / "authkey"
        keygen(key)
        for node in self.nodes.values():
            node.config.write_text(text)
            shutil.copy2(key, node.authkey)
        for name in names:
            self.start(name)
        self.wait_ring(names)

    def links(self, name: str) -> list[LinkEntry]:
        """`pmxfs links --json` on `name`, checked to have the contract's shape."""
        out = json.loads(self.cli(name, "links", "--json").stdout)
        assert isinstance(out, dict), out
        assert set(out) == {"links"}, out
        return [LinkEntry.parse(raw) for raw in out["links"]]

    def carrying(self, name: str, peer: str) -> tuple[int, ...]:
        """The links `name` sends to `peer` on now (`active` in `pmxfs links`)."""
        nodeid = self.nodes[peer].nodeid
        return tuple(sorted(e.link for e in self.links(name)
                            if e.nodeid == nodeid and e.active))

    def wait_carrying(self, pairs: Sequence[tuple[str, str]], links: tuple[int, ...],
                      timeout: float) -> float:
        """Until each (name, peer) of `pairs` carries its traffic on exactly `links`; the
        seconds it took."""
        started = time.monotonic()
        wait_until(lambda: all(self.carrying(a, b) == links for a, b in pairs), timeout,
                   f"traffic on link(s) {list(links)} for {list(pairs)}",
                   lambda: self.describe_links(sorted({a for a, _ in pairs})))
        return time.monotonic() - started

    def describe_links(self, names: Sequence[str]) -> str:
        lines = [self.describe(names)]
        for name in names:
            result = self.cli(name, "links", check=False)
            lines.append(f"--- pmxfs links on {name} ({result.returncode}) ---\n"
                         f"{result.stdout}{result.stderr}")
        return "\n".join(lines)

    def ring_id(self, name: str) -> Any:
        return self.status(name)["membership"]["ring_id"]

    def counters(self, name: str, topic: str = "ring") -> dict[str, int]:
        """The integer counters `pmxfs debug TOPIC --json` shows, flattened (nested maps joined
        with '.'), so a benchmark can diff them whatever their grouping."""
        flat: dict[str, int] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}{key}.", inner)
            elif isinstance(value, int) and not isinstance(value, bool):
                flat[prefix.rstrip(".")] = value

        walk("", self.query(name, "debug", topic))
        return flat


class WriteLoad:
    """One lifecycle `Writer` per node of `names`, each on its own file `load-<node>.txt`
    through that node's mount (module header)."""

    def __init__(self, lab: NetnsLab, names: Sequence[str], tag: str = "load") -> None:
        self.lab = lab
        self.writers = {name: Writer(lab[name].mount / f"{tag}-{name}.txt") for name in names}
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=w.run, args=(self.stop_event,), daemon=True)
                        for w in self.writers.values()]

    def __enter__(self) -> WriteLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=WRITER_JOIN_S)
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"a writer is stuck in a write: {stuck}\n{self.lab.describe()}"

    def acked(self) -> int:
        return sum(len(w.acked) for w in self.writers.values())

    def wait_progress(self, count: int, timeout: float = RING_TIMEOUT_S) -> None:
        """Until every writer has `count` more acknowledged writes than now."""
        base = {name: len(w.acked) for name, w in self.writers.items()}
        wait_until(lambda: all(len(w.acked) >= base[name] + count
                               for name, w in self.writers.items()),
                   timeout, f"{count} more acknowledged writes per writer", self.lab.describe)

    def latencies(self, start: float, end: float) -> list[float]:
        """Seconds each write took that began in [start, end) (monotonic clock)."""
        out = []
        for writer in self.writers.values():
            times = list(writer.attempt_times)  # the writer may append meanwhile
            out += [after - before for before, after in itertools.pairwise(times)
                    if start <= before < end]
        return out

    def verify(self, names: Sequence[str]) -> dict[str, int]:
        """After `stop`: no write failed; every node of `names` holds each writer's file with
        the same values, strictly increasing, every acknowledged one among them; the number of
        values per writer. Waits for one synced ring of `names` holding one tree first."""
        self.lab.wait_ring(names)
        counts = {}
        for owner, writer in self.writers.items():
            assert not writer.errors, f"{owner}: failed writes: {writer.errors[:5]}"
            contents = {name: (self.lab[name].mount / writer.path.name).read_text()
                        for name in names}
            assert len(set(contents.values())) == 1, (owner, contents)
            values = [int(line) for line in contents[names[0]].splitlines()]
            assert values == sorted(set(values)), f"{owner}: a value twice or out of order"
            lost = sorted(set(writer.acked) - set(values))
            assert not lost, f"{owner}: acknowledged writes lost: {lost}"
            assert set(values) <= set(writer.attempted)
            counts[owner] = len(values)
        return counts


def summary(latencies: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50, p99 and max of `latencies` in ms."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {"writes": len(latencies), "p50_ms": ms(percentile(latencies, 0.5)),
            "p99_ms": ms(percentile(latencies, 0.99)),
            "max_ms": ms(max(latencies) if latencies else None),
            "mean_ms": ms(statistics.fmean(latencies) if latencies else None)}


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


def lossy_load(lab: LinksLab, loss: dict[int, float], seconds: float) -> dict[str, Any]:
    """Every node drops `loss[L]` % of what it sends on link L while each node writes for
    `seconds` (a measurement window, not a wait for a condition); then the loss is removed and
    the writes verified (ordered, nothing lost). The figures: acknowledged writes, whether the
    ring id changed, and the deltas of the retransmission counters of `pmxfs debug ring` and
    of every counter of `pmxfs debug transport`, summed over the nodes."""
    names = list(lab.nodes)
    ring_id = lab.ring_id(names[0])
    ring_before = {name: lab.counters(name) for name in names}
    transport_before = {name: lab.counters(name, "transport") for name in names}
    for name in names:
        for link, percent in loss.items():
            lab.set_loss(name, link, percent)
    load = WriteLoad(lab, names, tag="lossy")
    with load:
        time.sleep(seconds)
    ring: dict[str, int] = {}
    transport: dict[str, int] = {}
    for name in names:
        for key, value in counter_delta(ring_before[name], lab.counters(name)).items():
            if "retrans" in key and not key.startswith("params."):  # counters, not timers
                ring[key] = ring.get(key, 0) + value
        for key, value in counter_delta(transport_before[name],
                                             lab.counters(name, "transport")).items():
            transport[key] = transport.get(key, 0) + value
    for name in names:
        for link in loss:
            lab.set_loss(name, link, 0)
    written = load.verify(names)
    return {"loss_percent": {str(link): percent for link, percent in loss.items()},
            "seconds": seconds, "writes": sum(written.values()),
            "ring_changed": lab.ring_id(names[0]) != ring_id,
            "retransmissions": ring, "transport": transport}
