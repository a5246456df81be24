"""`pmxfs daemon` and its directories (issue 10 §5): --data-dir, --run-dir and the mount point are
created when missing and the log says so, as systemd's StateDirectory/RuntimeDirectory would;
a missing parent is refused with one line before anything is created, so a mistyped path is
never built."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from cpg_harness import PMXFS, wait_until
from daemon_harness import MOUNT_TIMEOUT_S, fuse_unavailable, is_mounted, unmount

EXIT_TIMEOUT_S = 60.0


def daemon(tmp_path: Path, *args: str) -> list[str]:
    """A `--local` daemon command line with its paths under `tmp_path` unless `args` says."""
    paths = {"--mount": "mnt", "--data-dir": "data", "--run-dir": "run"}
    argv = [str(PMXFS), "daemon", "--local", "--node", "solo", *args]
    for option, name in paths.items():
        if option not in args:
            argv += [option, str(tmp_path / name)]
    return argv


@pytest.mark.parametrize(("option", "what"), [("--data-dir", "data directory"),
                                              ("--run-dir", "run directory"),
                                              ("--mount", "mount point")])
def test_a_missing_parent_is_refused_in_one_line(tmp_path: Path, option: str, what: str) -> None:
    path = tmp_path / "typo" / "dir"
    result = subprocess.run(daemon(tmp_path, option, str(path)), capture_output=True, text=True,
                            timeout=EXIT_TIMEOUT_S, check=False)
    assert result.returncode == 1
    assert result.stderr == (f"pmxfs: cannot create {what} {path}: {path.parent} does not exist "
                             "(create it first, or check the path)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.fuse
@pytest.mark.root
def test_missing_directories_are_created_and_logged(tmp_path: Path) -> None:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    log = tmp_path / "daemon.log"
    mount = tmp_path / "mnt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(daemon(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
    try:
        def mounted() -> bool:
            assert proc.poll() is None, log.read_text()
            return is_mounted(mount) and (mount / ".members").exists()

        wait_until(mounted, MOUNT_TIMEOUT_S, "the mount", log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)
        unmount(mount)
    text = log.read_text()
    for what, name, mode in (("data directory", "data", 0o700), ("run directory", "run", 0o755),
                             ("mount point", "mnt", 0o755)):
        assert f"created {what} {tmp_path / name}\n" in text, text
        assert (tmp_path / name).stat().st_mode & 0o7777 == mode & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
