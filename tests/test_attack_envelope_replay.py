"""Replayed certified mail (issue 13, items 1 and 3), on real providers over loopback.

A signed ``POSTA CERTIFICATA`` envelope taken from a mailbox and sent unchanged to an inbound
listener, with other SMTP recipients than the ones it certifies, must not become certified mail
for them: each such recipient gets the envelope only inside an anomaly envelope, no take-charge
names them, and the sender gets no receipt for them. Each (PEC id, recipient) is taken in charge
and delivered at most once, however the recipients are grouped across transactions, across a
restart, on a peer's inbound or on the sending provider's own (same-domain mail, RFC 6109 §3.4).
Receipts go only to the mailbox they are for. Certified mail from a peer in clear is not taken in
charge (``[inbound] require_tls``)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pecd.clock import ManualClock, SystemClock
from pecd.config import ConfigError
from pecd.format import compose, envelope, pec, receipts
from pecd.format.daticert import Recipient
from pecd.format.pec import Transaction
from pecd.service import Service, make_issuer, make_timestamper
from pecd.store.db import MIGRATIONS, Database, connect, migrate
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import NewItem, Outcome, Queue
from pecd.store.spool import Spool

from .attack_support import add_user_fast, kind_of, ledger_rows, serving, wait_until
from .conftest import ProviderDir, client_tls, exchange_cards, make_provider, submit
from .pechelpers import configure, count, queued, send_inbound
from .test_timeouts_virus import EICAR, message
from .test_timeouts_virus import clamd_daemon as clamd_daemon  # fixture: a real clamd

ALICE, ERIN, FRANK = "alice@a.test", "erin@a.test", "frank@a.test"
BOB, CAROL, DAVE = "bob@b.test", "carol@b.test", "dave@b.test"
ZOE = "zoe@c.test"
SERVICE = {d: f"posta-certificata@{d}" for d in ("a.test", "b.test", "c.test")}
USERS = {"a.test": (ALICE, ERIN, FRANK), "b.test": (BOB, CAROL, DAVE), "c.test": (ZOE,)}
NOT_A_RECIPIENT = "not a recipient of this certified envelope"


def _net(base: Path, *domains: str) -> list[ProviderDir]:
    """Providers sharing a CA, each in the others' index, EC keys (fast signatures)."""
    providers = [make_provider(base, d, base / "ca", **{"--key-type": "ec"}) for d in domains]
    exchange_cards(*providers)
    for p in providers:
        for user in USERS[p.domain]:
            add_user_fast(p, user, _password(user))
    return providers


def _password(user: str) -> str:
    return user.split("@")[0] + "-secret"


def _mail(subject: str, to: list[str]) -> bytes:
    slug = "".join(c for c in subject.lower() if c.isalnum())
    return (f"From: Alice <{ALICE}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{slug}@client.a.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
            "\r\nRiservato.\r\n").encode()


def _settled(*providers: ProviderDir) -> bool:
    """Nothing left in any queue; give the providers upstream first (a relay item leaves its
    queue only after the next provider's queue holds the message)."""
    return all(queued(p) == 0 for p in providers)


def _certify(a: ProviderDir, port: int, rcpts: list[str], subject: str,
             *downstream: ProviderDir) -> None:
    """alice submits; returns when every receipt is home and every queue is empty."""
    receipts_before = count(a, ALICE)
    code, reply = submit(a, ALICE, _password(ALICE), ALICE, rcpts, _mail(subject, rcpts), port)
    assert code == 250, reply
    wait_until(lambda: count(a, ALICE) == receipts_before + 1 + len(rcpts)
               and _settled(a, *downstream, a), what="acceptance and delivery receipts")


def _envelope_of(p: ProviderDir, rcpt: str, subject: str) -> bytes:
    (found,) = [m for m in p.messages(rcpt) if kind_of(m) == "posta-certificata"
                and f"POSTA CERTIFICATA: {subject}".encode() in m]
    return found


def _kinds(p: ProviderDir, address: str) -> list[str]:
    return sorted(kind_of(m) for m in p.messages(address))


