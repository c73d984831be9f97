"""pecd.trust.pki: key files, the dev CA and the certificates it issues; openssl is the outside judge."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pecd.clock import ManualClock
from pecd.trust import pki

OPENSSL = "/usr/bin/openssl"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture(scope="session")
def rsa_key() -> pki.PrivateKey:
    return pki.new_key("rsa")


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki-ca")


@pytest.fixture(scope="session")
def ca(ca_dir: Path) -> pki.CertAuthority:
    return pki.CertAuthority.load_or_create(ca_dir)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- keys and files


def test_new_key_kinds() -> None:
    r = pki.new_key()
    assert isinstance(r, rsa.RSAPrivateKey) and r.key_size == 2048
    e = pki.new_key("ec")
    assert isinstance(e, ec.EllipticCurvePrivateKey) and e.curve.name == "secp256r1"
    with pytest.raises(ValueError):
        pki.new_key("dsa")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_write_key_is_0600_even_with_permissive_umask(tmp_path: Path, kind: pki.KeyType) -> None:
    key = pki.new_key(kind)
    path = tmp_path / "k.key"
    old = os.umask(0)
    try:
        pki.write_key(path, key)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert pki.load_key(path).public_key() == key.public_key()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    # openssl reads it too
    assert openssl("pkey", "-in", path, "-noout").returncode == 0


def test_write_key_replaces_a_world_readable_file_with_a_0600_one(
    tmp_path: Path, rsa_key: pki.PrivateKey
) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    pki.write_key(path, rsa_key)
    assert mode(path) == 0o600
    assert pki.load_key(path).public_key() == rsa_key.public_key()


def test_load_errors_are_typed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not pem")
    with pytest.raises(pki.PKIError):
        pki.load_key(bad)
    with pytest.raises(pki.PKIError):
        pki.load_cert(bad)
    with pytest.raises(pki.PKIError):
        pki.load_key(tmp_path / "missing.key")


def test_load_certs_reads_a_bundle_in_order(tmp_path: Path, ca: pki.CertAuthority) -> None:
    leaf = ca.issue_signing_cert(pki.new_key("ec"), "P", "posta@p.test")
    pki.write_certs(tmp_path / "bundle.pem", [leaf, ca.cert])
    assert pki.load_certs(tmp_path / "bundle.pem") == [leaf, ca.cert]
    assert pki.load_cert(tmp_path / "bundle.pem") == leaf
    pki.write_cert(tmp_path / "one.pem", leaf)
    assert pki.load_certs(tmp_path / "one.pem") == [leaf]


def test_fingerprint_matches_openssl(tmp_path: Path, ca: pki.CertAuthority) -> None:
    pki.write_cert(tmp_path / "ca.pem", ca.cert)
    out = openssl("x509", "-in", tmp_path / "ca.pem", "-noout", "-fingerprint", "-sha256").stdout
    expected = out.strip().split("=", 1)[1].replace(":", "").lower()
    assert pki.cert_fingerprint(ca.cert) == expected
    assert len(expected) == 64


# --------------------------------------------------------------------------- the CA


def test_ca_files_are_created_once_and_reused(tmp_path: Path) -> None:
    first = pki.CertAuthority.load_or_create(tmp_path / "ca", "Test CA")
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert (tmp_path / "ca" / "ca.pem").exists()
    second = pki.CertAuthority.load_or_create(tmp_path / "ca", "Other name is ignored")
    assert second.cert == first.cert
    assert second.key.public_key() == first.key.public_key()


def test_ca_with_mismatched_or_half_files_is_refused(tmp_path: Path, rsa_key: pki.PrivateKey) -> None:
    pki.CertAuthority.load_or_create(tmp_path / "a")
    pki.write_key(tmp_path / "a" / "ca.key", rsa_key)  # someone else's key
    with pytest.raises(pki.PKIError, match="does not belong"):
        pki.CertAuthority.load_or_create(tmp_path / "a")
    (tmp_path / "b").mkdir()
    pki.write_key(tmp_path / "b" / "ca.key", rsa_key)
    with pytest.raises(pki.PKIError, match="only one"):
        pki.CertAuthority.load_or_create(tmp_path / "b")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_ca_certificate_shape(tmp_path: Path, kind: pki.KeyType) -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    ca = pki.CertAuthority.load_or_create(tmp_path, "Shape CA", kind=kind, clock=clock)
    cert = ca.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=3650)
    assert cert.not_valid_before_utc <= clock.now() < cert.not_valid_after_utc
    cert.verify_directly_issued_by(cert)  # self-signed
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Shape CA"


# --------------------------------------------------------------------------- issued certificates


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signing_cert_follows_rfc6109_section5(
    tmp_path: Path, ca_dir: Path, ca: pki.CertAuthority, kind: pki.KeyType
) -> None:
    key = pki.new_key(kind)
    cert = ca.issue_signing_cert(key, "Provider A S.p.A.", "posta-certificata@a.test")
    assert cert.public_key() == key.public_key()
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    o = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert cn == o == "Provider A S.p.A."
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["posta-certificata@a.test"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.content_commitment
    assert not ku.value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.BasicConstraints)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ski.digest != ca_ski.digest
    cert.verify_directly_issued_by(ca.cert)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=826)

    pki.write_cert(tmp_path / "leaf.pem", cert)
    r = openssl("verify", "-CAfile", ca_dir / "ca.pem", "-purpose", "smimesign", tmp_path / "leaf.pem")
    assert r.returncode == 0, r.stderr
    # the same leaf must not pass as a TSA: that purpose needs the EKU
    r = openssl("verify", "-CAfile", ca_dir / "ca.pem", "-purpose", "timestampsign", tmp_path / "leaf.pem")
    assert r.returncode != 0


def test_tsa_cert_passes_openssl_timestampsign(tmp_path: Path, ca_dir: Path, ca: pki.CertAuthority) -> None:
    cert = ca.issue_tsa_cert(pki.new_key("ec"), "pecd TSA")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    pki.write_cert(tmp_path / "tsa.pem", cert)
    r = openssl("verify", "-CAfile", ca_dir / "ca.pem", "-purpose", "timestampsign", tmp_path / "tsa.pem")
    assert r.returncode == 0, r.stderr


def test_cert_validity_follows_the_clock(tmp_path: Path) -> None:
    start = datetime(2020, 3, 1, 12, 0, tzinfo=UTC)
    ca = pki.CertAuthority.load_or_create(tmp_path, clock=ManualClock(start))
    cert = ca.issue_signing_cert(pki.new_key("ec"), "P", "p@p.test", days=30)
    assert cert.not_valid_before_utc <= start
    assert cert.not_valid_after_utc == start + timedelta(days=30)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_tls_cert_completes_a_real_handshake(
    tmp_path: Path, ca_dir: Path, ca: pki.CertAuthority, kind: pki.KeyType
) -> None:
    key = pki.new_key(kind)
    cert = ca.issue_tls_cert(key, ["mx.a.test", "localhost"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.a.test", "localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    pki.write_key(tmp_path / "tls.key", key)
    pki.write_cert(tmp_path / "tls.pem", cert)
    r = openssl("verify", "-CAfile", ca_dir / "ca.pem", "-purpose", "sslserver", tmp_path / "tls.pem")
    assert r.returncode == 0, r.stderr

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.pem", tmp_path / "tls.key")
    for host in ("mx.a.test", "127.0.0.1"):
        client_ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
        _handshake(client_ctx, server_ctx, host)
    other = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(other, server_ctx, "mx.b.test")


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, host: str) -> None:
    """A TLS handshake through memory BIOs: real TLS, no sockets."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")
