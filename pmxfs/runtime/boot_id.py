"""Ordered boot ids: every run of a node gets one greater than all of its earlier runs.

The frame layer's replay protection refuses frames of a sender's earlier runs, which only works if
runs are ordered. The boot id is max(last boot id + 1, wall clock in µs): the persisted last value
keeps the order when the clock was set back, and the clock keeps it when the data directory was
lost. The file `<data dir>/bootid_<nodeid>` is replaced atomically before the id is used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BOOT_ID_BYTES = 8


class BootIdFileError(Exception):
    """The boot id file exists but cannot be read or trusted."""


def next_boot_id(data_dir: str | os.PathLike[str], node_id: int) -> bytes:
    path = Path(data_dir) / f"bootid_{node_id}"
    last = 0
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = "0"
    except (OSError, UnicodeDecodeError) as exc:
        raise BootIdFileError(f"cannot read {path}: {exc}") from None
    if not text.isdigit():
        raise BootIdFileError(f"{path} does not hold a boot id: {text[:40]!r}")
    last = int(text)
    boot_id = max(last + 1, time.time_ns() // 1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{boot_id}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return boot_id.to_bytes(BOOT_ID_BYTES, "big")
