"""pecd.trust.cms: detached and attached SignedData, CAdES-T, verification; openssl is the outside judge."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from pecd.clock import ManualClock, SystemClock
from pecd.trust import cms, pki, tsa, verdict
from pecd.trust import paths as trust

OPENSSL = "/usr/bin/openssl"
DATA = b"Content-Type: text/plain\r\n\r\nCiao,\r\nquesto e' un messaggio.\r\n"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, check=False, timeout=60)


@dataclass
class Provider:
    dir: Path
    ca: pki.CertAuthority
    key: pki.PrivateKey
    cert: x509.Certificate
    tsa: tsa.LocalTSA

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def tsa_pem(self) -> Path:
        return self.dir / "tsa.pem"

    def signer(self, clock: ManualClock | SystemClock | None = None, ts: bool = True) -> cms.Signer:
        return cms.Signer(self.key, self.cert, clock or SystemClock(), timestamper=self.tsa if ts else None)


def _provider(base: Path, kind: pki.KeyType) -> Provider:
    ca = pki.CertAuthority.load_or_create(base, f"CMS test CA {kind}", kind=kind)
    key = pki.new_key(kind)
    cert = ca.issue_signing_cert(key, f"Provider {kind}", f"posta-certificata@{kind}.test")
    tsa_key = pki.new_key(kind)
    tsa_cert = ca.issue_tsa_cert(tsa_key, f"TSA {kind}")
    pki.write_cert(base / "tsa.pem", tsa_cert)
    pki.write_key(base / "signing.key", key)
    pki.write_cert(base / "signing.pem", cert)
    return Provider(base, ca, key, cert, tsa.LocalTSA(tsa_key, tsa_cert, SystemClock()))


@pytest.fixture(scope="session", params=["rsa", "ec"])
def prov(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Provider:
    return _provider(tmp_path_factory.mktemp(f"cms-{request.param}"), request.param)


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Provider:
    """A provider under a CA nobody in these tests trusts."""
    return _provider(tmp_path_factory.mktemp("cms-stranger"), "ec")


def openssl_verify_detached(prov: Provider, tmp_path: Path, sig: bytes, data: bytes) -> bool:
    (tmp_path / "sig.der").write_bytes(sig)
    (tmp_path / "data.bin").write_bytes(data)
    r = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "sig.der",
        "-content", tmp_path / "data.bin", "-CAfile", prov.ca_pem, "-out", "/dev/null",
    )  # fmt: skip
    return r.returncode == 0


# --------------------------------------------------------------------------- round trips


def test_detached_signature_verifies_here_and_in_openssl(prov: Provider, tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=654321))
    sig = prov.signer(clock).sign_detached(DATA)
    info = cms.verify_detached(sig, DATA, [prov.ca.cert], require_timestamp=True)
    assert info.signer == prov.cert
    assert info.signing_time == clock.now().replace(microsecond=0)
    assert info.timestamp_time is not None
    assert abs(info.timestamp_time - datetime.now(UTC)) < timedelta(minutes=1)
    assert info.certificates == (prov.cert, prov.ca.cert)
    assert openssl_verify_detached(prov, tmp_path, sig, DATA)
    assert not openssl_verify_detached(prov, tmp_path, sig, DATA + b" ")
    with pytest.raises(cms.SignatureInvalid, match="messageDigest"):
        cms.verify_detached(sig, DATA + b" ", [prov.ca.cert])


def test_structure_is_what_openssl_reports(prov: Provider, tmp_path: Path) -> None:
    (tmp_path / "sig.der").write_bytes(prov.signer().sign_detached(DATA))
    r = openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", tmp_path / "sig.der")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    for needle in (
        "eContentType: pkcs7-data",
        "eContent: <ABSENT>",
        "object: contentType",
        "object: signingTime",
        "object: messageDigest",
        "object: id-smime-aa-signingCertificateV2",
        "object: id-smime-aa-timeStampToken",
    ):
        assert needle in text, needle
    # RFC 5754: SHA-2 digest AlgorithmIdentifiers are generated without parameters
    digest_alg = text.split("digestAlgorithms:")[1].split("encapContentInfo")[0]
    assert "sha256" in digest_alg and "parameter: <ABSENT>" in digest_alg


def test_attached_signature(prov: Provider, tmp_path: Path) -> None:
    sig = prov.signer().sign_attached(DATA)
    content, info = cms.verify_attached(sig, [prov.ca.cert], require_timestamp=True)
    assert content == DATA and info.signer == prov.cert
    (tmp_path / "sig.der").write_bytes(sig)
    r = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "sig.der",
        "-CAfile", prov.ca_pem, "-out", tmp_path / "out.bin",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == DATA
    with pytest.raises(cms.SignatureInvalid, match="both"):
        cms.verify_detached(sig, DATA, [prov.ca.cert])
    with pytest.raises(cms.SignatureInvalid, match="content missing"):
        cms.verify_attached(prov.signer().sign_detached(DATA), [prov.ca.cert])


def test_openssl_made_signature_verifies_here(prov: Provider, tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    r = openssl(
        "cms", "-sign", "-binary", "-outform", "DER", "-in", tmp_path / "data.bin",
        "-signer", prov.dir / "signing.pem", "-inkey", prov.dir / "signing.key",
        "-md", "sha256", "-out", tmp_path / "sig.der",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sig = (tmp_path / "sig.der").read_bytes()
    info = cms.verify_detached(sig, DATA, [prov.ca.cert])
    assert info.signer == prov.cert and info.timestamp_time is None
    assert info.signing_time is not None
    with pytest.raises(cms.SignatureInvalid, match="timestamp missing"):
        cms.verify_detached(sig, DATA, [prov.ca.cert], require_timestamp=True)
    with pytest.raises(cms.SignatureInvalid):
        cms.verify_detached(sig, DATA[:-1], [prov.ca.cert])


# --------------------------------------------------------------------------- failures


def test_certificate_from_another_ca_is_untrusted(prov: Provider, stranger: Provider) -> None:
    sig = stranger.signer(ts=False).sign_detached(DATA)
    with pytest.raises(cms.CertificateUntrusted, match="trusted root"):
        cms.verify_detached(sig, DATA, [prov.ca.cert])
    # trusted once its own CA is among the roots
    cms.verify_detached(sig, DATA, [prov.ca.cert, stranger.ca.cert])


def test_timestamp_from_an_untrusted_tsa_fails(prov: Provider, stranger: Provider) -> None:
    signer = cms.Signer(prov.key, prov.cert, SystemClock(), timestamper=stranger.tsa)
    sig = signer.sign_detached(DATA)
    with pytest.raises(cms.SignatureInvalid, match="signature timestamp"):
        cms.verify_detached(sig, DATA, [prov.ca.cert])
    info = cms.verify_detached(sig, DATA, [prov.ca.cert], tsa_roots=[stranger.ca.cert])
    assert info.timestamp_time is not None


def test_expired_certificate(tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(days=400)
    ca = pki.CertAuthority.load_or_create(tmp_path, clock=ManualClock(start))
    key = pki.new_key("ec")
    cert = ca.issue_signing_cert(key, "Old", "old@old.test", days=30)
    tsa_key = pki.new_key("ec")
    tsa_cert = ca.issue_tsa_cert(tsa_key, "Old TSA")  # 825 days: still valid
    # signed (and timestamped) 60 days into a 30-day certificate
    late = ManualClock(start + timedelta(days=60))
    signer = cms.Signer(key, cert, late, timestamper=tsa.LocalTSA(tsa_key, tsa_cert, late))
    sig = signer.sign_detached(DATA)
    with pytest.raises(verdict.CertificateExpired, match=r"CN=Old.*expired"):
        cms.verify_detached(sig, DATA, [ca.cert])
    # signed inside the validity period: good at that time, not good at a later check time
    early = ManualClock(start + timedelta(days=10))
    good = cms.Signer(key, cert, early, timestamper=tsa.LocalTSA(tsa_key, tsa_cert, early))
    sig = good.sign_detached(DATA)
    assert cms.verify_detached(sig, DATA, [ca.cert]).timestamp_time == early.now().replace(
        microsecond=early.now().microsecond // 1000 * 1000
    )
    with pytest.raises(verdict.CertificateExpired, match="expired"):
        cms.verify_detached(sig, DATA, [ca.cert], at=datetime.now(UTC))


def test_wrong_message_digest_attribute(prov: Provider, tmp_path: Path) -> None:
    """A genuine signature over attributes whose messageDigest is not the content's digest."""
    core = cms._SignerCore(prov.key, prov.cert)
    attrs, signature = core.sign_attrs(
        [
            cms.der_attribute(cms.ID_CONTENT_TYPE, cms._OID_DER[cms.ID_DATA]),
            cms.der_attribute(cms.ID_MESSAGE_DIGEST, cms._der_tlv(0x04, hashlib.sha256(b"other").digest())),
            core.ess_attr_der,
        ]
    )
    sig = core.content_info(cms.ID_DATA, None, attrs, signature)
    with pytest.raises(cms.SignatureInvalid, match="messageDigest does not match"):
        cms.verify_detached(sig, DATA, [prov.ca.cert], at=datetime.now(UTC))
    assert not openssl_verify_detached(prov, tmp_path, sig, DATA)
    # the same construction with the right digest passes both: the test above can tell
    attrs, signature = core.sign_attrs(
        [
            cms.der_attribute(cms.ID_CONTENT_TYPE, cms._OID_DER[cms.ID_DATA]),
            cms.der_attribute(cms.ID_MESSAGE_DIGEST, cms._der_tlv(0x04, hashlib.sha256(DATA).digest())),
            core.ess_attr_der,
        ]
    )
    sig = core.content_info(cms.ID_DATA, None, attrs, signature)
    cms.verify_detached(sig, DATA, [prov.ca.cert], at=datetime.now(UTC))
    assert openssl_verify_detached(prov, tmp_path, sig, DATA)
    with pytest.raises(cms.SignatureInvalid, match="no time"):
        cms.verify_detached(sig, DATA, [prov.ca.cert])  # no signingTime, no timestamp, no at


