"""The cluster log: entry limits and truncation, deduplication, the size bound, merge order
independence (against a model: the longest run of newest entries that fits), and the codec's
robustness (anything malformed raises ProtocolError, nothing else)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core.clusterlog import (
    DEFAULT_MAX_BYTES,
    MAX_MSG_BYTES,
    MAX_NAME_BYTES,
    ClusterLog,
    LogEntry,
    LogWriter,
    decode_cutoff,
    decode_entries,
    encode_cutoff,
    encode_entries,
)
from pmxfs.core.errors import ProtocolError


def entry(uid: int = 1, time: int = 100, node: str = "node1", msg: str = "hello",
          pri: int = 6, tag: str = "cluster", pid: int = 42, user: str = "root") -> LogEntry:
    return LogEntry(uid=uid, time=time, pri=pri, tag=tag, pid=pid, node=node, user=user, msg=msg)


# ------------------------------------------------------------------------------- LogEntry


@pytest.mark.parametrize(("field", "value", "message"), [
    ("uid", -1, "uid out of range"), ("uid", 2**63, "uid out of range"),
    ("time", -1, "time out of range"), ("time", 2**63, "time out of range"),
    ("pri", -1, "priority out of range"), ("pri", 8, "priority out of range"),
    ("pid", -1, "pid out of range"), ("pid", 2**32, "pid out of range"),
    ("msg", "x" * (MAX_MSG_BYTES + 1), "msg is longer than"),
    ("msg", "é" * (MAX_MSG_BYTES // 2) + "x", "msg is longer than"),
    ("tag", "t" * (MAX_NAME_BYTES + 1), "tag is longer than"),
    ("node", "ü" * 33, "node is longer than"), ("user", "u" * 65, "user is longer than"),
    ("msg", "bad \udcff", "msg is not valid unicode"),
])
def test_entry_limits_are_checked(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        entry(**{field: value})


def test_entry_at_the_limits_is_accepted() -> None:
    e = entry(uid=2**63 - 1, time=2**63 - 1, pri=7, pid=2**32 - 1, msg="é" * (MAX_MSG_BYTES // 2),
              tag="t" * 64, node="ü" * 32, user="")
    assert len(e.msg.encode()) == MAX_MSG_BYTES


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("x" * 5000, MAX_MSG_BYTES, "x" * 4096),
    ("é" * 3000, MAX_MSG_BYTES, "é" * 2048),  # 2-byte characters, cut falls on a boundary
    ("ab" + "€" * 2000, MAX_MSG_BYTES, "ab" + "€" * 1364),  # a 3-byte € would straddle 4096
    ("a" + "😀" * 1100, MAX_MSG_BYTES, "a" + "😀" * 1023),  # 4-byte characters
    ("short", MAX_MSG_BYTES, "short"),
    ("bad \udcff surrogate", MAX_MSG_BYTES, "bad ? surrogate"),
])
def test_make_cuts_msg_at_a_character_boundary(text: str, limit: int, expected: str) -> None:
    e = LogEntry.make(uid=1, time=1, pri=6, tag="t", pid=1, node="n", user="u", msg=text)
    assert e.msg == expected
    assert len(e.msg.encode()) <= limit


def test_make_cuts_names_to_64_bytes() -> None:
    e = LogEntry.make(uid=1, time=1, pri=6, tag="t" * 100, pid=1, node="€" * 30,
                      user="a" + "é" * 40, msg="m")
    assert e.tag == "t" * 64
    assert e.node == "€" * 21  # 63 bytes; a 22nd € would need 66
    assert e.user == "a" + "é" * 31  # 63 bytes
    assert max(len(s.encode()) for s in (e.tag, e.node, e.user)) <= MAX_NAME_BYTES


def test_size_counts_header_texts_with_nul_and_padding() -> None:
    # 44 + len("cluster")+1 + len("node1")+1 + len("root")+1 + len("hello")+1 = 69 → 72
    assert entry().size == 72
    assert entry(msg="hellohell").size == 80  # 73 → 80
    assert entry(msg="é").size == 72  # 2 bytes of UTF-8: 66 → 72


def test_log_writer_numbers_from_the_start_it_is_given() -> None:
    writer = LogWriter("node2", 1000)
    first = writer.entry(time=5, pri=6, tag="cluster", pid=7, user="root", msg="one")
    second = writer.entry(time=5, pri=3, tag="cluster", pid=7, user="root", msg="two")
    assert (first.uid, second.uid, writer.next_uid) == (1000, 1001, 1002)
    assert first.node == second.node == "node2"
    log = ClusterLog()
    assert log.add(first)
    assert log.add(second)
    with pytest.raises(ValueError, match="uid out of range"):
        LogWriter("node2", -1)


# ------------------------------------------------------------------------ dedup and order


def test_add_deduplicates_by_node_uid_time() -> None:
    log = ClusterLog()
    assert log.add(entry())
    assert not log.add(entry())
    assert not log.add(entry(msg="other text, same identity"))
    assert log.add(entry(uid=2))
    assert log.add(entry(node="node2"))
    assert log.add(entry(time=101))
    assert len(log) == 4
    assert [e.msg for e in log.entries()].count("hello") == 4


def test_entries_are_newest_first_by_time_node_uid() -> None:
    log = ClusterLog()
    es = [entry(uid=2, time=10, node="b"), entry(uid=1, time=10, node="b"),
          entry(uid=9, time=10, node="a"), entry(uid=1, time=12, node="a"),
          entry(uid=5, time=3, node="c")]
    assert log.merge(es) == 5
    assert [(e.time, e.node, e.uid) for e in log.entries()] == [
        (12, "a", 1), (10, "b", 2), (10, "b", 1), (10, "a", 9), (3, "c", 5)]
    assert log.newest(2) == log.entries()[:2]
    assert log.newest(0) == []
    assert log.newest(99) == log.entries()
    with pytest.raises(ValueError, match="must not be negative"):
        log.newest(-1)


def test_merge_counts_only_new_entries() -> None:
    log = ClusterLog()
    log.add(entry(uid=1))
    assert log.merge([entry(uid=1), entry(uid=2), entry(uid=2), entry(uid=3)]) == 2
    assert log.merge([]) == 0


def test_to_json_is_the_clusterlog_format_newest_first_50_at_most() -> None:
    log = ClusterLog()
    log.merge(entry(uid=i, time=1000 + i) for i in range(60))
    doc = log.to_json()
    assert len(doc["data"]) == 50
    assert doc["data"][0] == {"uid": 59, "time": 1059, "pri": 6, "tag": "cluster", "pid": 42,
                              "node": "node1", "user": "root", "msg": "hello"}
    assert [d["uid"] for d in doc["data"]] == list(range(59, 9, -1))
    assert log.to_json(2) == {"data": [e.to_json() for e in log.entries()[:2]]}
    assert ClusterLog().to_json() == {"data": []}


# ---------------------------------------------------------------------------------- bound


def test_oldest_entries_are_dropped_beyond_the_bound() -> None:
    log = ClusterLog(max_bytes=3 * 72)
    for uid in range(5):
        log.add(entry(uid=uid))
        assert log.bytes_used <= 3 * 72
    assert [e.uid for e in log.entries()] == [4, 3, 2]
    assert log.bytes_used == 3 * 72


def test_an_entry_older_than_what_was_dropped_is_refused() -> None:
    log = ClusterLog(max_bytes=2 * 72)
    assert log.cutoff is None
    log.merge([entry(time=10), entry(time=20), entry(time=30)])  # time 10 is dropped
    assert [e.time for e in log.entries()] == [30, 20]
    assert log.cutoff == (10, "node1", 1)
    assert not log.add(entry(time=10))  # the dropped one again
    assert not log.add(entry(time=5))  # older still
    assert not log.add(entry(time=15))  # newer than the cutoff, but the oldest and no room
    assert log.cutoff == (15, "node1", 1)
    assert log.add(entry(time=25))
    assert [e.time for e in log.entries()] == [30, 25]
    assert log.cutoff == (20, "node1", 1)


def test_merge_adopts_a_higher_cutoff() -> None:
    log = ClusterLog()
    log.merge([entry(time=10), entry(time=20), entry(time=30)])
    assert log.merge([entry(time=15), entry(time=40)], cutoff=(20, "node1", 1)) == 1
    assert [e.time for e in log.entries()] == [40, 30]
    assert log.cutoff == (20, "node1", 1)
    assert log.bytes_used == 2 * 72
    assert log.merge([], cutoff=(5, "node1", 1)) == 0  # a lower one changes nothing
    assert log.cutoff == (20, "node1", 1)
    assert not log.add(entry(time=20, node="node0"))


def test_an_entry_larger_than_the_bound_is_not_kept() -> None:
    log = ClusterLog(max_bytes=100)
    assert not log.add(entry(msg="x" * 200))
    assert len(log) == 0
    assert log.bytes_used == 0
    assert log.add(entry(time=200))


def test_default_bound_is_128_kib() -> None:
    log = ClusterLog()
    assert log.max_bytes == DEFAULT_MAX_BYTES == 128 * 1024
    big = "m" * MAX_MSG_BYTES
    log.merge(entry(uid=i, msg=big) for i in range(100))
    size = entry(msg=big).size
    assert len(log) == DEFAULT_MAX_BYTES // size
    assert log.bytes_used <= DEFAULT_MAX_BYTES
    assert log.entries()[0].uid == 99


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        ClusterLog(max_bytes=0)


# ------------------------------------------------------------------ merge determinism


def model(entries: list[LogEntry], max_bytes: int) -> list[LogEntry]:
    """The longest run of newest distinct entries that fits in max_bytes, newest first."""
    kept: list[LogEntry] = []
    used = 0
    for e in sorted({e.key: e for e in entries}.values(), key=lambda e: e.key, reverse=True):
        if used + e.size > max_bytes:
            break
        kept.append(e)
        used += e.size
    return kept


log_entries = st.builds(
    LogEntry.make,
    uid=st.integers(0, 6), time=st.integers(0, 8), pri=st.integers(0, 7),
    tag=st.sampled_from(["cluster", "pvedaemon"]), pid=st.integers(0, 100),
    node=st.sampled_from(["node1", "node2", "node3"]), user=st.sampled_from(["root", "admin"]),
    msg=st.text(max_size=120),
)
# A node never writes two different entries under one identity.
entry_sets = st.lists(log_entries, max_size=40, unique_by=lambda e: e.key)
bounds = st.integers(60, 2500) | st.just(DEFAULT_MAX_BYTES)


@settings(max_examples=300)
@given(entry_sets, bounds, st.randoms(use_true_random=False))
def test_merge_order_does_not_matter(
    entries: list[LogEntry], max_bytes: int, rnd: Any
) -> None:
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    one, two = ClusterLog(max_bytes), ClusterLog(max_bytes)
    one.merge(entries)
    for e in shuffled:  # one at a time, with duplicates offered again in between
        two.add(e)
        two.add(rnd.choice(shuffled))
    assert one == two
    assert one.entries() == model(entries, max_bytes)


@settings(max_examples=300)
@given(entry_sets, st.lists(log_entries, max_size=10), bounds,
       st.randoms(use_true_random=False))
def test_members_agree_after_exchanging_logs(
    entries: list[LogEntry], later: list[LogEntry], max_bytes: int, rnd: Any
) -> None:
    """Each member logged a part of the entries (and dropped some); at the sync every member
    merges every member's entries and cutoff, in its own order. They end equal to each other and
    to a log that saw every entry, and from then on take or refuse new entries alike."""
    members = [ClusterLog(max_bytes) for _ in range(3)]
    for e in entries:
        rnd.choice(members).add(e)
    sent = [(m.entries(), m.cutoff) for m in members]
    for member in members:
        for j in rnd.sample(range(3), 3):
            member.merge(*sent[j])
    whole = ClusterLog(max_bytes)
    whole.merge(entries)
    assert members[0] == members[1] == members[2] == whole
    for e in later:
        assert len({m.add(e) for m in members}) == 1
    assert members[0] == members[1] == members[2]


# ---------------------------------------------------------------------------------- codec


def test_encode_decode_round_trip_through_msgpack() -> None:
    es = [entry(), entry(uid=2, msg="ünïcödé 😀", tag="", user="a@pve"),
          LogEntry.make(uid=2**63 - 1, time=0, pri=0, tag="t", pid=2**32 - 1, node="n",
                        user="u", msg="x" * 5000)]
    packed = msgpack.packb(encode_entries(es), use_bin_type=True)
    assert decode_entries(msgpack.unpackb(packed, raw=False)) == es
    assert decode_entries([]) == []


def test_cutoff_codec() -> None:
    for cutoff in (None, (0, "", 0), (2**63 - 1, "ü" * 32, 2**63 - 1)):
        packed = msgpack.packb(encode_cutoff(cutoff), use_bin_type=True)
        assert decode_cutoff(msgpack.unpackb(packed, raw=False)) == cutoff


@pytest.mark.parametrize("obj", [
    [], [1, "n"], [1, "n", 2, 3], (1, "n", 2), [1.0, "n", 2], [1, b"n", 2], [True, "n", 2],
    [-1, "n", 2], [1, "n", 2**63], [1, "n" * 65, 2], [1, "\udcff", 2], "x", 0, {},
])
def test_decode_cutoff_rejects_malformed(obj: object) -> None:
    with pytest.raises(ProtocolError):
        decode_cutoff(obj)


GOOD = [7, 100, 6, "cluster", 42, "node1", "root", "hello"]


@pytest.mark.parametrize("obj", [
    None, 1, "x", b"x", {}, (GOOD,), [GOOD[:7]], [[*GOOD, 1]], [tuple(GOOD)], [None],
    [[True, *GOOD[1:]]], [[*GOOD[:2], 8, *GOOD[3:]]], [[-1, *GOOD[1:]]], [[2**64, *GOOD[1:]]],
    [[7, 100.0, *GOOD[2:]]], [[*GOOD[:3], b"cluster", *GOOD[4:]]], [[*GOOD[:4], 2**32, *GOOD[5:]]],
    [[*GOOD[:5], "n" * 65, *GOOD[6:]]], [[*GOOD[:7], "m" * (MAX_MSG_BYTES + 1)]],
    [[*GOOD[:7], "\udcff"]], [GOOD, GOOD[:3]],
])
def test_decode_rejects_malformed(obj: object) -> None:
    with pytest.raises(ProtocolError):
        decode_entries(obj)


scalars = (st.none() | st.booleans() | st.integers() | st.integers(-1, 2**64) | st.floats()
           | st.text(max_size=80) | st.binary(max_size=80))
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=9) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=40,
)


@st.composite
def damaged(draw: st.DrawFn) -> list[Any]:
    """A valid encoding with one field replaced, or an item cut or extended."""
    items: list[list[Any]] = [list(x) for x in encode_entries(draw(st.lists(log_entries,
                                                                             max_size=3)))]
    items.append(list(GOOD))
    i = draw(st.integers(0, len(items) - 1))
    how = draw(st.sampled_from(["replace", "cut", "extend"]))
    if how == "replace":
        items[i][draw(st.integers(0, 7))] = draw(anything)
    elif how == "cut":
        items[i] = items[i][:draw(st.integers(0, 7))]
    else:
        items[i].append(draw(anything))
    return items


def check_decodes_or_protocol_error(obj: object) -> None:
    try:
        decoded = decode_entries(obj)
    except ProtocolError:
        pass
    else:
        assert all(isinstance(e, LogEntry) for e in decoded)
        assert encode_entries(decoded) == obj
    try:
        cutoff = decode_cutoff(obj)
    except ProtocolError:
        pass
    else:
        assert encode_cutoff(cutoff) == obj


@settings(max_examples=500)
@given(anything | st.lists(anything, max_size=4))
def test_decode_arbitrary_objects(obj: object) -> None:
    check_decodes_or_protocol_error(obj)


@settings(max_examples=500)
@given(damaged())
def test_decode_damaged_encodings(obj: list[Any]) -> None:
    check_decodes_or_protocol_error(obj)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_unpacked_random_bytes(data: bytes) -> None:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # not msgpack at all: the caller drops it before decode_entries
        return
    check_decodes_or_protocol_error(obj)
