"""The fault harness's short form (issue 16): tools/faults.py on three real daemons in network
namespaces, every fault kind once, which must end with no violation and the summary line; and
its refusal of bad usage (exit 2, one line). The long runs are in the README."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lifecycle_harness import lab_unavailable

TOOL = Path(__file__).resolve().parent.parent / "tools" / "faults.py"
KINDS = ("kill", "pause", "kill-during-sync", "slowdisk", "partition", "isolate", "bridge",
         "oneway", "loss", "duplicate", "delay", "linkdown", "flap", "combo")
RUN_BOUND_S = 200  # --max-seconds: the harness stops starting cycles after this
DEADLINE_S = 300  # the subprocess's own deadline: the bound plus the last cycle and cleanup
CLEANUP_S = 120  # past its deadline it gets SIGTERM and this long to remove the lab
SUMMARY = re.compile(r"^faults: (\d+) cycles, 3 nodes, (\d+) violations, (\d+) acked, "
                     r"(\d+) refused, (\d+) unknown$", re.MULTILINE)


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """faults.py with `args`; past `timeout` it is stopped with SIGTERM, on which it removes
    its namespaces, mounts and daemons (a SIGKILL, subprocess.run's way, would leave them)."""
    with subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=CLEANUP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"faults.py did not finish within {timeout} s:\n{out}{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("args", [["--nodes", "2"], ["--nodes", "8"], ["--kinds", "kill,nope"],
                                  ["--cycles", "0"], ["--seed", "x"]])
def test_bad_usage_is_one_line_and_exit_2(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.netns
@pytest.mark.root
@pytest.mark.fuse
def test_every_kind_once_on_three_nodes(tmp_path: Path) -> None:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    done = run("--nodes", "3", "--cycles", str(len(KINDS)), "--seed", "16",
               "--kinds", ",".join(KINDS), "--dir", str(tmp_path), "--max-seconds",
               str(RUN_BOUND_S), timeout=DEADLINE_S)
    output = done.stdout + done.stderr
    match = SUMMARY.search(done.stdout)
    assert match is not None, output
    cycles, violations, acked = (int(match.group(i)) for i in (1, 2, 3))
    assert violations == 0, output
    assert done.returncode == 0, output
    assert cycles == len(KINDS), output
    assert acked > 0, output
    for kind in KINDS:
        assert re.search(rf"^cycle \d+ {re.escape(kind)}", done.stdout, re.MULTILINE) or (
            kind == "combo" and "combo(" in done.stdout), (kind, output)
