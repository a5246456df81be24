"""The cluster log: a small, bounded, deduplicated log that every node keeps and merges at sync.

Each node numbers its own entries (`LogWriter`: uid = a counter from a start the caller supplies,
so a restarted node keeps increasing), sends them to the others, and at every sync merges the
union of all members' logs. An entry's identity is (node, uid, time): adding it a second time,
however it travels, changes nothing.

The log is ordered by the key (time, node, uid) and bounded by the encoded size of its entries
(128 KiB by default, as pmxcfs). When it is over the bound the entries with the smallest key (the
oldest) are dropped, and the log remembers the key of the newest entry it dropped, its `cutoff`:
an entry at or below the cutoff is refused. This makes the log a function of the entries ever
offered to it, whatever their order: the longest run of newest entries that fits, all above the
cutoff. So two logs that merged the same entries are equal. The price is that an entry stamped
older than the cutoff (from a node whose clock is far behind) is not kept; it would be the next
to go anyway.

At sync each member sends its entries and its cutoff, and every member merges all of them
(`merge(entries, cutoff)`): a received cutoff above the own one is adopted, so the members end
with equal logs even though each had dropped different entries before. Determinism assumes what
`LogWriter` guarantees: one identity, one content — a second, different entry under an identity
already seen is treated as a duplicate.

`encode_entries`/`decode_entries` and `encode_cutoff`/`decode_cutoff` give msgpack-ready values
for the sync messages; the decoders check everything and raise only `ProtocolError`.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from pmxfs.core.errors import ProtocolError

MAX_MSG_BYTES = 4096
MAX_NAME_BYTES = 64  # tag, node and user
MAX_PRIORITY = 7  # syslog LOG_DEBUG; 0 is LOG_EMERG
MAX_UID = 2**63 - 1
MAX_TIME = 2**63 - 1
MAX_PID = 2**32 - 1
DEFAULT_MAX_BYTES = 128 * 1024
JSON_ENTRIES = 50  # what `.clusterlog` shows
# What an entry costs against the bound, modelled on pmxcfs's record: fixed fields, each string
# with a terminating NUL, padded to 8 bytes.
ENTRY_HEADER_BYTES = 44

Key: TypeAlias = tuple[int, str, int]  # (time, node, uid): order and identity
EntryJson: TypeAlias = dict[str, int | str]


def _utf8_len(value: str, limit: int, what: str) -> int:
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid unicode text") from None
    if n > limit:
        raise ValueError(f"{what} is longer than {limit} bytes of UTF-8")
    return n


def _check_int(value: int, hi: int, what: str) -> None:
    if not 0 <= value <= hi:
        raise ValueError(f"{what} out of range 0..{hi}")


def _cut(value: str, limit: int) -> str:
    """`value` as UTF-8 of at most `limit` bytes, cut at a character boundary; a character that
    cannot be UTF-8 (a lone surrogate) becomes '?'."""
    data = value.encode("utf-8", "replace")
    # Only the last character can be incomplete after the cut; "ignore" drops just that.
    return data[:limit].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One cluster log entry. The constructor checks the limits (ValueError); `make` cuts the
    texts to them instead."""

    uid: int  # the writing node's running number for its entries
    time: int  # seconds since the epoch
    pri: int  # syslog priority 0..7
    tag: str  # the program that logged it, as syslog's tag
    pid: int  # its process id
    node: str  # the name of the node that wrote it
    user: str  # who the program acted for
    msg: str

    def __post_init__(self) -> None:
        _check_int(self.uid, MAX_UID, "uid")
        _check_int(self.time, MAX_TIME, "time")
        _check_int(self.pri, MAX_PRIORITY, "priority")
        _check_int(self.pid, MAX_PID, "pid")
        _utf8_len(self.tag, MAX_NAME_BYTES, "tag")
        _utf8_len(self.node, MAX_NAME_BYTES, "node")
        _utf8_len(self.user, MAX_NAME_BYTES, "user")
        _utf8_len(self.msg, MAX_MSG_BYTES, "msg")

    @classmethod
    def make(
        cls, *, uid: int, time: int, pri: int, tag: str, pid: int, node: str, user: str, msg: str
    ) -> LogEntry:
        """An entry whose texts are cut to their limits at a character boundary."""
        return cls(
            uid=uid, time=time, pri=pri, tag=_cut(tag, MAX_NAME_BYTES), pid=pid,
            node=_cut(node, MAX_NAME_BYTES), user=_cut(user, MAX_NAME_BYTES),
            msg=_cut(msg, MAX_MSG_BYTES),
        )

    @property
    def key(self) -> Key:
        """Sort key, oldest first; also the identity (node, uid, time) used for deduplication."""
        return (self.time, self.node, self.uid)

    @property
    def size(self) -> int:
        """What the entry counts against the log's bound."""
        texts = (self.tag, self.node, self.user, self.msg)
        raw = ENTRY_HEADER_BYTES + sum(len(t.encode("utf-8")) + 1 for t in texts)
        return (raw + 7) & ~7

    def to_json(self) -> EntryJson:
        return {
            "uid": self.uid, "time": self.time, "pri": self.pri, "tag": self.tag,
            "pid": self.pid, "node": self.node, "user": self.user, "msg": self.msg,
        }


