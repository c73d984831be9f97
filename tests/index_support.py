"""Shared by the provider-index tests: an index authority with a real key, signed index files
made by ``openssl cms`` (the outside signer), provider entries, and a real HTTP server on
loopback that serves whatever the test puts at a path."""

from __future__ import annotations

import base64
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pecd.trust import index, index_ldif, pki

from .conftest import OPENSSL

FORMS = ("smime-detached", "smime-opaque", "der", "pem")


@dataclass(frozen=True)
class Authority:
    cert: Path
    key: Path

    @property
    def certificate(self) -> x509.Certificate:
        return pki.load_cert(self.cert)


def make_authority(directory: Path, name: str = "Test PEC Index Authority") -> Authority:
    """A self-signed signing certificate, as an index authority could publish for operators."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .sign(key, hashes.SHA256())
    )
    auth = Authority(directory / "authority.pem", directory / "authority.key")
    auth.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    auth.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return auth


def sign(content: bytes, auth: Authority, form: str = "smime-detached",
         days_ago: int = 0) -> bytes:
    """The index file as the authority would publish it, signed by openssl (``days_ago``: with
    the clock set back, under faketime, so its signingTime is that old)."""
    clock = [shutil.which("faketime") or "faketime", "-f", f"-{days_ago}d"] if days_ago else []
    args = [*clock, OPENSSL, "cms", "-sign", "-signer", str(auth.cert), "-inkey", str(auth.key),
            "-md", "sha256"]
    if form == "smime-detached":
        args += ["-text", "-outform", "SMIME"]
    elif form == "smime-opaque":
        args += ["-text", "-nodetach", "-outform", "SMIME"]
    elif form == "der":
        args += ["-binary", "-nodetach", "-outform", "DER"]
    elif form == "pem":
        args += ["-binary", "-nodetach", "-outform", "PEM"]
    else:
        raise ValueError(form)
    return subprocess.run(args, input=content, capture_output=True, check=True).stdout


def cert_of(p: object) -> x509.Certificate:
    from .conftest import ProviderDir

    assert isinstance(p, ProviderDir)
    return pki.load_cert(p.root / "keys" / "signing.pem")


def entry(name: str, domains: Sequence[str], certs: Sequence[x509.Certificate] = (),
          hashes_: Sequence[str] = (), mail_receipt: str = "", base: str = "o=postacert") -> bytes:
    """One provider entry in LDIF; ``hashes_`` are written exactly as given (any textual form)."""
    dn = f"providerName={index_ldif.escape_rdn_value(name)},{base}"
    lines = [f"dn: {dn}", "objectClass: top", "objectClass: provider", f"providerName: {name}"]
    if mail_receipt:
        lines.append(f"mailReceipt: {mail_receipt}")
    lines += [f"managedDomains: {d}" for d in domains]
    lines += [f"providerCertificateHash: {h}" for h in hashes_]
    text = "\n".join(lines) + "\n"
    for c in certs:
        der = c.public_bytes(serialization.Encoding.DER)
        text += "providerCertificate:: " + base64.b64encode(der).decode() + "\n"
    return text.encode() + b"\n"


def directory(*entries: bytes, base: str = "o=postacert") -> bytes:
    """A whole index: the base entry, then the provider entries."""
    head = f"version: 1\n\ndn: {base}\nobjectClass: top\nobjectClass: organization\no: postacert\n\n"
    return head.encode() + b"".join(entries)


def sha1_of(cert: x509.Certificate) -> str:
    return index.sha1_hex(cert)


@dataclass
class Served:
    """What the loopback HTTP server answers: path → (status, body)."""

    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)  # path → bytes sent with no length
    hits: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    url: str = ""


@contextmanager
def http_server() -> Iterator[Served]:
    served = Served()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.hits[self.path] = served.hits.get(self.path, 0) + 1
            if self.path in served.streams:  # no Content-Length: the client must stop reading
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"A" * 65536
                served.sent[self.path] = 0
                try:
                    while served.sent[self.path] < served.streams[self.path]:
                        self.wfile.write(chunk)
                        served.sent[self.path] += len(chunk)
                except OSError:  # the client hung up, as it should
                    pass
                return
            status, body = served.files.get(self.path, (404, b"not here"))
            self.send_response(status)
            self.send_header("Content-Type", "application/pkcs7-mime")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def set_index_config(conf: Path, **values: object) -> None:
    """Append an ``[index]`` table to a provider's pecd.toml (init writes it commented out)."""
    text = conf.read_text()
    lines = "\n".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                      for k, v in values.items())
    text = text.replace("\n[index]\n", f"\n[index]\n{lines}\n", 1)
    conf.write_text(text)
