"""The knet transport and link health, hardened after review: no busy loop at a heartbeat
deadline, a peer added to a lone node is pinged at once, a failed set_links changes nothing,
a silent path keeps a bounded number of pings, host names resolve in totem.ip_version's order.
Loopback addresses only (127.0.1.x / 127.0.2.x, as tests/test_knet_transport.py)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
from test_knet_transport import INTERVAL_MS, TIMEOUT_MS, addr, crypto, pair, specs

from pmxfs.commands import config_check
from pmxfs.core import conf
from pmxfs.core.link_health import LinkConfig, LinkHealth
from pmxfs.runtime import knet_transport
from pmxfs.runtime.knet_transport import KnetTransport, LinkSpec

WAIT_S = 2.0


class _Blocked(Exception):
    """`recv` reached a real wait (the deadline lies ahead): no busy loop."""


async def test_recv_does_not_spin_when_woken_exactly_at_the_deadline(
        monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock) -> None:
    """Woken exactly at a heartbeat deadline, `recv` sends the pings that are due and waits
    again; it does not loop on a floored millisecond that is one short of the deadline (with a
    clock that stands still that loop never ended)."""
    async with pair() as (_port, ts):
        t = ts[1]
        now = trio.current_time()
        for due in range(1000, 5000):  # a deadline whose float wake-up floors to due - 1
            epoch = now - due / 1000
            if epoch + due / 1000 == now and int((now - epoch) * 1000) < due:
                break
        else:
            pytest.skip("no rounding case at this clock value")
        t._epoch, t._due = epoch, due
        real_wait = KnetTransport._wait
        calls = 0

        async def counting_wait(self: KnetTransport) -> None:
            nonlocal calls
            assert self._due is not None
            if self._epoch + self._due / 1000 > trio.current_time():
                raise _Blocked
            calls += 1
            assert calls < 100, "recv busy-loops: deadline passed but _tick does not fire"
            await real_wait(self)

        monkeypatch.setattr(KnetTransport, "_wait", counting_wait)
        with pytest.raises(_Blocked):
            await t.recv()


async def test_a_peer_added_to_a_lone_node_is_pinged_without_waiting_for_its_traffic() -> None:
    """A node alone in its cluster (after `pmxfs create`) waits with no heartbeat deadline; a
    peer added by `set_links` brings the deadline forward while it waits, so the peer is
    pinged at once rather than when some datagram happens to arrive."""
    port = 24000 + (hash("review") % 4000) * 2
    lone = await KnetTransport.open(node_id=1, links=specs(port, (1,)), mode="passive",
                                    crypto=crypto(1, (1, 2)))
    peer = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await peer.bind((addr(0, 2), port))

        async def receive() -> None:
            try:
                while True:
                    await lone.recv_batch()
            except trio.ClosedResourceError:
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.sleep(0.05)  # the receiving task is now waiting (no deadline)
            await lone.set_links(specs(port, (1, 2)), "passive")
            with trio.move_on_after(WAIT_S) as waited:
                await peer.recv(65536)
            lone.close()
        assert not waited.cancelled_caught, (
            f"no ping reached the added peer in {WAIT_S} s (interval {INTERVAL_MS} ms, "
            f"timeout {TIMEOUT_MS} ms): pings_sent={lone.counters['pings_sent']}")
    finally:
        peer.close()
        lone.close()


async def test_failed_set_links_changes_nothing() -> None:
    """A `set_links` refused (a node id out of range) leaves the sockets and the peers as they
    were: every check runs before anything is swapped."""
    async with pair() as (port, ts):
        one = ts[1]
        before = one.local_addresses
        bad = [LinkSpec(number=s.number, port=s.port + 100, priority=s.priority,
                        ping_interval_ms=s.ping_interval_ms, ping_timeout_ms=s.ping_timeout_ms,
                        pong_count=s.pong_count, addresses={**s.addresses, 0: addr(s.number, 9)})
               for s in specs(port, (1, 2))]
        with pytest.raises(ValueError, match=r"node id\(s\) \[0\] out of range"):
            await one.set_links(bad, "passive")
        assert one.local_addresses == before, "a failed set_links rebound the links"
        assert one._others == [2]


def test_outstanding_pings_per_path_are_bounded() -> None:
    """A path that gets no pongs keeps only the newest `MAX_OUTSTANDING_PINGS` pings, whatever
    ratio of ping timeout to interval the config allows."""
    text = """totem {
  cluster_name: c
  config_version: 1
  interface {
    linknumber: 0
    knet_ping_interval: 1
    knet_ping_timeout: 10000000
  }
}
nodelist {
  node {
    name: a
    nodeid: 1
    ring0_addr: 10.0.0.1
  }
  node {
    name: b
    nodeid: 2
    ring0_addr: 10.0.0.2
  }
}
quorum {
  provider: corosync_votequorum
}
"""
    config = conf.check(text).config
    assert config is not None  # accepted today
    s = conf.link_settings(config)[0]
    health = LinkHealth(0, 1, [2], [LinkConfig(s.number, s.priority, s.ping_interval_ms,
                                                s.ping_timeout_ms, s.pong_count)], "passive")
    for now in range(20000):  # 20 s with peer 2 silent
        health.pings_due(now)
    outstanding = len(health._paths[(2, 0)].sent)
    assert outstanding <= 64, f"{outstanding} pings kept for one silent path"


async def test_runtime_resolves_host_names_in_totem_ip_version_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Host names resolve in `totem.ip_version`'s order at start, as `config check` shows them:
    with `ip_version: ipv4`, a name with both AAAA and A records is bound as IPv4."""
    v6 = (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("::1", 5405, 0, 0))
    v4 = (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", 5405))

    async def fake_getaddrinfo(host: str, port: int, family: int = 0,
                               *_args: Any) -> list[Any]:
        if family == socket.AF_INET:
            return [v4]
        if family == socket.AF_INET6:
            return [v6]
        return [v6, v4]  # RFC 6724 order on a host with IPv6

    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    text = """totem {
  cluster_name: c
  config_version: 1
  ip_version: ipv4
}
nodelist {
  node {
    name: a
    nodeid: 1
    ring0_addr: a.example
  }
  node {
    name: b
    nodeid: 2
    ring0_addr: b.example
  }
}
quorum {
  provider: corosync_votequorum
}
"""
    config = conf.check(text).config
    assert config is not None
    assert conf.ip_versions(config) == (4,)
    assert config_check.resolve is not None  # config check honours (4,): see resolve()
    own, _peers = await knet_transport._resolve_link(1, knet_transport.link_specs(config)[0])
    assert own.family == socket.AF_INET, "the daemon ignores totem.ip_version: ipv4"
