"""The fault harness's history checker (tools/faultlab/history.py): each guarantee holds on a
history that keeps it, and each broken one is reported -- the checker's sabotage tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from faultlab.history import CheckInput, NodeEvent, Op, check, classify, write_counts


def write(key: str, value: str, start: float, end: float | None, outcome: str = "ok",
          node: str = "n1") -> Op:
    return Op(client=value.split(":")[0], node=node, kind="write", key=key, value=value,
              start=start, end=end, outcome=outcome)


def read(key: str, value: str | None, start: float, end: float, node: str = "n1") -> Op:
    return Op(client=f"{node}c9", node=node, kind="read", key=key, value=value, start=start,
              end=end, outcome="ok")


def run(ops: list[Op], final: dict[str, str] | None = None, *,
        events: list[NodeEvent] | None = None,
        trees: dict[str, dict[str, str]] | None = None,
        lost_found: dict[str, list[str]] | None = None) -> list[str]:
    if trees is None:
        tree = final or {}
        trees = {"n1": tree, "n2": dict(tree)}
    return check(CheckInput(ops=ops, events=events or [], final_trees=trees,
                            lost_found=lost_found or {}))


def only(violations: list[str], kind: str) -> None:
    assert violations, "expected a violation"
    assert all(v.startswith(kind + ":") for v in violations), violations


def test_classify_and_counts() -> None:
    ops = [write("k", "a:1", 0, 1), write("k", "a:2", 2, 3, "EACCES"),
           write("k", "a:3", 4, 5, "ETIMEDOUT"), write("k", "a:4", 6, None, "unknown"),
           read("k", "a:1", 7, 8)]
    assert [classify(op) for op in ops[:4]] == ["acked", "refused", "unknown", "unknown"]
    assert write_counts(ops) == {"acked": 1, "refused": 1, "unknown": 2}


def test_a_clean_history_passes() -> None:
    ops = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3),
           write("shared/s", "a:3", 0, 5), write("shared/s", "b:1", 1, 4, node="n2"),
           write("own/a", "a:4", 4, 9, "EACCES"),
           read("own/a", "a:1", 1.5, 1.8), read("own/a", "a:2", 3.5, 3.6),
           read("shared/s", "a:3", 6, 7, node="n2")]
    # The two shared writes overlap: either may be last.
    assert run(ops, {"own/a": "a:2", "shared/s": "b:1"}) == []
    assert run(ops, {"own/a": "a:2", "shared/s": "a:3"}) == []


def test_an_acknowledged_write_lost_is_reported() -> None:
    ops = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3)]
    only(run(ops, {"own/a": "a:1"}), "acknowledged write lost")
    only(run(ops, {}), "acknowledged write lost")


def test_a_later_unknown_write_may_win() -> None:
    ops = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3, "ETIMEDOUT")]
    assert run(ops, {"own/a": "a:2"}) == []
    assert run(ops, {"own/a": "a:1"}) == []
    # An unknown write may take effect after it returned: even after a later acknowledged one.
    ops.append(write("own/a", "a:3", 4, 5))
    assert run(ops, {"own/a": "a:2"}) == []
    only(run(ops, {"own/a": "a:1"}), "acknowledged write lost")


def test_a_refused_write_applied_is_reported() -> None:
    ops = [write("own/a", "a:1", 0, 1, "EACCES")]
    only(run(ops, {"own/a": "a:1"}), "refused write applied")


def test_a_value_nobody_wrote_is_reported() -> None:
    ops = [write("own/a", "a:1", 0, 1)]
    only(run(ops, {"own/a": "zz:1"}), "value from nowhere")


def test_trees_that_differ_are_reported() -> None:
    ops = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3, "ETIMEDOUT")]
    violations = run(ops, trees={"n1": {"own/a": "a:1"}, "n2": {"own/a": "a:2"}})
    only(violations, "trees differ")


def test_lost_found_holding_an_acknowledged_write_is_reported() -> None:
    ops = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3, "ETIMEDOUT")]
    assert run(ops, {"own/a": "a:1"}, lost_found={"n2": ["a:2"]}) == []
    only(run(ops, {"own/a": "a:1"}, lost_found={"n2": ["a:1"]}),
         "acknowledged write in lost+found")


def test_reads_of_values_never_written_or_from_the_future() -> None:
    ops = [write("own/a", "a:1", 5, 6), read("own/a", "zz:9", 0, 1)]
    only(run(ops, {"own/a": "a:1"}), "read of a value never written")
    ops = [write("own/a", "a:1", 5, 6), read("own/a", "a:1", 0, 1)]
    only(run(ops, {"own/a": "a:1"}), "read from the future")


def test_a_read_going_back_past_an_acknowledged_value_is_reported() -> None:
    base = [write("own/a", "a:1", 0, 1, node="n2"), write("own/a", "a:2", 2, 3, node="n2")]
    final = {"own/a": "a:2"}
    # n1 saw a:2, then a:1 again: back past an acknowledged value.
    ops = [*base, read("own/a", "a:2", 4, 5), read("own/a", "a:1", 6, 7)]
    only(run(ops, final), "read went back")
    ops = [*base, read("own/a", "a:2", 4, 5), read("own/a", None, 6, 7)]
    only(run(ops, final), "read went back")
    # Overlapping reads may return either.
    ops = [*base, read("own/a", "a:2", 4, 6), read("own/a", "a:1", 5, 7)]
    assert run(ops, final) == []
    # Going back to the older value is fine on another node ...
    ops = [*base, read("own/a", "a:2", 4, 5), read("own/a", "a:1", 6, 7, node="n3")]
    assert run(ops, final) == []


def test_a_restart_may_go_back_but_not_during_one_run() -> None:
    base = [write("own/a", "a:1", 0, 1, node="n2"), write("own/a", "a:2", 2, 3, node="n2"),
            read("own/a", "a:2", 4, 5), read("own/a", "a:1", 8, 9)]
    restarted = [NodeEvent(6, "n1", "killed"), NodeEvent(7, "n1", "started")]
    final = {"own/a": "a:2"}
    assert run(base, final, events=restarted) == []
    paused = [NodeEvent(6, "n1", "paused"), NodeEvent(7, "n1", "resumed")]
    only(run(base, final, events=paused), "read went back")


def test_read_your_writes_on_the_acknowledging_node() -> None:
    base = [write("own/a", "a:1", 0, 1), write("own/a", "a:2", 2, 3)]
    final = {"own/a": "a:2"}
    only(run([*base, read("own/a", "a:1", 4, 5)], final), "read lost its own write")
    # Even after a restart: the acknowledged write is on this node's disk.
    restarted = [NodeEvent(3.5, "n1", "killed"), NodeEvent(3.7, "n1", "started")]
    only(run([*base, read("own/a", "a:1", 4, 5)], final, events=restarted),
         "read lost its own write")
    # Another node may still lag behind.
    assert run([*base, read("own/a", "a:1", 4, 5, node="n2")], final) == []
    # A read that began before the acknowledgement may return the older value.
    assert run([*base, read("own/a", "a:1", 2.5, 5)], final) == []


def test_every_violation_is_listed() -> None:
    """The harness reports each line once over a run whose history keeps growing: a cap here
    would hide the new violations of a kind behind the old ones."""
    ops = [write(f"own/k{i}", f"a:{i}", i, i + 0.5) for i in range(50)]
    violations = run(ops, {}, trees={"n1": {}})
    assert len(violations) == 50
    assert len(set(violations)) == 50


def test_an_empty_new_file_shows_only_on_its_node_while_it_is_created() -> None:
    """docs/tree-rules.md "New files": open(O_CREAT) shows the file at once, empty, on its node."""
    creating = write("own/a", "a:1", 0, 2)
    assert run([creating, read("own/a", "", 0.5, 1)], {"own/a": "a:1"}) == []
    only(run([creating, read("own/a", "", 0.5, 1, node="n2")], {"own/a": "a:1"}),
         "read of a value never written")
    only(run([creating, read("own/a", "", 2.5, 3)], {"own/a": "a:1"}),
         "read of a value never written")
    # While being created it counts as missing: after an acknowledged value, that goes back.
    ops = [write("own/a", "a:1", 0, 1, node="n2"), read("own/a", "a:1", 2, 3),
           write("own/a", "a:2", 3.5, 5), read("own/a", "", 4, 4.5)]
    only(run(ops, {"own/a": "a:2"}), "read went back")


def test_a_value_read_before_its_acknowledgement_sets_no_floor() -> None:
    """design.md §5: a write delivered only on its node (the tail of a ring the others left)
    shows there, a sync takes it away, the node sends it again and it is acknowledged then --
    a read between the sync and the resend returns the older value."""
    ops = [write("own/a", "a:1", 0, 1, node="n2"), write("own/a", "a:2", 2, 9, node="n2"),
           read("own/a", "a:2", 3, 4, node="n2"), read("own/a", "a:1", 5, 6, node="n2"),
           read("own/a", "a:2", 10, 11, node="n2")]
    assert run(ops, {"own/a": "a:2"}) == []
    # Once a read that began after the acknowledgement returned it, going back is reported.
    ops = [*ops, read("own/a", "a:1", 12, 13, node="n2"), read("own/a", "a:2", 14, 15),
           read("own/a", "a:1", 16, 17)]
    only(run(ops, {"own/a": "a:2"}), "read went back")