def _delivery_receipts(a: ProviderDir) -> list[str]:
    """Whom alice's delivery receipts say her mail was delivered to."""
    out = []
    for m in a.messages(ALICE):
        cd = pec.parse(m).certdata
        if cd is not None and cd.type == "avvenuta-consegna":
            assert cd.delivered_to is not None
            out.append(cd.delivered_to)
    return sorted(out)


def _recipients(p: ProviderDir, event: str) -> list[list[str]]:
    return [r["recipients"] for r in ledger_rows(p, event)]


def _anomaly_reasons(p: ProviderDir) -> list[tuple[list[str], str]]:
    return [(r["recipients"], r["detail"]["reason"]) for r in ledger_rows(p, "anomaly")]


def _replay(target: ProviderDir, port: int, mail_from: str, rcpts: list[str], data: bytes,
            tls: bool = True) -> None:
    code, reply = send_inbound(target, port, mail_from, rcpts, data, tls)
    assert code == 250, reply  # taken for judgement; the verdict is the reception point's


@pytest.fixture
def ab(tmp_path: Path) -> tuple[ProviderDir, ProviderDir]:
    a, b = _net(tmp_path, "a.test", "b.test")
    return a, b


# --- item 1: envelopes replayed to mailboxes they were not addressed to -----------------------

