"""Forged reading evidence: a provider in the index (c.test, with a real certificate) signs a
``presa-visione`` saying that bob@b.test opened alice's message. Only b.test may say that about
its own mailbox: the sender's provider (a.test) delivers the forgery to alice inside an anomaly
envelope, records an ``anomaly`` row and leaves the read time unset; the honest evidence from
b.test, sent the same way, is taken as a receipt and sets it."""

from __future__ import annotations

import smtplib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from pecd.clock import SystemClock
from pecd.format.daticert import Recipient
from pecd.format.pec import Issuer, Transaction
from pecd.points import consultation
from pecd.trust import pki
from pecd.trust.cms import Signer
from pecd.trust.tsa import LocalTSA

from .attack_support import ALICE, ALICE_PW, kind_of, ledger_rows, serving, wait_until
from .conftest import ProviderDir, client_tls, exchange_cards, make_provider, submit
from .interop_support import configure


def _issuer(p: ProviderDir) -> Issuer:
    keys = p.root / "keys"
    clock = SystemClock()
    tsa = LocalTSA(pki.load_key(keys / "tsa.key"), pki.load_cert(keys / "tsa.pem"), clock)
    signer = Signer(pki.load_key(keys / "signing.key"), pki.load_cert(keys / "signing.pem"),
                    clock, timestamper=tsa)
    return Issuer(f"Provider {p.domain}", p.domain, f"posta-certificata@{p.domain}", signer)


def _evidence(issuer: Issuer, pec_id: str) -> bytes:
    now = datetime.now(UTC)
    tx = Transaction(identifier=pec_id, ref_msgid=None, sender=ALICE,
                     recipients=(Recipient("bob@b.test"),), reply_to=ALICE, subject="Contratto",
                     accepted_at=now, issuer_name=issuer.name)
    ev = consultation.Evidence(event="ContentHandover", identifier=pec_id,
                               recipient="bob@b.test", time=now, via="imap")
    return bytes(consultation.build_evidence(tx, ev, issuer)[1])


def _send(port: int, ca: Path, mail_from: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=client_tls(ca))
        s.ehlo()
        assert s.mail(mail_from)[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        code, msg = s.data(data)
        assert code == 250, msg


def _read_time(p: ProviderDir, pec_id: str) -> float | None:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        value = conn.execute("SELECT read FROM tracking WHERE pec_id=?", (pec_id,)).fetchone()[0]
        return None if value is None else float(value)
    finally:
        conn.close()


def test_attack_forged_read_evidence_from_another_provider_is_an_anomaly(
        tmp_path: Path) -> None:
    a, b, c = (make_provider(tmp_path, d, tmp_path / "ca") for d in ("a.test", "b.test", "c.test"))
    for p in (a, b, c):
        configure(p, "consultation", enabled=True)
    exchange_cards(a, b, c)
    a.add_user(ALICE, ALICE_PW)
    with serving(a) as (svc,):  # b.test is down: only the evidence below ever comes back
        code, reply = submit(a, ALICE, ALICE_PW, ALICE, ["bob@b.test"],
                             b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: Contratto\r\n"
                             b"X-Presa-Visione: si\r\n\r\nfirmato\r\n", svc.ports.submission)
        assert code == 250, reply
        wait_until(lambda: len(a.messages(ALICE)) == 1, what="acceptance")
        (accepted,) = ledger_rows(a, "accepted")
        pec_id = accepted["msgid"]
        _send(svc.ports.inbound, a.ca, "posta-certificata@c.test", _evidence(_issuer(c), pec_id))
        wait_until(lambda: len(ledger_rows(a, "anomaly")) == 1, what="the forgery judged")
        assert _read_time(a, pec_id) is None
        _send(svc.ports.inbound, a.ca, "posta-certificata@b.test", _evidence(_issuer(b), pec_id))
        wait_until(lambda: _read_time(a, pec_id) is not None, what="the honest evidence")

    (anomaly,) = ledger_rows(a, "anomaly")
    assert "bob@b.test is not in a domain managed by Provider c.test" in \
        anomaly["detail"]["reason"]
    kinds = sorted(kind_of(m) for m in a.messages(ALICE))
    assert kinds == ["accettazione", "errore", "presa-visione"]
    (received,) = [r for r in ledger_rows(a, "receipt-received")
                   if r["detail"]["type"] == "presa-visione"]
    assert received["provider"] == "Provider b.test"
