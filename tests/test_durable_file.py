"""runtime/durable_file.py: the one way pmxfs replaces a file outside SQLite."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pmxfs.runtime import durable_file
from pmxfs.runtime.durable_file import write_file


def test_replaces_with_the_mode_asked_for_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_file(target, b"new", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f"]  # no temporary file left


def test_the_file_then_its_directory_are_fsynced(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable_file.os, "fsync", recording)
    write_file(tmp_path / "f", b"data")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path
    assert synced[0] != str(tmp_path / "f")
    assert synced[1] == str(tmp_path)


def test_without_replace_an_existing_file_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_file(target, b"first", mode=0o400, replace=False)
    with pytest.raises(FileExistsError):
        write_file(target, b"second", mode=0o400, replace=False)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def no_space(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable_file.os, "write", no_space)
    with pytest.raises(OSError, match="No space"):
        write_file(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]
