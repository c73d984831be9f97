"""Outside PKI for the revocation and bring-your-own-certificate tests.

:class:`OutsideCA` is made by the ``openssl`` command line (nothing of pecd's): a root and an
issuing intermediate, as accredited PEC CAs have. :class:`RevocationCA` (``cryptography``) issues
provider certificates that name a CRL distribution point and an OCSP responder, revokes them,
and publishes: its CRL through :class:`CrlServer` (``http.server`` on loopback, in a thread) and
its status through :class:`OcspResponder` (``openssl ocsp`` as a subprocess on loopback)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from pecd.clock import SystemClock
from pecd.config import Reception
from pecd.format import compose, envelope
from pecd.format.daticert import Recipient
from pecd.format.pec import Issuer, Transaction
from pecd.trust import pki, revocation
from pecd.trust.cms import Signer
from pecd.trust.tsa import LocalTSA

from .attack_support import ALICE, ALICE_PW, BOB, BOB_PW, add_user_fast
from .conftest import OPENSSL, ProviderDir, exchange_cards, free_port, make_provider, submit
from .pechelpers import configure

_EXTENSIONS = """
[v3_int]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[v3_leaf]
keyUsage = critical, {key_usage}
subjectAltName = email:{email}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {proc.stderr}")


@dataclass(frozen=True)
class OutsideCA:
    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root.pem"

    @property
    def intermediate(self) -> Path:
        return self.dir / "int.pem"

    @property
    def intermediate_key(self) -> Path:
        return self.dir / "int.key"

    @property
    def chain(self) -> Path:
        """Intermediate then root, as CAs hand them out."""
        return self.dir / "chain.pem"

    @classmethod
    def create(cls, dir: Path) -> OutsideCA:
        dir.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key",
                 "-out", "root.pem", "-days", "30", "-subj", "/CN=Outside Root CA/O=Outside Trust",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "int.key", "-out", "int.csr",
                 "-subj", "/CN=Outside Issuing CA/O=Outside Trust", cwd=dir)
        (dir / "int.cnf").write_text(_EXTENSIONS.format(key_usage="digitalSignature", email="x@x"))
        _openssl("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
                 "-set_serial", "2", "-days", "30", "-out", "int.pem", "-extfile", "int.cnf",
                 "-extensions", "v3_int", cwd=dir)
        (dir / "chain.pem").write_bytes((dir / "int.pem").read_bytes()
                                        + (dir / "root.pem").read_bytes())
        return cls(dir)

    def issue(self, provider: str, email: str, name: str = "leaf",
              key_usage: str = "digitalSignature, nonRepudiation") -> tuple[Path, Path]:
        """(key, certificate) for a provider, issued by the intermediate."""
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={provider}/O={provider}", cwd=self.dir)
        (self.dir / f"{name}.cnf").write_text(_EXTENSIONS.format(key_usage=key_usage, email=email))
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "int.pem", "-CAkey", "int.key",
                 "-CAcreateserial", "-days", "20", "-out", f"{name}.pem",
                 "-extfile", f"{name}.cnf", "-extensions", "v3_leaf", cwd=self.dir)
        return self.dir / f"{name}.key", self.dir / f"{name}.pem"


# --------------------------------------------------------------------------- a CA that revokes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, cn)])


@dataclass
class RevocationCA:
    """A root CA that publishes a CRL at ``crl_url`` and answers OCSP at ``ocsp_url`` (through a
    delegated responder certificate), as accredited PEC CAs do."""

    dir: Path
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    responder_key: rsa.RSAPrivateKey
    responder: x509.Certificate
    crl_url: str
    ocsp_url: str
    issued: list[x509.Certificate] = field(default_factory=list)
    revoked: dict[int, datetime] = field(default_factory=dict)

    @classmethod
    def create(cls, dir: Path, crl_url: str, ocsp_url: str) -> RevocationCA:
        dir.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(_name("Revoking Root CA"))
                .issuer_name(_name("Revoking Root CA")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                             False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        rkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        responder = (x509.CertificateBuilder().subject_name(_name("Revoking CA OCSP responder"))
                     .issuer_name(cert.subject).public_key(rkey.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - timedelta(days=1))
                     .not_valid_after(now + timedelta(days=30))
                     .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                                    critical=True)
                     .add_extension(x509.OCSPNoCheck(), critical=False)  # RFC 6960 §4.2.2.2.1
                     .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                                  False, False), critical=True)
                     .sign(key, hashes.SHA256()))
        ca = cls(dir, key, cert, rkey, responder, crl_url, ocsp_url)
        (dir / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (dir / "responder.pem").write_bytes(responder.public_bytes(serialization.Encoding.PEM))
        (dir / "responder.key").write_bytes(rkey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return ca

    @property
    def root(self) -> Path:
        return self.dir / "root.pem"

    def issue(self, provider: str, email: str, name: str, *, crl: bool = True,
              ocsp: bool = True) -> tuple[Path, Path, x509.Certificate]:
        """(key file, certificate file, certificate) of a provider signing certificate naming
        the CRL distribution point and/or the OCSP responder."""
        now = datetime.now(UTC)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = (x509.CertificateBuilder().subject_name(_name(provider))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(hours=1))
                   .not_valid_after(now + timedelta(days=20))
                   .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                                  critical=False)
                   .add_extension(x509.KeyUsage(True, True, False, False, False, False, False,
                                                False, False), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if crl:
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(self.crl_url)], None, None, None)]),
                critical=False)
        if ocsp:
            builder = builder.add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(self.ocsp_url))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        self.issued.append(cert)
        key_path, cert_path = self.dir / f"{name}.key", self.dir / f"{name}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path, cert

    def revoke(self, cert: x509.Certificate, at: datetime | None = None) -> None:
        self.revoked[cert.serial_number] = at or datetime.now(UTC) - timedelta(minutes=30)
        self.write_index()

    def crl(self, this_update: datetime | None = None, next_update: datetime | None = None,
            key: rsa.RSAPrivateKey | None = None, issuer: x509.Name | None = None) -> bytes:
        """The CRL, DER; by default issued a minute ago, good for an hour."""
        this_update = this_update or datetime.now(UTC) - timedelta(minutes=1)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer or self.cert.subject)
                   .last_update(this_update)
                   .next_update(next_update or this_update + timedelta(hours=1))
                   .add_extension(x509.CRLNumber(int(this_update.timestamp())), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        for serial, when in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build())
        return builder.sign(key or self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER)

    @property
    def index(self) -> Path:
        return self.dir / "index.txt"

    def write_index(self) -> None:
        """The ``openssl ca`` database that ``openssl ocsp -index`` reads."""
        lines = []
        for cert in self.issued:
            expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
            serial = f"{cert.serial_number:X}"
            serial = serial if len(serial) % 2 == 0 else "0" + serial
            when = self.revoked.get(cert.serial_number)
            subject = "/" + "/".join(f"{a.oid._name}={a.value}" for a in cert.subject)
            if when is None:
                lines.append(f"V\t{expiry}\t\t{serial}\tunknown\t{subject}")
            else:
                lines.append(f"R\t{expiry}\t{when.strftime('%y%m%d%H%M%SZ')},keyCompromise\t"
                             f"{serial}\tunknown\t{subject}")
        self.index.write_text("".join(line + "\n" for line in lines))


