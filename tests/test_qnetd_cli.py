"""`pmxfs qnetd`: help with examples, init and token through the CLI, one-line refusals of bad
arguments, and the server run as a process on 127.0.0.1 that SIGTERM stops with exit 0."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cpg_harness import PMXFS, wait_until

from pmxfs.cli import main
from pmxfs.core.qnetd_token import decode_token
from pmxfs.runtime.qnetd_pki import ca_fingerprint


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["qnetd", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [(), ("init",), ("token",)])
def test_help_describes_and_shows_examples(capsys: pytest.CaptureFixture[str],
                                           command: tuple[str, ...]) -> None:
    code, out, err = run(capsys, *command, "--help")
    assert code == 0
    assert err == ""
    assert out.startswith(f"usage: pmxfs qnetd {' '.join(command)}".rstrip())
    assert f"pmxfs qnetd {' '.join(command)}".rstrip() in out.partition("\nexamples")[2]


def test_init_then_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "qnetd"
    code, out, _ = run(capsys, "init", "--dir", str(directory))
    assert code == 0
    assert "made" in out
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    code, out, _ = run(capsys, "init", "--dir", str(directory))
    assert (code, out.strip()) == (0, f"{directory}: complete already")
    code, out, _ = run(capsys, "token", "--dir", str(directory), "--address", "192.0.2.10:6000",
                       "--ttl", "15m")
    assert code == 0
    assert len(out.splitlines()) == 1
    token = decode_token(out)
    assert (token.host, token.port) == ("192.0.2.10", 6000)
    assert token.fingerprint == ca_fingerprint((directory / "ca.pem").read_bytes())
    code, out, _ = run(capsys, "token", "--dir", str(directory))
    assert code == 0
    assert decode_token(out).port == 5403


@pytest.mark.parametrize(("args", "reason"), [
    (("token", "--dir", "D", "--ttl", "1s"), "too short"),
    (("token", "--dir", "D", "--address", "a b"), "bad address"),
    (("token", "--dir", "D", "--address", "192.0.2.1:0"), "port"),
    (("--listen", "x:y"), "bad address"),
    (("token",), "--dir"),
])
def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                    reason: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert reason in err.strip().splitlines()[-1]


def test_token_without_a_directory_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "--dir", str(tmp_path / "missing"))
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("pmxfs: cannot read")


def test_server_without_a_directory_is_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--dir", str(tmp_path / "missing"), "--listen", "127.0.0.1:1")
    assert code == 1
    assert len(err.splitlines()) == 1
    assert "pmxfs qnetd init" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_server_runs_until_sigterm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "qnetd"
    assert run(capsys, "init", "--dir", str(directory))[0] == 0
    port = free_port()
    log = tmp_path / "qnetd.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [str(PMXFS), "qnetd", "--listen", f"127.0.0.1:{port}", "--dir", str(directory)],
            stderr=stderr)
    try:
        wait_until(lambda: b"listening on" in log.read_bytes(), 20, "qnetd to listen",
                   lambda: log.read_text())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 20
        assert b"stopping (SIGTERM)" in log.read_bytes()
        assert b"Traceback" not in log.read_bytes()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
