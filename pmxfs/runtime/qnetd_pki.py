"""qnetd's keys and certificates, its enrollment tokens, and the client side of enrollment.

The qnetd directory
-------------------
`init(DIR)` makes (mode 0700, created if missing) what `pmxfs qnetd` needs, keeping whatever
already exists, so it may run again at any time:

    ca.pem, ca.key          qnetd's CA: ECDSA P-256, self-signed, 20 years
    server.pem, server.key  the certificate qnetd shows to voting clients, signed by the CA
    tokens/                 enrollment tokens, as <hex SHA-256 of the secret>.json

Keys are 0600, created with exclusive create and written durably (runtime/durable_file.py);
`load(DIR)` reads them back as a `QnetdPki`, refusing a directory that is incomplete.

Tokens
------
`issue_token` writes a token's record (`{"expires": unix_s}`, core/qnetd_token.py) and returns
the token; the secret itself is stored nowhere. Spending one (`QnetdPki.enroll`) renames its
record to a name unique to this attempt before reading it: rename is atomic, so of two
concurrent uses of one token exactly one finds the record, the other is refused as "unknown or
already used". The renamed record is deleted at once, also when the token had expired. Expired
records are swept whenever a token is issued.

Enrollment (server side)
------------------------
`QnetdPki.enroll(Enroll, now)` answers one `Enroll` with `Enrolled` or raises `EnrollRefused`
(one line, safe to send to the client): the token must exist and be unexpired, the certificate
signing request must carry a valid signature, an ECDSA P-256 key, and exactly the common name
`qdevice_wire.cluster_subject(name, id)` of the cluster named in the `Enroll` -- checked before
the token is spent, so a broken request does not waste it. The client certificate is valid for
10 years, for client authentication only.

TLS
---
One listener serves both kinds of connection (`server_context`). The server asks for a client
certificate but does not insist (CERT_OPTIONAL); one that is presented must chain to the CA or
the handshake fails. The server then tells the two apart by whether the client presented one:
with a certificate it is a voting connection, without one an enrollment connection.

An enrolling client knows qnetd only by the CA fingerprint in its token, and Python's ssl does
not show a client the chain a server sends (before 3.13). So an enrolling client asks for the
server name `ENROLL_SERVER_NAME` (SNI), for which qnetd presents the CA certificate itself,
proving it holds the CA key; `enroll` completes the handshake without CA or host-name checks,
compares the SHA-256 of the certificate presented with the token's fingerprint and, on a
mismatch, closes having sent nothing (the secret never reaches a wrong host or a man in the
middle). It then checks what comes back: the CA of the answer is the pinned one, the client
certificate is signed by it, for `key`, with the cluster's subject. Voting clients
(`client_context`) verify the server certificate against the CA stored in the tree, without
host-name checks (the CA is qnetd's alone). TLS 1.2 is the oldest version either side speaks.
Private keys reach OpenSSL through an anonymous memory file (memfd), never a temporary file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pmxfs.core.errors import LocalError, ProtocolError
from pmxfs.core.join_token import format_host_port
from pmxfs.core.qdevice_wire import Enroll, Enrolled, Refused, cluster_subject
from pmxfs.core.qnetd_token import (
    QnetdToken,
    TokenError,
    decode_record,
    encode_record,
    new_token,
    record_name,
)
from pmxfs.runtime.durable_file import write_file
from pmxfs.runtime.net_errors import one_line, reason
from pmxfs.runtime.qdevice_frames import ConnectionClosed, receive_message, send_message

DEFAULT_DIR = Path("/etc/pmxfs-qnetd")
CA_PEM, CA_KEY, SERVER_PEM, SERVER_KEY, TOKENS = (
    "ca.pem", "ca.key", "server.pem", "server.key", "tokens")
ENROLL_SERVER_NAME = "enroll.pmxfs-qnetd.invalid"  # SNI of an enrolling client
CA_VALID_DAYS = 20 * 365 + 5
CLIENT_VALID_DAYS = 10 * 365 + 3
ENROLL_TIMEOUT_S = 30.0


class PkiError(LocalError):
    """A qnetd directory that cannot be made or used; str() is one line."""


class EnrollRefused(Exception):
    """Why qnetd refuses an enrollment: one line, sent to the client as `Refused`."""


class EnrollError(LocalError):
    """An enrollment that failed on the client side; str() is one line naming the server."""


# ------------------------------------------------------------------------------ the directory


def init(directory: Path) -> list[str]:
    """Make what is missing of a qnetd directory (module header); the names of the files made.
    PkiError when what exists cannot be used (a CA certificate without its key, say)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        (directory / TOKENS).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot make the qnetd directory {directory}: {exc.strerror}") from None
    made: list[str] = []
    ca_files = [(directory / name).exists() for name in (CA_PEM, CA_KEY)]
    if ca_files == [False, False]:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_new(directory / CA_KEY, _key_pem(ca_key), 0o600)
        _write_new(directory / CA_PEM, _cert_pem(_ca_certificate(ca_key)), 0o644)
        made += [CA_KEY, CA_PEM]
    elif ca_files != [True, True]:
        present, missing = (CA_PEM, CA_KEY) if ca_files[0] else (CA_KEY, CA_PEM)
        raise PkiError(f"{directory} has {present} but no {missing}: restore it, or move the "
                       "directory away and init a new one (every cluster must then enroll again)")
    ca_cert, ca_key = _read_ca(directory)
    if not (directory / SERVER_PEM).exists() or not (directory / SERVER_KEY).exists():
        server_key = ec.generate_private_key(ec.SECP256R1())
        for name in (SERVER_PEM, SERVER_KEY):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        _write_new(directory / SERVER_KEY, _key_pem(server_key), 0o600)
        _write_new(directory / SERVER_PEM,
                   _cert_pem(_server_certificate(server_key, ca_cert, ca_key)), 0o644)
        made += [SERVER_KEY, SERVER_PEM]
    return made


