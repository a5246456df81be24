"""File-system operations: the mutations that travel through totem and that memdb applies.

Every change to the tree is one of these frozen dataclasses. A proposer encodes it with
`encode_op`, every member decodes it with `decode_op` and hands it to `MemDB.apply` at its place in
the total order. Paths are relative to the mount's root, '/'-separated, without a leading slash
(`nodes/node1/qemu-server/100.conf`; `""` is the root). Times (`mtime`) are whole seconds chosen by
the proposer, so every member stores the same value.

`decode_op` checks every field's type and size and raises `ProtocolError` for anything else: a
member that sends garbage cannot make the others raise. Those field rules are also the
proposer's: `op_errno` runs the same decoder over the encoded operation, so nothing a receiver
would drop is ever sent, and the local caller gets the errno a Linux file system gives instead
(`InvalidField.errno`): a path that is not valid UTF-8 (FUSE hands undecodable bytes over as
surrogate escapes) or holds a NUL -> EINVAL; a path over MAX_PATH_BYTES -> ENAMETOOLONG; data
over MAX_DATA_BYTES -> EFBIG; a number out of range -> EINVAL.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, TypeAlias

from pmxfs.core.errors import ProtocolError

MAX_PATH_BYTES = 4096  # PATH_MAX; a component's limit (255, NAME_MAX) is memdb's rule
MAX_DATA_BYTES = 1 << 20  # a file's limit; memdb answers EFBIG beyond it
MAX_OFFSET = 1 << 40
MAX_MTIME = 2**63 - 1


@dataclass(frozen=True, slots=True)
class CreateFile:
    """open(O_CREAT) of a file that does not exist yet: an empty file. `exclusive` is O_EXCL:
    EEXIST when it exists; otherwise an existing file is left as it is (success)."""

    path: str
    mtime: int
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Replace the whole content of a file (what a close after writes sends). With `create` a
    missing file is created; without it a missing file is ENOENT."""

    path: str
    data: bytes
    mtime: int
    create: bool = False


@dataclass(frozen=True, slots=True)
class WriteRange:
    """Write `data` at `offset` (a sparse gap is filled with zero bytes)."""

    path: str
    offset: int
    data: bytes
    mtime: int


@dataclass(frozen=True, slots=True)
class Truncate:
    """truncate(path, size): cut a file to `size` bytes, or extend it with zero bytes."""

    path: str
    size: int
    mtime: int


@dataclass(frozen=True, slots=True)
class Mkdir:
    """mkdir(path). Inside priv/lock this takes a lock; the writer becomes its holder."""

    path: str
    mtime: int


@dataclass(frozen=True, slots=True)
class Rmdir:
    """rmdir(path) of an empty directory."""

    path: str


@dataclass(frozen=True, slots=True)
class Unlink:
    """unlink(path) of a file."""

    path: str


@dataclass(frozen=True, slots=True)
class Rename:
    """rename(src, dst), replacing `dst` as POSIX allows."""

    src: str
    dst: str
    mtime: int


@dataclass(frozen=True, slots=True)
class SetMtime:
    """utime(path, (x, mtime)). On a lock directory this is the holder's refresh."""

    path: str
    mtime: int


@dataclass(frozen=True, slots=True)
class UnlockRequest:
    """utime(lockdir, (0, 0)): a contender asks whether the lock at `path` has expired."""

    path: str


@dataclass(frozen=True, slots=True)
class Unlock:
    """Sent by the lowest node id when the lock at `path` was unchanged for the lock timeout:
    delete it if it still has `checksum` (nobody refreshed it meanwhile)."""

    path: str
    checksum: bytes  # `MemDB.lock_checksum` of the lock when it was seen to expire


FsOp: TypeAlias = (CreateFile | WriteFile | WriteRange | Truncate | Mkdir | Rmdir | Unlink
                   | Rename | SetMtime | UnlockRequest | Unlock)

_TAGS: dict[type, int] = {CreateFile: 1, WriteFile: 2, WriteRange: 3, Truncate: 4, Mkdir: 5,
                          Rmdir: 6, Unlink: 7, Rename: 8, SetMtime: 9, UnlockRequest: 10,
                          Unlock: 11}


def op_paths(op: FsOp) -> tuple[str, ...]:
    """The paths an operation names (source first for a rename)."""
    if isinstance(op, Rename):
        return (op.src, op.dst)
    return (op.path,)


def encode_op(op: FsOp) -> list[Any]:
    """A msgpack-ready list: [tag, field, ...] in the dataclass's field order."""
    return [_TAGS[type(op)], *(getattr(op, name) for name in op.__slots__)]


class InvalidField(ProtocolError):
    """A field no member accepts, with the errno a local caller gets for it."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"bad {what}")
        self.errno = code


def _path(value: object) -> str:
    if type(value) is not str:
        raise InvalidField(errno.EINVAL, "path")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(errno.EINVAL, "path: not UTF-8") from None
    if b"\0" in raw:
        raise InvalidField(errno.EINVAL, "path: NUL byte")
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidField(errno.ENAMETOOLONG, "path: too long")
    return value


def _int(value: object, hi: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= hi:
        raise InvalidField(errno.EINVAL, what)
    return value


def _data(value: object, limit: int = MAX_DATA_BYTES) -> bytes:
    if type(value) is not bytes:
        raise InvalidField(errno.EINVAL, "data")
    if len(value) > limit:
        raise InvalidField(errno.EFBIG, "data: too large")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise InvalidField(errno.EINVAL, "flag")
    return value


def op_errno(op: FsOp) -> int:
    """0 when every member would accept `op` on the wire, else the errno for the local caller:
    the receivers' own decoder, run by the proposer before anything is sent."""
    try:
        decode_op(encode_op(op))
    except InvalidField as exc:
        return exc.errno
    except ProtocolError:
        return errno.EINVAL
    return 0


def decode_op(value: object) -> FsOp:
    """The operation encoded by `encode_op`; `ProtocolError` for anything else."""
    if type(value) is not list or not value:
        raise ProtocolError("bad operation")
    tag, *f = value
    arity = {1: 3, 2: 4, 3: 4, 4: 3, 5: 2, 6: 1, 7: 1, 8: 3, 9: 2, 10: 1, 11: 2}
    if type(tag) is not int or arity.get(tag) != len(f):
        raise ProtocolError("bad operation tag or arity")
    mtime = _int(f[-1], MAX_MTIME, "mtime") if tag in (5, 8, 9) else 0
    match tag:
        case 1:
            return CreateFile(_path(f[0]), _int(f[1], MAX_MTIME, "mtime"), _bool(f[2]))
        case 2:
            return WriteFile(_path(f[0]), _data(f[1]), _int(f[2], MAX_MTIME, "mtime"),
                             _bool(f[3]))
        case 3:
            return WriteRange(_path(f[0]), _int(f[1], MAX_OFFSET, "offset"), _data(f[2]),
                              _int(f[3], MAX_MTIME, "mtime"))
        case 4:
            return Truncate(_path(f[0]), _int(f[1], MAX_OFFSET, "size"),
                            _int(f[2], MAX_MTIME, "mtime"))
        case 5:
            return Mkdir(_path(f[0]), mtime)
        case 6:
            return Rmdir(_path(f[0]))
        case 7:
            return Unlink(_path(f[0]))
        case 8:
            return Rename(_path(f[0]), _path(f[1]), mtime)
        case 9:
            return SetMtime(_path(f[0]), mtime)
        case 10:
            return UnlockRequest(_path(f[0]))
        case _:
            return Unlock(_path(f[0]), _data(f[1], 64))
