"""The parts of the fault harness (tools/faults.py, tools/faultlab/) that need no namespace, root
or mount: a client's read and write outcomes on a plain directory (the moment a restarted daemon
replaces its dead mount), reading final trees and lost+found, the nemesis's plans on a stand-in
lab (never more than a minority of daemons down, a heal that undoes everything, the ring that
starts a sync) and the exit status of a lab that fails under a run."""

from __future__ import annotations

import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import faults
from faultlab import nemesis
from faultlab.client import Workload
from faultlab.lab import Unavailable
from faultlab.rules import Rules
from faultlab.runner import Summary, read_lost_found, tree_or_none

# -- the client ------------------------------------------------------------------------------


def workload(mount: Path) -> Workload:
    """A client's operations on `mount` (reads and writes record nothing themselves)."""
    return Workload("n1", mount / "faults", [], [], -1, 1.0)


def test_a_plain_mount_point_reads_as_an_error_not_as_a_missing_key(tmp_path: Path) -> None:
    """While a restarted daemon replaces its dead mount, the mount point is an empty directory:
    a read there must not say "the key does not exist" (read-your-writes would seem broken)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    work = workload(mount)
    assert work.read("own/n1c1-0") == ("ENOENT", None)
    assert work.write("own/n1c1-0", "n1c1:1") == "ENOENT"  # refused: nothing lands there
    assert not (mount / "faults").exists()


def test_reads_and_writes_on_the_workload_directory(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    (mount / "faults" / "own").mkdir(parents=True)
    work = workload(mount)
    assert work.read("own/n1c1-0") == ("ok", None)
    assert work.write("own/n1c1-0", "n1c1:1") == "ok"
    assert work.read("own/n1c1-0") == ("ok", "n1c1:1")
    assert (mount / "faults" / "own" / "n1c1-0").read_text() == "n1c1:1"


# -- final state -----------------------------------------------------------------------------


def test_a_tree_that_cannot_be_listed_is_no_tree(tmp_path: Path) -> None:
    """os.walk skips what it cannot list: a dead mount must not read as an empty tree."""
    assert tree_or_none(tmp_path / "gone") is None
    (tmp_path / "t" / "own").mkdir(parents=True)
    (tmp_path / "t" / "own" / "a").write_text("n1c1:1")
    assert tree_or_none(tmp_path / "t") == {"own/a": "n1c1:1"}


def test_lost_found_contents(tmp_path: Path) -> None:
    assert read_lost_found(tmp_path) == []
    saved = tmp_path / "lost+found" / "1.8" / "faults" / "own"
    saved.mkdir(parents=True)
    (saved / "a").write_text("n2c1:7")
    assert read_lost_found(tmp_path) == ["n2c1:7"]


# -- the nemesis on a stand-in lab -------------------------------------------------------------


@dataclass
class FakeNode:
    up: bool = True
    paused: bool = False
    link_up: bool = True
    proc: Any = None

    def running(self) -> bool:
        return self.up


@dataclass
class FakeSwitch:
    rules: Rules = field(default_factory=Rules)
    counters: Counter[str] = field(default_factory=Counter)

    def set_rules(self, rules: Rules) -> None:
        self.rules = rules


class FakeLab:
    """What the nemesis calls on a lab; every daemon's log shows the ring of all nodes."""

    def __init__(self, count: int) -> None:
        self.nodes = {f"n{i}": FakeNode() for i in range(1, count + 1)}
        self.switch = FakeSwitch()
        self.slow_node = f"n{count}"
        self.worst_down = 0

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    def _count_down(self) -> None:
        down = sum(not n.up or n.paused for n in self.nodes.values())
        self.worst_down = max(self.worst_down, down)

    def kill(self, name: str) -> None:
        self.nodes[name].up = False
        self.nodes[name].paused = False
        self._count_down()

    def start(self, name: str, *, wait: bool = True) -> None:
        self.nodes[name].up = True

    def pause(self, name: str) -> None:
        if self.nodes[name].up:
            self.nodes[name].paused = True
        self._count_down()

    def resume(self, name: str) -> None:
        self.nodes[name].paused = False

    def set_link(self, name: str, *, up: bool) -> None:
        self.nodes[name].link_up = up

    def stall_disk(self) -> bool:
        return True

    def wait_mounted(self, name: str) -> bool:
        return self.nodes[name].up

    def log_size(self, name: str) -> int:
        return 0

    def log_since(self, name: str, offset: int) -> str:
        return f"membership 1.8: {', '.join(self.nodes)}\n"

    def log_tail(self, name: str, lines: int = 20) -> str:
        return ""


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plans' steps run back to back here; kill-during-sync would sleep its delay."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def carried_out(count: int, kind: str, seed: int, *, cut: float = 1.0) -> tuple[FakeLab, Any]:
    """A stand-in lab after the first `cut` share of a plan of `kind`, in the plan's order."""
    lab = FakeLab(count)
    foe = nemesis.Nemesis(lab, random.Random(seed), StringIO())  # type: ignore[arg-type]
    plan = foe.plan(kind)
    for step in plan.steps[:round(len(plan.steps) * cut)]:
        step.action()
    return lab, foe


