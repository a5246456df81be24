"""One row of the tree, as memdb holds it and as `config.db` stores it, and what a path means.

The row has pmxcfs's layout: inode, parent inode, version (the global version of the change
that last wrote it), writer (node id), mtime (seconds), type (DT_DIR 4 / DT_REG 8), name, data.
The root is inode 0; its row carries the tree's global version.

Guest configs are the files `nodes/<node>/<kind>/<vmid>.conf` with kind one of qemu-server, lxc
and openvz and a VMID from 100 to 999999999 written without leading zeros; `guest_config` says
whether a path is one. A VMID may exist only once in the whole tree.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

ROOT_INODE = 0
DIGEST_BYTES = 16

GUEST_KINDS = {"qemu-server": "qemu", "lxc": "lxc", "openvz": "openvz"}
MIN_VMID = 100
MAX_VMID = 999_999_999
_VMID_FILE = re.compile(r"([1-9][0-9]{2,8})\.conf")


class EntryType(IntEnum):
    """A row's kind, with the dirent type numbers pmxcfs stores."""

    DIR = 4  # DT_DIR
    FILE = 8  # DT_REG


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or directory: a row of the tree. Rows are immutable; a change makes a new row
    with the tree's next global version, so equal versions mean equal rows across nodes."""

    inode: int  # unique in the tree; ROOT_INODE for the root
    parent: int  # the directory's inode (the root is its own parent)
    version: int  # the global version of the change that last wrote the row
    writer: int  # the node id that made that change
    mtime: int  # modification time, seconds
    type: EntryType
    name: str  # the name in the parent directory ("" for the root)
    data: bytes = b""  # a file's content; empty for a directory

    @property
    def is_dir(self) -> bool:
        return self.type is EntryType.DIR

    def digest(self) -> bytes:
        """A fingerprint of every field: equal digests mean equal rows."""
        h = hashlib.sha256(struct.pack(">QQQQqB", self.inode, self.parent, self.version,
                                       self.writer, self.mtime, int(self.type)))
        name = self.name.encode("utf-8", "surrogateescape")
        h.update(struct.pack(">I", len(name)) + name)
        h.update(self.data)
        return h.digest()[:DIGEST_BYTES]


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What a guest config path names: which node's guest, of what kind, with which VMID."""

    node: str  # the node directory it is under
    kind: str  # "qemu", "lxc" or "openvz", as .vmlist shows it
    vmid: int


def guest_config(path: str) -> GuestConfig | None:
    """The guest a path configures, or None when it is not a guest config path."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "nodes" or not parts[1] or parts[2] not in GUEST_KINDS:
        return None
    m = _VMID_FILE.fullmatch(parts[3])
    if m is None:
        return None
    vmid = int(m.group(1))
    if not MIN_VMID <= vmid <= MAX_VMID:
        return None
    return GuestConfig(node=parts[1], kind=GUEST_KINDS[parts[2]], vmid=vmid)