def load(directory: Path) -> QnetdPki:
    """The qnetd directory's CA and server certificate; PkiError when they cannot be used."""
    ca_cert, ca_key = _read_ca(directory)
    server_pem = _read(directory / SERVER_PEM)
    server_key_pem = _read(directory / SERVER_KEY)
    return QnetdPki(directory, ca_cert, ca_key, server_pem, server_key_pem)


def ca_fingerprint(ca_pem: bytes) -> str:
    """The lowercase hex SHA-256 of the DER of the (first) certificate in `ca_pem`."""
    try:
        certificate = x509.load_pem_x509_certificates(ca_pem)[0]
    except ValueError:
        raise PkiError("no usable certificate in the CA PEM") from None
    return _fingerprint(certificate)


def issue_token(directory: Path, host: str, port: int, ttl_s: int, now: float) -> QnetdToken:
    """A new enrollment token for qnetd's CA in `directory`, valid for `ttl_s` from `now` (unix
    seconds), naming `host`:`port`; its record is written, expired ones are swept. TokenError
    for a bad host or port, PkiError when the directory cannot be used."""
    ca_cert, _ = _read_ca(directory)
    token = new_token(host, port, _fingerprint(ca_cert))
    tokens = directory / TOKENS
    _sweep_expired(tokens, now)
    try:
        write_file(tokens / record_name(token.secret), encode_record(int(now) + ttl_s),
                   mode=0o600, replace=False)
    except OSError as exc:
        raise PkiError(f"cannot store the token in {tokens}: {exc.strerror}") from None
    return token


