"""Certified mail end to end: two providers on loopback, real SMTP and TLS, openssl as judge."""

from __future__ import annotations

import asyncio
import smtplib
import sqlite3
import subprocess
from pathlib import Path

import psycopg
import pytest

from pecd.format import daticert, pec
from pecd.service import Service

from .conftest import (
    ProviderDir,
    client_tls,
    openssl_timestamp_verifies,
    openssl_verifies,
    running,
    submit,
    wait_for,
)

ORIGINAL = (
    b"From: Alice <alice@a.test>\r\n"
    b"To: Bob <bob@b.test>\r\n"
    b"Subject: Contratto firmato\r\n"
    b"Message-ID: <original-1@client.a.test>\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Buongiorno Bob,\r\nin allegato il contratto.\r\n"
)


def _kind(msg: bytes) -> str:
    parsed = pec.parse(msg)
    assert parsed.certdata is not None
    return parsed.certdata.type


async def _run_pipeline(a: ProviderDir, b: ProviderDir) -> dict[str, bytes]:
    async with running(a, b) as (svc_a, _svc_b):
        loop = asyncio.get_running_loop()
        code, reply = await loop.run_in_executor(
            None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
            ORIGINAL, svc_a.ports.submission)
        assert code == 250, reply

        def done() -> bool:
            return (len(a.messages("alice@a.test")) == 2 and len(b.messages("bob@b.test")) == 1
                    and len(a.messages("posta-certificata@a.test")) == 1)

        await wait_for(done)
    out = {_kind(m): m for m in a.messages("alice@a.test")}
    out["posta-certificata"] = b.messages("bob@b.test")[0]
    out["presa-in-carico"] = a.messages("posta-certificata@a.test")[0]
    return out


def test_certified_mail_end_to_end(two_providers_db: tuple[ProviderDir, ProviderDir],
                                   tmp_path: Path) -> None:
    a, b = two_providers_db
    msgs = asyncio.run(_run_pipeline(a, b))
    assert set(msgs) == {"accettazione", "avvenuta-consegna", "posta-certificata",
                         "presa-in-carico"}

    envelope = pec.parse(msgs["posta-certificata"])
    assert envelope.headers["X-Trasporto"] == "posta-certificata"
    assert envelope.headers["X-Riferimento-Message-ID"] == "<original-1@client.a.test>"
    assert envelope.headers["Subject"] == "POSTA CERTIFICATA: Contratto firmato"
    assert envelope.original == ORIGINAL  # the original travels untouched
    assert envelope.certdata is not None
    assert envelope.certdata.sender == "alice@a.test"
    assert envelope.certdata.recipients == (daticert.Recipient("bob@b.test", "certificato"),)
    pec_id = envelope.certdata.identifier
    assert pec_id.endswith("@a.test")

    delivery = pec.parse(msgs["avvenuta-consegna"])
    assert delivery.certdata is not None
    assert delivery.certdata.delivered_to == "bob@b.test"
    assert delivery.certdata.identifier == pec_id
    assert delivery.certdata.receipt_kind == "completa"
    assert delivery.original == ORIGINAL  # complete form carries the original
    take_charge = pec.parse(msgs["presa-in-carico"])
    assert take_charge.certdata is not None
    assert take_charge.certdata.taken_in_charge == ("bob@b.test",)

    # the outside judge: openssl verifies every signature and every timestamp
    for name, data in msgs.items():
        eml = tmp_path / f"{name}.eml"
        eml.write_bytes(data)
        assert openssl_verifies(eml, a.ca), name
        tsa = (a if name in ("accettazione", "posta-certificata") else b).tsa_cert
        assert openssl_timestamp_verifies(eml, a.ca, tsa), name
        assert "signature: valid" in a.cli("verify", str(eml))
        # a byte flipped in the signed body must make both openssl and pecd fail
        tampered = tmp_path / f"{name}-tampered.eml"
        pos = data.index(b"Identificativo messaggio")
        tampered.write_bytes(data[:pos] + b"J" + data[pos + 1:])
        assert not openssl_verifies(tampered, a.ca), name
        a.cli("verify", str(tampered), ok=False)

    # every event is in the ledgers, and the ledgers verify
    status_a = a.cli("status", pec_id)
    for event in ("submitted", "accepted", "relayed", "receipt-received"):
        assert f'"event": "{event}"' in status_a or event == "submitted", event
    assert '"event": "accepted"' in status_a
    status_b = b.cli("status", pec_id)
    for event in ("taken-in-charge", "delivered"):
        assert f'"event": "{event}"' in status_b, event
    assert "ledger ok" in a.cli("ledger", "verify")
    assert "ledger ok" in b.cli("ledger", "verify")

    url = b.config.paths.database_url
    if url is None:
        # editing a row with the sqlite3 shell is caught by the chain (triggers can be dropped)
        db = b.root / "data" / "pecd.sqlite"
        triggers = [r[0] for r in sqlite3.connect(db).execute(
            "SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='ledger'")]
        script = "".join(f"DROP TRIGGER {t};" for t in triggers)
        script += "UPDATE ledger SET subject='forged' WHERE seq=2;"
        subprocess.run(["sqlite3", str(db), script], check=True)
    else:
        # nothing of the provider's state in a local SQLite file
        assert not list((b.root / "data").glob("pecd.sqlite*"))
        # the table owner can switch the triggers off: the chain still catches the edit
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("ALTER TABLE ledger DISABLE TRIGGER USER")
            pg.execute("UPDATE ledger SET subject='forged' WHERE seq=2")
    out = b.cli("ledger", "verify", ok=False)
    assert "row 2" in out


async def _refusals(a: ProviderDir, b: ProviderDir) -> None:
    svc_a = Service(a.config)
    await svc_a.start()
    loop = asyncio.get_running_loop()
    port = svc_a.ports.submission

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo()
            assert not s.has_extn("auth"), "AUTH must not be offered before TLS"
            code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlQGEudGVzdABhbGljZS1zZWNyZXQ=")
            assert code == 538
            code, _ = s.mail("alice@a.test")
            assert code == 530  # no unauthenticated submission
            s.starttls(context=client_tls(a.ca))
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice@a.test", "wrong")
            s.login("alice@a.test", "alice-secret")
            code, msg = s.mail("mallory@a.test")
            assert code == 553, msg
            code, _ = s.mail("alice@a.test")
            assert code == 250
            s.rcpt("bob@b.test")
            code, msg = s.data(ORIGINAL.replace(b"From: Alice <alice@a.test>",
                                                b"From: Boss <boss@a.test>"))
            assert code == 550, msg

    def implicit_tls() -> None:
        with smtplib.SMTP_SSL("127.0.0.1", svc_a.ports.smtps, timeout=30,
                              context=client_tls(a.ca)) as s:
            s.login("alice@a.test", "alice-secret")
            code, _ = s.mail("alice@a.test")
            assert code == 250

    try:
        await loop.run_in_executor(None, session)
        await loop.run_in_executor(None, implicit_tls)
    finally:
        await svc_a.stop()


def test_submission_refusals(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    asyncio.run(_refusals(a, b))
    conn = sqlite3.connect(a.root / "data" / "pecd.sqlite")
    events = [r[0] for r in conn.execute("SELECT event FROM ledger")]
    assert events.count("auth-failed") == 2  # smtplib tries PLAIN, then LOGIN
    assert events.count("submission-refused") == 2
    stored = conn.execute("SELECT password_hash FROM users").fetchone()[0]
    assert stored.startswith("$argon2id$") and "alice-secret" not in stored