def _crafted(prov: Provider, *, content_type: str, ess: bytes | None) -> bytes:
    """A genuine signature by prov over hand-picked signed attributes."""
    core = cms._SignerCore(prov.key, prov.cert)
    attrs = [
        cms.der_attribute(cms.ID_CONTENT_TYPE, cms._oid(content_type)),
        cms.der_attribute(cms.ID_MESSAGE_DIGEST, cms._der_tlv(0x04, hashlib.sha256(DATA).digest())),
        cms.der_attribute(cms.ID_SIGNING_TIME, cms.der_time(datetime.now(UTC))),
    ]
    if ess is not None:
        attrs.append(ess)
    signed_attrs, signature = core.sign_attrs(attrs)
    return core.content_info(cms.ID_DATA, None, signed_attrs, signature)


def test_signed_attributes_must_name_the_content_and_the_signer(
    prov: Provider, stranger: Provider, tmp_path: Path
) -> None:
    own_ess = cms._SignerCore(prov.key, prov.cert).ess_attr_der
    good = _crafted(prov, content_type=cms.ID_DATA, ess=own_ess)
    cms.verify_detached(good, DATA, [prov.ca.cert])
    assert openssl_verify_detached(prov, tmp_path, good, DATA)
    # signingCertificateV2 naming another certificate (certificate substitution)
    other_ess = cms._SignerCore(stranger.key, stranger.cert).ess_attr_der
    bad = _crafted(prov, content_type=cms.ID_DATA, ess=other_ess)
    with pytest.raises(cms.SignatureInvalid, match="signingCertificateV2"):
        cms.verify_detached(bad, DATA, [prov.ca.cert])
    # openssl 3.0 `cms -verify` does not look at ESS attributes (only `ts -verify` does), so it
    # cannot be the judge here; it accepts this signature.
    # contentType attribute disagreeing with the encapsulated content type
    bad = _crafted(prov, content_type=cms.ID_CT_TST_INFO, ess=own_ess)
    with pytest.raises(cms.SignatureInvalid, match="contentType"):
        cms.verify_detached(bad, DATA, [prov.ca.cert])
    # ESS is optional for CMS signatures (openssl makes it so), required in TSA tokens
    cms.verify_detached(_crafted(prov, content_type=cms.ID_DATA, ess=None), DATA, [prov.ca.cert])


