"""A cluster's whole life through the command line, with real daemons (issue 13).

Each node is a `pmxfs daemon` in its own network namespace with its own paths
(lifecycle_harness.NetnsLab): it starts standalone, `pmxfs create` makes the first member, the
others join with `pmxfs join-token` / `pmxfs add`, `pmxfs delnode` removes a stopped node, and
`pmxfs db backup` / `db restore` re-install one. No daemon is restarted by any of it: a running
daemon takes each new corosync.conf (nodelist, votes, totem timers) at run time. Every cluster
gets a 1000 ms totem token right after `create`, written through the mount, so a stopped node is
noticed within a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cpg_harness import wait_until
from lifecycle_harness import (
    CLUSTER,
    RING_TIMEOUT_S,
    TOKEN_MS,
    NetnsLab,
    lab_set,
    running_token,
)

from pmxfs.core.join_token import decode_token, encode_token

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.fuse]

EXPIRING_TTL_S = 10  # the shortest TTL `join-token` accepts
RATE_LIMIT = 5  # failed joins from one source within 60 s; the member refuses it after that
QUIET_S = 3.0  # how long a removed node is watched not disturbing the ring
LOAD_AFTER_JOIN = 20  # acknowledged writes each writer makes once the fourth node is in

LabFactory = Callable[[Sequence[str]], NetnsLab]


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[LabFactory]:
    """`make_lab(names)`: namespaces and paths for those nodes; all torn down after the test."""
    with lab_set(tmp_path) as keep:
        yield lambda names: keep(lambda root: NetnsLab(root, names))


def _config_version(lab: NetnsLab, name: str) -> int:
    return int(lab.status(name)["cluster"]["config_version"])


def _members(lab: NetnsLab, name: str) -> list[str]:
    return sorted(m["name"] for m in lab.status(name)["membership"]["members"])


def _wait_config_version(lab: NetnsLab, name: str, version: int) -> None:
    wait_until(lambda: _config_version(lab, name) == version, RING_TIMEOUT_S,
               f"config_version {version} on {name}", lab.describe)


def _one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The `pmxfs: reason` line of a refused command, checked to say each of `needles`."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pmxfs: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _reason(refusal: str) -> str:
    """What a refusal line of `pmxfs add` says, without the command's own words around it."""
    return refusal.removeprefix("pmxfs: ").removeprefix("the cluster refused the join: ")


def _says(entries: Sequence[str], text: str) -> bool:
    """Whether one of `entries` says `text`, spacing aside (ctime pads a day: "Dec  4")."""
    words = " ".join(text.split())
    return any(words in " ".join(entry.split()) for entry in entries)


def _wait_file(path: Path, text: str) -> None:
    def there() -> bool:
        try:
            return path.read_text() == text
        except FileNotFoundError:
            return False

    wait_until(there, RING_TIMEOUT_S, f"{path} holding {text!r}")


def _new_lines(before: str, after: str) -> list[str]:
    assert after.startswith(before)
    return after[len(before):].splitlines()