class LogWriter:
    """Makes this node's entries, numbering them start, start + 1, ... The caller picks the start
    so that a restarted node continues above the uids it used before (persisted, or derived from
    the clock), and may persist `next_uid`."""

    def __init__(self, node: str, first_uid: int) -> None:
        _check_int(first_uid, MAX_UID, "uid")
        self.node = node  # this node's name, put in every entry
        self._next_uid = first_uid  # the uid of the next entry

    @property
    def next_uid(self) -> int:
        return self._next_uid

    def entry(self, *, time: int, pri: int, tag: str, pid: int, user: str, msg: str) -> LogEntry:
        made = LogEntry.make(uid=self._next_uid, time=time, pri=pri, tag=tag, pid=pid,
                             node=self.node, user=user, msg=msg)
        self._next_uid += 1
        return made


class ClusterLog:
    """The bounded, deduplicated log (see the module comment for the rules)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes  # the bound on the entries' `size`, summed
        self._keys: list[Key] = []  # ascending: oldest first
        self._by_key: dict[Key, LogEntry] = {}
        self._bytes = 0  # the entries' `size`, summed
        self._cutoff: Key | None = None  # key of the newest entry dropped for the bound

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterLog):
            return NotImplemented
        return (self.max_bytes, self._cutoff, self._keys, self._by_key) == (
            other.max_bytes, other._cutoff, other._keys, other._by_key)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def cutoff(self) -> Key | None:
        """The key of the newest entry dropped for the bound (own or learnt at a merge)."""
        return self._cutoff

    def add(self, entry: LogEntry) -> bool:
        """Take `entry`; True when it is in the log afterwards. False for a duplicate, an entry at
        or below the cutoff, or one that is itself the oldest and does not fit."""
        key = entry.key
        if key in self._by_key or (self._cutoff is not None and key <= self._cutoff):
            return False
        insort(self._keys, key)
        self._by_key[key] = entry
        self._bytes += entry.size
        drop = 0
        while self._bytes > self.max_bytes:
            self._cutoff = self._keys[drop]
            self._bytes -= self._by_key.pop(self._cutoff).size
            drop += 1
        del self._keys[:drop]
        return key in self._by_key

    def merge(self, entries: Iterable[LogEntry], cutoff: Key | None = None) -> int:
        """Take another member's log at sync: adopt its `cutoff` when that is above the own one
        (dropping the entries at or below it), then add every entry. Returns how many entries
        were taken."""
        if cutoff is not None and (self._cutoff is None or cutoff > self._cutoff):
            self._cutoff = cutoff
            drop = bisect_right(self._keys, cutoff)
            for key in self._keys[:drop]:
                self._bytes -= self._by_key.pop(key).size
            del self._keys[:drop]
        return sum(self.add(e) for e in entries)

    def entries(self) -> list[LogEntry]:
        """Every entry, newest first."""
        return [self._by_key[k] for k in reversed(self._keys)]

    def newest(self, n: int = JSON_ENTRIES) -> list[LogEntry]:
        """The `n` newest entries, newest first."""
        if n < 0:
            raise ValueError("n must not be negative")
        start = max(0, len(self._keys) - n)
        return [self._by_key[k] for k in reversed(self._keys[start:])]

    def to_json(self, n: int = JSON_ENTRIES) -> dict[str, list[EntryJson]]:
        """The `.clusterlog` object: the `n` newest entries, newest first."""
        return {"data": [e.to_json() for e in self.newest(n)]}


def encode_entries(entries: Iterable[LogEntry]) -> list[list[int | str]]:
    """Entries as msgpack-ready lists `[uid, time, pri, tag, pid, node, user, msg]`."""
    return [[e.uid, e.time, e.pri, e.tag, e.pid, e.node, e.user, e.msg] for e in entries]


def encode_cutoff(cutoff: Key | None) -> list[int | str] | None:
    """A cutoff as a msgpack-ready `[time, node, uid]`; None stays None."""
    return None if cutoff is None else list(cutoff)


def _field_int(value: object) -> int:
    if type(value) is not int:
        raise ProtocolError("bad log integer")
    return value


def _field_str(value: object) -> str:
    if type(value) is not str:
        raise ProtocolError("bad log text")
    return value


def decode_entries(obj: object) -> list[LogEntry]:
    """The entries encoded by `encode_entries`; `ProtocolError` for anything else."""
    if type(obj) is not list:
        raise ProtocolError("log entries are not a list")
    decoded: list[LogEntry] = []
    for item in obj:
        if type(item) is not list or len(item) != 8:
            raise ProtocolError("bad log entry")
        uid, time, pri, tag, pid, node, user, msg = item
        try:
            decoded.append(LogEntry(
                uid=_field_int(uid), time=_field_int(time), pri=_field_int(pri),
                tag=_field_str(tag), pid=_field_int(pid), node=_field_str(node),
                user=_field_str(user), msg=_field_str(msg),
            ))
        except ValueError as exc:
            raise ProtocolError(f"bad log entry: {exc}") from None
    return decoded


def decode_cutoff(obj: object) -> Key | None:
    """The cutoff encoded by `encode_cutoff`; `ProtocolError` for anything else."""
    if obj is None:
        return None
    if type(obj) is not list or len(obj) != 3:
        raise ProtocolError("bad log cutoff")
    time, node, uid = _field_int(obj[0]), _field_str(obj[1]), _field_int(obj[2])
    try:
        _check_int(time, MAX_TIME, "time")
        _utf8_len(node, MAX_NAME_BYTES, "node")
        _check_int(uid, MAX_UID, "uid")
    except ValueError as exc:
        raise ProtocolError(f"bad log cutoff: {exc}") from None
    return (time, node, uid)
