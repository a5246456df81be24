"""qnetd enrollment tokens: what `pmxfs qnetd token` prints and `pmxfs qdevice setup` reads -- pure.

A token lets one cluster enroll with a qnetd once: it names where qnetd listens (host and TCP
port, `QNETD_PORT` 5403 by default), how to recognise it (the SHA-256 fingerprint of the DER of
qnetd's CA certificate: the client pins it and sends nothing to a server whose certificate does
not chain to that CA) and a 32-byte random secret (the proof that qnetd's admin let this cluster
in). Text:

    pmxfs-qnetd-1:<base64url without padding of the payload>

The payload and its codec are the join token's (core/token_text.py): only the prefix differs, so
a join token given to `qdevice setup` is refused as "not a pmxfs qnetd token", and vice versa.

What qnetd stores
-----------------
Only a hash: `record_name(secret)` is `<hex SHA-256 of the secret>.json` in qnetd's tokens
directory, holding `{"expires": <unix seconds>}` (`encode_record` / `decode_record`). Unknown
keys are ignored, so a later version may add some. How a token is made and spent (once, also
under concurrent use) is runtime/qnetd_pki.py's business.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field

from pmxfs.core.qdevice_wire import QNETD_PORT
from pmxfs.core.token_text import SECRET_BYTES, TokenFields, TokenFormat
from pmxfs.core.token_text import TokenError as TokenError  # re-exported for the callers

DEFAULT_TTL_S = 3600
FORMAT_VERSION = 1
PREFIX = "pmxfs-qnetd-"
FORMAT = TokenFormat(PREFIX, FORMAT_VERSION, "qnetd")
DEFAULT_PORT = QNETD_PORT


@dataclass(frozen=True)
class QnetdToken:
    """What a qnetd token carries. Built by `new_token` or `decode_token`, which check it."""

    host: str  # IPv4/IPv6 literal or host name, no brackets
    port: int
    fingerprint: str  # lowercase hex SHA-256 of the DER of qnetd's CA certificate (64 chars)
    secret: bytes = field(repr=False)  # 32 random bytes


def new_token(host: str, port: int, fingerprint: str) -> QnetdToken:
    """A token with a fresh random secret; TokenError when host, port or fingerprint is bad."""
    token = QnetdToken(host, port, fingerprint, secrets.token_bytes(SECRET_BYTES))
    FORMAT.check(_fields(token))
    return token


def encode_token(token: QnetdToken) -> str:
    """The one-line text of `token`."""
    return FORMAT.encode(_fields(token))


def decode_token(text: str) -> QnetdToken:
    """The token `text` carries (surrounding whitespace ignored); TokenError, and only that, for
    anything else."""
    fields = FORMAT.decode(text)
    return QnetdToken(fields.host, fields.port, fields.fingerprint, fields.secret)


def record_name(secret: bytes) -> str:
    """The file name under qnetd's tokens directory of the token with `secret`."""
    return f"{hashlib.sha256(secret).hexdigest()}.json"


def encode_record(expires: int) -> bytes:
    """The bytes of a token's record: compact JSON."""
    return json.dumps({"expires": expires}, separators=(",", ":")).encode()


def decode_record(data: bytes) -> int:
    """The expiry (unix seconds) a token record holds; TokenError for anything else."""
    try:
        fields = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenError("bad qnetd token record: not JSON") from None
    if not isinstance(fields, dict):
        raise TokenError("bad qnetd token record: not a JSON object")
    expires = fields.get("expires")
    if not isinstance(expires, int) or isinstance(expires, bool) or not 0 <= expires < 2**63:
        raise TokenError("bad qnetd token record: \"expires\" is not a unix time")
    return expires


def _fields(token: QnetdToken) -> TokenFields:
    return TokenFields(token.host, token.port, token.fingerprint, token.secret)
