"""Boot ids: every run of a node gets one greater than all of its earlier runs, and none repeats.

A boot id does two jobs in the frame layer (`pmxfs.runtime.frame_crypto`):
* ordering: receivers refuse frames of a sender's earlier runs, which only works if each run's
  boot id is greater than the last one's;
* uniqueness: (sender, boot id) selects the run key and the counter restarts at 0 each run, so a
  repeated boot id would repeat ChaCha20-Poly1305 nonces under one key -- the one thing that
  breaks the cipher (keystream reuse, and forgeable tags).

How one is chosen: the 64-bit id is split into a high part, a clock in units of 2**20 µs
(about a second), and `RANDOM_BITS` = 20 low bits drawn fresh from the OS (`secrets`) each run:

    high    = max(high(last) + 1, high(wall clock in µs))
    boot id = high << 20 | 20 random bits

`last` is the id stored in `<data dir>/bootid_<nodeid>`; the new id replaces it through
`durable_file.write_file` (a temporary file, fsynced, renamed over it, the directory fsynced),
all before the id is returned (and so before any frame uses it).

Why that orders runs: high(new) > high(last), so the new id is greater than the last id whatever
the random bits are, and a clock set back does not matter. If the file was lost, the clock alone
orders the run after earlier ones that started more than a second before it (and were not pushed
ahead of the clock by restarts more frequent than once a second).

Why that does not repeat:
* a crash or power loss: the id is durable (file and directory entry) before it is used, so the
  next run reads it, or a later one, as `last` and goes above it;
* a rollback (a VM snapshot or backup restored, bringing back an older file and possibly an older
  clock): two runs started from the same restored state read the same `last` and may read the
  same clock second, so they pick the same high part; they still differ unless their 20 fresh
  random bits are equal (1 in 2**20 per such pair). Where the clock moved on between them, the
  high parts differ and the ids do too.
A rolled-back run may get an id below one its peers already saw from the lost run; they refuse
its frames as replays until it (or they) restart: a rollback costs availability, never a nonce.

The ids stay in the range of a µs timestamp (about 2**50.6 now), so the high part runs out
in about 580,000 years; restarts faster than once a second push it ahead of the clock by a
second each, harmlessly.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from pmxfs.core.errors import StoredStateError
from pmxfs.runtime.durable_file import write_file

BOOT_ID_BYTES = 8
RANDOM_BITS = 20
MAX_BOOT_ID = (1 << (8 * BOOT_ID_BYTES)) - 1


class BootIdFileError(StoredStateError):
    """The boot id file exists but cannot be read, trusted or replaced."""


def choose_boot_id(last: int, clock_us: int, random_bits: int) -> int:
    """The boot id after `last` at wall clock `clock_us` with `random_bits` (< 2**RANDOM_BITS)
    in its low bits; always greater than `last` (module docstring)."""
    high = max((last >> RANDOM_BITS) + 1, clock_us >> RANDOM_BITS)
    return high << RANDOM_BITS | random_bits


def next_boot_id(data_dir: str | os.PathLike[str], node_id: int) -> bytes:
    """A new boot id for this run of `node_id`, durably stored in `data_dir` before it is
    returned (8 bytes, big-endian)."""
    path = Path(data_dir) / f"bootid_{node_id}"
    boot_id = choose_boot_id(_read_last(path), time.time_ns() // 1000,
                             secrets.randbits(RANDOM_BITS))
    if boot_id > MAX_BOOT_ID:
        raise BootIdFileError(f"{path}: boot ids are exhausted")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, f"{boot_id}\n".encode("ascii"))
    except OSError as exc:
        raise BootIdFileError(f"cannot store the boot id in {path}: "
                              f"{exc.strerror or exc}") from None
    return boot_id.to_bytes(BOOT_ID_BYTES, "big")


def _read_last(path: Path) -> int:
    """The boot id stored at `path`, 0 when there is none."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise BootIdFileError(f"cannot read {path}: {exc}") from None
    if not text.isdigit() or int(text) > MAX_BOOT_ID:
        raise BootIdFileError(f"{path} does not hold a boot id: {text[:40]!r}")
    return int(text)
