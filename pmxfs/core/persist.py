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
    version: int
    upserts: tuple[Entry, ...] = ()
    removed: tuple[int, ...] = ()
    replace_all: bool = False  # `upserts` is the whole tree: every other row is deleted
    meta: tuple[tuple[str, bytes], ...] = ()