@pytest.mark.usefixtures("no_sleep")
@pytest.mark.parametrize("count", [3, 5, 7])
def test_no_plan_takes_down_more_than_a_minority(count: int) -> None:
    for kind in ("kill", "pause", "kill-during-sync", "combo"):
        for seed in range(40):
            lab, _ = carried_out(count, kind, seed)
            assert lab.worst_down <= (count - 1) // 2, (kind, seed)


@pytest.mark.usefixtures("no_sleep")
@pytest.mark.parametrize("kind", nemesis.KINDS)
def test_heal_undoes_everything_even_when_a_plan_is_cut_short(kind: str) -> None:
    for seed in range(10):
        lab, foe = carried_out(5, kind, seed, cut=0.5)
        assert foe.heal() == []
        assert lab.switch.rules == Rules()
        assert all(n.up and not n.paused and n.link_up for n in lab.nodes.values()), (kind, seed)
        assert not foe.killed


def test_a_dead_daemon_the_nemesis_did_not_kill_is_reported_and_restarted() -> None:
    lab = FakeLab(3)
    foe = nemesis.Nemesis(lab, random.Random(1), StringIO())  # type: ignore[arg-type]
    lab.nodes["n2"].up = False
    problems = foe.heal()
    assert len(problems) == 1
    assert "n2 died without being killed" in problems[0]
    assert lab.nodes["n2"].up


def test_the_ring_that_takes_a_node_back_is_not_its_own_ring() -> None:
    own = "2026-12-05 05:59:58,866 pmxfs[18221]: membership 2.212: n2\n"
    back = "2026-12-05 05:59:58,887 pmxfs[18221]: membership 1.216: n1, n2, n3\n"
    without = "2026-12-05 05:59:57,672 pmxfs[17819]: membership 1.212: n1, n3\n"
    assert not nemesis.ring_takes_back(own, "n2")
    assert not nemesis.ring_takes_back(without, "n2")
    assert nemesis.ring_takes_back(own + without + back, "n2")


# -- faults.py's exit status ------------------------------------------------------------------


@pytest.fixture
def signals_kept() -> Iterator[None]:
    """faults.main installs its own SIGINT/SIGTERM/SIGHUP handlers: put pytest's back."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


class FailingRunner:
    """A Runner whose lab fails in `build` or under the run, as `ip` may."""

    fails_in = "run"
    closed = 0

    def __init__(self, root: Path, nodes: int, kinds: list[str], seed: int,
                 deadline: float) -> None:
        self.summary = Summary(seed, nodes)

    def build(self) -> None:
        if self.fails_in == "build":
            raise Unavailable("ip netns add: boom")

    def run(self, cycles: int) -> Summary:
        raise Unavailable("ip -n pmxf link set down: boom")

    def close(self) -> None:
        FailingRunner.closed += 1


@pytest.mark.usefixtures("signals_kept")
@pytest.mark.parametrize(("fails_in", "status", "said"),
                         [("build", 2, "cannot build the lab"), ("run", 1, "the lab failed")])
def test_a_lab_failing_under_the_run_is_no_unbuildable_lab(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        fails_in: str, status: int, said: str) -> None:
    monkeypatch.setattr(faults, "lab_unavailable", lambda: None)
    monkeypatch.setattr(faults, "Runner", FailingRunner)
    monkeypatch.setattr(FailingRunner, "fails_in", fails_in)
    monkeypatch.setattr(FailingRunner, "closed", 0)
    assert faults.main(["--dir", str(tmp_path), "--seed", "1"]) == status
    out = capsys.readouterr()
    assert said in out.out + out.err
    assert FailingRunner.closed == 1