def test_create_then_add_two_nodes_without_restarts(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    for name in ("a", "b", "c"):
        lab.start(name)
    pids = {name: lab[name].pids[0] for name in ("a", "b", "c")}
    created = lab.create("a").stdout.splitlines()
    assert len(created) == 2, created
    assert created[0].startswith(f"created cluster {CLUSTER}:"), created
    assert lab["a"].config.exists()
    assert lab["a"].authkey.exists()
    lab.write_config("a", {"token": TOKEN_MS})
    (lab["a"].mount / "before-joins.txt").write_text("written on a before any join\n")

    for name in ("b", "c"):
        added = lab.add(name, lab.join_token("a")).stdout.splitlines()
        assert added[0].startswith(f"joined cluster {CLUSTER} as node {lab[name].nodeid};")
        assert added[1] == "waiting for quorum...OK", added
    lab.wait_ring(["a", "b", "c"])

    version = 4  # create 1, the token change 2, each join one more
    cluster_conf = (lab["a"].mount / "corosync.conf").read_text()
    assert f"config_version: {version}" in cluster_conf
    for name in ("a", "b", "c"):
        st = lab.status(name)
        assert st["cluster"] == {"name": CLUSTER, "config_version": version,
                                 "transport": "udpu"}, st
        assert st["node"] == {"name": name, "nodeid": lab[name].nodeid}
        assert st["quorum"]["quorate"], st
        assert st["quorum"]["expected_votes"] == 3, st
        assert sorted(m["name"] for m in st["membership"]["members"]) == ["a", "b", "c"]
        assert (lab[name].mount / "before-joins.txt").read_text() == \
            "written on a before any join\n"
        assert lab[name].config.read_text() == cluster_conf  # the files a restart would read
        assert lab[name].authkey.read_bytes() == lab["a"].authkey.read_bytes()
        nodes = lab.query(name, "nodes")
        assert [(n["name"], n["online"]) for n in nodes] == \
            [("a", True), ("b", True), ("c", True)]
        assert all(isinstance(n["joined"], int) for n in nodes), nodes
        # never restarted: the first daemon still runs, and it mounted once
        assert lab[name].running()
        assert lab[name].pids == [pids[name]], lab[name].pids
        assert lab[name].log_text().count(" mounted ") == 1, lab[name].log_tail()


def test_bad_tokens_are_refused_logged_and_rate_limited(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    for name in ("a", "b", "c"):
        lab.start(name)
    lab.create("a")
    lab.write_config("a", {"token": TOKEN_MS})
    expiring_made = time.time()
    expiring = lab.join_token("a", f"{EXPIRING_TTL_S}s")
    spare = lab.join_token("a")  # valid all along: the join service keeps listening
    used = lab.join_token("a")
    lab.add("b", used)
    lab.wait_ring(["a", "b"])
    version, tree = _config_version(lab, "a"), lab.tree_checksum("a")
    member_log = lab["a"].log_text()
    joiner = lab["c"].addr

    wrong_secret = encode_token(dataclasses.replace(decode_token(spare), secret=bytes(32)))
    wrong_fingerprint = encode_token(dataclasses.replace(decode_token(spare),
                                                         fingerprint="0" * 64))
    refusals = {"used": _one_line_refusal(lab.add("c", used, check=False), "already used"),
                "wrong secret": _one_line_refusal(lab.add("c", wrong_secret, check=False),
                                                  "unknown join token")}
    before = lab["a"].log_text()
    refusals["wrong fingerprint"] = _one_line_refusal(
        lab.add("c", wrong_fingerprint, check=False), "fingerprint", "nothing was sent")
    assert not [line for line in _new_lines(before, lab["a"].log_text()) if joiner in line], \
        "the member heard of a join whose certificate the joiner refused"
    wait_until(lambda: time.time() > expiring_made + EXPIRING_TTL_S + 1,
               EXPIRING_TTL_S + 5, "the short token's expiry")
    refusals["expired"] = _one_line_refusal(lab.add("c", expiring, check=False), "expired")

    # every refusal: in the daemon log and the cluster log of the member asked -- or, for the
    # wrong fingerprint, of the joiner (nothing was sent to the member)
    member_lines = _new_lines(member_log, lab["a"].log_text())
    member_cluster_log = lab.cluster_log("b")  # replicated: read it on the other member
    for what, line in refusals.items():
        reason = _reason(line)
        logs = ((lab["c"].log_text().splitlines(), lab.cluster_log("c"))
                if what == "wrong fingerprint" else (member_lines, member_cluster_log))
        for log in logs:
            assert _says(log, reason), (what, reason, log)
    for entry in member_cluster_log:
        if "join refused" in entry:
            assert joiner in entry, entry

    # 3 failures counted so far (used, wrong secret, expired): two more, then the limit
    for _ in range(RATE_LIMIT - 3):
        _one_line_refusal(lab.add("c", wrong_secret, check=False), "unknown join token")
    limited = _one_line_refusal(lab.add("c", spare, check=False),
                                f"too many failed join attempts from {joiner}")
    assert _says(lab["a"].log_text().splitlines(), _reason(limited)), lab["a"].log_tail()
    assert _says(lab.cluster_log("b"), _reason(limited))

    # nothing changed: the cluster's tree and config, and the joiner is still standalone
    for name in ("a", "b"):
        assert _config_version(lab, name) == version
        assert lab.tree_checksum(name) == tree
        assert _members(lab, name) == ["a", "b"]
    assert not lab["c"].config.exists()
    assert not lab["c"].authkey.exists()
    assert _members(lab, "c") == ["c"]


def test_a_vmid_in_use_blocks_the_join_until_removed(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b"])
    lab.start("a")
    lab.start("b")
    lab.create("a")
    lab.write_config("a", {"token": TOKEN_MS})
    (lab["a"].mount / "nodes/a/qemu-server/100.conf").write_text("name: in-the-cluster\n")
    mine = lab["b"].mount / "nodes/b/qemu-server/100.conf"
    mine.write_text("name: on-the-joiner\n")
    (lab["b"].mount / "nodes/b/qemu-server/101.conf").write_text("name: no-conflict\n")
    token = lab.join_token("a")
    version, tree = _config_version(lab, "a"), lab.tree_checksum("a")

    refused = _one_line_refusal(lab.add("b", token, check=False), "VMID", "100")
    assert "101" not in refused, refused
    assert any("100" in line and "join refused" in line
               for line in lab["a"].log_text().splitlines()), lab["a"].log_tail()
    assert _config_version(lab, "a") == version
    assert lab.tree_checksum("a") == tree
    assert not lab["b"].config.exists()

    mine.unlink()
    lab.add("b", token)  # the refusal did not use the token up
    lab.wait_ring(["a", "b"])
    vmlist = json.loads((lab["b"].mount / ".vmlist").read_text())["ids"]
    assert vmlist["100"]["node"] == "a", vmlist
    assert vmlist["101"]["node"] == "b", vmlist  # the joiner's guests join the cluster
    assert (lab["b"].mount / "nodes/a/qemu-server/100.conf").read_text() == \
        "name: in-the-cluster\n"


def test_delnode_of_a_stopped_node_and_its_return(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    lab.build(["a", "b", "c"])
    version = _config_version(lab, "a")
    _one_line_refusal(lab.cli("a", "delnode", "c", check=False), "power it off first")
    assert _config_version(lab, "a") == version

    assert lab.stop("c") == 0
    lab.wait_ring(["a", "b"])
    removed = lab.cli("a", "delnode", "c").stdout
    assert "nodes/c" in removed, removed
    for name in ("a", "b"):
        _wait_config_version(lab, name, version + 1)
        quorum = lab.status(name)["quorum"]
        assert quorum["quorate"], quorum
        assert (quorum["expected_votes"], quorum["total_votes"], quorum["quorum"]) == (2, 2, 2)
        assert [n["name"] for n in lab.query(name, "nodes")] == ["a", "b"]
    assert (lab["a"].mount / "nodes/c").is_dir()  # kept, as pvecm keeps it

    # the removed node comes back with its old config: refused, the ring does not notice
    ring_id = lab.status("a")["membership"]["ring_id"]
    drops = {name: lab.transport(name)["unknown_sender"] for name in ("a", "b")}
    lab.start("c")
    wait_until(lambda: all(lab.transport(name)["unknown_sender"] > drops[name]
                           for name in ("a", "b")),
               RING_TIMEOUT_S, "the survivors dropping the removed node's frames", lab.describe)
    deadline = time.monotonic() + QUIET_S
    written = 0
    while time.monotonic() < deadline:
        for name in ("a", "b"):
            st = lab.status(name)
            assert st["membership"]["ring_id"] == ring_id, (name, st, lab.describe())
            assert _members(lab, name) == ["a", "b"]
            assert st["quorum"]["quorate"]
        path = f"while-c-knocks-{written}.txt"
        (lab["a"].mount / path).write_text(f"{written}\n")
        _wait_file(lab["b"].mount / path, f"{written}\n")
        written += 1
    assert written >= 2
    assert _members(lab, "c") == ["c"]
    assert not lab.status("c")["quorum"]["quorate"]
    assert lab.transport("a")["unknown_sender"] > drops["a"]


@dataclass
class Writer:
    """Appends 1, 2, 3, ... as lines to its own file through one mount until stopped; a value
    is acknowledged when its close succeeded."""

    path: Path
    attempted: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    attempt_times: list[float] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        value = 0
        while not stop.is_set():
            value += 1
            self.attempted.append(value)
            self.attempt_times.append(time.monotonic())
            try:
                with open(self.path, "a", encoding="ascii") as f:
                    f.write(f"{value}\n")
            except OSError as exc:
                self.errors.append(f"{value}: {exc}")
            else:
                self.acked.append(value)


def test_a_fourth_node_joins_under_write_load(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c", "d"])
    lab.build(["a", "b", "c"])
    lab.start("d")
    writers = {name: Writer(lab[name].mount / f"load-{name}.txt") for name in ("a", "b", "c")}
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True)
               for w in writers.values()]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(len(w.acked) >= LOAD_AFTER_JOIN for w in writers.values()),
                   RING_TIMEOUT_S, "writes before the join")
        join_started = time.monotonic()
        lab.add("d", lab.join_token("a"))
        join_ended = time.monotonic()
        lab.wait_ring(["a", "b", "c", "d"], same_tree=False)
        acked_at_join = {name: len(w.acked) for name, w in writers.items()}
        wait_until(lambda: all(len(w.acked) >= acked_at_join[name] + LOAD_AFTER_JOIN
                               for name, w in writers.items()),
                   RING_TIMEOUT_S, "writes after the join")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a writer is stuck"
    assert any(join_started <= t <= join_ended for w in writers.values()
               for t in w.attempt_times), "no write was attempted while the node joined"
    lab.wait_ring(["a", "b", "c", "d"])

    for name, writer in writers.items():
        contents = {node: (lab[node].mount / writer.path.name).read_text()
                    for node in ("a", "b", "c", "d")}
        assert len(set(contents.values())) == 1, (name, contents)
        values = [int(line) for line in contents["a"].splitlines()]
        assert values == sorted(set(values)), f"{name}: a value twice or out of order"
        assert set(writer.acked) <= set(values), \
            f"{name}: acknowledged writes lost: {sorted(set(writer.acked) - set(values))}"
        assert set(values) <= set(writer.attempted)
        assert values[-1] >= writer.acked[-1], (values[-1], writer.acked[-1])


def test_a_token_change_reaches_every_daemon(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    lab.build(["a", "b", "c"])
    pids = {name: lab[name].pids for name in ("a", "b", "c")}
    for name in ("a", "b", "c"):
        assert lab.ring(name)["params"]["token"] == running_token(TOKEN_MS, 3)
    version = lab.write_config("b", {"token": 2 * TOKEN_MS})

    for name in ("a", "b", "c"):
        _wait_config_version(lab, name, version)
        assert lab.ring(name)["params"]["token"] == running_token(2 * TOKEN_MS, 3), \
            lab.ring(name)
    lab.wait_ring(["a", "b", "c"])
    assert {name: lab[name].pids for name in ("a", "b", "c")} == pids
    assert all(lab[name].running() for name in ("a", "b", "c"))


def test_backup_wipe_restore_rejoins_as_itself(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    lab.build(["a", "b", "c"])
    (lab["a"].mount / "before-backup.txt").write_text("before\n")
    lab.wait_ring(["a", "b", "c"])
    backup = lab.root / "c-config.db"
    lab.cli("c", "db", "backup", str(lab["c"].data_dir), str(backup))

    c = lab["c"]
    assert lab.stop("c") == 0
    shutil.rmtree(c.data_dir)
    c.config.unlink()
    c.authkey.unlink()
    lab.wait_ring(["a", "b"])
    (lab["a"].mount / "while-away.txt").write_text("written while c was away\n")

    restored = lab.cli("c", "db", "restore", str(c.data_dir), str(backup)).stdout
    assert restored.startswith(f"{c.data_dir}/config.db: restored from {backup}"), restored
    lab.start("c")
    lab.wait_ring(["a", "b", "c"])
    st = lab.status("c")
    assert st["node"] == {"name": "c", "nodeid": c.nodeid}, st
    assert st["cluster"]["config_version"] == _config_version(lab, "a")
    assert c.config.read_text() == (lab["a"].mount / "corosync.conf").read_text()
    assert c.authkey.read_bytes() == lab["a"].authkey.read_bytes()
    for name in ("a", "b"):
        ids = {m["name"]: m["nodeid"] for m in lab.status(name)["membership"]["members"]}
        assert ids["c"] == c.nodeid, ids
    assert (c.mount / "while-away.txt").read_text() == "written while c was away\n"
    assert (c.mount / "before-backup.txt").read_text() == "before\n"
    assert os.path.isdir(c.mount / "nodes/c")
