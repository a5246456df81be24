"""What a replica asks its database to make durable before the replies that follow it.

The replica emits one `Persist` per batch of deliveries (group commit); the runtime commits it in
one SQLite transaction and only then carries out the outputs after it (`Reply` above all), so an
acknowledged write is always on disk. `meta` holds the replica's side state (tree history,
applied operation ids) under fixed keys, stored next to the pmxcfs-compatible `tree` table.
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
