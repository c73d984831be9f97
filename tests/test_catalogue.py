"""The RFC 6109 catalogue end to end (issue 4, part A): formal checks, many recipients of two
kinds, the three delivery-receipt forms, non-delivery, anomaly envelopes, same-domain mail.

Real providers on loopback, real SMTP and TLS; every message a test produces is judged by
``openssl cms -verify`` and a strict daticert parse (``pechelpers.judge``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from pecd.clock import SystemClock
from pecd.format import compose, daticert, envelope, headers, receipts
from pecd.format.daticert import Recipient
from pecd.format.pec import Transaction
from pecd.service import Service, make_issuer, make_timestamper

from .conftest import ProviderDir, exchange_cards, make_provider, submit, wait_for
from .pechelpers import (
    Pec,
    configure,
    count,
    judge,
    judge_all,
    ledger,
    mailbox,
    parts_of,
    send_inbound,
    smtp_sink,
)

GOLDEN = Path(__file__).parent / "golden" / "brief"
ALICE = "alice@a.test"
SERVICE_A = "posta-certificata@a.test"


def mail(subject: str, to: list[str], cc: list[str] | None = None, *,
         extra: list[str] | None = None, sender: str | None = ALICE,
         content: bytes = b"Content-Type: text/plain; charset=utf-8\r\n\r\nTesto.\r\n") -> bytes:
    """A message as a mail client submits it; ``content`` starts with its Content-Type."""
    lines = [f"From: Alice <{sender}>"] if sender else []
    if to:
        lines.append("To: " + ", ".join(to))
    if cc:
        lines.append("Cc: " + ", ".join(cc))
    slug = "".join(c for c in subject.lower() if c.isalnum())[:30]
    lines += [f"Subject: {subject}", f"Message-ID: <{slug}@client.a.test>",
              "Date: Mon, 23 Nov 2026 10:00:00 +0100", "MIME-Version: 1.0", *(extra or [])]
    return ("\r\n".join(lines) + "\r\n").encode() + content


@asynccontextmanager
async def running(*providers: ProviderDir, runners: bool = True) -> AsyncIterator[list[Service]]:
    services: list[Service] = []
    try:
        for p in providers:
            services.append(Service(p.config))
            await services[-1].start(runners=runners)
        yield services
    finally:
        for s in services:
            await s.stop()


async def send(provider: ProviderDir, svc: Service, rcpts: list[str], data: bytes,
               user: str = ALICE) -> tuple[int, bytes]:
    password = user.split("@")[0] + "-secret"
    return await asyncio.get_running_loop().run_in_executor(
        None, submit, provider, user, password, user, rcpts, data, svc.ports.submission)


def by_subject(msgs: list[Pec]) -> dict[str, Pec]:
    out: dict[str, Pec] = {}
    for m in msgs:
        out[m.subject.split(": ", 1)[1]] = m
    return out


def add_users(p: ProviderDir, *addresses: str) -> None:
    for a in addresses:
        p.add_user(a, a.split("@")[0] + "-secret")


# --- 1. formal checks → non-acceptance ----------------------------------------------------------

def test_formal_checks_end_in_signed_non_acceptance(tmp_path: Path) -> None:
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    a.add_user(ALICE, "alice-secret")
    configure(a, "limits", max_message_size=20_000, max_recipients=5)
    many = [f"r{i}@esterno.test" for i in range(4)]
    big = b"Content-Type: text/plain\r\n\r\n" + (b"y" * 76 + b"\r\n") * 100  # ~8 kB
    cases = {  # subject -> (RCPT TO, message, what the notice must say)
        "con bcc": (["bob@b.test"], mail("con bcc", ["bob@b.test"], extra=["Bcc: eve@b.test"]),
                    "Bcc recipients are not allowed"),
        "rcpt nascosto": (["bob@b.test", "eve@b.test"], mail("rcpt nascosto", ["bob@b.test"]),
                          "recipient eve@b.test is in neither To nor Cc"),
        "senza from": (["bob@b.test"], mail("senza from", ["bob@b.test"], sender=None),
                       "the From header is missing"),
        "due from": (["bob@b.test"],
                     mail("due from", ["bob@b.test"]).replace(
                         b"From: Alice <alice@a.test>", b"From: alice@a.test, alice@a.test"),
                     "exactly one address"),
        "senza to": (["bob@b.test"], mail("senza to", [], ["bob@b.test"]),
                     "the To header must hold at least one address"),
        "troppo grande": (["b1@b.test", "b2@b.test", "b3@b.test"],
                          mail("troppo grande", ["b1@b.test", "b2@b.test", "b3@b.test"],
                               content=big),
                          "exceeds the limit of 20000 bytes"),
        "troppi destinatari": (many, mail("troppi destinatari", many),
                               "too many recipients (4 > 3)"),
    }

    async def scenario() -> None:
        # queued while the limit was 5 recipients; the operator lowers it to 3 before the
        # access point runs: the queued message now fails the check and gets its notice
        async with running(a, runners=False) as (svc,):
            rcpts, data, _ = cases["troppi destinatari"]
            code, reply = await send(a, svc, rcpts, data)
            assert code == 250, reply
        configure(a, "limits", max_recipients=3)
        async with running(a) as (svc,):
            for subject, (rcpts, data, _) in cases.items():
                if subject != "troppi destinatari":
                    code, reply = await send(a, svc, rcpts, data)
                    assert code == 250, (subject, reply)  # accepted for judgement, notice follows
            # what SMTP itself answers: a 4th RCPT is refused, an oversized DATA too (§3.1.2)
            code, reply = await send(a, svc, many, mail("quattro", many))
            assert code == 452, reply
            code, reply = await send(a, svc, ["bob@b.test"],
                                     mail("enorme", ["bob@b.test"], content=big + big[26:] * 2))
            assert code == 552, reply
            # control: an empty Bcc: passes every check and is accepted
            code, reply = await send(a, svc, ["x@esterno.test"],
                                     mail("bcc vuoto", ["x@esterno.test"], extra=["Bcc:"]))
            assert code == 250, reply
            await wait_for(lambda: count(a, ALICE) == len(cases) + 1)

    asyncio.run(scenario())
    judge_all(a)
    got = by_subject(mailbox(a, ALICE))
    assert set(got) == set(cases) | {"bcc vuoto"}
    assert got["bcc vuoto"].kind == "accettazione"
    refused = {r["detail"]["reason"]: r for r in ledger(a, "refused")}
    assert len(refused) == len(cases)
    for subject, (rcpts, _, why) in cases.items():
        notice = got[subject]
        assert notice.kind == "non-accettazione", subject
        assert notice.subject == f"AVVISO DI NON ACCETTAZIONE: {subject}"
        assert notice.original is None  # never the original (§3.1.2)
        assert notice.certdata is not None
        assert notice.certdata.error == "altro"
        assert why in (notice.certdata.extended_error or ""), (subject, notice.certdata)
        assert [r.address for r in notice.certdata.recipients] == rcpts
        assert headers.addresses(notice.headers, "To") == [ALICE]
        # the ledger says why, and names the notice it sent
        row = next(r for reason, r in refused.items() if why in reason)
        notice_id = headers.bare_id(headers.message_id(notice.headers))
        assert row["related"] == [notice_id] and row["recipients"] == rcpts
    accepted = ledger(a, "accepted")
    assert [r["recipients"] for r in accepted] == [["x@esterno.test"]]  # nothing else went on


# --- 2. many recipients, two kinds ----------------------------------------------------------------

def test_recipients_on_three_providers_and_ordinary_mail(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    a, b, c = (make_provider(tmp_path, d, ca) for d in ("a.test", "b.test", "c.test"))
    exchange_cards(a, b, c)
    add_users(a, ALICE)
    add_users(b, "bob@b.test", "dan@b.test")
    add_users(c, "carol@c.test")
    to = ["bob@b.test", "carol@c.test", "x@esterno.test"]
    cc = ["dan@b.test", "y@altrove.test"]
    rcpts = [*to, *cc]
    original = mail("Verbale assemblea", to, cc)

    async def scenario() -> list[Path]:
        server, sink, port = await smtp_sink()
        configure(a, "relay", smarthost="127.0.0.1", smarthost_port=port)
        try:
            async with running(a, b, c) as (svc_a, _, _):
                code, reply = await send(a, svc_a, rcpts, original)
                assert code == 250, reply
                await wait_for(lambda: count(a, ALICE) == 4 and count(a, SERVICE_A) == 2
                               and len(sink.got) == 1)
        finally:
            server.close()
            await server.wait_closed()
        (got,) = sink.got
        assert got.mail_from == ALICE and got.rcpts == ["x@esterno.test", "y@altrove.test"]
        out = tmp_path / "smarthost.eml"
        out.write_bytes(got.data)
        return [out]

    relayed = asyncio.run(scenario())
    judge_all(a, b, c, extra=tuple(relayed))
    kinds: dict[str, daticert.RecipientKind] = {
        "bob@b.test": "certificato", "carol@c.test": "certificato", "dan@b.test": "certificato",
        "x@esterno.test": "esterno", "y@altrove.test": "esterno"}
    expected = tuple(Recipient(r, kinds[r]) for r in rcpts)

    alice = mailbox(a, ALICE)
    (acceptance,) = [m for m in alice if m.kind == "accettazione"]
    assert acceptance.certdata is not None and acceptance.certdata.recipients == expected
    pec_id = acceptance.certdata.identifier
    text = acceptance.parts[0].decoded.decode()
    assert 'x@esterno.test ("posta ordinaria")' in text
    assert 'carol@c.test ("posta certificata")' in text

    # one take-charge per receiving provider, each listing only its own recipients
    take = {m.certdata.issuer: m.certdata for m in mailbox(a, SERVICE_A) if m.certdata}
    assert {k: v.taken_in_charge for k, v in take.items()} == {
        "Provider b.test": ("bob@b.test", "dan@b.test"), "Provider c.test": ("carol@c.test",)}
    assert all(v.identifier == pec_id and v.type == "presa-in-carico" for v in take.values())

    # one delivery receipt per certified recipient; the Cc one is synthetic
    delivered = {m.certdata.delivered_to: m for m in alice
                 if m.certdata and m.certdata.type == "avvenuta-consegna"}
    assert set(delivered) == {"bob@b.test", "carol@c.test", "dan@b.test"}
    forms = {r: m.certdata.receipt_kind for r, m in delivered.items() if m.certdata}
    assert forms == {"bob@b.test": "completa", "carol@c.test": "completa",
                     "dan@b.test": "sintetica"}
    assert delivered["carol@c.test"].original == original

    # every recipient got the same envelope: the PEC ones in their mailbox, the ordinary ones
    # through the smarthost
    envelopes = [*mailbox(b, "bob@b.test"), *mailbox(b, "dan@b.test"),
                 *mailbox(c, "carol@c.test"), judge(relayed[0], a.ca)]
    for env in envelopes:
        assert env.kind == "posta-certificata" and env.original == original
        assert env.certdata is not None and env.certdata.identifier == pec_id
        assert env.certdata.recipients == expected


# --- 3. receipt forms ---------------------------------------------------------------------------

PDF_B64 = base64.encodebytes(b"%PDF-1.4\n" + bytes(range(256)) * 8).replace(b"\n", b"\r\n")
PDF_B64 = PDF_B64.rstrip(b"\r\n")
ATTACHED = (b"From: carlo@x.test\r\nTo: alice@a.test\r\nSubject: inoltrato\r\n\r\n"
            b"Messaggio allegato.\r\n")
WITH_ATTACHMENTS = (
    b'Content-Type: multipart/mixed; boundary="=_b1"\r\n\r\n'
    b"--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nIn allegato il contratto.\r\n"
    b'--=_b1\r\nContent-Type: application/pdf; name="contratto.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="contratto.pdf"\r\n\r\n' + PDF_B64 + b"\r\n"
    b'--=_b1\r\nContent-Type: message/rfc822; name="inoltrato.eml"\r\n\r\n' + ATTACHED +
    b"--=_b1--\r\n"
)


def test_receipt_forms_complete_brief_synthetic(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    add_users(b, "dan@b.test")
    sent = {form: mail(f"ricevuta {form}", ["bob@b.test"], ["dan@b.test"],
                       extra=[f"X-TipoRicevuta: {form}"],
                       content=WITH_ATTACHMENTS)
            for form in ("completa", "breve", "sintetica")}

    async def scenario() -> None:
        async with running(a, b) as (svc_a, _):
            for data in sent.values():
                code, reply = await send(a, svc_a, ["bob@b.test", "dan@b.test"], data)
                assert code == 250, reply
            await wait_for(lambda: count(a, ALICE) == 9)

    asyncio.run(scenario())
    judge_all(a, b)
    receipts_ = {(m.subject.split(": ", 1)[1], m.certdata.delivered_to): m
                 for m in mailbox(a, ALICE) if m.certdata and m.kind == "avvenuta-consegna"}
    assert len(receipts_) == 6
    for form in sent:
        bob = receipts_[(f"ricevuta {form}", "bob@b.test")]
        dan = receipts_[(f"ricevuta {form}", "dan@b.test")]
        assert bob.certdata is not None and dan.certdata is not None
        assert bob.certdata.receipt_kind == form, form  # the To recipient: what was asked
        assert dan.certdata.receipt_kind == "sintetica", form  # the Cc recipient: always synthetic
        assert dan.original is None
    envelopes = by_subject(mailbox(b, "bob@b.test"))
    for form, data in sent.items():
        assert envelopes[f"ricevuta {form}"].headers["X-TipoRicevuta"] == form
        assert envelopes[f"ricevuta {form}"].original == data  # recipients get it whole

    assert receipts_[("ricevuta completa", "bob@b.test")].original == sent["completa"]
    assert receipts_[("ricevuta sintetica", "bob@b.test")].original is None
    brief = receipts_[("ricevuta breve", "bob@b.test")].original
    assert brief is not None
    head, _ = compose.split_entity(brief)
    assert sent["breve"].startswith(head)  # the original's header and structure are kept
    parts = parts_of(brief)
    assert [(p.content_type, p.filename) for p in parts] == [
        ("text/plain", None), ("text/plain", "contratto.pdf.hash"),
        ("text/plain", "inoltrato.eml.hash")]
    assert parts[0].body == b"In allegato il contratto."
    assert parts[1].body == hashlib.sha1(PDF_B64).hexdigest().encode()
    # the CRLF before a boundary belongs to the boundary (RFC 2046 §5.1.1), not to the part
    assert parts[2].body == hashlib.sha1(ATTACHED.removesuffix(b"\r\n")).hexdigest().encode()
    assert PDF_B64 not in brief and b"Messaggio allegato" not in brief


def test_brief_original_golden() -> None:
    """The pure builder against a golden file: a signed original, nested multiparts, a
    forwarded message, an inline image with only a Content-Type name, non-ASCII names."""
    original = (GOLDEN / "original.eml").read_bytes()
    expected = (GOLDEN / "brief.eml").read_bytes()
    assert receipts.brief_original(original) == expected
    # the golden file's own claim, checked independently: the PDF's base64 text, hashed
    pdf = original.split(b"fattura%20n%C2%B01.pdf\r\n\r\n")[1].split(b"\r\n--mix")[0]
    assert b"\r\n" + hashlib.sha1(pdf).hexdigest().encode() + b"\r\n--mix" in expected
    assert pdf not in expected
    signature = original[original.index(b"------sig\r\nContent-Type: application/pkcs7"):]
    assert expected.endswith(signature)  # the sender's signature part is left as it was


def test_brief_original_edge_cases() -> None:
    plain = mail("solo testo", ["bob@b.test"])
    assert receipts.brief_original(plain) == plain  # no attachment: nothing to replace
    opaque = mail("cifrato", ["bob@b.test"], content=(
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n"))
    assert receipts.brief_original(opaque) == opaque  # §3.3.2.2: a CMS blob stays whole
    single = mail("solo allegato", ["bob@b.test"], content=(
        b'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
        b"\r\n" + PDF_B64 + b"\r\n"))
    out = receipts.brief_original(single)
    head, body = compose.split_entity(out)
    info = headers.parse(head)
    assert info["Subject"] == "solo allegato" and info.get_filename() == "a.pdf.hash"
    assert body == hashlib.sha1(PDF_B64 + b"\r\n").hexdigest().encode() + b"\r\n"


# --- 4. non-delivery ------------------------------------------------------------------------------

def test_non_delivery_no_dest_no_dominio_altro(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, b = two_providers
    add_users(b, "dora@b.test", ".nascosto@b.test")
    b.cli("user", "disable", "dora@b.test")
    # A's copy of the index still says B manages gone.test; B no longer does
    card = json.loads(b.cli("index", "export"))
    card["domains"].append("gone.test")
    stale = tmp_path / "stale-card.json"
    stale.write_text(json.dumps(card))
    a.cli("index", "import", str(stale))
    rcpts = ["bob@b.test", "nobody@b.test", "dora@b.test", ".nascosto@b.test", "u@gone.test"]

    async def scenario() -> None:
        async with running(a, b) as (svc_a, svc_b):
            code, reply = await send(a, svc_a, rcpts, mail("Diffida", rcpts))
            assert code == 250, reply
            await wait_for(lambda: count(a, ALICE) == 6 and count(a, SERVICE_A) == 1)
            # the listener still refuses foreign domains to anyone but a PEC peer over TLS
            loop = asyncio.get_running_loop()
            for sender, tls in (("mario@internet.test", True), (ALICE, False)):
                code, _ = await loop.run_in_executor(
                    None, send_inbound, b, svc_b.ports.inbound, sender, ["u@gone.test"],
                    b"Subject: x\r\n\r\nx\r\n", tls)
                assert code == 554, (sender, tls)
            # one that looks like a PEC peer gets past RCPT, but what it sends is judged: not
            # certified, so nothing goes on to the foreign domain (the listener is no open relay)
            code, _ = await loop.run_in_executor(
                None, send_inbound, b, svc_b.ports.inbound, ALICE, ["u@gone.test"],
                b"From: alice@a.test\r\nSubject: inoltra\r\n\r\nx\r\n", True)
            assert code == 250
            await wait_for(lambda: len(ledger(b, "undeliverable")) == 1)

    asyncio.run(scenario())
    judge_all(a, b)
    (dropped,) = ledger(b, "undeliverable")
    assert dropped["recipients"] == ["u@gone.test"]
    assert dropped["detail"]["reason"] == "domain not managed here"
    assert all(r["recipients"] in ([ALICE], [SERVICE_A]) for r in ledger(b, "relayed"))
    notices = {m.certdata.delivered_to: m for m in mailbox(a, ALICE)
               if m.certdata and m.kind == "errore-consegna"}
    errors = {r: (m.certdata.error, m.certdata.extended_error)
              for r, m in notices.items() if m.certdata}
    assert errors == {
        "nobody@b.test": ("no-dest", "mailbox does not exist"),
        "dora@b.test": ("altro", "mailbox disabled"),
        ".nascosto@b.test": ("altro", "the mailbox cannot take the message: unsafe mailbox"
                                      " name '.nascosto@b.test'"),
        "u@gone.test": ("no-dominio", "the domain is not managed by this provider"),
    }
    for rcpt, m in notices.items():
        assert m.subject == "AVVISO DI MANCATA CONSEGNA: Diffida"
        assert m.certdata is not None and m.certdata.issuer == "Provider b.test"  # B's DP says so
        assert headers.addresses(m.headers, "To") == [ALICE], rcpt
    delivered = [m for m in mailbox(a, ALICE) if m.kind == "avvenuta-consegna"]
    assert [m.certdata.delivered_to for m in delivered if m.certdata] == ["bob@b.test"]
    (take,) = mailbox(a, SERVICE_A)
    assert take.certdata is not None  # B answers for its own domain only (§3.2.1)
    assert take.certdata.taken_in_charge == tuple(r for r in rcpts if r.endswith("@b.test"))
    assert count(b, "dora@b.test") == 0 and not b.maildir("nobody@b.test").exists()
    logged = {r["recipients"][0]: r["detail"]["error"] for r in ledger(b, "non-delivery")}
    assert logged == {r: e for r, (e, _) in errors.items()}


# --- 5. anomaly envelopes -------------------------------------------------------------------------

def _signed_envelope(p: ProviderDir, sender: str, subject: str) -> bytes:
    """A transport envelope really signed by provider ``p`` (the pure builder, p's keys)."""
    clock = SystemClock()
    cfg = p.config
    issuer = make_issuer(cfg, clock, make_timestamper(cfg, clock))
    at = datetime.now(UTC).replace(microsecond=0)
    tx = Transaction(identifier=compose.message_id(issuer.domain, at), ref_msgid=None,
                     sender=sender, recipients=(Recipient("bob@b.test"),), reply_to=sender,
                     subject=subject, accepted_at=at, issuer_name=issuer.name)
    original = mail(subject, ["bob@b.test"], sender=sender)
    return bytes(envelope.transport_envelope(tx, original, issuer, at))


def test_anomaly_envelopes_for_what_cannot_be_certified(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, b = two_providers
    d = make_provider(tmp_path, "d.test", tmp_path / "ca")  # same CA, but not in B's index
    ordinary = (b"From: Mario <mario@internet.test>\r\nTo: bob@b.test\r\n"
                b"Subject: posta ordinaria\r\nMessage-ID: <ordinaria-1@internet.test>\r\n\r\n"
                b"Ciao Bob.\r\n")
    good = _signed_envelope(a, ALICE, "busta alterata")
    pos = good.index(b"Identificativo messaggio")
    tampered = good[:pos] + b"J" + good[pos + 1:]
    stranger = _signed_envelope(d, "dave@d.test", "firmatario sconosciuto")
    arrivals = [  # (MAIL FROM, bytes, TLS, why it cannot be certified)
        ("mario@internet.test", ordinary, False, "not a certified message"),
        (ALICE, tampered, True, "signature not valid"),
        ("dave@d.test", stranger, True, "the signer is not a provider in the index"),
    ]

    async def scenario() -> None:
        async with running(b) as (svc_b,):
            loop = asyncio.get_running_loop()
            for sender, data, tls, _ in arrivals:
                code, reply = await loop.run_in_executor(
                    None, send_inbound, b, svc_b.ports.inbound, sender, ["bob@b.test"], data, tls)
                assert code == 250, reply
            await wait_for(lambda: count(b, "bob@b.test") == len(arrivals))

    asyncio.run(scenario())
    judge_all(b)
    got = {m.original: m for m in mailbox(b, "bob@b.test")}
    assert set(got) == {data for _, data, _, _ in arrivals}  # what arrived, byte for byte
    for _, data, _, why in arrivals:
        anomaly = got[data]
        assert anomaly.kind == "errore" and anomaly.certdata is None
        assert anomaly.headers["X-Trasporto"] == "errore"
        assert anomaly.headers.get("X-Ricevuta") is None
        subject = headers.text(headers.parse(data), "Subject")
        assert anomaly.subject == f"ANOMALIA MESSAGGIO: {subject}"
        assert why in anomaly.parts[0].decoded.decode()
        assert headers.message_id(anomaly.headers) == headers.message_id(headers.parse(data))
    reasons = [r["detail"]["reason"] for r in ledger(b, "anomaly")]
    assert len(reasons) == len(arrivals)
    for *_, why in arrivals:
        assert any(why in r for r in reasons), (why, reasons)
    # never treated as certified: no take-charge, no delivery receipt, nothing sent anywhere
    assert ledger(b, "taken-in-charge") == [] and ledger(b, "delivered") == []
    assert ledger(b, "relayed") == []


# --- 6. same-domain mail --------------------------------------------------------------------------

def test_same_domain_mail_runs_the_full_pipeline(tmp_path: Path) -> None:
    a = make_provider(tmp_path, "a.test", tmp_path / "ca")
    add_users(a, ALICE, "carol@a.test")
    original = mail("Stessa casa", ["carol@a.test"])

    async def scenario() -> None:
        async with running(a) as (svc,):
            code, reply = await send(a, svc, ["carol@a.test"], original)
            assert code == 250, reply
            await wait_for(lambda: count(a, ALICE) == 2 and count(a, "carol@a.test") == 1
                           and count(a, SERVICE_A) == 1)

    asyncio.run(scenario())
    judge_all(a)
    alice = {m.kind: m for m in mailbox(a, ALICE)}
    assert set(alice) == {"accettazione", "avvenuta-consegna"}
    (env,) = mailbox(a, "carol@a.test")
    (take,) = mailbox(a, SERVICE_A)
    assert env.kind == "posta-certificata" and env.original == original
    assert env.certdata is not None and take.certdata is not None
    assert env.certdata.recipients == (Recipient("carol@a.test", "certificato"),)
    assert take.certdata.taken_in_charge == ("carol@a.test",)
    receipt = alice["avvenuta-consegna"].certdata
    assert receipt is not None and receipt.delivered_to == "carol@a.test"
    pec_id = env.certdata.identifier
    assert {take.certdata.identifier, receipt.identifier} == {pec_id}
    for event in ("accepted", "taken-in-charge", "delivered", "receipt-received"):
        assert any(r["msgid"] == pec_id for r in ledger(a, event)), event
