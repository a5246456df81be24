"""Boot ids: each run of a node gets a boot id greater than all earlier runs, durably stored
before use, and runs started from one rolled-back state still get different ones."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from pmxfs.runtime import boot_id
from pmxfs.runtime.boot_id import (
    RANDOM_BITS,
    BootIdFileError,
    choose_boot_id,
    next_boot_id,
)

LOW = (1 << RANDOM_BITS) - 1


def run(data_dir: Path) -> int:
    return int.from_bytes(next_boot_id(data_dir, 1), "big")


def test_each_run_gets_a_greater_boot_id(tmp_path: Path) -> None:
    ids = [run(tmp_path) for _ in range(5)]
    assert ids == sorted(set(ids))
    assert (tmp_path / "bootid_1").read_text().strip() == str(ids[-1])


def test_order_survives_a_clock_set_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run(tmp_path)
    monkeypatch.setattr(boot_id.time, "time_ns", lambda: 1_000_000)  # 1970
    second = run(tmp_path)
    assert second > first
    assert second >> RANDOM_BITS == (first >> RANDOM_BITS) + 1


def test_without_the_file_the_clock_orders_runs(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_700_000_000 * 10**9]
    monkeypatch.setattr(boot_id.time, "time_ns", lambda: clock[0])
    first = run(tmp_path)
    (tmp_path / "bootid_1").unlink()  # the data directory was lost
    clock[0] += 2 * 10**9
    assert run(tmp_path) > first


def test_ids_follow_the_clock_with_random_low_bits() -> None:
    clock_us = 1_700_000_000_123_456
    for random_bits in (0, 1, LOW):
        chosen = choose_boot_id(0, clock_us, random_bits)
        assert chosen & LOW == random_bits
        assert chosen >> RANDOM_BITS == clock_us >> RANDOM_BITS
    # a last id ahead of the clock (or in the same second) is passed whatever the random bits
    last = clock_us | LOW
    assert choose_boot_id(last, clock_us, 0) > last
    assert choose_boot_id(LOW, 0, 0) == 1 << RANDOM_BITS


def test_runs_from_one_rolled_back_state_get_different_ids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM restored twice from one snapshot: same file, same clock reading. Each run must get
    its own boot id (it keys the run's frames; a repeat would reuse nonces)."""
    first = run(tmp_path)
    snapshot = (tmp_path / "bootid_1").read_bytes()
    monkeypatch.setattr(boot_id.time, "time_ns", lambda: 1_700_000_000 * 10**9)
    draws = iter(range(7, 7 + 20))  # the OS's randomness, made predictable for the test
    monkeypatch.setattr(boot_id.secrets, "randbits", lambda bits: next(draws) & LOW)
    ids = []
    for _ in range(20):
        (tmp_path / "bootid_1").write_bytes(snapshot)  # the rollback
        ids.append(run(tmp_path))
    assert len(set(ids)) == 20
    assert all(i > first for i in ids)


def test_fresh_randomness_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = boot_id.secrets.randbits

    def randbits(bits: int) -> int:
        asked.append(bits)
        return real(bits)

    monkeypatch.setattr(boot_id.secrets, "randbits", randbits)
    run(tmp_path)
    assert asked == [RANDOM_BITS]


def test_file_and_directory_are_fsynced_before_the_id_is_returned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(boot_id.os, "fsync", fsync)
    monkeypatch.setattr(boot_id.os, "replace", replace)
    data_dir = tmp_path / "data"
    run(data_dir)
    assert [step for step, _ in steps] == ["fsync", "replace", "fsync"]
    assert re.fullmatch(re.escape(str(data_dir)) + r"/\.bootid_1\.[0-9a-f]+\.tmp", steps[0][1])
    assert steps[1:] == [("replace", str(data_dir / "bootid_1")), ("fsync", str(data_dir))]


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    for text in ("not a number\n", "-5\n", f"{1 << 64}\n"):
        (tmp_path / "bootid_1").write_text(text)
        with pytest.raises(BootIdFileError, match="does not hold a boot id"):
            next_boot_id(tmp_path, 1)


def test_exhausted_ids_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bootid_1").write_text(f"{(1 << 64) - 1}\n")
    with pytest.raises(BootIdFileError, match="exhausted"):
        next_boot_id(tmp_path, 1)


def test_a_failed_store_is_a_boot_id_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(boot_id, "write_file", full)
    with pytest.raises(BootIdFileError, match=r"cannot store the boot id .*No space left"):
        next_boot_id(tmp_path, 1)
    assert not (tmp_path / "bootid_1").exists()
