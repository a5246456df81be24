"""`pmxfs keygen [PATH] [--force]`: 256 random bytes, mode 0400, atomic, no silent overwrite, and
missing directories created 0700 and reported."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pmxfs.cli import main
from pmxfs.commands import keygen
from pmxfs.runtime import durable_file
from pmxfs.runtime.transport import load_authkey

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_256_bytes_mode_0400(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "authkey"
    assert main(["keygen", str(key)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{key}\n", "")
    data = key.read_bytes()
    assert len(data) == 256
    assert mode(key) == 0o400
    assert load_authkey(key) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authkey"]  # no temporary file left


def test_keys_are_random(tmp_path: Path) -> None:
    keys = set()
    for i in range(5):
        assert main(["keygen", str(tmp_path / f"k{i}")]) == 0
        keys.add((tmp_path / f"k{i}").read_bytes())
    assert len(keys) == 5
    assert all(len(set(k)) > 100 for k in keys)  # not a constant or a short pattern


def test_refuses_to_overwrite_without_force(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "authkey"
    key.write_bytes(b"precious")
    assert main(["keygen", str(key)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"pmxfs: {key} exists (use --force to replace it)\n"
    assert key.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authkey"]


def test_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "authkey"
    assert main(["keygen", str(key)]) == 0
    first = key.read_bytes()
    assert main(["keygen", str(key)]) == 1  # read-only 0400 file: still refused without --force
    assert main(["keygen", "--force", str(key)]) == 0
    second = key.read_bytes()
    assert len(second) == 256
    assert second != first
    assert mode(key) == 0o400
    out, _ = capsys.readouterr()
    assert out == f"{key}\n{key}\n"


def test_missing_directories_are_created_0700_and_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "etc" / "pmxfs" / "authkey"
    old = os.umask(0o077)
    try:
        assert main(["keygen", str(key)]) == 0
    finally:
        os.umask(old)
    out, err = capsys.readouterr()
    assert out == f"{key}\n"
    assert err.splitlines() == [
        f"pmxfs keygen: created directory {tmp_path / 'etc'} (mode 0700)",
        f"pmxfs keygen: created directory {key.parent} (mode 0700)"]
    assert mode(key.parent) == mode(key.parent.parent) == 0o700
    assert mode(key) == 0o400
    assert len(key.read_bytes()) == 256


def test_an_existing_directory_is_not_reported(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = mode(tmp_path)
    assert main(["keygen", str(tmp_path / "authkey")]) == 0
    assert capsys.readouterr().err == ""
    assert mode(tmp_path) == before


def test_mode_is_0400_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o777)
    try:
        assert main(["keygen", str(tmp_path / "authkey")]) == 0
    finally:
        os.umask(old)
    assert mode(tmp_path / "authkey") == 0o400


def test_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--force", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"pmxfs: {tmp_path} is a directory\n"


def test_unwritable_directory_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["keygen", str(blocker / "authkey")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pmxfs: cannot ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_permission_denied_is_one_line(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "authkey"
    elif os.path.isdir("/sys/kernel"):
        target = Path("/sys/authkey")  # sysfs refuses new files even to root
    else:
        pytest.skip("running as root without /sys: no directory refuses root")
    assert main(["keygen", str(target)]) == 1
    err = capsys.readouterr().err
    assert err == f"pmxfs: cannot write {target}: Permission denied\n"


def test_race_with_another_writer_is_not_overwritten(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH appearing between the existence check and the final step is still not replaced."""
    key = tmp_path / "authkey"
    real = durable_file._write_temporary

    def write_then_race(target: Path, data: bytes, mode: int) -> Path:
        tmp = real(target, data, mode)
        key.write_bytes(b"the other writer's key")
        return tmp

    monkeypatch.setattr(durable_file, "_write_temporary", write_then_race)
    with pytest.raises(keygen.KeygenError, match="exists"):
        keygen.write_authkey(key)
    assert key.read_bytes() == b"the other writer's key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authkey"]


def test_default_path_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keygen", "--help"])
    assert keygen.DEFAULT_AUTHKEY_PATH in capsys.readouterr().out


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "pmxfs"
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    key = tmp_path / "sub" / "authkey"
    done = subprocess.run([str(script), "keygen", str(key)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert (done.returncode, done.stdout) == (0, f"{key}\n")
    assert done.stderr == f"pmxfs keygen: created directory {key.parent} (mode 0700)\n"
    assert len(key.read_bytes()) == 256
    assert mode(key) == 0o400
    again = subprocess.run([str(script), "keygen", str(key)], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    assert (again.returncode, again.stdout) == (1, "")
    assert again.stderr == f"pmxfs: {key} exists (use --force to replace it)\n"
