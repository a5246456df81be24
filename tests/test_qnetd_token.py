"""pmxfs.core.qnetd_token (and the shared pmxfs.core.token_text): qnetd enrollment tokens round
trip, damaged or foreign text is refused with a one-line TokenError, records of the tokens
directory."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmxfs.core import join_token
from pmxfs.core.qnetd_token import (
    DEFAULT_PORT,
    QnetdToken,
    TokenError,
    decode_record,
    decode_token,
    encode_record,
    encode_token,
    new_token,
    record_name,
)

FINGERPRINT = "cd" * 32
SHELL_SAFE = re.compile(r"pmxfs-qnetd-1:[A-Za-z0-9_-]+")


@pytest.mark.parametrize("host", ["192.0.2.7", "fd00::5", "qnetd.example.org", "fe80::1%eth0"])
def test_round_trip(host: str) -> None:
    token = new_token(host, DEFAULT_PORT, FINGERPRINT)
    text = encode_token(token)
    assert SHELL_SAFE.fullmatch(text)
    assert decode_token(f"  {text}\n") == token
    assert token.secret.hex() not in repr(token)


def test_default_port_is_qnetds() -> None:
    assert DEFAULT_PORT == 5403


def test_same_payload_as_a_join_token_but_not_interchangeable() -> None:
    token = new_token("192.0.2.7", 5403, FINGERPRINT)
    text = encode_token(token)
    as_join = join_token.encode_token(join_token.JoinToken(token.host, token.port,
                                                           token.fingerprint, token.secret))
    assert text.partition(":")[2] == as_join.partition(":")[2]
    with pytest.raises(TokenError, match="not a pmxfs qnetd token"):
        decode_token(as_join)
    with pytest.raises(TokenError, match="not a pmxfs join token"):
        join_token.decode_token(text)


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda t: t[:-3], "damaged qnetd token"),
    (lambda t: t[:30] + ("A" if t[30] != "A" else "B") + t[31:], "damaged qnetd token"),
    (lambda t: t.replace("pmxfs-qnetd-1:", "pmxfs-qnetd-2:"), "format 2 is not supported"),
    (lambda t: t + "!", "characters other than"),
    (lambda t: "", "not a pmxfs qnetd token"),
    (lambda t: t * 20, "far too long"),
])
def test_damage_is_refused(mangle: object, reason: str) -> None:
    text = encode_token(new_token("192.0.2.7", 5403, FINGERPRINT))
    assert callable(mangle)
    with pytest.raises(TokenError, match=reason) as caught:
        decode_token(mangle(text))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("host", "port", "fingerprint", "reason"), [
    ("", 5403, FINGERPRINT, "bad qnetd host"),
    ("a b", 5403, FINGERPRINT, "bad qnetd host"),
    ("192.0.2.7", 0, FINGERPRINT, "bad qnetd port"),
    ("192.0.2.7", 5403, "AB" * 32, "fingerprint"),
])
def test_bad_fields_are_refused(host: str, port: int, fingerprint: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        new_token(host, port, fingerprint)


def test_bad_secret_is_refused() -> None:
    with pytest.raises(TokenError, match="secret"):
        encode_token(QnetdToken("192.0.2.7", 5403, FINGERPRINT, b"short"))


@given(st.text(max_size=200))
def test_garbage_only_ever_raises_token_error(text: str) -> None:
    outcome: object
    try:
        outcome = decode_token(text)
    except TokenError as exc:
        outcome = str(exc)
    assert not isinstance(outcome, str) or "\n" not in outcome


def test_records() -> None:
    secret = bytes(range(32))
    assert re.fullmatch(r"[0-9a-f]{64}\.json", record_name(secret))
    assert decode_record(encode_record(1_700_000_000)) == 1_700_000_000
    assert decode_record(b'{"expires": 5, "later": "ignored"}') == 5
    for bad in (b"", b"[]", b'{"expires": true}', b'{"expires": -1}', b"\xff"):
        with pytest.raises(TokenError, match="bad qnetd token record"):
            decode_record(bad)