def test_envelope_replayed_to_another_recipient(ab: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = ab
    with serving(a, b) as (svc_a, svc_b):
        _certify(a, svc_a.ports.submission, [BOB], "Contratto", b)
        stolen = _envelope_of(b, BOB, "Contratto")
        _replay(b, svc_b.ports.inbound, ALICE, [CAROL], stolen)
        wait_until(lambda: count(b, CAROL) == 1 and _settled(b, a), what="carol's anomaly")

    assert _kinds(b, CAROL) == ["errore"]  # never as certified mail
    (anomaly,) = b.messages(CAROL)
    assert NOT_A_RECIPIENT.encode() in anomaly
    assert _kinds(b, BOB) == ["posta-certificata"]
    assert _recipients(b, "taken-in-charge") == [[BOB]]
    assert _recipients(b, "delivered") == [[BOB]]
    assert _anomaly_reasons(b) == [([CAROL], NOT_A_RECIPIENT)]
    assert [r["detail"]["verdict"] for r in ledger_rows(b, "anomaly")] == ["misaddressed"]
    # alice has her acceptance and one delivery receipt, for bob; one take-charge, for bob
    assert count(a, ALICE) == 2 and _delivery_receipts(a) == [BOB]
    (take,) = [pec.parse(m).certdata for m in a.messages(SERVICE["a.test"])]
    assert take is not None and take.taken_in_charge == (BOB,)
    assert "ledger ok" in b.cli("ledger", "verify")


def test_envelope_replayed_with_an_added_recipient(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = ab
    with serving(a, b) as (svc_a, svc_b):
        _certify(a, svc_a.ports.submission, [BOB], "Preventivo", b)
        stolen = _envelope_of(b, BOB, "Preventivo")
        _replay(b, svc_b.ports.inbound, ALICE, [BOB, CAROL], stolen)
        wait_until(lambda: count(b, CAROL) == 1 and _settled(b, a), what="carol's anomaly")
        # b answered the repeat for bob with the same take-charge, which a drops as seen
        wait_until(lambda: len(ledger_rows(a, "duplicate")) == 1 and _settled(b, a),
                   what="take-charge sent again and dropped")

    assert _kinds(b, BOB) == ["posta-certificata"]  # no second copy for the original recipient
    assert _kinds(b, CAROL) == ["errore"]
    assert _recipients(b, "duplicate") == [[BOB]]
    assert _recipients(b, "taken-in-charge") == [[BOB]]
    assert _recipients(b, "delivered") == [[BOB]]
    assert _anomaly_reasons(b) == [([CAROL], NOT_A_RECIPIENT)]
    assert count(a, ALICE) == 2 and _delivery_receipts(a) == [BOB]
    assert count(a, SERVICE["a.test"]) == 1


def test_envelope_replayed_to_the_same_recipient_after_restart(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = ab
    with serving(a) as (svc_a,):
        with serving(b) as (svc_b,):
            _certify(a, svc_a.ports.submission, [BOB], "Fattura", b)
            stolen = _envelope_of(b, BOB, "Fattura")
            _replay(b, svc_b.ports.inbound, ALICE, [BOB], stolen)
            wait_until(lambda: len(ledger_rows(b, "duplicate")) == 1 and _settled(b, a),
                       what="first replay dropped")
        with serving(b) as (svc_b,):  # the keys are in the database, not in memory
            _replay(b, svc_b.ports.inbound, ALICE, [BOB], stolen)
            wait_until(lambda: len(ledger_rows(b, "duplicate")) == 2 and _settled(b, a),
                       what="second replay dropped")

    assert _kinds(b, BOB) == ["posta-certificata"]
    assert _recipients(b, "taken-in-charge") == [[BOB]]
    assert _recipients(b, "delivered") == [[BOB]]
    assert _recipients(b, "duplicate") == [[BOB], [BOB]]
    assert count(a, ALICE) == 2 and _delivery_receipts(a) == [BOB]
    assert count(a, SERVICE["a.test"]) == 1


def test_envelope_replayed_with_recipients_regrouped(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    """One transaction for bob and dave; replays name them one by one, then together with
    carol, after a restart: nothing is taken in charge or delivered a second time."""
    a, b = ab
    with serving(a) as (svc_a,):
        with serving(b):
            _certify(a, svc_a.ports.submission, [BOB, DAVE], "Verbale", b)
        stolen = _envelope_of(b, DAVE, "Verbale")
        with serving(b) as (svc_b,):
            for rcpts in ([DAVE], [BOB], [DAVE, CAROL, BOB]):
                _replay(b, svc_b.ports.inbound, ALICE, rcpts, stolen)
            wait_until(lambda: len(ledger_rows(b, "duplicate")) == 3 and count(b, CAROL) == 1
                       and _settled(b, a), what="replays judged")

    assert _recipients(b, "taken-in-charge") == [[BOB, DAVE]]
    assert sorted(r[0] for r in _recipients(b, "delivered")) == [BOB, DAVE]
    assert _recipients(b, "duplicate") == [[DAVE], [BOB], [DAVE, BOB]]
    assert _kinds(b, BOB) == _kinds(b, DAVE) == ["posta-certificata"]
    assert _kinds(b, CAROL) == ["errore"]
    assert _delivery_receipts(a) == [BOB, DAVE]
    assert count(a, SERVICE["a.test"]) == 1


def test_envelope_replayed_on_the_sending_providers_own_inbound(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    """Same-domain mail (alice to erin) runs through a's own reception point: erin's envelope
    replayed to frank, or to erin again, and bob's envelope replayed to a's users, certify
    nothing new."""
    a, b = ab
    with serving(a, b) as (svc_a, _svc_b):
        _certify(a, svc_a.ports.submission, [ERIN], "Interno", b)
        _certify(a, svc_a.ports.submission, [BOB], "Esterno", b)
        erins = _envelope_of(a, ERIN, "Interno")
        bobs = _envelope_of(b, BOB, "Esterno")
        port = svc_a.ports.inbound
        _replay(a, port, ALICE, [FRANK], erins)
        _replay(a, port, ALICE, [ERIN], erins)
        _replay(a, port, ALICE, [FRANK, ERIN], bobs)
        # the repeat for erin: a's own take-charge sent again, and dropped as seen
        wait_until(lambda: count(a, FRANK) == 2 and count(a, ERIN) == 2
                   and len(ledger_rows(a, "duplicate")) == 2 and _settled(a, b),
                   what="replays judged")

    assert _kinds(a, FRANK) == ["errore", "errore"]
    assert _kinds(a, ERIN) == ["errore", "posta-certificata"]  # her own, bob's as anomaly
    assert [r for r in _recipients(a, "duplicate") if r] == [[ERIN]]
    assert _recipients(a, "taken-in-charge") == [[ERIN]]
    assert sorted(r[0] for r in _recipients(a, "delivered")) == [ERIN]
    assert sorted(r for rs, _ in _anomaly_reasons(a) for r in rs) == [ERIN, FRANK, FRANK]
    assert _delivery_receipts(a) == [BOB, ERIN]
    assert count(a, ALICE) == 4
    assert count(a, SERVICE["a.test"]) == 2  # one take-charge per transaction, none more


def test_concurrent_replays_are_taken_in_charge_once(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    """The same envelope arrives twice on two connections, each naming bob and dave (who is
    not certified), before the reception point looks at either; one pass of its runner judges
    both side by side: bob is taken in charge and delivered once, dave gets two anomalies."""
    a, b = ab
    signed = _fresh_envelope(a, "Doppio")

    async def scenario() -> None:
        svc = Service(b.config)
        await svc.start(runners=False)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(
                None, send_inbound, b, svc.ports.inbound, ALICE, [BOB, DAVE], signed, True)
                for _ in range(2)))
            assert queued(b) == 2
            while await svc.run_once():
                pass
        finally:
            await svc.stop()

    with serving(a):
        asyncio.run(scenario())
        wait_until(lambda: count(a, ALICE) == 1 and _settled(b, a), what="delivery receipt")
    assert _kinds(b, BOB) == ["posta-certificata"]
    assert _kinds(b, DAVE) == ["errore", "errore"]
    assert _recipients(b, "taken-in-charge") == [[BOB]]
    assert _recipients(b, "duplicate") == [[BOB]]
    assert _delivery_receipts(a) == [BOB]


def test_envelope_split_across_transactions_is_taken_once_per_recipient(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    """Not an attack, the case the per-recipient keys must keep working: a peer delivers one
    envelope for bob and dave in two transactions (dave was refused for a while); each is taken
    in charge once."""
    a, b = ab
    cfg = a.config
    clock = SystemClock()
    issuer = make_issuer(cfg, clock, make_timestamper(cfg, clock))
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("a.test", at), ref_msgid=None, sender=ALICE,
                     recipients=(Recipient(BOB), Recipient(DAVE)), reply_to=ALICE,
                     subject="A rate", accepted_at=at, issuer_name=issuer.name)
    signed = bytes(envelope.transport_envelope(tx, _mail("A rate", [BOB, DAVE]), issuer, at))
    with serving(a, b) as (_svc_a, svc_b):
        for rcpts in ([BOB], [DAVE], [BOB, DAVE]):
            _replay(b, svc_b.ports.inbound, ALICE, rcpts, signed)
            wait_until(lambda: _settled(b, a), what="judged")
        wait_until(lambda: count(a, ALICE) == 2 and _settled(b, a), what="delivery receipts")

    assert _recipients(b, "taken-in-charge") == [[BOB], [DAVE]]
    assert _recipients(b, "duplicate") == [[BOB, DAVE]]
    assert _kinds(b, BOB) == _kinds(b, DAVE) == ["posta-certificata"]
    assert _delivery_receipts(a) == [BOB, DAVE]
    takes = [pec.parse(m).certdata for m in a.messages(SERVICE["a.test"])]
    assert sorted(t.taken_in_charge for t in takes if t) == [(BOB,), (DAVE,)]


# --- the class around it: receipts replayed ----------------------------------------------------

@pytest.fixture
def abc(tmp_path: Path) -> tuple[ProviderDir, ProviderDir, ProviderDir]:
    a, b, c = _net(tmp_path, "a.test", "b.test", "c.test")
    return a, b, c


def _receipt_of(a: ProviderDir, address: str, kind: str) -> bytes:
    (found,) = [m for m in a.messages(address) if kind_of(m) == kind]
    return found


def test_delivery_receipt_replayed_to_another_mailbox(
        abc: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, c = abc
    with serving(a, b, c) as (svc_a, _svc_b, svc_c):
        _certify(a, svc_a.ports.submission, [BOB], "Ricevuta", b)
        stolen = _receipt_of(a, ALICE, "avvenuta-consegna")
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [ERIN], stolen)  # another of a's
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [ALICE], stolen)  # alice again
        _replay(c, svc_c.ports.inbound, SERVICE["b.test"], [ZOE], stolen)  # another provider
        wait_until(lambda: count(a, ERIN) == 1 and count(c, ZOE) == 1
                   and len(ledger_rows(a, "duplicate")) == 1 and _settled(a, c),
                   what="replays judged")

    assert _kinds(a, ERIN) == ["errore"] and _kinds(c, ZOE) == ["errore"]
    assert count(a, ALICE) == 2  # her acceptance and the one real receipt
    assert sorted(r["detail"]["type"] for r in ledger_rows(a, "receipt-received")) == \
        ["avvenuta-consegna", "presa-in-carico"]
    assert _anomaly_reasons(a) == [([ERIN], "not a recipient of this avvenuta-consegna receipt")]
    ((zoe, why),) = _anomaly_reasons(c)
    assert zoe == [ZOE] and "not of this provider" in why
    assert ledger_rows(c, "receipt-received") == []


def test_take_charge_replayed_to_another_mailbox(
        abc: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, c = abc
    with serving(a, b, c) as (svc_a, _svc_b, svc_c):
        _certify(a, svc_a.ports.submission, [BOB], "Presa", b)
        stolen = _receipt_of(a, SERVICE["a.test"], "presa-in-carico")
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [ALICE], stolen)  # to a user
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [SERVICE["a.test"]], stolen)  # again
        _replay(c, svc_c.ports.inbound, SERVICE["b.test"], [SERVICE["c.test"]], stolen)
        wait_until(lambda: count(a, ALICE) == 3 and count(c, SERVICE["c.test"]) == 1
                   and len(ledger_rows(a, "duplicate")) == 1 and _settled(a, c),
                   what="replays judged")

    assert _kinds(a, ALICE) == ["accettazione", "avvenuta-consegna", "errore"]
    assert count(a, SERVICE["a.test"]) == 1
    assert _kinds(c, SERVICE["c.test"]) == ["errore"]
    assert _anomaly_reasons(a) == [([ALICE], "not a recipient of this presa-in-carico receipt")]
    assert ledger_rows(c, "receipt-received") == []


def test_infected_envelope_replayed_to_another_recipient(
        ab: tuple[ProviderDir, ProviderDir], clamd_daemon: tuple[str, str]) -> None:
    """b scans: an infected envelope for bob, sent with carol added, then again: bob's virus
    notice goes to a once, carol gets nothing at all (not even an anomaly: it is infected)."""
    a, b = ab
    configure(b, "antivirus", clamd=clamd_daemon[0])
    signed = _fresh_envelope(a, "fattura", message("fattura", EICAR))
    with serving(a, b) as (_svc_a, svc_b):
        _replay(b, svc_b.ports.inbound, ALICE, [BOB, CAROL], signed)
        wait_until(lambda: count(a, SERVICE["a.test"]) == 1 and _settled(b, a), what="notice")
        _replay(b, svc_b.ports.inbound, ALICE, [BOB], signed)
        wait_until(lambda: len(ledger_rows(b, "duplicate")) == 1
                   and len(ledger_rows(a, "duplicate")) == 1 and _settled(b, a),
                   what="replay dropped, notice sent again and dropped")

    assert count(b, BOB) == 0 and count(b, CAROL) == 0
    assert _recipients(b, "virus-detected") == [[BOB]]
    assert _recipients(b, "duplicate") == [[BOB]]
    (stranger,) = ledger_rows(b, "undeliverable")
    assert stranger["recipients"] == [CAROL]
    assert stranger["detail"]["reason"] == "not a recipient of this infected envelope"
    assert ledger_rows(b, "taken-in-charge") == [] and ledger_rows(b, "anomaly") == []
    assert _kinds(a, SERVICE["a.test"]) == ["rilevazione-virus"]


# --- item 3: certified mail between providers in clear -----------------------------------------

def _fresh_envelope(a: ProviderDir, subject: str, original: bytes | None = None) -> bytes:
    """A transport envelope really signed by a (a's keys, the pure builder), for bob."""
    cfg, clock = a.config, SystemClock()
    issuer = make_issuer(cfg, clock, make_timestamper(cfg, clock))
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("a.test", at), ref_msgid=None, sender=ALICE,
                     recipients=(Recipient(BOB),), reply_to=ALICE, subject=subject,
                     accepted_at=at, issuer_name=issuer.name)
    original = _mail(subject, [BOB]) if original is None else original
    return bytes(envelope.transport_envelope(tx, original, issuer, at))


def _fresh_receipt(b: ProviderDir, subject: str) -> bytes:
    """A delivery receipt really signed by b, for one of alice's messages."""
    cfg, clock = b.config, SystemClock()
    issuer = make_issuer(cfg, clock, make_timestamper(cfg, clock))
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id("a.test", at), ref_msgid=None, sender=ALICE,
                     recipients=(Recipient(BOB),), reply_to=ALICE, subject=subject,
                     accepted_at=at, issuer_name="Provider a.test")
    return bytes(receipts.delivery(tx, BOB, "sintetica", None, issuer, at)[1])


