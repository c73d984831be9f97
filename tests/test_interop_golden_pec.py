"""pecd reads PEC messages in the layout real providers send (tests/golden/pec/, written by hand
from RFC 6109 §4.3 and the published real daticert layout; see regenerate.py there): the
``application/x-pkcs7-signature`` protocol, ``multipart/alternative`` text + HTML in ISO-8859-1
quoted-printable, base64 ``daticert.xml`` before ``postacert.eml``, a one-line daticert without
``msgid``, signatures made by openssl rather than by pecd."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pecd.format import daticert, pec
from pecd.trust import pki, smime
from pecd.trust.cms import SignatureInvalid

from .conftest import openssl_verifies, pecd

GOLDEN = Path(__file__).parent / "golden" / "pec"
PEC_ID = "opec275.20120921151638.12345.06.1.48@pec.example.it"

EXPECTED = {
    "posta-certificata": dict(
        category="envelope", ricevuta=None, error="nessuno", msgid=None,
        recipients=(daticert.Recipient("anna.bianchi@mail.example.com", "esterno"),),
        issuer="EXAMPLE PEC S.p.A.", original=True, receipt_kind="completa",
        delivered_to=None, time=datetime(2012, 9, 21, 13, 16, 38, tzinfo=UTC)),
    "accettazione": dict(
        category="receipt", ricevuta="accettazione", error="nessuno",
        msgid="<5058B2C2.4030607@pec.example.it>",
        recipients=(daticert.Recipient("anna.bianchi@mail.example.com", "esterno"),
                    daticert.Recipient("luca.verdi@pec.other.example.it", "certificato")),
        issuer="EXAMPLE PEC S.p.A.", original=False, receipt_kind=None, delivered_to=None,
        time=datetime(2012, 9, 21, 13, 16, 38, tzinfo=UTC)),
    "avvenuta-consegna": dict(
        category="receipt", ricevuta="avvenuta-consegna", error="nessuno",
        msgid="<5058B2C2.4030607@pec.example.it>",
        recipients=(daticert.Recipient("luca.verdi@pec.other.example.it", "certificato"),),
        issuer="OTHER PEC S.r.l.", original=True, receipt_kind="completa",
        delivered_to="luca.verdi@pec.other.example.it",
        time=datetime(2012, 9, 21, 13, 16, 41, tzinfo=UTC)),
    "errore-consegna": dict(
        category="receipt", ricevuta="errore-consegna", error="no-dest",
        msgid="<5058B2C2.4030607@pec.example.it>",
        recipients=(daticert.Recipient("nessuno@pec.other.example.it", "certificato"),),
        issuer="OTHER PEC S.r.l.", original=False, receipt_kind=None,
        delivered_to="nessuno@pec.other.example.it",
        time=datetime(2012, 9, 21, 13, 16, 42, tzinfo=UTC)),
}


def test_every_golden_sample_is_listed() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pecd_parses_real_world_layout(name: str) -> None:
    want = EXPECTED[name]
    parsed = pec.parse((GOLDEN / f"{name}.eml").read_bytes())
    assert parsed.category == want["category"]
    assert parsed.ricevuta == want["ricevuta"]
    cd = parsed.certdata
    assert cd is not None
    assert cd.type == name
    assert cd.error == want["error"]
    assert cd.sender == "mario.rossi@pec.example.it"
    assert cd.reply_to == "mario.rossi@pec.example.it"
    assert cd.subject == "Photos"
    assert cd.identifier == PEC_ID
    assert cd.msgid == want["msgid"]
    assert cd.recipients == want["recipients"]
    assert cd.issuer == want["issuer"]
    assert cd.time == want["time"]
    assert cd.receipt_kind == want["receipt_kind"]
    assert cd.delivered_to == want["delivered_to"]
    if want["original"]:
        assert parsed.original is not None
        assert b"Subject: Photos\r\n" in parsed.original
        assert b"Message-ID: <5058B2C2.4030607@pec.example.it>\r\n" in parsed.original
    else:
        assert parsed.original is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_signatures_made_by_openssl_verify_in_pecd(name: str, tmp_path: Path) -> None:
    data = (GOLDEN / f"{name}.eml").read_bytes()
    roots = pki.load_certs(GOLDEN / "ca.pem")
    _signed, info = smime.verify_message(data, roots)
    assert info.signing_time is not None and info.signing_time.year == 2012
    assert "Posta Certificata pec." in info.signer.subject.rfc4514_string()
    out = pecd("-c", str(tmp_path / "unused.toml"), "verify", "--ca", str(GOLDEN / "ca.pem"),
               "--no-timestamp", str(GOLDEN / f"{name}.eml"))
    assert "signature: valid" in out and f"type: {name}" in out and PEC_ID in out
    assert openssl_verifies(GOLDEN / f"{name}.eml", GOLDEN / "ca.pem")

    # one byte of the signed daticert changed: both judges refuse
    pos = data.index(b"Content-Type: application/xml")
    tampered = data[:pos] + data[pos:].replace(b"PD94", b"PD95", 1)
    with pytest.raises(SignatureInvalid):
        smime.verify_message(tampered, roots)
    (tmp_path / "tampered.eml").write_bytes(tampered)
    assert not openssl_verifies(tmp_path / "tampered.eml", GOLDEN / "ca.pem")