def test_tampering_is_detected(prov: Provider) -> None:
    sig = prov.signer(ts=False).sign_detached(DATA)
    parsed = asn1_cms.ContentInfo.load(sig)
    value = parsed["content"]["signer_infos"][0]["signature"].native
    i = sig.index(value) + 10
    flipped = sig[:i] + bytes([sig[i] ^ 0x01]) + sig[i + 1 :]
    with pytest.raises(cms.SignatureInvalid, match="signature value does not match"):
        cms.verify_detached(flipped, DATA, [prov.ca.cert])
    with pytest.raises(cms.SignatureInvalid, match="malformed"):
        cms.verify_detached(b"\x30\x82\x01\x00" + b"\x00" * 10, DATA, [prov.ca.cert])
    with pytest.raises(cms.SignatureInvalid):
        cms.verify_detached(sig[:-5], DATA, [prov.ca.cert])


def test_timestamp_token_moved_to_another_signature_fails(prov: Provider) -> None:
    """The token covers one signature value; it proves nothing about another."""
    signer = prov.signer()
    sig_a = signer.sign_detached(DATA)
    sig_b = signer.sign_detached(DATA + b"b")
    token_a, value_a = cms.extract_timestamp_token(sig_a) or (b"", b"")
    token_b, value_b = cms.extract_timestamp_token(sig_b) or (b"", b"")
    assert token_a and token_b and value_a != value_b
    si = asn1_cms.ContentInfo.load(sig_b)["content"]["signer_infos"][0]
    rebuild = cms._SignerCore(prov.key, prov.cert).content_info
    signed_attrs = bytes(si["signed_attrs"].contents)

    def with_token(token: bytes) -> bytes:
        unsigned = [cms.der_attribute(cms.ID_AA_SIGNATURE_TIME_STAMP_TOKEN, token)]
        return rebuild(cms.ID_DATA, None, signed_attrs, value_b, unsigned)

    assert with_token(token_b) == sig_b  # the rebuild is faithful...
    cms.verify_detached(with_token(token_b), DATA + b"b", [prov.ca.cert])
    with pytest.raises(cms.SignatureInvalid, match="imprint"):  # ...so only the token differs
        cms.verify_detached(with_token(token_a), DATA + b"b", [prov.ca.cert])


