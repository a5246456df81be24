"""`pmxfs links [--json]` and the control command "links", against a control socket served for a
small fake node (the real node's answer is covered by tests/test_knet_transport.py)."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_ipc import NOBODY, needs_root_and_www_data, run_cli, run_cli_as, www_data_gid

from pmxfs.commands.links import check_links_shape, render_links_text
from pmxfs.commands.status import check_status_shape
from pmxfs.core.replica import Reply
from pmxfs.runtime.ipc import ControlError, request, serve_control

LINKS: list[dict[str, Any]] = [
    {"nodeid": 3, "name": "pve3", "link": 0, "address": "10.0.0.3", "connected": False,
     "active": False},
    {"nodeid": 2, "name": "pve2", "link": 1, "address": "10.1.0.2", "connected": True,
     "active": False},
    {"nodeid": 2, "name": "pve2", "link": 0, "address": "10.0.0.2", "connected": True,
     "active": True},
    {"nodeid": 3, "name": "pve3", "link": 1, "address": "10.1.0.3", "connected": True,
     "active": True},
]
STATUS: dict[str, Any] = {
    "cluster": {"name": "lab", "config_version": 3, "transport": "knet"},
    "node": {"name": "pve1", "nodeid": 1},
    "quorum": {"quorate": True, "expected_votes": 3, "highest_expected": 3, "total_votes": 3,
               "quorum": 2, "flags": ["Quorate"]},
    "membership": {"ring_id": "1.2c", "members": [
        {"nodeid": 1, "name": "pve1", "votes": 1, "local": True},
        {"nodeid": 2, "name": "pve2", "votes": 1, "local": False},
        {"nodeid": 3, "name": "pve3", "votes": 1, "local": False},
    ]},
    "fs": {"synced": True, "version": 17},
    "links": LINKS,
}


class FakeNode:
    def __init__(self) -> None:
        self.links = LINKS

    def status(self) -> dict[str, Any]:
        return {**STATUS, "links": self.links}

    def nodes(self) -> list[dict[str, Any]]:
        return []

    async def set_expected(self, expected: int) -> Reply:
        raise AssertionError("not called")

    async def log(self, *, priority: int, tag: str, user: str, pid: int, msg: str) -> None:
        raise AssertionError("not called")

    def debug(self, topic: str) -> dict[str, Any]:
        raise KeyError(topic)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pmxfs-links-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
async def node(run_dir: Path, nursery: trio.Nursery) -> FakeNode:
    fake = FakeNode()
    await nursery.start(functools.partial(serve_control, run_dir / "pmxfs.sock", fake,
                                          www_data_gid=www_data_gid()))
    return fake


async def test_the_links_command_answers_the_status_list(run_dir: Path, node: FakeNode) -> None:
    answer = await trio.to_thread.run_sync(request, run_dir / "pmxfs.sock", "links")
    assert answer == {"links": LINKS}
    assert check_links_shape(answer) == []
    assert check_status_shape(STATUS) == []
    with pytest.raises(ControlError, match="unknown argument"):
        await trio.to_thread.run_sync(functools.partial(request, run_dir / "pmxfs.sock",
                                                        "links", verbose=True))


async def test_json_prints_the_answer(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                      node: FakeNode) -> None:
    code, out, err = await run_cli(capsys, run_dir, "links", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"links": LINKS}


async def test_text_is_a_table_per_peer_and_link(capsys: pytest.CaptureFixture[str],
                                                 run_dir: Path, node: FakeNode) -> None:
    code, out, err = await run_cli(capsys, run_dir, "links")
    assert (code, err) == (0, "")
    assert out == (
        "Links to the other nodes\n"
        "------------------------\n"
        "    Nodeid Name Link Address  Status\n"
        "         2 pve2    0 10.0.0.2 connected, carries traffic\n"
        "         2 pve2    1 10.1.0.2 connected\n"
        "         3 pve3    0 10.0.0.3 down\n"
        "         3 pve3    1 10.1.0.3 connected, carries traffic\n")
    node.links = []
    code, out, err = await run_cli(capsys, run_dir, "links")
    assert (code, out.startswith("No other nodes"), err) == (0, True, "")


async def test_a_malformed_answer_is_one_line(capsys: pytest.CaptureFixture[str],
                                              run_dir: Path, node: FakeNode) -> None:
    node.links = [{"nodeid": 2, "link": 0}]
    code, out, err = await run_cli(capsys, run_dir, "links")
    assert (code, out) == (1, "")
    assert err.startswith("pmxfs: unexpected link list from the daemon: links.links[0]")
    assert err.count("\n") == 1


async def test_no_daemon(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    code, out, err = await run_cli(capsys, run_dir, "links")
    assert (code, out) == (2, "")
    assert err == f"pmxfs: no daemon at {run_dir / 'pmxfs.sock'} (is pmxfs running?)\n"


def test_render_sorts_by_node_and_link() -> None:
    lines = render_links_text(LINKS).splitlines()[3:]
    assert [line.split()[:3] for line in lines] == [
        ["2", "pve2", "0"], ["2", "pve2", "1"], ["3", "pve3", "0"], ["3", "pve3", "1"]]


@pytest.mark.root
@needs_root_and_www_data
async def test_www_data_may_read_the_links(run_dir: Path, node: FakeNode) -> None:
    www = www_data_gid()
    assert www is not None
    code, out, err = await run_cli_as(run_dir, "links", "--json", uid=NOBODY, gid=NOBODY,
                                      groups=(www,))
    assert (code, err, json.loads(out)) == (0, "", {"links": LINKS})
