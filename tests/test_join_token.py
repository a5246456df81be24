"""pmxfs.core.join_token and pmxfs.core.join_limit: token text round trips, every garbage input
refused with TokenError (and never another exception), stored records, TTL and address parsing,
and the failure limiter's windows and memory bound."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmxfs.core.errors import LocalError
from pmxfs.core.join_limit import FailureLimiter
from pmxfs.core.join_token import (
    JOIN_PORT,
    MAX_TTL_S,
    MIN_TTL_S,
    TOKEN_DIR,
    JoinToken,
    TokenError,
    TokenRecord,
    decode_record,
    decode_token,
    encode_record,
    encode_token,
    format_host_port,
    new_token,
    parse_host_port,
    parse_ttl,
    token_path,
    used_path,
)

FINGERPRINT = "ab" * 32
SHELL_SAFE = re.compile(r"pmxfs-join-1:[A-Za-z0-9_-]+")

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
host_names = st.builds(lambda labels, last: ".".join([*labels, last]),
                       st.lists(_label, max_size=3),
                       st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True))
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), host_names)
ports = st.integers(1, 65535)
fingerprints = st.binary(min_size=32, max_size=32).map(bytes.hex)
tokens = st.builds(JoinToken, hosts, ports, fingerprints, st.binary(min_size=32, max_size=32))


def _token_text(payload: bytes) -> str:
    """A format-1 token text around `payload`, with a matching check."""
    body = payload + hashlib.sha256(payload).digest()[:4]
    return "pmxfs-join-1:" + base64.urlsafe_b64encode(body).decode().rstrip("=")


def _decodes_or_refuses(text: str) -> JoinToken | None:
    """The token of `text`, or None when decode_token refuses it with a one-line TokenError."""
    try:
        return decode_token(text)
    except TokenError as exc:
        refusal = str(exc)
    assert refusal
    assert "\n" not in refusal
    return None


# --------------------------------------------------------------------------------------------
# Token text


@settings(max_examples=300)
@given(tokens)
def test_a_token_survives_its_text(token: JoinToken) -> None:
    text = encode_token(token)
    assert SHELL_SAFE.fullmatch(text), text
    assert decode_token(text) == token


@given(tokens, st.sampled_from(["", " ", "\n", "\t ", "\r\n"]),
       st.sampled_from(["", " ", "\n", " \n"]))
def test_decoding_ignores_surrounding_whitespace(token: JoinToken, before: str,
                                                 after: str) -> None:
    assert decode_token(before + encode_token(token) + after) == token


def test_new_tokens_have_fresh_secrets_and_keep_them_out_of_repr() -> None:
    first = new_token("10.0.0.1", JOIN_PORT, FINGERPRINT)
    second = new_token("10.0.0.1", JOIN_PORT, FINGERPRINT)
    assert len(first.secret) == 32
    assert first.secret != second.secret
    assert (first.host, first.port, first.fingerprint) == ("10.0.0.1", JOIN_PORT, FINGERPRINT)
    assert first.secret.hex() not in repr(first)
    assert repr(first.secret) not in repr(first)


@pytest.mark.parametrize(("host", "port", "fingerprint"), [
    ("", JOIN_PORT, FINGERPRINT),
    ("[fd00::1]", JOIN_PORT, FINGERPRINT),
    ("bad host", JOIN_PORT, FINGERPRINT),
    ("10.0.0.256", JOIN_PORT, FINGERPRINT),
    ("10.0.0.1", 0, FINGERPRINT),
    ("10.0.0.1", 65536, FINGERPRINT),
    ("10.0.0.1", JOIN_PORT, "AB" * 32),
    ("10.0.0.1", JOIN_PORT, "ab" * 31),
    ("10.0.0.1", JOIN_PORT, "zz" * 32),
])
def test_new_token_refuses_what_a_token_cannot_carry(host: str, port: int,
                                                     fingerprint: str) -> None:
    with pytest.raises(TokenError):
        new_token(host, port, fingerprint)


def test_encode_refuses_a_short_secret() -> None:
    with pytest.raises(TokenError, match="secret"):
        encode_token(JoinToken("10.0.0.1", JOIN_PORT, FINGERPRINT, b"x" * 31))


def test_token_error_is_a_local_error() -> None:
    assert issubclass(TokenError, LocalError)


@pytest.mark.parametrize(("text", "reason"), [
    ("", "not a pmxfs join token"),
    ("hello", "not a pmxfs join token"),
    ("pmxfs-join-:abc", "not a pmxfs join token"),
    ("pmxfs-join-1", "not a pmxfs join token"),
    ("pmxfs-join-2:AAAA", "format 2 is not supported"),
    ("pmxfs-join-17:AAAA", "format 17 is not supported"),
    ("pmxfs-join-1:", "damaged"),
    ("pmxfs-join-1:AAAA", "damaged"),
    ("pmxfs-join-1:AA AA", "damaged"),
    ("pmxfs-join-1:AA=A", "damaged"),
    ("pmxfs-join-1:A", "damaged"),
    ("pmxfs-join-1:" + "A" * 5000, "not a pmxfs join token"),
])
def test_garbage_is_not_a_token(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        decode_token(text)


def test_a_token_of_a_later_format_is_refused_with_a_clear_message() -> None:
    later = encode_token(new_token("10.0.0.1", JOIN_PORT, FINGERPRINT)).replace(
        "pmxfs-join-1:", "pmxfs-join-2:")
    with pytest.raises(TokenError, match=r"format 2 is not supported.*reads format 1"):
        decode_token(later)


@settings(max_examples=500)
@given(st.text())
def test_any_text_is_refused_with_token_error_only(text: str) -> None:
    _decodes_or_refuses(text)
    _decodes_or_refuses("pmxfs-join-1:" + text)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_any_payload_with_a_valid_check_decodes_or_is_refused(payload: bytes) -> None:
    token = _decodes_or_refuses(_token_text(payload))
    if token is not None:
        assert encode_token(token) == _token_text(payload)


def test_a_payload_with_a_non_ascii_host_is_refused() -> None:
    payload = bytes(32) + bytes.fromhex(FINGERPRINT) + (5406).to_bytes(2, "big") + "nœud".encode()
    with pytest.raises(TokenError, match="ASCII"):
        decode_token(_token_text(payload))


@settings(max_examples=300)
@given(tokens, st.data())
def test_a_damaged_token_is_refused_or_unchanged(token: JoinToken, data: st.DataObject) -> None:
    text = encode_token(token)
    position = data.draw(st.integers(len("pmxfs-join-1:"), len(text) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_Zz09"))
    damaged = text[:position] + replacement + text[position + 1:]
    assert _decodes_or_refuses(damaged) in (None, token)


@settings(max_examples=200)
@given(tokens, st.data())
def test_a_truncated_token_is_refused(token: JoinToken, data: st.DataObject) -> None:
    text = encode_token(token)
    cut = data.draw(st.integers(0, len(text) - 1))
    with pytest.raises(TokenError):
        decode_token(text[:cut])


def test_tree_paths_hold_a_hash_of_the_secret_not_the_secret() -> None:
    secret = bytes(range(32))
    digest = hashlib.sha256(secret).hexdigest()
    assert token_path(secret) == f"{TOKEN_DIR}/{digest}" == f"priv/join-tokens/{digest}"
    assert used_path(secret) == f"priv/join-tokens/{digest}.used"
    assert secret.hex() not in token_path(secret)
    assert token_path(bytes(32)) != token_path(secret)


# --------------------------------------------------------------------------------------------
# Records


@given(st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=40))
def test_a_record_survives_its_bytes(expires: int, created_by: str) -> None:
    record = TokenRecord(expires, created_by)
    data = encode_record(record)
    assert len(data) < 300
    assert decode_record(data) == record


def test_a_record_ignores_unknown_keys() -> None:
    assert (decode_record(b'{"expires": 5, "created_by": "pve1", "added_later": [1]}')
            == TokenRecord(5, "pve1"))


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"null", b"[]", b'"x"', b"{}", b"{",
    b'{"created_by": "pve1"}',
    b'{"expires": 5}',
    b'{"expires": "5", "created_by": "pve1"}',
    b'{"expires": true, "created_by": "pve1"}',
    b'{"expires": 5.5, "created_by": "pve1"}',
    b'{"expires": -1, "created_by": "pve1"}',
    b'{"expires": 9223372036854775808, "created_by": "pve1"}',
    b'{"expires": 5, "created_by": ""}',
    b'{"expires": 5, "created_by": 7}',
    b'{"expires": ' + b"9" * 5000 + b', "created_by": "pve1"}',
    b"[" * 100_000,
])
def test_a_bad_record_is_refused(data: bytes) -> None:
    with pytest.raises(TokenError, match="bad join token record"):
        decode_record(data)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_record_bytes_decode_or_are_refused_with_token_error(data: bytes) -> None:
    with contextlib.suppress(TokenError):
        decode_record(data)


# --------------------------------------------------------------------------------------------
# TTL


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400), ("600", 600),
    ("10", MIN_TTL_S), ("10s", MIN_TTL_S), ("7d", MAX_TTL_S), ("168h", MAX_TTL_S),
    ("604800", MAX_TTL_S), (" 15m\n", 900), ("0015m", 900),
])
def test_parse_ttl_reads_units(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(("text", "reason"), [
    ("9", "too short: at least 10s"), ("9s", "too short"), ("0", "too short"),
    ("0d", "too short"), ("00000000000000000000000000009s", "too short"),
    ("8d", "too long: at most 7d"), ("604801", "too long"), ("169h", "too long"),
    ("9" * 5000, "too long"), ("9" * 13 + "s", "too long"),
    ("", "bad TTL"), ("s", "bad TTL"), ("1.5h", "bad TTL"), ("-5m", "bad TTL"),
    ("+5m", "bad TTL"), ("15M", "bad TTL"), ("15 m", "bad TTL"), ("1w", "bad TTL"),
    ("5m5s", "bad TTL"), ("1_000", "bad TTL"), ("\u0661\u0665", "bad TTL"),
])
def test_parse_ttl_refuses(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason) as caught:
        parse_ttl(text)
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200


@given(st.text(max_size=30))
def test_parse_ttl_gives_a_bounded_number_or_token_error(text: str) -> None:
    try:
        seconds = parse_ttl(text)
    except TokenError:
        return
    assert MIN_TTL_S <= seconds <= MAX_TTL_S


# --------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1", ("10.0.0.1", JOIN_PORT)),
    ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ("pve1", ("pve1", JOIN_PORT)),
    ("pve1.example.com:1", ("pve1.example.com", 1)),
    ("node-2:65535", ("node-2", 65535)),
    ("[fd00::1]", ("fd00::1", JOIN_PORT)),
    ("[fd00::1]:7000", ("fd00::1", 7000)),
    ("fd00::1", ("fd00::1", JOIN_PORT)),
    ("::1", ("::1", JOIN_PORT)),
    ("::ffff:10.0.0.1", ("::ffff:10.0.0.1", JOIN_PORT)),
    ("[fe80::1%eth0]:7000", ("fe80::1%eth0", 7000)),
    ("fe80::1%eth0", ("fe80::1%eth0", JOIN_PORT)),
    ("  pve1:7000\n", ("pve1", 7000)),
])
def test_parse_host_port_reads(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, JOIN_PORT) == expected


@pytest.mark.parametrize("text", [
    "", " ", ":5406", "[fd00::1", "[10.0.0.1]", "[pve1]:5406", "[fd00::1]x", "[fd00::1]:",
    "[fd00::1]:5406:1", "[]", "pve1:", "pve1:0", "pve1:65536", "pve1:abc", "pve1:+1",
    "pve1:-1", "pve1: 1", "pve1:123456", "fd00::1:99999", "fd00:::1", "10.0.0.256",
    "256.0.0.1", "1.2.3", "12", "-pve1", "pve1-", "a..b", ".pve1", "pve_1", "pve 1", "nœud",
    "x" * 254, "a" * 64 + ".example", "[fe80::1%eth 0]", "[fe80::1%]",
])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(TokenError, match="bad address") as caught:
        parse_host_port(text, JOIN_PORT)
    assert "\n" not in str(caught.value)


@given(hosts, ports, st.integers(1, 65535))
def test_format_host_port_is_read_back(host: str, port: int, default_port: int) -> None:
    text = format_host_port(host, port)
    assert text.startswith("[") == (":" in host)
    assert parse_host_port(text, default_port) == (host, port)


@settings(max_examples=500)
@given(st.text(max_size=60))
def test_parse_host_port_gives_a_usable_address_or_token_error(text: str) -> None:
    try:
        host, port = parse_host_port(text, JOIN_PORT)
    except TokenError:
        return
    assert 1 <= port <= 65535
    assert encode_token(JoinToken(host, port, FINGERPRINT, bytes(32)))


# --------------------------------------------------------------------------------------------
# Failure limiter


def test_a_source_is_refused_after_its_failures_until_the_first_ages_out() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60.0, max_total=100)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after(t, "10.0.0.9") is None
        limiter.failed(t, "10.0.0.9")
    assert limiter.retry_after(25.0, "10.0.0.9") == pytest.approx(35.0)
    assert limiter.retry_after(25.0, "10.0.0.8") is None
    assert limiter.retry_after(59.9, "10.0.0.9") == pytest.approx(0.1)
    assert limiter.retry_after(60.0, "10.0.0.9") is None
    limiter.failed(60.0, "10.0.0.9")
    assert limiter.retry_after(61.0, "10.0.0.9") == pytest.approx(9.0)


def test_all_sources_together_are_refused_past_the_total() -> None:
    limiter = FailureLimiter(max_failures=5, window_s=60.0, max_total=4)
    for i in range(4):
        assert limiter.retry_after(float(i), f"10.0.1.{i}") is None
        limiter.failed(float(i), f"10.0.1.{i}")
    assert limiter.retry_after(10.0, "10.0.2.1") == pytest.approx(50.0)
    assert limiter.retry_after(10.0, "10.0.1.3") == pytest.approx(50.0)
    assert limiter.retry_after(60.0, "10.0.2.1") is None


def test_the_longer_of_both_waits_is_given() -> None:
    limiter = FailureLimiter(max_failures=2, window_s=60.0, max_total=3)
    for t, source in ((0.0, "b"), (10.0, "b"), (20.0, "a"), (30.0, "c")):
        limiter.failed(t, source)
    # b's own limit lifts at 60, the total's (its 3 newest: 10, 20, 30) at 70
    assert limiter.retry_after(45.0, "b") == pytest.approx(25.0)
    assert limiter.retry_after(45.0, "d") == pytest.approx(25.0)
    limiter = FailureLimiter(max_failures=2, window_s=60.0, max_total=3)
    for t, source in ((0.0, "a"), (30.0, "b"), (40.0, "b")):
        limiter.failed(t, source)
    # the total lifts at 60, b's own limit at 90
    assert limiter.retry_after(45.0, "b") == pytest.approx(45.0)
    assert limiter.retry_after(45.0, "a") == pytest.approx(15.0)
    assert limiter.retry_after(61.0, "a") is None


def test_a_clock_that_went_back_never_gives_more_than_a_window() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=60.0)
    limiter.failed(1000.0, "a")
    wait = limiter.retry_after(10.0, "a")
    assert wait is not None
    assert 0 < wait <= 60.0


def test_a_flood_of_sources_keeps_memory_bounded() -> None:
    limiter = FailureLimiter(max_failures=5, window_s=60.0, max_total=30, max_sources=100)
    for i in range(10_000):
        limiter.failed(i * 0.001, f"source-{i}")
        assert limiter.tracked_sources() <= 100
    assert limiter.retry_after(10.0, "anyone") is not None  # the total still counts
    limiter.failed(200.0, "late")
    assert limiter.tracked_sources() == 1  # everything else aged out


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.sampled_from("abcd"),
                          st.booleans()), max_size=60))
def test_the_limiter_matches_counting_every_failure(
        steps: list[tuple[float, str, bool]]) -> None:
    """retry_after is None exactly when fewer than the limits of failures are in the window,
    counted the slow way from the full history of failures."""
    limiter = FailureLimiter(max_failures=3, window_s=10.0, max_total=5)
    now = 0.0
    history: list[tuple[float, str]] = []
    for step, source, fails in steps:
        now += step
        in_window = [s for t, s in history if t > now - 10.0]
        allowed = len(in_window) < 5 and in_window.count(source) < 3
        wait = limiter.retry_after(now, source)
        assert (wait is None) == allowed
        assert wait is None or 0 < wait <= 10.0
        if fails:
            limiter.failed(now, source)
            history.append((now, source))
