"""`pmxfs daemon` start-up. Its directories (issue 10 §5): --data-dir, --run-dir and the mount
point are created when missing and the log says so, as systemd's StateDirectory/RuntimeDirectory
would; a missing parent is refused with one line before anything is created, so a mistyped path
is never built. And systemd hears READY=1 once the mount answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
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


@contextlib.contextmanager
def running_daemon(tmp_path: Path, env: dict[str, str] | None = None
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """A `--local` daemon logging to TMP/daemon.log; stopped (SIGTERM, exit 0 required) and
    unmounted afterwards, killed if it does not stop."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(daemon(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, env=env)
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)
        unmount(tmp_path / "mnt")


def wait_mounted(proc: subprocess.Popen[bytes], mount: Path, log: Path) -> None:
    def mounted() -> bool:
        assert proc.poll() is None, log.read_text()
        return is_mounted(mount) and (mount / ".members").exists()

    wait_until(mounted, MOUNT_TIMEOUT_S, "the mount", log.read_text)


@pytest.mark.fuse
@pytest.mark.root
def test_missing_directories_are_created_and_logged(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with running_daemon(tmp_path) as proc:
        wait_mounted(proc, tmp_path / "mnt", log)
    text = log.read_text()
    for what, name, mode in (("data directory", "data", 0o700), ("run directory", "run", 0o755),
                             ("mount point", "mnt", 0o755)):
        assert f"created {what} {tmp_path / name}\n" in text, text
        assert (tmp_path / name).stat().st_mode & 0o7777 == mode & ~current_umask()


@pytest.mark.fuse
@pytest.mark.root
def test_systemd_hears_ready_once_the_mount_answers(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(MOUNT_TIMEOUT_S)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        with running_daemon(tmp_path, env):
            assert notify.recv(4096) == b"READY=1"
            assert (tmp_path / "mnt" / ".members").exists()  # answered, not merely mounted


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
