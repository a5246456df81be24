"""systemd/pmxfs.service: `systemd-analyze verify` accepts it, and its command line is a valid
`pmxfs daemon` invocation with the default paths, matching the directories systemd makes; the
same for systemd/pmxfs-qnetd.service and `pmxfs qnetd`."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pmxfs.cli import build_parser
from pmxfs.commands import daemon, qnetd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pmxfs.service"
QNETD_UNIT = UNIT.with_name("pmxfs-qnetd.service")
INSTALLED_PMXFS = "/usr/local/bin/pmxfs"
VENV_PMXFS = Path(sys.executable).parent / "pmxfs"


def settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order (enough of systemd's syntax for this file: no line
    continuations)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", [UNIT, QNETD_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify(tmp_path: Path, unit: Path) -> None:
    """`systemd-analyze verify` refuses a unit whose ExecStart binary does not exist, and pmxfs is
    not installed at /usr/local/bin here; so the copy that is verified differs from the file
    only in that path, which points at this virtualenv's `pmxfs` (a real executable). Verify
    exits 0 even for unknown keys or values it cannot parse (it only prints them), so the test
    also requires it to print nothing."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = unit.read_text()
    assert text.count(f"ExecStart={INSTALLED_PMXFS} ") == 1
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_PMXFS} ", f"ExecStart={VENV_PMXFS} "))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_exec_start_is_the_daemon_with_default_paths() -> None:
    unit = settings(UNIT.read_text())
    assert unit[("Service", "Type")] == ["notify"]
    [exec_start] = unit[("Service", "ExecStart")]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_PMXFS
    args = build_parser().parse_args(argv[1:])
    assert args.handler is daemon.run
    assert (args.config, args.authkey, args.mount, args.data_dir, args.run_dir) == (
        "/etc/pmxfs/corosync.conf", "/etc/pmxfs/authkey", "/etc/pve", "/var/lib/pmxfs",
        "/run/pmxfs")
    assert not args.local
    assert not args.debug
    assert args.node is None
    defaults = build_parser().parse_args(["daemon"])  # the unit spells out the daemon's defaults
    assert (defaults.config, defaults.authkey, defaults.mount, defaults.data_dir) == (
        args.config, args.authkey, args.mount, args.data_dir)
    # the directories systemd creates are the ones the daemon is given
    assert f"/run/{unit[('Service', 'RuntimeDirectory')][0]}" == args.run_dir
    assert f"/var/lib/{unit[('Service', 'StateDirectory')][0]}" == args.data_dir


def test_nothing_unmounts_after_a_crash() -> None:
    """A crashed daemon leaves a dead mount (ENOTCONN) so that nothing is written into the plain
    directory before Restart=on-failure starts it again; ExecStop= and ExecStopPost= run after a
    crash too, so neither may unmount. The daemon unmounts on SIGTERM itself."""
    unit = settings(UNIT.read_text())
    assert unit[("Service", "Restart")] == ["on-failure"]
    stop_commands = [key for _, key in unit if key.startswith("ExecStop")]
    assert stop_commands == []


def test_stop_and_restart_policy() -> None:
    unit = settings(UNIT.read_text())
    assert unit[("Service", "KillMode")] == ["mixed"]
    assert unit[("Service", "Restart")] == ["on-failure"]
    assert int(unit[("Service", "TimeoutStopSec")][0]) > 0
    assert unit[("Unit", "Wants")] == ["network-online.target"]
    assert unit[("Unit", "After")] == ["network-online.target"]
    assert unit[("Install", "WantedBy")] == ["multi-user.target"]


def test_scheduling_is_left_to_the_daemon() -> None:
    """The daemon asks for SCHED_RR itself and runs on without it when refused
    (runtime/scheduling.py); a CPUScheduling*= that systemd cannot apply would fail the start."""
    unit = settings(UNIT.read_text())
    assert [key for _, key in unit if key.startswith(("CPUScheduling", "Nice"))] == []


def test_qnetd_exec_start_is_the_server_with_its_defaults() -> None:
    unit = settings(QNETD_UNIT.read_text())
    [exec_start] = unit[("Service", "ExecStart")]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_PMXFS
    args = build_parser().parse_args(argv[1:])
    assert args.handler is qnetd.run_server
    defaults = build_parser().parse_args(["qnetd"])
    assert (args.listen, args.serve_dir) == (defaults.listen, defaults.serve_dir)
    assert unit[("Service", "Restart")] == ["on-failure"]
    assert unit[("Install", "WantedBy")] == ["multi-user.target"]