def test_attack_plaintext_peer_envelope(ab: tuple[ProviderDir, ProviderDir]) -> None:
    """A valid signed envelope sent without STARTTLS is not taken in charge; the same bytes
    over TLS are (the plaintext arrival did not use up its key)."""
    a, b = ab
    signed = _fresh_envelope(a, "In chiaro")
    ordinary = b"From: mario@internet.test\r\nTo: bob@b.test\r\nSubject: ordinaria\r\n\r\nx\r\n"
    with serving(a, b) as (_svc_a, svc_b):
        _replay(b, svc_b.ports.inbound, ALICE, [BOB], signed, tls=False)
        _replay(b, svc_b.ports.inbound, "mario@internet.test", [BOB], ordinary, tls=False)
        wait_until(lambda: count(b, BOB) == 2 and _settled(b, a), what="anomalies")
        assert ledger_rows(b, "taken-in-charge") == []
        _replay(b, svc_b.ports.inbound, ALICE, [BOB], signed, tls=True)
        wait_until(lambda: count(b, BOB) == 3 and count(a, ALICE) == 1 and _settled(b, a),
                   what="certified over TLS")

    assert _kinds(b, BOB) == ["errore", "errore", "posta-certificata"]
    assert [r["detail"]["tls"] for r in ledger_rows(b, "received")] == [False, False, True]
    reasons = sorted(why for _, why in _anomaly_reasons(b))
    assert reasons == ["certified message from Provider a.test received over plaintext SMTP"
                       " (TLS required)",
                       "not a certified message"]  # ordinary mail in clear: as before
    assert sorted(r["detail"]["verdict"] for r in ledger_rows(b, "anomaly")) == \
        ["malformed", "plaintext"]
    assert _recipients(b, "taken-in-charge") == [[BOB]]
    assert _delivery_receipts(a) == [BOB]  # one, for the transaction over TLS