def test_extract_timestamp_token_for_openssl_ts_verify(prov: Provider, tmp_path: Path) -> None:
    assert cms.extract_timestamp_token(prov.signer(ts=False).sign_detached(DATA)) is None
    extracted = cms.extract_timestamp_token(prov.signer().sign_detached(DATA))
    assert extracted is not None
    token, value = extracted
    (tmp_path / "tok.der").write_bytes(token)
    (tmp_path / "sig.bin").write_bytes(value)
    r = openssl(
        "ts", "-verify", "-data", tmp_path / "sig.bin", "-in", tmp_path / "tok.der",
        "-token_in", "-CAfile", prov.ca_pem, "-untrusted", prov.tsa_pem,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (tmp_path / "sig.bin").write_bytes(value[:-1] + bytes([value[-1] ^ 1]))
    r = openssl(
        "ts", "-verify", "-data", tmp_path / "sig.bin", "-in", tmp_path / "tok.der",
        "-token_in", "-CAfile", prov.ca_pem, "-untrusted", prov.tsa_pem,
    )  # fmt: skip
    assert r.returncode != 0


def test_signer_with_wrong_purpose_certificate_is_refused(prov: Provider, tmp_path: Path) -> None:
    """A TLS certificate (EKU serverAuth/clientAuth) must not sign mail."""
    key = pki.new_key("ec")
    tls = prov.ca.issue_tls_cert(key, ["mx.test"])
    sig = cms.Signer(key, tls, SystemClock()).sign_detached(DATA)
    with pytest.raises(cms.CertificateUntrusted, match="e-mail"):
        cms.verify_detached(sig, DATA, [prov.ca.cert])
    assert not openssl_verify_detached(prov, tmp_path, sig, DATA)


def test_signer_refuses_a_key_that_is_not_the_certificates(prov: Provider) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        cms.Signer(pki.new_key("ec"), prov.cert, SystemClock())


# --------------------------------------------------------------------------- chains


def _intermediate(root: pki.CertAuthority, path_length: int | None = 0,
                  name: str = "Intermediate") -> pki.CertAuthority:
    key = pki.new_key("ec")
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(root.key, hashes.SHA256())
    )
    return pki.CertAuthority(key=key, cert=cert)


