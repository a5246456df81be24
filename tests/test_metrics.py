"""`pmxfs metrics`: the renderer, a running in-process cluster's exposition parsed with
prometheus_client's parser, the control command and CLI, and the HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from test_replica_node import Cluster, cluster

from pmxfs import cli
from pmxfs.core.fsop import Mkdir, WriteFile
from pmxfs.core.metrics import Histogram, counter, labelled, render
from pmxfs.runtime import metrics_http
from pmxfs.runtime.ipc import serve_control
from pmxfs.runtime.node_metrics import render_node
from pmxfs.runtime.replica_node import ReplicaNode

Families = dict[str, list[tuple[str, dict[str, str], float]]]

__all__ = ["cluster"]  # the fixture, imported from test_replica_node


def parse(text: str) -> Families:
    """Family name (as the parser names it) -> its samples."""
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def value(families: Families, sample: str, **labels: str) -> float:
    for fam in families.values():
        for name, lab, v in fam:
            if name == sample and all(lab.get(k) == x for k, x in labels.items()):
                return v
    raise KeyError((sample, labels))


def test_render_escapes_and_parses() -> None:
    text = render([counter("x_total", "help with \\ and\nnewline", 3, {"a": 'q"\\\n'}),
                   labelled("g", "a gauge", "gauge", [({"k": "1"}, 1.5), ({"k": "2"}, math.inf)])])
    assert '{a="q\\"\\\\\\n"}' in text
    families = parse(text)
    assert families["x"] == [("x_total", {"a": 'q"\\\n'}, 3)]
    assert value(families, "g", k="2") == math.inf


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 5)]
    families = parse(render([h.family("d_seconds", "a histogram")]))
    samples = families["d_seconds"]
    assert ("d_seconds_count", {}, 5) in samples
    assert value(families, "d_seconds_sum") == pytest.approx(5.65)


def check_exposition(text: str) -> Families:
    """Parsed, every histogram's buckets monotonic and ending with +Inf == _count."""
    families = parse(text)
    for fam in text_string_to_metric_families(text):
        if fam.type != "histogram":
            continue
        buckets = [(s.labels["le"], s.value) for s in fam.samples if s.name.endswith("_bucket")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), fam.name
        assert buckets[-1][0] == "+Inf"
        assert buckets[-1][1] == value(families, f"{fam.name}_count")
    return families


async def test_a_running_node_exposes_its_metrics(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    before = parse(render_node(node))
    with trio.fail_after(30):
        assert (await node.write(Mkdir("m", 1))).errno == 0
        assert (await node.write(Mkdir("m", 1))).errno == errno.EEXIST
        assert (await node.write(WriteFile("m/f", b"x", 1, create=True))).errno == 0
    families = check_exposition(render_node(node))
    for sample, labels, grew in (("pmxfs_operations_proposed_total", {}, 3),
                                 ("pmxfs_operations_applied_total", {}, 2),
                                 ("pmxfs_operations_refused_total", {"errno": "EEXIST"}, 1),
                                 ("pmxfs_write_duration_seconds_count", {}, 3)):
        try:
            was = value(before, sample, **labels)
        except KeyError:  # a label not seen yet
            was = 0
        assert value(families, sample, **labels) - was == grew, sample
    assert value(families, "pmxfs_database_commit_duration_seconds_count") >= 1
    assert value(families, "pmxfs_quorum_quorate") == 1
    assert value(families, "pmxfs_quorum_total_votes") == 3
    assert value(families, "pmxfs_quorum_votes_needed") == 2
    assert value(families, "pmxfs_ring_members") == 3
    ring = node.replica.ring
    assert value(families, "pmxfs_ring_info", ring_id=f"{ring.rep}.{ring.seq}") == 1
    assert value(families, "pmxfs_membership_changes_total") >= 1
    assert value(families, "pmxfs_totem_token_rotations_total") > 0
    assert value(families, "pmxfs_totem_state", state="operational") == 1
    assert "pmxfs_link_up" in families  # one sample per peer and link (none standalone)
    for entry in node.links():
        assert value(families, "pmxfs_link_up", nodeid=str(entry["nodeid"]),
                     link=str(entry["link"])) == int(entry["connected"])
    assert value(families, "pmxfs_sync_duration_seconds_count") >= 1
    assert value(families, "pmxfs_operations_pending") == 0
    for name in families:
        assert name.startswith("pmxfs_"), name


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pmxfs-metrics-", dir="/tmp") as path:
        yield Path(path)


async def test_the_control_command_and_the_cli(cluster: Cluster, run_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    node: ReplicaNode = cluster.nodes[2]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(
            serve_control, run_dir / "pmxfs.sock", node, www_data_gid=None,
            metrics=functools.partial(render_node, node)))
        code = await trio.to_thread.run_sync(cli.main, ["--run-dir", str(run_dir), "metrics"])
        out, err = capsys.readouterr()
        nursery.cancel_scope.cancel()
    assert (code, err) == (0, "")
    families = check_exposition(out)
    assert value(families, "pmxfs_node_info", node="node2", nodeid="2") == 1


async def test_a_daemon_without_metrics_refuses_in_one_line(
        cluster: Cluster, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(
            serve_control, run_dir / "pmxfs.sock", cluster.nodes[1], www_data_gid=None))
        code = await trio.to_thread.run_sync(cli.main, ["--run-dir", str(run_dir), "metrics"])
        nursery.cancel_scope.cancel()
    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", "pmxfs: this daemon serves no metrics\n")


async def http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


async def test_the_http_endpoint(cluster: Cluster) -> None:
    node = cluster.nodes[3]
    calls = {"fail": False}

    def rendered() -> str:
        if calls["fail"]:
            raise RuntimeError("boom")
        return render_node(node)

    listeners = await metrics_http.listen("127.0.0.1", 0)
    port = metrics_http.bound_port(listeners)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics_http.serve_metrics, listeners, rendered)
            answer = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200 OK\r\n")
            assert b"Content-Type: text/plain; version=0.0.4" in head
            assert value(check_exposition(body.decode()), "pmxfs_quorum_quorate") == 1
            assert (await http(port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
            assert (await http(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 405")
            assert (await http(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.0 400")
            # too large: answered 400, or reset because the rest is left unread
            with contextlib.suppress(trio.BrokenResourceError):
                assert (await http(port, b"GET /" + b"a" * 10000)).startswith(b"HTTP/1.0 400")
            head_only = await http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert head_only.endswith(b"\r\n\r\n")
            calls["fail"] = True
            assert (await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 500")
            calls["fail"] = False  # the server survived all of it
            assert (await http(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 200")
            nursery.cancel_scope.cancel()


def test_parse_listen() -> None:
    assert metrics_http.parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert metrics_http.parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", "host:", "host:x", ":9100", "h:70000"):
        with pytest.raises(metrics_http.MetricsListenError):
            metrics_http.parse_listen(bad)


async def test_a_port_in_use_is_refused_in_one_line() -> None:
    listeners = await metrics_http.listen("127.0.0.1", 0)
    try:
        with pytest.raises(metrics_http.MetricsListenError, match="cannot listen for metrics"):
            await metrics_http.listen("127.0.0.1", metrics_http.bound_port(listeners))
    finally:
        for listener in listeners:
            await listener.aclose()
