"""Development PKI: keys, PEM files on disk, and a local CA that issues provider certificates.

Receives: paths chosen by the operator and names from the configuration. Trusts: the local file
system (a key file we wrote is ours). It issues certificates for test and single-site deployments;
a production provider loads its accredited certificates with ``load_key`` / ``load_certs``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pecd.clock import Clock, SystemClock
from pecd.store import durable

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
CA_DAYS = 3650
# Backdating absorbs small clock differences between this host and the peers that verify.
_BACKDATE = timedelta(minutes=5)


class PKIError(Exception):
    """A key or certificate file is missing, unreadable or of an unsupported kind."""


def new_key(kind: KeyType = "rsa") -> PrivateKey:
    """RSA-2048 is what accredited PEC providers use; P-256 is the small fast alternative."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {kind!r}")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write through a fresh temporary file created with its final mode, then rename over ``path``.

    The file never exists with wider permissions, and readers never see half a file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (it can never add any)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_key(path: Path, key: PrivateKey) -> None:
    """PEM PKCS#8 without a passphrase, mode 0600 from the first byte written."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(Path(path), data, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_certs(path: Path, certs: Sequence[x509.Certificate]) -> None:
    """A PEM bundle, e.g. a chain or a set of trust roots."""
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _write_atomic(Path(path), data, 0o644)


def load_key(path: Path) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PKIError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_certs(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in file order."""
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot load certificates from {path}: {exc}") from exc


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return load_certs(path)[0]


