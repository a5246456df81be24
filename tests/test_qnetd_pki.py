"""pmxfs.runtime.qnetd_pki: the qnetd directory (init idempotent, modes, incomplete ones
refused), tokens spent once (also by concurrent uses) and expiring, CSR signing refused for
another cluster, and the TLS contexts."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pmxfs.core.qdevice_wire import Enroll, Enrolled, cluster_subject
from pmxfs.core.qnetd_token import record_name
from pmxfs.runtime.qnetd_pki import (
    CA_KEY,
    CA_PEM,
    SERVER_KEY,
    SERVER_PEM,
    TOKENS,
    EnrollRefused,
    PkiError,
    QnetdPki,
    ca_fingerprint,
    client_context,
    init,
    issue_token,
    load,
    make_csr,
)

NAME, ID = "alpha", "0123456789abcdef"


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    directory = tmp_path / "qnetd"
    init(directory)
    return directory


def enroll_request(secret: bytes, name: str = NAME, cluster_id: str = ID,
                   csr_name: str = NAME, csr_id: str = ID) -> Enroll:
    key = ec.generate_private_key(ec.SECP256R1())
    return Enroll(secret, name, cluster_id, make_csr(key, csr_name, csr_id))


def test_init_makes_everything_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "qnetd"
    assert sorted(init(directory)) == sorted([CA_PEM, CA_KEY, SERVER_PEM, SERVER_KEY])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / TOKENS).stat().st_mode) == 0o700
    for name in (CA_KEY, SERVER_KEY):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    pki = load(directory)
    server = x509.load_pem_x509_certificate(pki.server_pem)
    server.verify_directly_issued_by(pki.ca_cert)
    assert isinstance(pki.ca_cert.public_key(), ec.EllipticCurvePublicKey)


def test_init_is_idempotent(qdir: Path) -> None:
    before = {p.name: p.read_bytes() for p in qdir.iterdir() if p.is_file()}
    qdir.chmod(0o755)
    assert init(qdir) == []
    assert {p.name: p.read_bytes() for p in qdir.iterdir() if p.is_file()} == before
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700


def test_init_remakes_a_missing_server_certificate_with_the_same_ca(qdir: Path) -> None:
    ca = (qdir / CA_PEM).read_bytes()
    (qdir / SERVER_PEM).unlink()
    assert sorted(init(qdir)) == [SERVER_KEY, SERVER_PEM]
    assert (qdir / CA_PEM).read_bytes() == ca
    x509.load_pem_x509_certificate(load(qdir).server_pem).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca))


def test_a_ca_without_its_key_is_refused(qdir: Path) -> None:
    (qdir / CA_KEY).unlink()
    with pytest.raises(PkiError, match=r"has ca\.pem but no ca\.key"):
        init(qdir)
    with pytest.raises(PkiError, match="cannot read"):
        load(qdir)


def test_token_names_the_ca_and_is_stored_as_a_hash(qdir: Path) -> None:
    token = issue_token(qdir, "192.0.2.10", 5403, 3600, time.time())
    assert token.fingerprint == ca_fingerprint((qdir / CA_PEM).read_bytes())
    record = qdir / TOKENS / record_name(token.secret)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert token.secret not in record.read_bytes()
    assert token.secret.hex() not in record.read_bytes().decode()


def test_enroll_signs_a_client_certificate_and_spends_the_token(qdir: Path) -> None:
    pki = load(qdir)
    token = issue_token(qdir, "192.0.2.10", 5403, 3600, time.time())
    answer = pki.enroll(enroll_request(token.secret), time.time())
    assert isinstance(answer, Enrolled)
    assert answer.ca_pem == (qdir / CA_PEM).read_bytes()
    certificate = x509.load_pem_x509_certificate(answer.cert_pem)
    certificate.verify_directly_issued_by(pki.ca_cert)
    assert certificate.subject.rfc4514_string() == f"CN={cluster_subject(NAME, ID)}"
    assert list((qdir / TOKENS).iterdir()) == []
    with pytest.raises(EnrollRefused, match="unknown or already used"):
        pki.enroll(enroll_request(token.secret), time.time())


def race(pkis: list[QnetdPki], requests: list[Enroll]) -> list[str]:
    """Each pki enrolls its request at once, in threads; the outcome of each."""
    start = threading.Barrier(len(requests))
    outcomes: list[str] = []

    def use(pki: QnetdPki, request: Enroll) -> None:
        start.wait()
        try:
            pki.enroll(request, time.time())
            outcomes.append("won")
        except EnrollRefused as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=use, args=pair)
               for pair in zip(pkis, requests, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_concurrent_uses_of_one_token_exactly_one_wins(qdir: Path) -> None:
    for _ in range(5):
        token = issue_token(qdir, "192.0.2.10", 5403, 3600, time.time())
        requests = [enroll_request(token.secret) for _ in range(8)]
        outcomes = race([load(qdir) for _ in requests], requests)
        assert outcomes.count("won") == 1, outcomes
        assert all(o == "won" or "already used" in o for o in outcomes), outcomes


def test_an_expired_token_is_refused_and_removed(qdir: Path) -> None:
    token = issue_token(qdir, "192.0.2.10", 5403, 60, time.time() - 120)
    with pytest.raises(EnrollRefused, match="expired"):
        load(qdir).enroll(enroll_request(token.secret), time.time())
    issue_token(qdir, "192.0.2.10", 5403, 60, time.time())  # sweeps expired records
    assert not (qdir / TOKENS / record_name(token.secret)).exists()


@pytest.mark.parametrize(("csr_name", "csr_id"), [("beta", ID), (NAME, "fedcba9876543210")])
def test_a_csr_for_another_cluster_is_refused_and_the_token_kept(qdir: Path, csr_name: str,
                                                                 csr_id: str) -> None:
    token = issue_token(qdir, "192.0.2.10", 5403, 3600, time.time())
    pki = load(qdir)
    with pytest.raises(EnrollRefused, match="another cluster"):
        pki.enroll(enroll_request(token.secret, csr_name=csr_name, csr_id=csr_id), time.time())
    assert isinstance(pki.enroll(enroll_request(token.secret), time.time()), Enrolled)


def test_a_csr_that_is_not_p256_or_not_a_csr_is_refused(qdir: Path) -> None:
    pki = load(qdir)
    with pytest.raises(EnrollRefused, match="not a PEM CSR"):
        pki.sign_csr(b"garbage", NAME, ID)
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(EnrollRefused, match="P-256"):
        pki.sign_csr(make_csr(key, NAME, ID), NAME, ID)


def test_contexts_load(qdir: Path) -> None:
    pki = load(qdir)
    pki.server_context()
    token = issue_token(qdir, "192.0.2.10", 5403, 3600, time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    request = Enroll(token.secret, NAME, ID, make_csr(key, NAME, ID))
    answer = pki.enroll(request, time.time())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    client_context(answer.ca_pem, answer.cert_pem, key_pem)
    with pytest.raises(PkiError):
        client_context(answer.ca_pem, answer.cert_pem, b"not a key")