class CrlServer:
    """``http.server`` on loopback in a thread: serves the bytes put at a path, counts the
    requests; stopped and started again on the same port to play a source that is down."""

    def __init__(self) -> None:
        self.port = free_port()
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.slow: set[str] = set()  # paths answered never (well, after 30 s)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        files, hits, slow = self.files, self.hits, self.slow

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path in slow:
                    time.sleep(30)
                    return
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True  # a slow answer does not hold up stop()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


class OcspResponder:
    """``openssl ocsp`` answering for a :class:`RevocationCA` on loopback (a subprocess)."""

    def __init__(self, ca: RevocationCA, port: int) -> None:
        self.ca = ca
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.ca.write_index()
        log = (self.ca.dir / "ocsp.log").open("ab")
        # openssl 3.0's -port takes no address (it listens on all); clients use loopback
        self.proc = subprocess.Popen(
            [OPENSSL, "ocsp", "-index", str(self.ca.index), "-port", str(self.port),
             "-rsigner", str(self.ca.dir / "responder.pem"), "-rkey",
             str(self.ca.dir / "responder.key"), "-CA", str(self.ca.root), "-nmin", "60",
             "-ignore_err"],
            stdout=log, stderr=log)
        log.close()
        # ready once it says so (a probe connection would hold its one-at-a-time loop)
        deadline = time.monotonic() + 20
        while b"waiting for OCSP client connections" not in (self.ca.dir / "ocsp.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("openssl ocsp did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def revoking_pair(base: Path, ca: RevocationCA, *, crl: bool = True,
                  ocsp: bool = True) -> tuple[ProviderDir, ProviderDir, x509.Certificate]:
    """``a.test`` signing with a certificate from ``ca`` (brought with ``pecd init --key
    --cert --chain``), ``b.test`` with the dev PKI trusting ``ca`` too; alice and bob; the
    relay retries fast (a peer's answer ``451`` is tried again within seconds)."""
    key, cert_path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a-signing",
                                    crl=crl, ocsp=ocsp)
    a = make_provider(base, "a.test", base / "ca", **{
        "--key": str(key), "--cert": str(cert_path), "--chain": str(ca.root)})
    b = make_provider(base, "b.test", base / "ca")
    b.ca.write_bytes(b.ca.read_bytes() + ca.root.read_bytes())
    exchange_cards(a, b)
    add_user_fast(a, ALICE, ALICE_PW)
    add_user_fast(b, BOB, BOB_PW)
    configure(a, "relay", retry_base=0.2, retry_max=1.0)
    return a, b, cert


def send_certified(a: ProviderDir, port: int, subject: str) -> None:
    """alice submits one message to bob at a.test's submission listener."""
    body = (f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.a.test>\r\n\r\nciao\r\n").encode()
    code, reply = submit(a, ALICE, ALICE_PW, ALICE, [BOB], body, port)
    assert code == 250, reply


def envelope_signed_by(a: ProviderDir, key: Path, cert: Path, subject: str) -> bytes:
    """A transport envelope from alice as a.test would make it, signed with ``key``/``cert``
    (a.test's TSA stamps it)."""
    keys = a.root / "keys"
    clock = SystemClock()
    tsa = LocalTSA(pki.load_key(keys / "tsa.key"), pki.load_cert(keys / "tsa.pem"), clock)
    signer = Signer(pki.load_key(key), pki.load_cert(cert), clock, timestamper=tsa)
    issuer = Issuer("Provider a.test", "a.test", "posta-certificata@a.test", signer)
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("a.test", at), ref_msgid=None, sender=ALICE,
                     recipients=(Recipient(BOB),), reply_to=ALICE, subject=subject,
                     accepted_at=at, issuer_name=issuer.name)
    original = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nciao\r\n".encode()
    return bytes(envelope.transport_envelope(tx, original, issuer, at))


SETTINGS = Reception(revocation_timeout=5.0, revocation_retry=0.0, max_crl_bytes=100_000)


def gather(sources: revocation.Sources, cert: x509.Certificate,
             issuer: x509.Certificate) -> revocation.Material:
    """What the revocation sources gather for ``cert`` now (a private loop per call)."""
    return asyncio.run(sources.material(cert, issuer))