def test_attack_plaintext_peer_receipt(ab: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = ab
    signed = _fresh_receipt(b, "Ricevuta in chiaro")
    with serving(a) as (svc_a,):
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [ALICE], signed, tls=False)
        wait_until(lambda: count(a, ALICE) == 1 and _settled(a), what="anomaly")
        _replay(a, svc_a.ports.inbound, SERVICE["b.test"], [ALICE], signed, tls=True)
        wait_until(lambda: count(a, ALICE) == 2 and _settled(a), what="receipt")

    assert _kinds(a, ALICE) == ["avvenuta-consegna", "errore"]
    ((_, why),) = _anomaly_reasons(a)
    assert "over plaintext SMTP" in why
    assert len(ledger_rows(a, "receipt-received")) == 1


def test_require_tls_all_refuses_plaintext_transactions(
        ab: tuple[ProviderDir, ProviderDir]) -> None:
    _a, b = ab
    configure(b, "inbound", require_tls="all")
    with (serving(b, runners=False) as (svc_b,),
          smtplib.SMTP("127.0.0.1", svc_b.ports.inbound, timeout=30) as s):
        s.ehlo()
        assert s.mail("mario@internet.test")[0] == 530
        s.starttls(context=client_tls(b.ca))
        s.ehlo()
        assert s.mail("mario@internet.test")[0] == 250
    (refused,) = ledger_rows(b, "smtp-refused")
    assert refused["detail"]["reason"] == "plaintext transaction"


