"""Forged or replayed certified mail from the network: envelopes crafted with the real crypto
(pecd.trust.pki, pecd.trust.cms, the pecd.format.pec builders) and sent over SMTP to b.test's
inbound listener.

Only the honest envelope is delivered as certified. A bad or missing signature, a signer not in
the index, an expired certificate, an SMTP sender or a certified sender outside the signer's
domains, and a receipt vouching for another provider's mailbox all reach the recipient only
inside an anomaly envelope (RFC 6109 §3.2.2), each with an ``anomaly`` ledger row saying why;
a replayed identifier is dropped with a ``duplicate`` row and produces nothing a second time."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pecd.clock import Clock, ManualClock, SystemClock
from pecd.format import compose, envelope, pec, receipts
from pecd.format.daticert import Recipient
from pecd.format.pec import Issuer, Transaction
from pecd.trust import pki
from pecd.trust.cms import Signer
from pecd.trust.tsa import LocalTSA

from .attack_support import ALICE, BOB, kind_of, ledger_rows, provider_pair, serving, wait_until
from .conftest import ProviderDir, client_tls

SERVICE_A = "posta-certificata@a.test"


def _issuer(a: ProviderDir, key: pki.PrivateKey, cert: x509.Certificate, clock: Clock,
            timestamped: bool = True) -> Issuer:
    keys = a.root / "keys"
    tsa = LocalTSA(pki.load_key(keys / "tsa.key"), pki.load_cert(keys / "tsa.pem"), clock)
    signer = Signer(key, cert, clock, timestamper=tsa if timestamped else None)
    return Issuer("Provider a.test", "a.test", SERVICE_A, signer)


def _real_issuer(a: ProviderDir) -> Issuer:
    keys = a.root / "keys"
    return _issuer(a, pki.load_key(keys / "signing.key"), pki.load_cert(keys / "signing.pem"),
                   SystemClock())


def _expired_cert(base: Path, key: pki.PrivateKey) -> tuple[x509.Certificate, datetime]:
    """A provider certificate from the shared CA whose validity ended a moment ago."""
    ca_key, ca_cert = pki.load_key(base / "ca" / "ca.key"), pki.load_cert(base / "ca" / "ca.pem")
    start = ca_cert.not_valid_before_utc
    end = datetime.now(UTC) - timedelta(seconds=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Provider a.test (old key)"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Provider a.test")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(SERVICE_A)]), critical=False)
        .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, start + timedelta(seconds=10)


def _envelope(issuer: Issuer, subject: str, sender: str = ALICE,
              at: datetime | None = None) -> bytes:
    at = (at or datetime.now(UTC)).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("a.test", at), ref_msgid=None, sender=sender,
                     recipients=(Recipient(BOB),), reply_to=sender, subject=subject,
                     accepted_at=at, issuer_name=issuer.name)
    original = (f"From: {sender}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nciao\r\n").encode()
    return bytes(envelope.transport_envelope(tx, original, issuer, at))


def _forged_receipt(issuer: Issuer) -> bytes:
    """a.test says it delivered bob's message into a b.test mailbox: not its mailbox to vouch for."""
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("b.test", at), ref_msgid=None, sender=BOB,
                     recipients=(Recipient("carol@b.test"),), reply_to=BOB,
                     subject="receipt for another provider's mailbox", accepted_at=at)
    return bytes(receipts.delivery(tx, "carol@b.test", "sintetica", None, issuer, at)[1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProviderDir, ProviderDir, Path]:
    base = tmp_path_factory.mktemp("forgery")
    a, b = provider_pair(base)
    return a, b, base


def _send(port: int, ca: Path, mail_from: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=client_tls(ca))
        s.ehlo()
        code, msg = s.mail(mail_from)
        assert code == 250, msg
        code, msg = s.rcpt(BOB)
        assert code == 250, msg
        return s.data(data)


def test_forged_envelopes_and_receipts_are_not_certified(
        pair: tuple[ProviderDir, ProviderDir, Path]) -> None:
    a, b, base = pair
    real = _real_issuer(a)
    honest = _envelope(real, "onesto")
    pos = honest.index(b"Identificativo messaggio")
    tampered = _envelope(real, "manomesso")
    tampered = tampered.replace(b"Identificativo messaggio", b"Identificativo messaggiO", 1)
    stranger_key = pki.new_key("ec")
    stranger_cert = pki.CertAuthority.load_or_create(base / "ca").issue_signing_cert(
        stranger_key, "Provider a.test", SERVICE_A)
    old_key = pki.new_key("ec")
    old_cert, signed_at = _expired_cert(base, old_key)
    # the expired certificate was a.test's once: it is still in b's index
    card = base / "old-card.json"
    card.write_text(a.cli("index", "export").replace(
        a.root.joinpath("keys", "signing.pem").read_text().strip(),
        old_cert.public_bytes(serialization.Encoding.PEM).decode().strip()))
    assert "imported" in b.cli("index", "import", str(card))

    cases: dict[str, tuple[str, bytes, str]] = {
        # name: (MAIL FROM, message, what the anomaly row must say)
        "tampered": (ALICE, tampered, "messageDigest does not match"),
        "unsigned": (ALICE, b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: senza firma\r\n"
                            b"X-Trasporto: posta-certificata\r\n\r\nfidati\r\n", "not an S/MIME"),
        "stranger": (ALICE, _envelope(_issuer(a, stranger_key, stranger_cert, SystemClock()),
                                      "sconosciuto"), "not a provider in the index"),
        "expired": (ALICE, _envelope(_issuer(a, old_key, old_cert, ManualClock(signed_at),
                                             timestamped=False), "scaduto", at=signed_at),
                    "expired"),
        "smtp sender domain": ("mallory@evil.test", _envelope(real, "dominio smtp"),
                               "sender domain evil.test is not managed"),
        "certified sender domain": (ALICE, _envelope(real, "dominio certificato", "ceo@b.test"),
                                    "ceo@b.test is not in a domain managed by"),
        "receipt for another's mailbox": (SERVICE_A, _forged_receipt(real),
                                          "carol@b.test is not in a domain managed by"),
    }
    assert pos > 0
    before = {e: len(ledger_rows(b, e)) for e in ("anomaly", "duplicate", "taken-in-charge")}
    with serving(b) as (svc,):
        port = svc.ports.inbound
        assert _send(port, b.ca, ALICE, honest)[0] == 250
        for _name, (mail_from, data, _reason) in cases.items():
            code, msg = _send(port, b.ca, mail_from, data)
            assert code == 250, msg  # accepted for judgement; the verdict is the reception's
        wait_until(lambda: len(b.messages(BOB)) == 1 + len(cases), what="bob's mailbox")
        assert _send(port, b.ca, ALICE, honest)[0] == 250  # the replay
        wait_until(lambda: len(ledger_rows(b, "duplicate")) > before["duplicate"], what="dedup")

    kinds = [kind_of(m) for m in b.messages(BOB)]
    assert kinds.count("posta-certificata") == 1 and kinds.count("errore") == len(cases)
    delivered = next(m for m in b.messages(BOB) if kind_of(m) == "posta-certificata")
    assert b"onesto" in delivered
    for m in b.messages(BOB):
        if kind_of(m) == "errore":  # the anomaly envelope carries what arrived, marked as such
            assert pec.parse(m).headers["Subject"].startswith("ANOMALIA MESSAGGIO: ")
    anomalies = ledger_rows(b, "anomaly")[before["anomaly"]:]
    assert len(anomalies) == len(cases)
    for name, (_mail_from, _data, reason) in cases.items():
        assert sum(reason in r["detail"]["reason"] for r in anomalies) == 1, \
            (name, [r["detail"]["reason"] for r in anomalies])
    assert len(ledger_rows(b, "taken-in-charge")) == before["taken-in-charge"] + 1
    assert len(ledger_rows(b, "duplicate")) == before["duplicate"] + 1
    assert "ledger ok" in b.cli("ledger", "verify")
