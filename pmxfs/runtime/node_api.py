"""What the FUSE layer and the control socket need from the running node.

`ReplicaNode` (runtime/replica_node.py) provides both protocols; tests provide small fakes. All
methods are called from the node's one trio thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pmxfs.core.fsop import FsOp
from pmxfs.core.memdb import MemDB
from pmxfs.core.replica import Reply

# (paths whose cached attributes/contents/listings are stale, everything is stale)
Invalidator = Callable[[tuple[str, ...], bool], None]


class FsNode(Protocol):
    @property
    def node_name(self) -> str:
        """This node's name: the fixed root symlinks point into nodes/<node_name>/."""

    @property
    def memdb(self) -> MemDB:
        """The current tree. Read-only for callers; it is a new object after a sync."""

    def quorate(self) -> bool:
        """Whether writes can be taken now (modes lose their write bits when not)."""

    async def write(self, op: FsOp) -> Reply:
        """Replicate `op`; the Reply's errno is 0 or the errno the operation failed with."""

    def virtual_file(self, name: str) -> bytes:
        """The content of a virtual root file (.members, .vmlist, .version, .clusterlog,
        .debug)."""

    def set_debug(self, enabled: bool) -> None:
        """A write of "1"/"0" to .debug: turn debug logging on or off on this node."""

    def wall_seconds(self) -> int:
        """Now, in seconds since the epoch (for mtimes)."""

    def set_invalidator(self, invalidator: Invalidator) -> None:
        """Called by the FUSE layer once; the node calls it after every delivered change and
        quorum change."""


class ControlNode(Protocol):
    def status(self) -> dict[str, Any]:
        """`pmxfs status --json` (docs/cli.md)."""

    def nodes(self) -> list[dict[str, Any]]:
        """`pmxfs nodes --json`: one {"nodeid", "votes", "name", "local", "online"} per node of
        the nodelist."""

    async def set_expected(self, expected: int) -> Reply:
        """`pmxfs expected N`: errno 0, or EINVAL with the refusal's reason as message."""

    async def log(self, *, priority: int, tag: str, user: str, pid: int, msg: str) -> None:
        """Add an entry to the cluster log."""

    def debug(self, topic: str) -> dict[str, Any]:
        """`pmxfs debug <topic>`: "ring" (totem state, ring id, members, token counters),
        "transport" (frame counters), "quorum" (votequorum inputs and result), "tree" (every
        entry: path, type, size, version, writer, mtime), "checksum" (tree and state
        checksums, version), "verify" (start a verification round now). KeyError for an unknown
        topic."""


class LifecycleControl(Protocol):
    """The cluster-lifecycle commands of the control socket (runtime/lifecycle.py). Each
    returns a JSON-able answer or raises a `LocalError` whose text is the refusal."""

    async def create(self, cluster_name: str, *, link0: str | None, nodeid: int, votes: int,
                     port: int | None, links: Mapping[int, str] | None = None,
                     transport: str | None = None) -> dict[str, Any]: ...

    async def join_token(self, ttl: int) -> dict[str, Any]: ...

    async def add(self, host: str | None, token_text: str, *, link0: str | None,
                  nodeid: int | None, votes: int, force: bool,
                  links: Mapping[int, str] | None = None) -> dict[str, Any]: ...

    async def delnode(self, name: str) -> dict[str, Any]: ...