def test_require_tls_off_takes_plaintext_envelopes(ab: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = ab
    configure(b, "inbound", require_tls="off")
    with serving(a, b) as (_svc_a, svc_b):
        _replay(b, svc_b.ports.inbound, ALICE, [BOB], _fresh_envelope(a, "Senza TLS"), tls=False)
        wait_until(lambda: count(b, BOB) == 1 and _settled(b, a), what="delivery")
    assert _kinds(b, BOB) == ["posta-certificata"]


def test_require_tls_has_three_values(ab: tuple[ProviderDir, ProviderDir]) -> None:
    _a, b = ab
    assert b.config.inbound.require_tls == "indexed"  # what `pecd init` writes
    configure(b, "inbound", require_tls="sometimes")
    with pytest.raises(ConfigError, match="require_tls must be one of indexed, all, off"):
        _ = b.config


# --- the durable keys themselves ----------------------------------------------------------------

def test_seen_keys_of_older_versions_split_per_recipient(tmp_path: Path) -> None:
    """A database from before per-recipient keys: a transaction remembered as one key for its
    recipient set is remembered per recipient after the migration, replies on the first."""
    conn = connect(tmp_path / "old.sqlite")
    conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied TEXT)")
    for name, sql in [m for m in MIGRATIONS if not m[0].endswith("_seen_per_recipient")]:
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO migrations VALUES (?, 'then')", (name,))
    conn.executemany("INSERT INTO seen VALUES ('fp', ?, 'then', ?)", [
        ("id1@a.test bob@b.test,dave@b.test", '["tc1"]'),
        ("id2@a.test bob@b.test", '["tc2"]'),
        ("receipt-id@b.test", "[]"),
    ])
    migrate(conn)
    rows = conn.execute("SELECT message_id, replies FROM seen ORDER BY 1").fetchall()
    assert [tuple(r) for r in rows] == [
        ("id1@a.test bob@b.test", '["tc1"]'), ("id1@a.test dave@b.test", "[]"),
        ("id2@a.test bob@b.test", '["tc2"]'), ("receipt-id@b.test", "[]")]
    conn.close()


