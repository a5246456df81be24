"""The ring seq a node persists: totem forms every new ring id from the highest ring seq seen, so
a restarted node must remember it or it could reuse a ring id (corosync's ringid file). Both
kinds of node (the replica node of the daemon and the bare totem node of `debug cpg`) keep it
here, one file per node id in the data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pmxfs.core.errors import StoredStateError
from pmxfs.runtime.durable_file import write_file


class RingSeqFileError(StoredStateError):
    """The persisted ring seq file exists but cannot be read or trusted."""


class RingSeqStore:
    """`<data dir>/ringid_<nodeid>`: the highest ring seq this node has seen, as decimal text.

    Written atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves
    either the old or the new value, and a restarted node never reuses a ring id.
    """

    def __init__(self, data_dir: str | os.PathLike[str], node_id: int) -> None:
        self.path = Path(data_dir) / f"ringid_{node_id}"

    def load(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise RingSeqFileError(f"cannot read {self.path}: {exc}") from None
        if not text.strip().isdigit():
            raise RingSeqFileError(f"{self.path} does not hold a ring seq: {text[:40]!r}")
        return int(text)

    def store(self, ring_seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file(self.path, f"{ring_seq}\n".encode("ascii"))