@functools.lru_cache(maxsize=1024)  # the same few certificates, asked for on every message
def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex: the key of the provider index."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class CertAuthority:
    """A local CA; ``dir/ca.key`` + ``dir/ca.pem`` so that several local providers can share one."""

    key: PrivateKey
    cert: x509.Certificate
    clock: Clock = field(default_factory=SystemClock)

    @classmethod
    def create(
        cls, name: str = "pecd dev CA", *, kind: KeyType = "rsa", clock: Clock | None = None
    ) -> CertAuthority:
        clock = clock or SystemClock()
        key = new_key(kind)
        now = clock.now()
        subject = _name(name, name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert, clock=clock)

    @classmethod
    def load_or_create(
        cls,
        dir: Path,
        name: str = "pecd dev CA",
        *,
        kind: KeyType = "rsa",
        clock: Clock | None = None,
    ) -> CertAuthority:
        """Reuse ``dir/ca.key`` + ``dir/ca.pem`` when both exist, else create and store them."""
        dir = Path(dir)
        key_path, cert_path = dir / CA_KEY_FILE, dir / CA_CERT_FILE
        if key_path.exists() and cert_path.exists():
            key, cert = load_key(key_path), load_cert(cert_path)
            if cert.public_key() != key.public_key():
                raise PKIError(f"{key_path} does not belong to {cert_path}")
            return cls(key=key, cert=cert, clock=clock or SystemClock())
        if key_path.exists() or cert_path.exists():
            raise PKIError(f"{dir}: only one of {CA_KEY_FILE} / {CA_CERT_FILE} exists")
        durable.private_dir(dir)
        ca = cls.create(name, kind=kind, clock=clock)
        write_key(key_path, ca.key)
        write_cert(cert_path, ca.cert)
        return ca

    def _builder(self, subject: x509.Name, public_key: PublicKey, days: int) -> x509.CertificateBuilder:
        now = self.clock.now()
        not_after = min(now + timedelta(days=days), self.cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - _BACKDATE, self.cert.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, hashes.SHA256())

    def issue_signing_cert(
        self, key: PrivateKey, provider_name: str, service_address: str, days: int = 825
    ) -> x509.Certificate:
        """The provider's message-signing certificate, shaped as RFC 6109 §5 asks.

        Provider name in CN and O, the service mailbox in SAN rfc822Name, KeyUsage critical, and no
        BasicConstraints.
        """
        builder = (
            self._builder(_name(provider_name, provider_name), key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(service_address)]), critical=False)
            .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=True)
        )
        return self._sign(builder)

    def issue_tsa_cert(self, key: PrivateKey, name: str, days: int = 825) -> x509.Certificate:
        """RFC 3161 §2.3: the only EKU is timeStamping, critical; ``openssl ts -verify`` insists."""
        builder = (
            self._builder(_name(name, name), key.public_key(), days)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
        )
        return self._sign(builder)

    def issue_tls_cert(self, key: PrivateKey, hostnames: list[str], days: int = 825) -> x509.Certificate:
        """For the SMTP listeners; also valid for loopback so that local tests need no DNS."""
        if not hostnames:
            raise ValueError("a TLS certificate needs at least one host name")
        names: list[x509.GeneralName] = []
        for host in [*hostnames, "127.0.0.1", "::1"]:
            try:
                gn: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                gn = x509.DNSName(host)
            if gn not in names:
                names.append(gn)
        # RSA key exchange needs keyEncipherment; harmless for EC keys under TLS 1.3.
        usage = _key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey))
        builder = (
            self._builder(_name(hostnames[0]), key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        return self._sign(builder)


# --------------------------------------------------------------------------- bring your own


@dataclass(frozen=True)
class OutsidePair:
    """A signing key and certificate issued by an outside (accredited) CA, checked for use.

    ``intermediates`` travel in every signature after the certificate (``signing.pem`` holds
    them as one bundle); ``roots`` (self-signed certificates found in the chain file) are
    added to this provider's own trust roots, so its own mail (same-domain mail goes through
    the reception point too, RFC 6109 §3.4) verifies. ``warnings`` are shape problems that
    RFC 6109 §5 asks about but that do not stop peers from verifying the signature.
    """

    key: PrivateKey
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    warnings: tuple[str, ...]


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[Any] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def check_outside_pair(key_path: Path, cert_path: Path, chain_path: Path | None,
                       service_address: str, provider_name: str, now: datetime) -> OutsidePair:
    """Load and judge an outside CA's signing pair; PKIError says why it cannot be used.

    Refused (peers would reject every signature, or it is not the operator's certificate):
    the key does not belong to the certificate; the certificate is not valid now; it is a CA
    certificate; its KeyUsage forbids digitalSignature; its extended key usage excludes
    e-mail protection; a chain file whose first certificate did not issue it, or holds a
    non-CA certificate. Warned (RFC 6109 §5 shape; signatures still verify): the service
    address missing from SAN rfc822Name, no KeyUsage or a non-critical one, the provider
    name in neither CN nor O, no chain file.
    """
    key = load_key(key_path)
    certs = load_certs(cert_path)
    if not certs:
        raise PKIError(f"{cert_path}: no certificate")
    cert, extra = certs[0], certs[1:]
    if cert.public_key() != key.public_key():
        raise PKIError(f"{key_path} does not belong to the certificate in {cert_path}")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PKIError(f"{cert_path}: not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d}"
                       f" to {cert.not_valid_after_utc:%Y-%m-%d})")
    bc = _ext(cert, x509.BasicConstraints)
    if bc is not None and bc.value.ca:
        raise PKIError(f"{cert_path}: a CA certificate, not a signing certificate")
    warnings: list[str] = []
    ku = _ext(cert, x509.KeyUsage)
    if ku is None:
        warnings.append("no KeyUsage extension (RFC 6109 §5 asks for digitalSignature, critical)")
    else:
        if not ku.value.digital_signature:
            raise PKIError(f"{cert_path}: KeyUsage does not allow digitalSignature")
        if not ku.critical:
            warnings.append("KeyUsage is not marked critical (RFC 6109 §5)")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None and not {ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(eku.value):
        raise PKIError(f"{cert_path}: extended key usage excludes e-mail protection")
    san = _ext(cert, x509.SubjectAlternativeName)
    emails = [e.lower() for e in san.value.get_values_for_type(x509.RFC822Name)] if san else []
    if service_address.lower() not in emails:
        warnings.append(f"the service address {service_address} is not in the certificate's"
                        f" SAN rfc822Name ({', '.join(emails) or 'none'}); RFC 6109 §5 asks for it")
    names = [str(a.value) for a in cert.subject
             if a.oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME)]
    if provider_name not in names:
        warnings.append(f"the provider name {provider_name!r} is in neither CN nor O "
                        f"({', '.join(names) or 'none'})")
    chain = [*extra, *(load_certs(chain_path) if chain_path is not None else [])]
    intermediates = tuple(c for c in chain if not _self_signed(c) and c != cert)
    roots = tuple(c for c in chain if _self_signed(c))
    for c in intermediates:
        c_bc = _ext(c, x509.BasicConstraints)
        if c_bc is None or not c_bc.value.ca:
            raise PKIError(f"chain: {c.subject.rfc4514_string()} is not a CA certificate")
    if chain:
        first = intermediates[0] if intermediates else roots[0]
        try:
            cert.verify_directly_issued_by(first)
        except (ValueError, TypeError, InvalidSignature):
            raise PKIError(f"chain: the certificate was not issued by "
                           f"{first.subject.rfc4514_string()}, the chain's first") from None
    else:
        warnings.append("no --chain: peers need the issuing CA's certificates to verify")
    if not roots:
        warnings.append("no root certificate given: add the CA's root to [files] ca_certs, or this"
                        " provider's own mail (same-domain mail too) will not verify here")
    return OutsidePair(key, cert, intermediates, roots, tuple(warnings))


def install_outside_pair(pair: OutsidePair, key_path: Path, cert_path: Path) -> None:
    """The key (0600) and the certificate with its intermediates as one PEM bundle."""
    write_key(key_path, pair.key)
    write_certs(cert_path, [pair.cert, *pair.intermediates])
