"""The recipient's side beyond evidence: arrival notices (``pecd user set --notify``) sent as
ordinary mail through the smarthost, received here by a real SMTP server on loopback."""

from __future__ import annotations

import asyncio
import email
import json
import re
import sqlite3
from email import policy
from pathlib import Path

import pytest

from pecd.clock import ManualClock
from pecd.config import ConfigError, parse_size
from pecd.format import pec
from pecd.points import arrival

from .conftest import ProviderDir, free_port, running, submit, wait_for
from .interop_support import configure, ledger_rows
from .pechelpers import smtp_sink

ORIGINAL = (b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: Fattura 42\r\n"
            b"Message-ID: <fattura-42@client.a.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\nImporto segreto: 1000 euro\r\n")


async def _send(a: ProviderDir, port: int) -> None:
    code, reply = await asyncio.get_running_loop().run_in_executor(
        None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
        ORIGINAL, port)
    assert code == 250, reply


def test_arrival_notice_text_has_no_content() -> None:
    at = ManualClock().now()
    msgid, data = arrival.notice(
        service_address="posta-certificata@b.test", provider_name="Provider b.test",
        domain="b.test", to="bob.home@esterno.test", mailbox="bob@b.test",
        sender="alice@a.test", subject="Fattura 42", pec_id="id-1@a.test", at=at)
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg["Message-ID"] == f"<{msgid}>" and msg["Auto-Submitted"] == "auto-generated"
    assert not msg.is_multipart() and msg.get_content_type() == "text/plain"
    body = msg.get_content()
    assert "alice@a.test" in body and "Fattura 42" in body and "id-1@a.test" in body


def test_arrival_notice_through_the_smarthost(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    assert "arrival notices to bob.home@esterno.test" in b.cli(
        "user", "set", "bob@b.test", "--notify", "bob.home@esterno.test")

    async def scenario() -> bytes:
        server, sink, port = await smtp_sink()
        configure(b, "relay", smarthost="127.0.0.1", smarthost_port=port)
        try:
            async with running(a, b) as (svc_a, _svc_b):
                await _send(a, svc_a.ports.submission)
                await wait_for(lambda: len(sink.got) == 1
                               and len(a.messages("alice@a.test")) == 2)
        finally:
            server.close()
            await server.wait_closed()
        (got,) = sink.got
        assert got.mail_from == "posta-certificata@b.test"
        assert got.rcpts == ["bob.home@esterno.test"]
        return bytes(got.data)

    data = asyncio.run(scenario())
    msg = email.message_from_bytes(data, policy=policy.default)
    assert msg["To"] == "bob.home@esterno.test"
    assert str(msg["Subject"]) == "Nuova posta certificata da alice@a.test: Fattura 42"
    assert not msg.is_multipart()  # no attachment, no original
    body = msg.get_content()  # type: ignore[attr-defined]
    assert "Fattura 42" in body and "alice@a.test" in body
    assert b"segreto" not in data and b"X-Trasporto" not in data
    assert "signature" not in msg.get_content_type()
    (row,) = ledger_rows(b, "arrival-notice")
    assert json.loads(str(row["recipients"])) == ["bob@b.test"]
    assert row["detail"] == {"to": "bob.home@esterno.test"}
    assert len(b.messages("bob@b.test")) == 1
    assert "arrival notices off" in b.cli("user", "set", "bob@b.test", "--notify", "")


def test_a_notice_that_cannot_go_never_holds_up_the_delivery(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    b.cli("user", "set", "bob@b.test", "--notify", "bob.home@esterno.test")
    configure(b, "relay", smarthost="127.0.0.1", smarthost_port=free_port())  # nobody there

    async def scenario() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            await _send(a, svc_a.ports.submission)
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)  # delivery receipt
            await wait_for(lambda: bool(ledger_rows(b, "deferred")))

    asyncio.run(scenario())
    assert len(b.messages("bob@b.test")) == 1
    (deferred,) = ledger_rows(b, "deferred")[:1]
    assert "bob.home@esterno.test" in str(deferred["recipients"])
    assert _queued(b) == [("relay", "deferred")]


def _queued(p: ProviderDir) -> list[tuple[str, str]]:
    conn = sqlite3.connect(Path(p.root) / "data" / "pecd.sqlite")
    try:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT kind, state FROM queue WHERE state != 'done'")]
    finally:
        conn.close()


# --- quota ------------------------------------------------------------------------------------

def _usage(box: Path) -> int:
    return sum(p.stat().st_size for sub in ("new", "cur") if (box / sub).exists()
               for p in (box / sub).iterdir())


def _fill(box: Path, target: int) -> None:
    """Make the Maildir hold ``target`` bytes, as mail Dovecot stored (or deleted) would."""
    filler = box / "cur" / "1.filler.host:2,S"
    if filler.exists():
        filler.unlink()
    missing = target - _usage(box)
    assert missing > 0
    filler.write_bytes(b"x" * missing)


def test_quota_warnings_once_per_crossing_and_a_full_mailbox_refuses(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    box = b.maildir("bob@b.test")

    async def scenario() -> list[str]:
        async with running(a, b) as (svc_a, _svc_b):
            async def deliver(n: int) -> None:
                await _send(a, svc_a.ports.submission)
                await wait_for(lambda: len(a.messages("alice@a.test")) == 2 * n)

            await deliver(1)  # no quota yet: how big is one envelope here?
            size = _usage(box)
            quota = 20 * size
            b.cli("user", "set", "bob@b.test", "--quota", str(quota))
            _fill(box, int(quota * 0.80) - size // 2)
            await deliver(2)  # → 82.5%: the 80% warning
            await deliver(3)  # → 87.5%: nothing new
            _fill(box, int(quota * 0.95) - size // 2)
            await deliver(4)  # → 97.5%: the 95% warning
            await deliver(5)  # would be 102.5%: refused, the sender is told
            _fill(box, quota // 2)  # bob deleted mail
            await deliver(6)  # → about 55%: the level comes down, no warning
            _fill(box, int(quota * 0.80) - size // 2)
            await deliver(7)  # → 82.5% again: a new crossing, a new warning
        return [str(r["detail"]["level"]) for r in ledger_rows(b, "quota-warning")]

    assert asyncio.run(scenario()) == ["80", "95", "80"]
    warnings = [m for m in b.messages("bob@b.test") if b"Auto-Submitted: auto-generated" in m]
    # Maildir names sort by second, then queue id as text: the order is the ledger's (above)
    assert sorted(re.findall(rb"casella piena al (\d+)%", b"".join(warnings))) == [b"80", b"80", b"95"]
    (refused,) = ledger_rows(b, "non-delivery")
    assert refused["detail"]["error"] == "altro"  # type: ignore[index]
    assert "mailbox full" in refused["detail"]["reason"]  # type: ignore[index]
    notices = [m for m in a.messages("alice@a.test") if b"X-Ricevuta: errore-consegna" in m]
    assert len(notices) == 1
    parsed = pec.parse(notices[0])
    assert parsed.certdata is not None and parsed.certdata.error == "altro"
    assert "mailbox full" in (parsed.certdata.extended_error or "")
    assert len(ledger_rows(b, "delivered")) == 6


def test_size_units() -> None:
    assert parse_size("1GB", "x") == 1 << 30
    assert parse_size("500MB", "x") == 500 << 20
    assert parse_size("64K", "x") == 64 << 10
    assert parse_size(1000, "x") == 1000
    for bad in ("1PB", "", "0", "-5MB", True):
        with pytest.raises(ConfigError):
            parse_size(bad, "[delivery] quota")
