"""The replicated tree as the lifecycle commands and the join service use it: reading a file,
writing one (with its directories), replacing corosync.conf, waiting until the tree is writable,
and the cluster-wide files they keep there (the authkey, the join service's key and
certificate). Every write goes through the ring like any other; a refusal is a `LifecycleError`
with one line for the admin.
"""

from __future__ import annotations

import errno as E
import os
import time

from pmxfs.core.errors import LocalError
from pmxfs.core.fsop import CreateFile, FsOp, Mkdir, WriteFile
from pmxfs.core.memdb import COROSYNC_CONF
from pmxfs.runtime.join_tls import make_certificate
from pmxfs.runtime.replica_node import ReplicaNode

TREE_AUTHKEY = "priv/corosync.authkey"  # the cluster's authkey: a restored node finds it here
TREE_JOIN_PEM = "priv/join-tls.pem"  # the join service's key and certificate, one per cluster
WRITABLE_TIMEOUT_S = 30.0  # how long a command waits for a quorate, synced tree


class LifecycleError(LocalError):
    """Why a lifecycle command or a join was refused or failed: one line."""


class ClusterTree:
    def __init__(self, node: ReplicaNode) -> None:
        self.node = node

    def file(self, path: str) -> bytes | None:
        entry = self.node.memdb.lookup(path)
        return None if entry is None or entry.is_dir else entry.data

    def config_text(self) -> str:
        data = self.file(COROSYNC_CONF)
        if data is None:
            raise LifecycleError("the tree holds no corosync.conf")
        return data.decode("utf-8", "replace")

    def my_address(self) -> str | None:
        """This node's ring0 address in the running config; None once it is not listed."""
        return next((i.addr for i in self.node.infos if i.nodeid == self.node.node_id), None)

    async def wait_writable(self, what: str) -> None:
        if not await self.node.wait_writable(WRITABLE_TIMEOUT_S):
            raise LifecycleError(f"the tree did not become writable within "
                                 f"{WRITABLE_TIMEOUT_S:g} s {what}")

    async def write(self, op: FsOp) -> None:
        reply = await self.node.write(op)
        if reply.errno:
            raise LifecycleError(f"cannot write to the tree: {reason(reply.errno, reply.message)}")

    async def mkdirs(self, path: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if self.node.memdb.lookup(directory) is None:
                reply = await self.node.write(Mkdir(directory, int(time.time())))
                if reply.errno not in (0, E.EEXIST):
                    raise LifecycleError(f"cannot create {directory} in the tree: "
                                         f"{reason(reply.errno, reply.message)}")

    async def put(self, path: str, data: bytes) -> None:
        """Write the file `path` (and its missing directories)."""
        if "/" in path:
            await self.mkdirs(path.rsplit("/", 1)[0])
        await self.write(WriteFile(path, data, int(time.time()), create=True))

    async def put_once(self, path: str, data: bytes) -> bytes:
        """The content of `path`: `data` if this call created it, else what another member (a
        concurrent call) put there first -- an exclusive create through the ring decides. An
        empty file (its creator stopped between the create and the write) is filled here."""
        if "/" in path:
            await self.mkdirs(path.rsplit("/", 1)[0])
        reply = await self.node.write(CreateFile(path, int(time.time()), exclusive=True))
        if reply.errno not in (0, E.EEXIST):
            raise LifecycleError(f"cannot create {path} in the tree: "
                                 f"{reason(reply.errno, reply.message)}")
        if reply.errno == 0 or not self.file(path):
            await self.write(WriteFile(path, data, int(time.time())))
        return self.file(path) or data

    async def write_config(self, text: str) -> None:
        await self.write(WriteFile(COROSYNC_CONF, text.encode(), int(time.time())))

    async def join_pem(self) -> bytes:
        """The cluster's join key and certificate, made and stored the first time."""
        pem = self.file(TREE_JOIN_PEM)
        if pem:
            return pem
        return await self.put_once(
            TREE_JOIN_PEM, make_certificate(f"pmxfs join {self.node.config.cluster_name}"))

    async def keep_authkey(self, authkey: bytes) -> None:
        """The authkey into the tree when it is not there (a cluster created before it was
        kept there, or a create that stopped half-way)."""
        if self.file(TREE_AUTHKEY) is None:
            await self.put(TREE_AUTHKEY, authkey)


def reason(errno: int, message: str) -> str:
    return message or os.strerror(errno)