def test_chain_through_an_intermediate(prov: Provider, tmp_path: Path) -> None:
    inter = _intermediate(prov.ca)
    key = pki.new_key("rsa")
    leaf = inter.issue_signing_cert(key, "Leaf", "leaf@leaf.test")
    now = datetime.now(UTC)
    assert trust.validate_path(leaf, [inter.cert], [prov.ca.cert], now) == [
        leaf,
        inter.cert,
        prov.ca.cert,
    ]
    with pytest.raises(cms.CertificateUntrusted):
        trust.validate_path(leaf, [], [prov.ca.cert], now)
    # the verdict names the link that failed, not only the leaf
    with pytest.raises(verdict.CertificateExpired, match=r"Intermediate.*expired"):
        trust.validate_path(leaf, [inter.cert], [prov.ca.cert], now + timedelta(days=200))
    # a leaf may not act as a CA
    not_ca = pki.CertAuthority(key=key, cert=leaf)
    grandchild = not_ca.issue_signing_cert(pki.new_key("ec"), "G", "g@g.test")
    with pytest.raises(cms.CertificateUntrusted, match="not a CA"):
        trust.validate_path(grandchild, [leaf, inter.cert], [prov.ca.cert], now)
    with pytest.raises(cms.CertificateUntrusted, match="not a CA"):
        trust.validate_path(grandchild, [], [leaf], now)  # not even as a trust root
    assert trust.validate_path(leaf, [], [leaf], now) == [leaf]  # but a pinned leaf is trusted
    # pathLenConstraint 0: no further CA below the intermediate (a self-issued one would not
    # count, RFC 5280 §4.2.1.9, hence another name)
    sub = _intermediate(inter, name="Sub")
    below = sub.issue_signing_cert(pki.new_key("ec"), "B", "b@b.test")
    with pytest.raises(cms.CertificateUntrusted, match="path length"):
        trust.validate_path(below, [sub.cert, inter.cert], [prov.ca.cert], now)

    # the signer includes its chain; both verifiers accept it
    sig = cms.Signer(key, leaf, SystemClock(), chain=[inter.cert]).sign_detached(DATA)
    info = cms.verify_detached(sig, DATA, [prov.ca.cert])
    assert info.certificates == (leaf, inter.cert, prov.ca.cert)
    assert openssl_verify_detached(prov, tmp_path, sig, DATA)
    bare = cms.Signer(key, leaf, SystemClock()).sign_detached(DATA)
    with pytest.raises(cms.CertificateUntrusted):
        cms.verify_detached(bare, DATA, [prov.ca.cert])


def _check_der(data: bytes) -> None:
    """Walk every TLV: definite minimal lengths, SET OF members in DER order, minimal INTEGERs."""

    def walk(buf: bytes) -> None:
        i = 0
        while i < len(buf):
            tag = buf[i]
            assert tag & 0x1F != 0x1F, "high tag numbers are not used here"
            first = buf[i + 1]
            if first < 0x80:
                length, hl = first, 2
            else:
                n = first & 0x7F
                assert 0 < n <= 4, "indefinite or oversized length"
                length = int.from_bytes(buf[i + 2 : i + 2 + n], "big")
                assert length >= 0x80 and buf[i + 2] != 0, "non-minimal length"
                hl = 2 + n
            body = buf[i + hl : i + hl + length]
            assert len(body) == length, "truncated"
            if tag == 0x02:
                assert length >= 1
                if length > 1:
                    assert not (body[0] == 0 and body[1] < 0x80), "non-minimal INTEGER"
                    assert not (body[0] == 0xFF and body[1] >= 0x80), "non-minimal INTEGER"
            if tag & 0x20:  # constructed
                walk(body)
                if tag == 0x31:
                    members = _members(body)
                    assert members == sorted(members), "SET OF not in DER order"
            i += hl + length

    walk(data)


def _members(buf: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(buf):
        first = buf[i + 1]
        if first < 0x80:
            length, hl = first, 2
        else:
            n = first & 0x7F
            length, hl = int.from_bytes(buf[i + 2 : i + 2 + n], "big"), 2 + n
        out.append(buf[i : i + hl + length])
        i += hl + length
    return out


def test_signatures_are_der(prov: Provider) -> None:
    """Our hand-joined encodings must be DER, down to the token inside the unsigned attribute."""
    for sig in (prov.signer().sign_detached(DATA), prov.signer().sign_attached(DATA)):
        _check_der(sig)
        token, _ = cms.extract_timestamp_token(sig) or (b"", b"")
        tst = asn1_cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"]
        _check_der(bytes(tst))  # the TSTInfo inside the OCTET STRING
    with pytest.raises(AssertionError, match="non-minimal length"):
        _check_der(b"\x04\x81\x01\x00")  # the checker itself can fail
    with pytest.raises(AssertionError, match="DER order"):
        _check_der(b"\x31\x06\x02\x01\x02\x02\x01\x01")