@dataclass(frozen=True)
class QnetdPki:
    """A loaded qnetd directory: its CA, server certificate and tokens."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server_pem: bytes
    server_key_pem: bytes

    @property
    def ca_pem(self) -> bytes:
        return _cert_pem(self.ca_cert)

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: server.pem, a client certificate asked for and, when
        presented, verified against the CA; the CA itself shown to enrolling clients (SNI)."""
        context = _context(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(context, self.server_pem, self.server_key_pem)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        enrolling = _context(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(enrolling, self.ca_pem, _key_pem(self.ca_key))

        def choose(ssl_object: ssl.SSLObject, server_name: str | None,
                   _: ssl.SSLContext) -> None:
            if server_name == ENROLL_SERVER_NAME:
                ssl_object.context = enrolling

        context.sni_callback = choose
        return context

    def enroll(self, request: Enroll, now: float) -> Enrolled:
        """Spend the token of `request` and sign its CSR; EnrollRefused (module header)."""
        record = self.directory / TOKENS / record_name(request.secret)
        _check_record(_read_record(record), now)
        cert_pem = self.sign_csr(request.csr_pem, request.cluster_name, request.cluster_id)
        spent = record.with_name(f"{record.name}.{secrets.token_hex(8)}.spent")
        try:
            os.rename(record, spent)  # atomic: of two uses of one token, one finds it
        except FileNotFoundError:
            raise EnrollRefused("unknown or already used token") from None
        try:
            expires = _read_record(spent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                spent.unlink()
        _check_record(expires, now)
        return Enrolled(cert_pem, self.ca_pem)

    def sign_csr(self, csr_pem: bytes, cluster_name: str, cluster_id: str) -> bytes:
        """A client certificate (PEM) for the CSR, whose common name must be the cluster's
        subject; EnrollRefused for anything else."""
        subject = cluster_subject(cluster_name, cluster_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise EnrollRefused("the certificate signing request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise EnrollRefused("the certificate signing request has a bad signature")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise EnrollRefused("the certificate signing request is not for an ECDSA P-256 key")
        names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [subject]:
            shown = ", ".join(repr(str(n)[:80]) for n in names) or "none"
            raise EnrollRefused(f"the certificate signing request names {shown}, not "
                                f"{subject!r}: a request for another cluster")
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(self.ca_cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=CLIENT_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return _cert_pem(certificate)


def _check_record(expires: int, now: float) -> None:
    if expires <= now:
        raise EnrollRefused("the token has expired: make a new one with `pmxfs qnetd token`")


def _read_record(path: Path) -> int:
    try:
        return decode_record(path.read_bytes())
    except FileNotFoundError:
        raise EnrollRefused("unknown or already used token") from None
    except (OSError, TokenError) as exc:
        raise EnrollRefused(f"the token's record cannot be read: {exc}") from None


def _sweep_expired(tokens: Path, now: float) -> None:
    with contextlib.suppress(FileNotFoundError):
        for path in tokens.iterdir():
            if path.suffix != ".json":
                continue
            with contextlib.suppress(EnrollRefused, FileNotFoundError):
                if _read_record(path) <= now:
                    path.unlink()


# ------------------------------------------------------------------------------ the client


def client_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A voting client's context: it presents the cluster's certificate and verifies qnetd's
    against `ca_pem`, without host-name checks. PkiError when the PEMs cannot be used."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise PkiError("no usable CA certificate for qnetd") from None
    _load_chain(context, cert_pem, key_pem)
    return context


def make_csr(key: ec.EllipticCurvePrivateKey, cluster_name: str, cluster_id: str) -> bytes:
    """A PEM certificate signing request for `key` with the cluster's subject."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(_name(cluster_subject(cluster_name, cluster_id)))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


async def enroll(host: str, port: int, token: QnetdToken, cluster_name: str, cluster_id: str,
                 key: ec.EllipticCurvePrivateKey, *,
                 timeout: float = ENROLL_TIMEOUT_S) -> tuple[bytes, bytes]:  # noqa: ASYNC109
    """Enroll the cluster with the qnetd at `host`:`port` (which must present the CA of
    `token`'s fingerprint): (client certificate PEM for `key`, CA certificate PEM). EnrollError
    (one line) for every failure, also when `timeout` passes."""
    where = format_host_port(host, port)
    request = Enroll(token.secret, cluster_name, cluster_id,
                     make_csr(key, cluster_name, cluster_id))
    with trio.move_on_after(timeout):
        try:
            transport = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise EnrollError(f"cannot connect to qnetd at {where}: {exc.strerror or exc}"
                              ) from None
        stream = trio.SSLStream(transport, _enroll_context(), server_hostname=ENROLL_SERVER_NAME)
        try:
            answer = await _enroll_exchange(stream, where, token.fingerprint, request)
        finally:
            await trio.aclose_forcefully(stream)
        return _check_answer(answer, where, token.fingerprint, key, request)
    raise EnrollError(f"no answer from qnetd at {where} within {timeout:g} s")


async def _enroll_exchange(stream: trio.SSLStream[trio.SocketStream], where: str,
                           expected: str, request: Enroll) -> Enrolled | Refused:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise EnrollError(f"TLS handshake with qnetd at {where} failed: {reason(exc)}"
                          ) from None
    der = stream.getpeercert(binary_form=True)
    presented = hashlib.sha256(der).hexdigest() if der else "(none)"
    if presented != expected:
        raise EnrollError(f"qnetd at {where} presents a CA with fingerprint {presented}, the "
                          f"token expects {expected}: wrong host or a man in the middle; "
                          "nothing was sent")
    try:
        await send_message(stream, request)
        answer = await receive_message(stream)
    except (trio.BrokenResourceError, ConnectionClosed, ProtocolError) as exc:
        raise EnrollError(f"qnetd at {where} broke the enrollment: {reason(exc)}") from None
    if not isinstance(answer, Enrolled | Refused):
        raise EnrollError(f"qnetd at {where} answered the enrollment with a "
                          f"{type(answer).__name__}")
    return answer


def _check_answer(answer: Enrolled | Refused, where: str, expected: str,
                  key: ec.EllipticCurvePrivateKey, request: Enroll) -> tuple[bytes, bytes]:
    if isinstance(answer, Refused):
        raise EnrollError(f"qnetd at {where} refused the enrollment: {one_line(answer.reason)}")
    try:
        ca = x509.load_pem_x509_certificates(answer.ca_pem)[0]
        certificate = x509.load_pem_x509_certificates(answer.cert_pem)[0]
    except ValueError:
        raise EnrollError(f"qnetd at {where} sent no usable certificates") from None
    subject = cluster_subject(request.cluster_name, request.cluster_id)
    names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    problem = None
    if _fingerprint(ca) != expected:
        problem = "its CA is not the token's"
    elif certificate.public_key() != key.public_key():
        problem = "the certificate is not for our key"
    elif names != [subject]:
        problem = "the certificate names another cluster"
    else:
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            problem = "the certificate is not signed by its CA"
    if problem is not None:
        raise EnrollError(f"qnetd at {where} sent a bad certificate: {problem}")
    return answer.cert_pem, _cert_pem(ca)


def _enroll_context() -> ssl.SSLContext:
    context = _context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint is checked after the handshake
    return context


# ------------------------------------------------------------------------------ helpers


def _context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Give OpenSSL the certificate and key through a memfd: the key never lands on a disk."""
    fd = os.memfd_create("pmxfs-qnetd-certificate", os.MFD_CLOEXEC)
    try:
        view = memoryview(key_pem + b"\n" + cert_pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise PkiError(f"cannot use the certificate and key: {exc.reason or exc}") from None
    finally:
        os.close(fd)


def _read_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_cert = x509.load_pem_x509_certificate(_read(directory / CA_PEM))
        ca_key = serialization.load_pem_private_key(_read(directory / CA_KEY), password=None)
    except ValueError:
        raise PkiError(f"the CA in {directory} is not a usable certificate and key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
            ca_key.public_key() != ca_cert.public_key()):
        raise PkiError(f"{directory}/{CA_KEY} is not the key of {directory}/{CA_PEM}")
    return ca_cert, ca_key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror} (run `pmxfs qnetd init --dir "
                       f"{path.parent}`)") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_file(path, data, mode=mode, replace=False)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name(f"pmxfs qnetd CA {secrets.token_hex(4)}")
    return (_builder(name, name, key.public_key(), CA_VALID_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign_certificates=True), critical=True)
            .sign(key, hashes.SHA256()))


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (_builder(_name("pmxfs qnetd"), ca_cert.subject, key.public_key(), CA_VALID_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def _key_usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=sign_certificates, crl_sign=sign_certificates,
                         encipher_only=False, decipher_only=False)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

