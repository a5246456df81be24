"""What a user sees matches pmxcfs (issue 10 §4). Each test names the pmxcfs source it follows
(pve-cluster, src/pmxcfs/).

1. On a real mount (the in-process fixture of test_fuse_ops): readdir, symlink/link/mknod, chmod,
   lock times, `.rrd`.
2. The running node (`ReplicaNode`, one node on a memory transport, trio's autojump clock):
   status, nodes and `.members` after a new corosync.conf, and `.members` in local mode.
3. The replica on the simulated network: the cluster-log line about lost+found names the
   directory the node creates.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import trio
import trio.testing
from test_fuse_ops import NOW, Mount, fails_with, link_refused, mnt, perm, sh

from pmxfs.commands.status import check_status_shape
from pmxfs.core import conf
from pmxfs.core.fsop import Mkdir, SetMtime, UnlockRequest, WriteFile
from pmxfs.runtime.database import Database
from pmxfs.runtime.memory_transport import MemoryHub
from pmxfs.runtime.replica_node import ReplicaNode
from pmxfs.runtime.ring_seq import RingSeqStore
from pmxfs.sim.replica_sim import ReplicaCluster
from pmxfs.sim.totem_sim import sim_params

__all__ = ["mnt"]  # the fixture, shared with test_fuse_ops

# ------------------------------------------------------------------------- 1. on a real mount


@pytest.mark.fuse
@pytest.mark.root
def test_readdir_lists_dot_and_dotdot_first(mnt: Mount) -> None:
    """cfs_plug_base_readdir and cfs_plug_memdb_readdir fill "." and ".." first."""
    os.mkdir(mnt / "d")
    (mnt / "d/f").write_bytes(b"f")
    for listing in (sh("ls -fa", mnt.root).stdout, sh("ls -fa d", mnt.root).stdout):
        assert listing.split()[:2] == [".", ".."]
    assert sh("ls -fa d", mnt.root).stdout.split() == [".", "..", "f"]
    with os.scandir(mnt / "d") as entries:  # scandir drops them; the kernel's lookups stay sane
        assert [e.name for e in entries] == ["f"]
    assert os.stat(mnt / "d/.").st_ino == os.stat(mnt / "d").st_ino
    assert os.stat(mnt / "d/..").st_ino == os.stat(mnt.root).st_ino


@pytest.mark.fuse
@pytest.mark.root
def test_symlink_link_and_mknod_answer_as_pmxcfs(mnt: Mount) -> None:
    """pmxcfs.c registers no symlink, link or mknod: libfuse answers ENOSYS (newer kernels show
    link's as EPERM), and libfuse's mknod of a regular file is an exclusive create."""
    (mnt / "f").write_bytes(b"f")
    fails_with(errno.ENOSYS, lambda: os.symlink("f", mnt / "s"))
    with pytest.raises(OSError, match=link_refused()) as caught:
        os.link(mnt / "f", mnt / "h")
    assert caught.value.errno in (errno.ENOSYS, errno.EPERM)
    fails_with(errno.ENOSYS, lambda: os.mkfifo(mnt / "fifo"))
    fails_with(errno.ENOSYS, lambda: os.mknod(mnt / "sock", stat.S_IFSOCK | 0o600))
    os.mknod(mnt / "plain", stat.S_IFREG | 0o600)
    assert (mnt / "plain").read_bytes() == b""
    assert perm(mnt / "plain") == 0o640
    fails_with(errno.EEXIST, lambda: os.mknod(mnt / "f", stat.S_IFREG | 0o600))
    assert (mnt / "f").read_bytes() == b"f"
    assert {"s", "h", "fifo", "sock"}.isdisjoint(os.listdir(mnt.root))


@pytest.mark.fuse
@pytest.mark.root
def test_chmod_accepts_what_cfs_fuse_chmod_accepts(mnt: Mount) -> None:
    """cfs_fuse_chmod: exactly 0600 on a private path, 0640 on any other -- directories too."""
    os.mkdir(mnt / "d")
    start = mnt.op_count()
    for path, mode in (("d", 0o640), ("nodes/node1/priv", 0o600), ("priv/lock", 0o600),
                       ("", 0o640)):
        os.chmod(mnt / path, mode)
    for path, mode in (("d", 0o755), ("d", 0o600), ("nodes/node1/priv", 0o700),
                       ("priv", 0o640), ("", 0o755)):
        fails_with(errno.EPERM, lambda p=path, m=mode: os.chmod(mnt / p, m))  # type: ignore[misc]
    assert mnt.ops_since(start) == []
    assert perm(mnt / "d") == 0o755
    assert perm(mnt / "priv/lock") == 0o700


@pytest.mark.fuse
@pytest.mark.root
def test_lock_times_follow_memdb_mtime(mnt: Mount) -> None:
    """memdb_mtime: a lock's mtime moves only forward and only by its holder's node;
    cfs_plug_memdb_utimens: utime(0, 0) sends the unlock request and then fails (EACCES)."""
    mine, theirs = mnt / "priv/lock/mine", mnt / "priv/lock/theirs"
    os.mkdir(mine)  # the fake node writes as node 1
    mnt.remote(Mkdir("priv/lock/theirs", NOW))  # node 2 holds this one
    start = mnt.op_count()
    fails_with(errno.EACCES, lambda: os.utime(theirs, (0, NOW + 10)))
    fails_with(errno.EACCES, lambda: os.utime(theirs, (0, 0)))
    fails_with(errno.EACCES, lambda: os.utime(mine, (0, NOW - 1)))
    fails_with(errno.EACCES, lambda: os.utime(mine, (0, 0)))
    os.utime(mine, (0, NOW + 10))
    assert mnt.ops_since(start) == [
        SetMtime("priv/lock/theirs", NOW + 10),
        UnlockRequest("priv/lock/theirs"), SetMtime("priv/lock/theirs", 0),
        SetMtime("priv/lock/mine", NOW - 1),
        UnlockRequest("priv/lock/mine"), SetMtime("priv/lock/mine", 0),
        SetMtime("priv/lock/mine", NOW + 10)]
    assert int(theirs.stat().st_mtime) == NOW
    assert int(mine.stat().st_mtime) == NOW + 10


@pytest.mark.fuse
@pytest.mark.root
def test_rrd_is_a_virtual_file(mnt: Mount) -> None:
    """pmxcfs.c makes `.rrd` a read-only (0440) virtual file next to `.version` and friends."""
    assert ".rrd" in os.listdir(mnt.root)
    st = os.lstat(mnt / ".rrd")
    assert stat.S_ISREG(st.st_mode)
    assert perm(mnt / ".rrd") == 0o440
    assert (mnt / ".rrd").read_bytes() == b""
    fails_with(errno.EACCES, lambda: (mnt / ".rrd").write_bytes(b"x"))
    fails_with(errno.EACCES, lambda: os.unlink(mnt / ".rrd"))
    (mnt / "r").write_bytes(b"r")
    fails_with(errno.EACCES, lambda: os.rename(mnt / "r", mnt / ".rrd"))
    assert mnt.call(lambda: mnt.node.memdb.lookup(".rrd")) is None


# ---------------------------------------------------------------------- 2. the running node


def corosync_conf(version: int, votes: int = 1, nodes: int = 1) -> str:
    body = "".join(f"  node {{\n    name: node{i}\n    nodeid: {i}\n"
                   f"    quorum_votes: {votes if i == 1 else 1}\n"
                   f"    ring0_addr: 127.0.0.{i}\n  }}\n" for i in range(1, nodes + 1))
    return (f"totem {{\n  version: 2\n  cluster_name: lab\n  config_version: {version}\n}}\n"
            f"nodelist {{\n{body}}}\n"
            "quorum {\n  provider: corosync_votequorum\n}\n")


@asynccontextmanager
async def running_node(tmp_path: Path, *, local: bool) -> AsyncIterator[ReplicaNode]:
    """Node 1 alone on a memory transport, synced; with `local`, as `pmxfs daemon --local`
    makes it (no corosync.conf file of its own). On the real clock: the node commits in a worker
    thread, and a mock clock that jumps whenever trio waits would jump past every timeout while
    a commit runs."""
    text = corosync_conf(1)
    config_path = tmp_path / "corosync.conf"
    config_path.write_text(text)
    config = conf.check(text).config
    assert config is not None
    data = tmp_path / "data"
    database = Database.open(data)
    transport = MemoryHub().transport(1)
    node = ReplicaNode(node_id=1, config=config, config_path=None if local else config_path,
                       params=conf.totem_params(config), transport=transport, database=database,
                       ring_seq_store=RingSeqStore(data, 1), incarnation=1, data_dir=data)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run)
            await node.synced_once.wait()
            yield node
            nursery.cancel_scope.cancel()
    finally:
        transport.close()
        database.close()


@pytest.fixture
async def cluster_node(tmp_path: Path) -> AsyncIterator[ReplicaNode]:
    async with running_node(tmp_path, local=False) as node:
        yield node


@pytest.fixture
async def local_node(tmp_path: Path) -> AsyncIterator[ReplicaNode]:
    async with running_node(tmp_path, local=True) as node:
        yield node


async def test_status_nodes_and_members_show_a_new_corosync_conf_at_once(
        cluster_node: ReplicaNode) -> None:
    """pmxcfs reads the cluster info from corosync (cfs_status_set_clinfo) when it changes."""
    node = cluster_node
    newer = corosync_conf(2, votes=2, nodes=2)
    reply = await node.write(WriteFile("corosync.conf", newer.encode(), 1, create=True))
    assert reply.errno == 0, reply
    status = node.status()
    assert check_status_shape(status) == []
    assert status["cluster"] == {"name": "lab", "config_version": 2, "transport": "knet"}
    assert status["membership"]["members"] == [
        {"nodeid": 1, "name": "node1", "votes": 2, "local": True}]
    nodes = node.nodes()
    assert isinstance(nodes[0].pop("joined"), int)
    assert nodes == [
        {"nodeid": 1, "votes": 2, "name": "node1", "local": True, "online": True},
        {"nodeid": 2, "votes": 1, "name": "node2", "local": False, "online": False,
         "joined": None}]
    members = json.loads(node.virtual_file(".members"))
    assert members["cluster"] == {"name": "lab", "version": 2, "nodes": 2, "quorate": 1}
    assert members["nodelist"] == {"node1": {"id": 1, "online": 1, "ip": "127.0.0.1"},
                                   "node2": {"id": 2, "online": 0, "ip": "127.0.0.2"}}
    assert json.loads(node.virtual_file(".version"))["clinfo"] == members["version"]


async def test_members_in_local_mode_shows_only_the_node_name_and_version(
        local_node: ReplicaNode) -> None:
    """cfs_create_memberlist_msg: without a cluster configuration only these two keys."""
    members = json.loads(local_node.virtual_file(".members"))
    assert list(members) == ["nodename", "version"]
    assert members["nodename"] == "node1"
    version = json.loads(local_node.virtual_file(".version"))
    assert version["kvstore"] == {"node1": {}}
    assert version["clinfo"] == members["version"]
    assert local_node.virtual_file(".rrd") == b""


# ------------------------------------------------------------------------------ 3. the replica


def test_the_lost_and_found_log_line_names_the_directory_made(tmp_path: Path) -> None:
    """A lone node (expected 1) and the majority write the same file; after healing the losing
    side's version is saved, and the cluster log names the directory the node saved it in."""
    c = ReplicaCluster([1, 2, 3], sim_params(3), random.Random(1))
    c.net.faults.min_delay = 1
    c.wait(c.settled, 20_000, "the first sync")
    c.both_sides_write_while_apart("f", b"lonely", b"majority")
    assert c.lost
    messages = [e.msg for e in c.replica(2).log_buffer.entries() if "lost+found" in e.msg]
    for node_id, lost in c.lost:
        data_dir = tmp_path / f"node{node_id}"
        ReplicaNode._save_lost(cast(ReplicaNode, SimpleNamespace(data_dir=data_dir)), lost)
        [made] = (data_dir / "lost+found").iterdir()
        assert any(f"lost+found/{made.name}/" in msg for msg in messages), (made, messages)
