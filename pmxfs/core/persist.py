"""What a replica asks its database to make durable.

The replica emits one `Persist` per batch of deliveries, numbered from 1 (`id`). The runtime
commits them in order, several in one SQLite transaction when several are ready (group commit),
off the token's path, and reports the highest one done with `Replica.persisted`; no reply
depends on a Persist until every member reported it (`pmxfs.core.replica`). `meta` holds the
replica's side state (tree history, applied operation ids) under fixed keys, stored next to the
pmxcfs-compatible `tree` table.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmxfs.core.entry import Entry


@dataclass(frozen=True, slots=True)
class Persist:
    """One batch to commit atomically: the rows changed by the deliveries before it."""

    version: int  # the tree's global version after the batch (stored on the root row)
    upserts: tuple[Entry, ...] = ()  # rows written (inserted or replaced), by inode
    removed: tuple[int, ...] = ()  # inodes of rows deleted
    replace_all: bool = False  # `upserts` is the whole tree: every other row is deleted
    meta: tuple[tuple[str, bytes], ...] = ()  # side state to store, (key, value)
    id: int = 0  # the replica's number for it, handed back to `Replica.persisted`
