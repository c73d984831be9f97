"""pecd.trust.smime: multipart/signed built byte-exact; `openssl cms/smime -verify` is the outside judge."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from pecd.clock import SystemClock
from pecd.trust import cms, pki, smime, tsa

OPENSSL = "/usr/bin/openssl"

INNER = (
    b'Content-Type: multipart/mixed; boundary="inner-b"\r\n'
    b"\r\n"
    b"--inner-b\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Il giorno 21/09/2012 alle ore 15:16:38 (+02:00) il messaggio =C3=A8 stato accettato.\r\n"
    b"Trailing spaces stay   \r\n"
    b"\r\n"
    b"--inner-b\r\n"
    b'Content-Type: application/xml; name="daticert.xml"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b'<postacert tipo="accettazione" errore="nessuno"/>\r\n'
    b"--inner-b--\r\n"
)
HEADERS = [
    ("Date", "Mon, 23 Nov 2026 10:00:00 +0100"),
    ("From", '"Per conto di: alice@a.test" <posta-certificata@a.test>'),
    ("To", "alice@a.test"),
    ("Subject", "ACCETTAZIONE: =?UTF-8?Q?Perch=C3=A9?=\r\n =?UTF-8?Q?_no?="),
    ("Message-ID", "<opaque-1@a.test>"),
    ("X-Ricevuta", "accettazione"),
]


def openssl(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, check=False, timeout=60)


@dataclass
class Setup:
    dir: Path
    ca: pki.CertAuthority
    signer: cms.Signer
    tsa_cert: x509.Certificate

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"


@pytest.fixture(scope="session", params=["rsa", "ec"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    kind = request.param
    base = tmp_path_factory.mktemp(f"smime-{kind}")
    ca = pki.CertAuthority.load_or_create(base, f"S/MIME CA {kind}", kind=kind)
    key = pki.new_key(kind)
    cert = ca.issue_signing_cert(key, "Provider A", "posta-certificata@a.test")
    pki.write_key(base / "signing.key", key)
    pki.write_cert(base / "signing.pem", cert)
    tsa_key = pki.new_key(kind)
    tsa_cert = ca.issue_tsa_cert(tsa_key, "Provider A TSA")
    pki.write_cert(base / "tsa.pem", tsa_cert)
    local = tsa.LocalTSA(tsa_key, tsa_cert, SystemClock())
    return Setup(base, ca, cms.Signer(key, cert, SystemClock(), timestamper=local), tsa_cert)


@pytest.fixture(scope="session")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> pki.CertAuthority:
    return pki.CertAuthority.load_or_create(tmp_path_factory.mktemp("smime-stranger"))


def openssl_accepts(path: Path, ca_pem: Path) -> dict[str, bool]:
    return {
        cmd: openssl(cmd, "-verify", "-in", path, "-CAfile", ca_pem, "-out", "/dev/null").returncode == 0
        for cmd in ("cms", "smime")
    }


# --------------------------------------------------------------------------- wrap_signed


def test_openssl_verifies_crlf_and_bare_lf_files(setup: Setup, tmp_path: Path) -> None:
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    (tmp_path / "m.eml").write_bytes(message)
    (tmp_path / "lf.eml").write_bytes(message.replace(b"\r\n", b"\n"))
    for name in ("m.eml", "lf.eml"):
        assert openssl_accepts(tmp_path / name, setup.ca_pem) == {"cms": True, "smime": True}
        signed, info = smime.verify_message(
            (tmp_path / name).read_bytes(), [setup.ca.cert], require_timestamp=True
        )
        assert signed.inner == INNER
        assert info.timestamp_time is not None and info.signer == setup.signer.certificate


def test_one_flipped_byte_fails_everywhere(setup: Setup, tmp_path: Path) -> None:
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    at = message.index(b"accettato")
    flipped = message[:at] + b"A" + message[at + 1 :]
    (tmp_path / "bad.eml").write_bytes(flipped)
    (tmp_path / "badlf.eml").write_bytes(flipped.replace(b"\r\n", b"\n"))
    for name in ("bad.eml", "badlf.eml"):
        assert openssl_accepts(tmp_path / name, setup.ca_pem) == {"cms": False, "smime": False}
        with pytest.raises(cms.SignatureInvalid, match="messageDigest"):
            smime.verify_message((tmp_path / name).read_bytes(), [setup.ca.cert])


def test_untrusted_signer_fails(setup: Setup, stranger_ca: pki.CertAuthority, tmp_path: Path) -> None:
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    with pytest.raises(cms.CertificateUntrusted):
        smime.verify_message(message, [stranger_ca.cert])
    pki.write_cert(tmp_path / "stranger.pem", stranger_ca.cert)
    (tmp_path / "m.eml").write_bytes(message)
    assert openssl_accepts(tmp_path / "m.eml", tmp_path / "stranger.pem") == {
        "cms": False,
        "smime": False,
    }


def test_layout_is_byte_exact(setup: Setup) -> None:
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    assert b"\n" not in message.replace(b"\r\n", b"")  # CRLF only
    head, _, body = message.partition(b"\r\n\r\n")
    for name, value in HEADERS:
        assert f"{name}: {value}".encode() in head
    assert head.startswith(b"Date: ")
    boundary = re.search(rb'boundary="([^"]+)"', head)
    assert boundary is not None
    delim = b"--" + boundary.group(1)
    assert delim not in INNER
    assert b'protocol="application/pkcs7-signature"' in head and b'micalg="sha-256"' in head
    # part 1 is INNER exactly, framed by delimiter lines
    assert delim + b"\r\n" + INNER + b"\r\n" + delim + b"\r\n" in body
    sig_part = body.split(delim + b"\r\n")[2].split(b"\r\n" + delim + b"--")[0]
    sig_head, _, sig_b64 = sig_part.partition(b"\r\n\r\n")
    assert sig_head.split(b"\r\n") == [
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"',
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="smime.p7s"',
    ]
    lines = sig_b64.rstrip(b"\r\n").split(b"\r\n")
    assert all(len(line) == 76 for line in lines[:-1]) and 0 < len(lines[-1]) <= 76
    der = base64.b64decode(b"".join(lines), validate=True)
    cms.verify_detached(der, INNER, [setup.ca.cert])
    assert message.endswith(delim + b"--\r\n")

    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/signed"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["multipart/mixed", "application/pkcs7-signature"]


def test_boundary_never_occurs_in_the_signed_part(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    colliding = "a" * 32
    inner = INNER.replace(b"Trailing", b"------=_pecd_" + colliding.encode() + b" Trailing")
    tokens = iter([colliding, "b" * 32])
    monkeypatch.setattr("pecd.format.compose.secrets.token_hex", lambda n: next(tokens))
    message = bytes(smime.wrap_signed(HEADERS, inner, setup.signer))
    assert b'boundary="----=_pecd_' + b"b" * 32 + b'"' in message
    assert smime.verify_message(message, [setup.ca.cert])[0].inner == inner


def test_inputs_that_would_break_the_signature_are_refused(setup: Setup) -> None:
    with pytest.raises(ValueError, match="bare LF"):
        smime.wrap_signed(HEADERS, INNER.replace(b"\r\n", b"\n"), setup.signer)
    with pytest.raises(ValueError, match="not folding"):
        smime.wrap_signed([("Subject", "hi\r\nBcc: eve@evil.test")], INNER, setup.signer)
    with pytest.raises(ValueError, match="header name"):
        smime.wrap_signed([("Bad Name", "x")], INNER, setup.signer)
    with pytest.raises(ValueError, match="written by wrap_signed"):
        smime.wrap_signed([("Content-Type", "text/plain")], INNER, setup.signer)
    with pytest.raises(ValueError, match="not ASCII"):
        smime.wrap_signed([("Subject", "Perché")], INNER, setup.signer)


# --------------------------------------------------------------------------- split / verify


def test_split_signed_returns_the_parts(setup: Setup) -> None:
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    for variant in (message, message.replace(b"\r\n", b"\n")):
        signed = smime.split_signed(variant)
        assert signed.inner == INNER
        assert signed.headers["X-Ricevuta"] == "accettazione"
        assert signed.headers["Message-ID"] == "<opaque-1@a.test>"
        assert signed.headers.get_content_type() == "multipart/signed"
        assert signed.signature.startswith(b"\x30")
        assert cms.extract_timestamp_token(signed.signature) is not None


def test_timestamp_in_a_message_passes_openssl_ts_verify(setup: Setup, tmp_path: Path) -> None:
    signed = smime.split_signed(bytes(smime.wrap_signed(HEADERS, INNER, setup.signer)))
    extracted = cms.extract_timestamp_token(signed.signature)
    assert extracted is not None
    (tmp_path / "tok.der").write_bytes(extracted[0])
    (tmp_path / "sig.bin").write_bytes(extracted[1])
    r = openssl(
        "ts", "-verify", "-data", tmp_path / "sig.bin", "-in", tmp_path / "tok.der",
        "-token_in", "-CAfile", setup.ca_pem, "-untrusted", setup.dir / "tsa.pem",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_openssl_made_message_verifies_here(setup: Setup, tmp_path: Path) -> None:
    """The other direction: openssl writes x-pkcs7-signature and LF line ends; we still verify."""
    (tmp_path / "inner.txt").write_bytes(INNER.replace(b"\r\n", b"\n"))
    r = openssl(
        "smime", "-sign", "-in", tmp_path / "inner.txt", "-signer", setup.dir / "signing.pem",
        "-inkey", setup.dir / "signing.key", "-md", "sha256", "-from", "a@a.test",
        "-subject", "hi", "-out", tmp_path / "o.eml",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    raw = (tmp_path / "o.eml").read_bytes()
    signed, info = smime.verify_message(raw, [setup.ca.cert])
    assert signed.inner == INNER
    assert info.signer == setup.signer.certificate and info.timestamp_time is None
    with pytest.raises(cms.SignatureInvalid, match="timestamp missing"):
        smime.verify_message(raw, [setup.ca.cert], require_timestamp=True)
    tampered = raw.replace(b"accettato", b"accettata")
    assert tampered != raw
    with pytest.raises(cms.SignatureInvalid):
        smime.verify_message(tampered, [setup.ca.cert])


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@a.test\r\nSubject: plain\r\n\r\nhello\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n",
        b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=x\r\n'
        b"\r\n--x\r\n\r\nhi\r\n--x\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--x--\r\n",
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=x\r\n'
        b"\r\n--x\r\n\r\nhi\r\n--x--\r\n",
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=x\r\n'
        b"\r\n--x\r\n\r\nhi\r\n--xy\r\nnot a delimiter\r\n",
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=x\r\n'
        b"\r\n--x\r\n\r\nhi\r\n--x\r\nContent-Type: application/pkcs7-signature\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--x--\r\n",
        b"no header separator at all",
    ],
    ids=["plain", "mixed", "pgp", "one-part", "no-second-delimiter", "bad-base64", "no-body"],
)
def test_not_signed(message: bytes) -> None:
    with pytest.raises(smime.NotSigned):
        smime.split_signed(message)


def test_delimiter_rules(setup: Setup) -> None:
    """Transport padding after a delimiter is allowed; a longer boundary is not a delimiter."""
    message = bytes(smime.wrap_signed(HEADERS, INNER, setup.signer))
    boundary = re.search(rb'boundary="([^"]+)"', message)
    assert boundary is not None
    delim = b"--" + boundary.group(1)
    padded = message.replace(delim + b"\r\n", delim + b" \t\r\n")
    assert smime.verify_message(padded, [setup.ca.cert])[0].inner == INNER
    # a line that merely starts with the delimiter inside the signed part stays content;
    # wrap_signed never picks such a boundary, so assemble this message by hand
    b = b"simple"
    inner = INNER.replace(b"Trailing", b"--" + b + b"xyz\r\n--" + b + b"-- \r\nTrailing")
    sig = base64.encodebytes(setup.signer.sign_detached(inner)).replace(b"\n", b"\r\n")
    handmade = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b"micalg=sha-256; boundary=" + b + b"\r\n\r\n"
        b"--" + b + b"\r\n" + inner + b"\r\n--" + b + b"\r\n"
        b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + sig + b"\r\n--" + b + b"--\r\n"
    )
    with pytest.raises(smime.NotSigned, match="no signature part"):
        smime.split_signed(handmade)  # "--simple-- " in the content is a real close delimiter
    inner = INNER.replace(b"Trailing", b"--" + b + b"xyz\r\n--" + b + b"--x\r\nTrailing")
    sig = base64.encodebytes(setup.signer.sign_detached(inner)).replace(b"\n", b"\r\n")
    handmade = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b"micalg=sha-256; boundary=" + b + b"\r\n\r\n"
        b"--" + b + b"\r\n" + inner + b"\r\n--" + b + b"\r\n"
        b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + sig + b"\r\n--" + b + b"--\r\n"
    )
    assert smime.verify_message(handmade, [setup.ca.cert])[0].inner == inner
