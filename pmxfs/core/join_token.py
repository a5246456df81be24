"""Join tokens: what `pmxfs join-token` prints and `pmxfs add HOST --token TOKEN` reads -- pure.

What a token carries
--------------------
A token lets one new node into the cluster once, without SSH. It names where to ask (the join
address and TCP port of a member, `JOIN_PORT` by default), how to recognise the member (the
SHA-256 fingerprint of the cluster's join TLS certificate: the joiner pins it and sends nothing
to a server presenting another one) and a 32-byte random secret (the proof that the admin of a
quorate member let this node in).

Text format
-----------
    pmxfs-join-1:<base64url without padding of the payload>

The payload (secret, certificate fingerprint, port, host, a check against damage in copying) and
its codec are shared with qnetd's enrollment tokens: core/token_text.py describes them.
`JoinToken.__repr__` leaves the secret out, so logging a token does not leak it.

What the cluster stores
-----------------------
Only a hash: `token_path(secret)`, `TOKEN_DIR/<hex SHA-256 of the secret>`, holds a small JSON
`TokenRecord` (expiry in unix seconds, the node that made it). The tree is replicated, so every
member can check a token; a reader of the tree learns no secret. `used_path(secret)` marks a
token spent: the member serving a join creates it through the ring, and the total order makes
exactly one of two concurrent uses win. Unknown keys of a record are ignored, so a later version
may add some without older members refusing its tokens.

Parsing admin input
-------------------
`parse_ttl` reads a lifetime ("30s", "15m", "2h", "1d" or plain seconds) within
[`MIN_TTL_S`, `MAX_TTL_S`]; `parse_host_port` reads "ADDR", "ADDR:PORT", "[v6]", "[v6]:PORT" or
a bare IPv6 literal (which then has no port); `format_host_port` writes what it reads. Every
refusal is a `TokenError` whose text is one line for the admin.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field

from pmxfs.core.token_text import SECRET_BYTES, TokenFields, TokenFormat, host_problem, is_ipv6
from pmxfs.core.token_text import TokenError as TokenError  # re-exported: join's callers use it

JOIN_PORT = 5406
DEFAULT_TTL_S = 900
MIN_TTL_S = 10
MAX_TTL_S = 7 * 86400
TOKEN_DIR = "priv/join-tokens"

FORMAT_VERSION = 1
PREFIX = "pmxfs-join-"
FORMAT = TokenFormat(PREFIX, FORMAT_VERSION, "join")
FINGERPRINT_HEX_CHARS = 64

_PORT = re.compile(r"[0-9]{1,5}")
_TTL = re.compile(r"([0-9]+)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class JoinToken:
    """What a join token carries. Built by `new_token` or `decode_token`, which check it."""

    host: str  # IPv4/IPv6 literal or host name, no brackets
    port: int
    fingerprint: str  # lowercase hex SHA-256 of the DER certificate (64 chars)
    secret: bytes = field(repr=False)  # 32 random bytes


@dataclass(frozen=True)
class TokenRecord:
    """What the tree holds for a token, at `token_path(secret)`."""

    expires: int  # unix seconds
    created_by: str  # node name


def new_token(host: str, port: int, fingerprint: str) -> JoinToken:
    """A token with a fresh random secret; TokenError when host, port or fingerprint is bad."""
    token = JoinToken(host, port, fingerprint, secrets.token_bytes(SECRET_BYTES))
    FORMAT.check(_fields(token))
    return token


def encode_token(token: JoinToken) -> str:
    """The one-line text of `token` (see the module header)."""
    return FORMAT.encode(_fields(token))


def decode_token(text: str) -> JoinToken:
    """The token `text` carries (surrounding whitespace ignored); TokenError, and only that, for
    anything else."""
    fields = FORMAT.decode(text)
    return JoinToken(fields.host, fields.port, fields.fingerprint, fields.secret)


def token_path(secret: bytes) -> str:
    """Where the tree keeps the record of the token with `secret`."""
    return f"{TOKEN_DIR}/{hashlib.sha256(secret).hexdigest()}"


def used_path(secret: bytes) -> str:
    """The tree file whose existence marks the token with `secret` spent."""
    return token_path(secret) + ".used"


def encode_record(record: TokenRecord) -> bytes:
    """The bytes of the tree file for `record`: compact JSON."""
    return json.dumps({"expires": record.expires, "created_by": record.created_by},
                      sort_keys=True, separators=(",", ":")).encode()


def decode_record(data: bytes) -> TokenRecord:
    """The record the tree file `data` holds; TokenError for anything else."""
    try:
        fields = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenError("bad join token record: not JSON") from None
    if not isinstance(fields, dict):
        raise TokenError("bad join token record: not a JSON object")
    expires, created_by = fields.get("expires"), fields.get("created_by")
    if not isinstance(expires, int) or isinstance(expires, bool) or not 0 <= expires < 2**63:
        raise TokenError("bad join token record: \"expires\" is not a unix time")
    if not isinstance(created_by, str) or not created_by:
        raise TokenError("bad join token record: \"created_by\" is not a node name")
    return TokenRecord(expires, created_by)


def parse_ttl(text: str) -> int:
    """Seconds from "30s", "15m", "2h", "1d" or "600", within [MIN_TTL_S, MAX_TTL_S]."""
    match = _TTL.fullmatch(text.strip())
    if match is None:
        raise TokenError(f"bad TTL {text!r}: expected seconds or a number with the unit s, m, h "
                         "or d, e.g. 15m")
    digits, unit = match.groups()
    digits = digits.lstrip("0") or "0"
    seconds = MAX_TTL_S + 1 if len(digits) > 12 else int(digits) * _TTL_UNITS[unit]
    shown = f"{digits[:20]}{unit}"
    if seconds < MIN_TTL_S:
        raise TokenError(f"TTL {shown} is too short: at least {MIN_TTL_S}s")
    if seconds > MAX_TTL_S:
        raise TokenError(f"TTL {shown} is too long: at most {MAX_TTL_S // 86400}d")
    return seconds


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """(host, port) from "ADDR", "ADDR:PORT", "[v6]", "[v6]:PORT" or a bare IPv6 literal; the
    port is `default_port` when the text has none."""
    text = text.strip()
    shown = repr(text[:300])
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise TokenError(f"bad address {shown}: no closing ']'")
        if not is_ipv6(host):
            raise TokenError(f"bad address {shown}: brackets hold an IPv6 address")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise TokenError(f"bad address {shown}: expected ':PORT' after ']'")
        return host, _parse_port(rest[1:], shown)
    colons = text.count(":")
    if colons > 1:
        if not is_ipv6(text):
            raise TokenError(f"bad address {shown}: not an IPv6 address (an IPv6 address with "
                             "a port needs brackets, e.g. [fd00::1]:5406)")
        return text, default_port
    host, colon, port_text = text.partition(":")
    if not host:
        raise TokenError(f"bad address {shown}: no host")
    reason = host_problem(host)
    if reason is not None:
        raise TokenError(f"bad address {shown}: {reason}")
    return host, _parse_port(port_text, shown) if colon else default_port


def format_host_port(host: str, port: int) -> str:
    """"host:port", with the host in brackets when it is an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fields(token: JoinToken) -> TokenFields:
    return TokenFields(token.host, token.port, token.fingerprint, token.secret)


def _parse_port(text: str, shown: str) -> int:
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise TokenError(f"bad address {shown}: port {text[:20]!r} is not a number in 1..65535")
    return int(text)
