"""`pmxfs create --link0 --link1` and `pmxfs add --link0 --link1` through the CLI with real
daemons on two bridges (links_harness.LinksLab): the cluster they make runs knet on both links,
a joiner without link 1 is refused with the link named, and with link 0's cable pulled the two
nodes still write through link 1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cpg_harness import wait_until
from lifecycle_harness import lab_set
from links_harness import CLUSTER, RING_TIMEOUT_S, TOKEN_MS, LinksLab

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.fuse]

NAMES = ("a", "b")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LinksLab]:
    with lab_set(tmp_path) as keep:
        yield keep(lambda root: LinksLab(root, NAMES, links=2))


def _both_up(lab: LinksLab, name: str, peer: str) -> Callable[[], bool]:
    return lambda: all(e.connected for e in lab.links(name) if e.name == peer)


def test_create_and_add_with_two_links_make_a_knet_cluster_on_both(lab: LinksLab) -> None:
    for name in NAMES:
        lab.start(name)
    created = lab.cli("a", "create", CLUSTER, "--link0", lab.addr("a", 0), "--link1",
                      lab.addr("a", 1), "--nodeid", "1")
    assert (f"node 1 on {lab.addr('a', 0)} (link 0), {lab.addr('a', 1)} (link 1), transport "
            "knet, config_version 1") in created.stdout, created.stdout
    lab.write_config("a", {"token": TOKEN_MS})
    wait_until(lambda: lab.ring("a")["params"]["token"] == TOKEN_MS, RING_TIMEOUT_S,
               f"token {TOKEN_MS} on a", lambda: lab.describe(["a"]))

    token = lab.join_token("a")
    refused = lab.cli("b", "add", "--token", token, "--link0", lab.addr("b", 0), check=False)
    assert refused.returncode == 1, refused
    assert "b needs an address on link 1 too (--link1 ADDR)" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    lab.cli("b", "add", "--token", token, "--link0", lab.addr("b", 0), "--link1",
            lab.addr("b", 1))
    lab.wait_ring(NAMES)

    for name, peer in (("a", "b"), ("b", "a")):
        assert lab.status(name)["cluster"]["transport"] == "knet"
        entries = {e.link: e for e in lab.links(name) if e.name == peer}
        assert sorted(entries) == [0, 1]
        assert [entries[n].address for n in (0, 1)] == [lab.addr(peer, 0), lab.addr(peer, 1)]
        wait_until(_both_up(lab, name, peer), RING_TIMEOUT_S, f"both links {name}->{peer} up",
                   lab.describe)

    lab.set_link("b", 0, up=False)  # link 0's cable pulled: link 1 carries on
    wait_until(lambda: lab.carrying("a", "b") == (1,), RING_TIMEOUT_S, "a sends to b on link 1",
               lab.describe)
    (lab["b"].mount / "after-cut.txt").write_text("via link 1")
    wait_until(lambda: (lab["a"].mount / "after-cut.txt").exists(), RING_TIMEOUT_S,
               "b's write on a", lab.describe)
    assert lab.cli("b", "status").returncode == 0