def test_claims_commit_once_and_send_the_loser_back(tmp_path: Path) -> None:
    """Two outcomes claiming the same key: the first commits, the second commits nothing and
    its item is due again (to be judged knowing the key is taken)."""
    clock = ManualClock(datetime(2026, 12, 1, tzinfo=UTC))

    async def scenario() -> None:
        db = Database(tmp_path / "q.sqlite")
        queue = Queue(db, Spool(tmp_path / "spool"), clock)
        try:
            await queue.enqueue([NewItem("inbound", ALICE, (BOB,), data=b"x") for _ in range(2)])
            first, second = await queue.lease("inbound", 10)
            reply = NewItem("relay", SERVICE["b.test"], (SERVICE["a.test"],), data=b"tc")

            def outcome(n: int) -> Outcome:
                return Outcome(outputs=[NewItem("deliver", ALICE, (BOB,), data=b"env")],
                               events=[LedgerEvent(event="taken-in-charge", detail={"n": n})],
                               claims=("fp", ("id bob@b.test",)), replay=[reply])

            assert await queue.claimed("fp", ["id bob@b.test"]) == {}
            assert await queue.finish(first, outcome(1)) is True
            assert await queue.finish(second, outcome(2)) is False
            taken = await queue.claimed("fp", ["id bob@b.test", "id dave@b.test"])
            assert list(taken) == ["id bob@b.test"]
            assert [(i.kind, i.data) for i in taken["id bob@b.test"]] == [("relay", b"tc")]
            (again,) = await queue.lease("inbound", 10)
            assert again.id == second.id
        finally:
            db.close()

    asyncio.run(scenario())
    conn = sqlite3.connect(tmp_path / "q.sqlite")
    kinds = [r[0] for r in conn.execute("SELECT kind FROM queue ORDER BY id")]
    events = [json.loads(r[0]) for r in conn.execute(
        "SELECT detail FROM ledger WHERE event='taken-in-charge'")]
    conn.close()
    assert kinds == ["inbound", "deliver"]  # the loser's item (leased again), the winner's output
    assert events == [{"n": 1}]
