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

The prefix names the format version, so a token of a later format is refused with a message
saying so rather than as garbage. The alphabet of base64url (letters, digits, "-" and "_") and
the prefix need no quoting in a shell. The payload of format 1:

    offset  size  field
    0       32    secret
    32      32    certificate fingerprint (the raw SHA-256 digest)
    64      2     port, big-endian
    66      n     host: an IPv4 or IPv6 literal (no brackets) or a host name, ASCII
    66+n    4     check: the first 4 bytes of SHA-256 over the 66+n bytes before it

The check catches a token damaged when it was copied (a truncated paste shortens the host, which
the layout alone could not notice); it is no authentication, the TLS fingerprint and the secret
are. `JoinToken.__repr__` leaves the secret out, so logging a token does not leak it.

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

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import secrets
import struct
from dataclasses import dataclass, field

from pmxfs.core.errors import LocalError

JOIN_PORT = 5406
DEFAULT_TTL_S = 900
MIN_TTL_S = 10
MAX_TTL_S = 7 * 86400
TOKEN_DIR = "priv/join-tokens"

FORMAT_VERSION = 1
PREFIX = "pmxfs-join-"
SECRET_BYTES = 32
FINGERPRINT_HEX_CHARS = 64
MAX_HOST_CHARS = 253  # the longest DNS name; IPv6 literals with a zone fit as well
CHECK_BYTES = 4
MAX_TOKEN_CHARS = 1024  # far above any valid token; longer text is refused before decoding

_FIXED = struct.Struct(f">{SECRET_BYTES}s32sH")  # secret, raw fingerprint, port
_TOKEN_TEXT = re.compile(r"pmxfs-join-([0-9]+):(.*)", re.DOTALL)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ZONE = re.compile(r"[A-Za-z0-9_.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_TTL = re.compile(r"([0-9]+)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class TokenError(LocalError):
    """A join token, token record, TTL or address that cannot be used; str() is one line."""


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
    _check_token(token)
    return token


def encode_token(token: JoinToken) -> str:
    """The one-line text of `token` (see the module header)."""
    _check_token(token)
    body = _FIXED.pack(token.secret, bytes.fromhex(token.fingerprint), token.port)
    body += token.host.encode("ascii")
    body += _check(body)
    return f"{PREFIX}{FORMAT_VERSION}:{base64.urlsafe_b64encode(body).decode().rstrip('=')}"


def decode_token(text: str) -> JoinToken:
    """The token `text` carries (surrounding whitespace ignored); TokenError, and only that, for
    anything else."""
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError("not a pmxfs join token (far too long)")
    match = _TOKEN_TEXT.fullmatch(text)
    if match is None:
        raise TokenError("not a pmxfs join token (it should start with "
                         f"{PREFIX}{FORMAT_VERSION}:)")
    version, encoded = match.groups()
    if version != str(FORMAT_VERSION):
        raise TokenError(f"join token format {version[:8]} is not supported by this pmxfs (it "
                         f"reads format {FORMAT_VERSION}); make the token with a pmxfs of the "
                         "same version as this one")
    body = _unbase64url(encoded)
    if len(body) < _FIXED.size + 1 + CHECK_BYTES:
        raise TokenError("damaged join token (too short): copy it again")
    payload, check = body[:-CHECK_BYTES], body[-CHECK_BYTES:]
    if _check(payload) != check:
        raise TokenError("damaged join token (its check does not match): copy it again")
    secret, raw_fingerprint, port = _FIXED.unpack_from(payload)
    try:
        host = payload[_FIXED.size:].decode("ascii")
    except UnicodeDecodeError:
        raise TokenError("bad join token: its host is not ASCII") from None
    token = JoinToken(host, port, raw_fingerprint.hex(), secret)
    _check_token(token)
    return token


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
        if not _is_ipv6(host):
            raise TokenError(f"bad address {shown}: brackets hold an IPv6 address")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise TokenError(f"bad address {shown}: expected ':PORT' after ']'")
        return host, _parse_port(rest[1:], shown)
    colons = text.count(":")
    if colons > 1:
        if not _is_ipv6(text):
            raise TokenError(f"bad address {shown}: not an IPv6 address (an IPv6 address with "
                             "a port needs brackets, e.g. [fd00::1]:5406)")
        return text, default_port
    host, colon, port_text = text.partition(":")
    if not host:
        raise TokenError(f"bad address {shown}: no host")
    reason = _host_problem(host)
    if reason is not None:
        raise TokenError(f"bad address {shown}: {reason}")
    return host, _parse_port(port_text, shown) if colon else default_port


def format_host_port(host: str, port: int) -> str:
    """"host:port", with the host in brackets when it is an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_token(token: JoinToken) -> None:
    reason = _host_problem(token.host)
    if reason is not None:
        raise TokenError(f"bad join host {token.host[:300]!r}: {reason}")
    if not 1 <= token.port <= 65535:
        raise TokenError(f"bad join port {token.port}: not in 1..65535")
    if _FINGERPRINT.fullmatch(token.fingerprint) is None:
        raise TokenError(f"bad certificate fingerprint {token.fingerprint[:100]!r}: expected 64 "
                         "lowercase hex digits")
    if len(token.secret) != SECRET_BYTES:
        raise TokenError(f"bad join secret: {len(token.secret)} bytes, not {SECRET_BYTES}")


def _host_problem(host: str) -> str | None:
    """Why `host` is no IP literal or host name, or None when it is one."""
    if not host:
        return "empty host"
    if len(host) > MAX_HOST_CHARS:
        return f"longer than {MAX_HOST_CHARS} characters"
    if ":" in host:
        return None if _is_ipv6(host) else "not an IPv6 address"
    if _HOST_NAME.fullmatch(host) is None:
        return "not an IP address or host name"
    if host.rpartition(".")[2].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address (and a host name does not end in a number)"
    return None


def _is_ipv6(text: str) -> bool:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return address.scope_id is None or _ZONE.fullmatch(address.scope_id) is not None


def _parse_port(text: str, shown: str) -> int:
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise TokenError(f"bad address {shown}: port {text[:20]!r} is not a number in 1..65535")
    return int(text)


def _unbase64url(encoded: str) -> bytes:
    if _BASE64URL.fullmatch(encoded) is None:
        raise TokenError("damaged join token: characters other than letters, digits, '-' and "
                         "'_' after the prefix: copy it again")
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except binascii.Error:
        raise TokenError("damaged join token (cut short): copy it again") from None


def _check(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:CHECK_BYTES]
