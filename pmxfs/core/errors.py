"""Every error pmxfs raises on purpose, in one tree split the way h11 splits its errors: by who
is at fault, because that decides what happens to it.

    PmxfsError
    ├── RemoteError        bytes from a peer that break the protocol (a forged, malformed or
    │   │                  replayed frame or message). Dropped and counted where they enter;
    │   │                  never raised out of a node, never logged per packet at error level.
    │   └── ProtocolError  what every `decode_*` raises (wire, fsop, replica_msgs, clusterlog)
    └── LocalError         a request of a local caller (a FUSE call, a control request, a CLI
        │                  argument, a file the operator gave) that cannot be carried out:
        │                  refused to that caller with a reason, and nothing changes.
        └── StoredStateError  a file this node keeps (database, ring seq, boot id, authkey)
                           that cannot be read or trusted: the node refuses to start.

A broken invariant is neither: it is an `AssertionError` (never triggerable from outside). errno
values appear only at the edges that speak errno -- the FUSE layer, the CLI's exit codes -- and
in memdb's results, which are the file system's answers; errors here carry text.
"""

from __future__ import annotations


class PmxfsError(Exception):
    """The root of pmxfs's own errors."""


class RemoteError(PmxfsError):
    """A peer sent something that breaks the protocol: drop it and count it."""


class ProtocolError(RemoteError):
    """Malformed input from a peer, raised by the decoders (and only this, for any bytes)."""


class LocalError(PmxfsError):
    """A local caller's request that cannot be carried out: refuse it, change nothing."""


class StoredStateError(LocalError):
    """A file this node keeps cannot be read or trusted: refuse to start, touch nothing."""
