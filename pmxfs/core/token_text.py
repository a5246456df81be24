"""The one-line text of pmxfs's tokens (join tokens and qnetd enrollment tokens) -- pure.

Both kinds of token carry the same four things -- where to connect (host and TCP port), the
SHA-256 fingerprint of a certificate to pin, and a 32-byte secret -- and share one text format;
only the prefix tells them apart (`TokenFormat`: `pmxfs-join-` in core/join_token.py,
`pmxfs-qnetd-` in core/qnetd_token.py), so a token pasted into the wrong command is refused as
"not a pmxfs qnetd token" rather than tried.

    <prefix><version>:<base64url without padding of the payload>

The payload of format 1:

    offset  size  field
    0       32    secret
    32      32    certificate fingerprint (the raw SHA-256 digest)
    64      2     port, big-endian
    66      n     host: an IPv4 or IPv6 literal (no brackets) or a host name, ASCII
    66+n    4     check: the first 4 bytes of SHA-256 over the 66+n bytes before it

The prefix names the format version, so a token of a later format is refused with a message
saying so rather than as garbage. The alphabet of base64url (letters, digits, "-" and "_") and
the prefix need no quoting in a shell. The check catches a token damaged when it was copied (a
truncated paste shortens the host, which the layout alone could not notice); it is no
authentication, the TLS fingerprint and the secret are. `TokenFields.__repr__` leaves the secret
out.

Every refusal is a `TokenError` whose text is one line for the admin, naming the kind of token
(`TokenFormat.role`: "join", "qnetd").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import struct
from dataclasses import dataclass, field

from pmxfs.core.errors import LocalError

SECRET_BYTES = 32
MAX_HOST_CHARS = 253  # the longest DNS name; IPv6 literals with a zone fit as well
CHECK_BYTES = 4
MAX_TOKEN_CHARS = 1024  # far above any valid token; longer text is refused before decoding

_FIXED = struct.Struct(f">{SECRET_BYTES}s32sH")  # secret, raw fingerprint, port
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ZONE = re.compile(r"[A-Za-z0-9_.-]+")


class TokenError(LocalError):
    """A token, token record, TTL or address that cannot be used; str() is one line."""


@dataclass(frozen=True)
class TokenFields:
    """What a token carries, whatever its kind."""

    host: str  # IPv4/IPv6 literal or host name, no brackets
    port: int
    fingerprint: str  # lowercase hex SHA-256 of the DER certificate (64 chars)
    secret: bytes = field(repr=False)  # SECRET_BYTES random bytes


@dataclass(frozen=True)
class TokenFormat:
    """One kind of token: its prefix, format version and the word for it in messages."""

    prefix: str  # e.g. "pmxfs-join-"
    version: int
    role: str  # e.g. "join": "join token", "bad join host ..."

    def encode(self, fields: TokenFields) -> str:
        """The one-line text of `fields`; TokenError when one of them is bad."""
        self.check(fields)
        body = _FIXED.pack(fields.secret, bytes.fromhex(fields.fingerprint), fields.port)
        body += fields.host.encode("ascii")
        body += _check(body)
        return f"{self.prefix}{self.version}:{base64.urlsafe_b64encode(body).decode().rstrip('=')}"

    def decode(self, text: str) -> TokenFields:
        """The fields `text` carries (surrounding whitespace ignored); TokenError, and only
        that, for anything else."""
        what = f"{self.role} token"
        text = text.strip()
        if len(text) > MAX_TOKEN_CHARS:
            raise TokenError(f"not a pmxfs {what} (far too long)")
        match = re.fullmatch(rf"{re.escape(self.prefix)}([0-9]+):(.*)", text, re.DOTALL)
        if match is None:
            raise TokenError(f"not a pmxfs {what} (it should start with "
                             f"{self.prefix}{self.version}:)")
        version, encoded = match.groups()
        if version != str(self.version):
            raise TokenError(f"{what} format {version[:8]} is not supported by this pmxfs (it "
                             f"reads format {self.version}); make the token with a pmxfs of the "
                             "same version as this one")
        body = self._unbase64url(encoded)
        if len(body) < _FIXED.size + 1 + CHECK_BYTES:
            raise TokenError(f"damaged {what} (too short): copy it again")
        payload, check = body[:-CHECK_BYTES], body[-CHECK_BYTES:]
        if _check(payload) != check:
            raise TokenError(f"damaged {what} (its check does not match): copy it again")
        secret, raw_fingerprint, port = _FIXED.unpack_from(payload)
        try:
            host = payload[_FIXED.size:].decode("ascii")
        except UnicodeDecodeError:
            raise TokenError(f"bad {what}: its host is not ASCII") from None
        fields = TokenFields(host, port, raw_fingerprint.hex(), secret)
        self.check(fields)
        return fields

    def check(self, fields: TokenFields) -> None:
        """TokenError when host, port, fingerprint or secret of `fields` is bad."""
        reason = host_problem(fields.host)
        if reason is not None:
            raise TokenError(f"bad {self.role} host {fields.host[:300]!r}: {reason}")
        if not 1 <= fields.port <= 65535:
            raise TokenError(f"bad {self.role} port {fields.port}: not in 1..65535")
        if _FINGERPRINT.fullmatch(fields.fingerprint) is None:
            raise TokenError(f"bad certificate fingerprint {fields.fingerprint[:100]!r}: "
                             "expected 64 lowercase hex digits")
        if len(fields.secret) != SECRET_BYTES:
            raise TokenError(f"bad {self.role} secret: {len(fields.secret)} bytes, not "
                             f"{SECRET_BYTES}")

    def _unbase64url(self, encoded: str) -> bytes:
        if _BASE64URL.fullmatch(encoded) is None:
            raise TokenError(f"damaged {self.role} token: characters other than letters, "
                             "digits, '-' and '_' after the prefix: copy it again")
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except binascii.Error:
            raise TokenError(f"damaged {self.role} token (cut short): copy it again") from None


def host_problem(host: str) -> str | None:
    """Why `host` is no IP literal or host name, or None when it is one."""
    if not host:
        return "empty host"
    if len(host) > MAX_HOST_CHARS:
        return f"longer than {MAX_HOST_CHARS} characters"
    if ":" in host:
        return None if is_ipv6(host) else "not an IPv6 address"
    if _HOST_NAME.fullmatch(host) is None:
        return "not an IP address or host name"
    if host.rpartition(".")[2].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address (and a host name does not end in a number)"
    return None


def is_ipv6(text: str) -> bool:
    """Whether `text` is an IPv6 literal (a zone, if any, of safe characters)."""
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return address.scope_id is None or _ZONE.fullmatch(address.scope_id) is not None


def _check(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:CHECK_BYTES]
