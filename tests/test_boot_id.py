"""Ordered boot ids: each run of a node gets a boot id greater than all earlier runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmxfs.runtime import boot_id
from pmxfs.runtime.boot_id import BootIdFileError, next_boot_id


def test_each_run_gets_a_greater_boot_id(tmp_path: Path) -> None:
    ids = [int.from_bytes(next_boot_id(tmp_path, 1), "big") for _ in range(5)]
    assert ids == sorted(set(ids))
    assert (tmp_path / "bootid_1").read_text().strip() == str(ids[-1])


def test_order_survives_a_clock_set_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = int.from_bytes(next_boot_id(tmp_path, 1), "big")
    monkeypatch.setattr(boot_id.time, "time_ns", lambda: 1_000_000)  # 1970
    assert int.from_bytes(next_boot_id(tmp_path, 1), "big") == first + 1


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bootid_1").write_text("not a number\n")
    with pytest.raises(BootIdFileError, match="does not hold a boot id"):
        next_boot_id(tmp_path, 1)
