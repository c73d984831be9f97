"""Injection through what a sender controls: a Subject, display names and addresses holding
CR/LF (as RFC 2047 encoded words), ``<``, ``&``, ``"``, ``]]>`` or raw UTF-8, and addresses or
Message-IDs shaped like paths. Run through the whole two-provider pipeline, every envelope and
receipt must carry them correctly escaped: RFC 2047 in headers (no extra header line ever
appears), and in daticert.xml a document any XML parser reads back to the exact value; Maildir
file and directory names come from the queue, never from the message."""

from __future__ import annotations

import re
import smtplib
import xml.etree.ElementTree as ET
from email.header import decode_header
from pathlib import Path

import pytest

from pecd.format import compose, daticert, pec
from pecd.format import headers as hdr

from .attack_support import (
    ALICE,
    ALICE_PW,
    BOB,
    add_user_fast,
    kind_of,
    ledger_rows,
    provider_pair,
    serving,
    wait_until,
)
from .conftest import ProviderDir, client_tls

QUOTED = '"a<b&c]]>"@b.test'  # a legal quoted local part full of XML metacharacters
TRAVERSAL = "../../../../tmp/evil@b.test"
SLASHED = "a/b@b.test"

SUBJECT_1 = "Fattura <n. 1> & \"saldo\" ]]> 'ok' – caffè ☕"
SUBJECT_2_RAW = "=?utf-8?q?Avviso=0D=0ABcc:_evil@evil.test=0D=0AX-Trasporto:_errore?="
SUBJECT_2 = "AvvisoBcc: evil@evil.testX-Trasporto: errore"  # CR and LF are no header text
SUBJECT_3 = "../../etc/passwd"

MESSAGES = [
    ([BOB, QUOTED], (
        'From: "Alìce \\"capo\\" <&>" <alice@a.test>\r\n'
        f'To: Bòb <bob@b.test>, {QUOTED}\r\n'
        f"Subject: {SUBJECT_1}\r\n"
        "Message-ID: <uno@client.a.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Prezzo: 10 € ]]> <b>\r\n").encode()),
    ([BOB], (
        "From: alice@a.test\r\nTo: bob@b.test\r\n"
        f"Subject: {SUBJECT_2_RAW}\r\n"
        "Message-ID: <../../../etc/passwd@x>\r\n\r\n"
        "ciao\r\n").encode()),
    ([TRAVERSAL, SLASHED], (
        f"From: alice@a.test\r\nTo: {TRAVERSAL}, {SLASHED}\r\n"
        f"Subject: {SUBJECT_3}\r\n"
        "Message-ID: <a/../../b@x>\r\n\r\n"
        "ciao\r\n").encode()),
]
SUBJECTS = [SUBJECT_1, SUBJECT_2, SUBJECT_3]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProviderDir, ProviderDir, Path]:
    base = tmp_path_factory.mktemp("injection")
    a, b = provider_pair(base)
    for hostile in (QUOTED, TRAVERSAL, SLASHED):
        add_user_fast(b, hostile, "x")
    with serving(a, b) as (svc_a, _svc_b), \
            smtplib.SMTP("127.0.0.1", svc_a.ports.submission, timeout=30) as s:
        s.starttls(context=client_tls(a.ca))
        s.login(ALICE, ALICE_PW)
        for rcpts, data in MESSAGES:
            assert s.sendmail(ALICE, rcpts, data) == {}

        def done() -> bool:  # 3 acceptances, 2 deliveries to bob, 3 "altro" non-deliveries
            return (len(a.messages(ALICE)) == 8 and len(b.messages(BOB)) == 2
                    and len(a.messages("posta-certificata@a.test")) == 3)

        wait_until(done, what="all receipts")
    return a, b, base


def _all_messages(*providers: ProviderDir) -> list[bytes]:
    return [f.read_bytes() for p in providers
            for f in sorted((p.root / "data" / "mail").rglob("*")) if f.is_file()]


def _xml(msg: bytes) -> bytes | None:
    signed = pec.parse(msg).signed
    assert signed is not None
    for part in compose.split_multipart(signed.inner):
        head, body = compose.split_entity(part)
        info = hdr.parse(head)
        if info.get_filename() == "daticert.xml":
            return compose.decode_body(info, body)
    return None


def test_daticert_holds_the_exact_values_for_any_xml_parser(
        run: tuple[ProviderDir, ProviderDir, Path]) -> None:
    a, b, _ = run
    subjects_seen: set[str] = set()
    addresses_seen: set[str] = set()
    for msg in _all_messages(a, b):
        if kind_of(msg) == "errore":
            continue
        xml = _xml(msg)
        assert xml is not None
        tree = ET.fromstring(xml)  # an independent, standard parser
        strict = daticert.parse(xml)  # pecd's own strict reader agrees with it
        oggetto = tree.findtext("intestazione/oggetto")
        assert oggetto == strict.subject
        subjects_seen.add(str(oggetto))
        for el in tree.iter("destinatari"):
            addresses_seen.add(str(el.text))
        assert [el.text for el in tree.iter("destinatari")] == \
            [r.address for r in strict.recipients]
        if strict.delivered_to:
            assert tree.findtext("dati/consegna") == strict.delivered_to
            addresses_seen.add(strict.delivered_to)
    assert subjects_seen == set(SUBJECTS)
    assert {QUOTED, TRAVERSAL, SLASHED, BOB} <= addresses_seen
    assert b"]]>" not in b"".join(x or b"" for x in map(_xml, b.messages(BOB)))  # escaped


def test_headers_are_encoded_and_nothing_is_injected(
        run: tuple[ProviderDir, ProviderDir, Path]) -> None:
    a, b, _ = run
    prefixes = {"posta-certificata": "POSTA CERTIFICATA: ", "accettazione": "ACCETTAZIONE: ",
                "avvenuta-consegna": "CONSEGNA: ", "presa-in-carico": "PRESA IN CARICO: ",
                "errore-consegna": "AVVISO DI MANCATA CONSEGNA: "}
    for msg in _all_messages(a, b):
        outer = msg[: msg.index(b"\r\n\r\n") + 2]
        assert outer.isascii()  # 8-bit text only as RFC 2047 encoded words
        names = [line.split(b":", 1)[0].lower() for line in outer.split(b"\r\n")
                 if line and line[:1] not in b" \t"]
        assert b"bcc" not in names
        assert names.count(b"x-trasporto") + names.count(b"x-ricevuta") == 1
        parsed = hdr.parse(msg)
        subject = "".join(
            part.decode(cs or "ascii") if isinstance(part, bytes) else part
            for part, cs in decode_header(str(parsed["Subject"]).replace("\r\n", "")))
        prefix = prefixes[kind_of(msg)]
        assert subject.startswith(prefix) and subject[len(prefix):] in SUBJECTS, subject
    envelope = next(m for m in b.messages(BOB) if b"uno@client.a.test" in m)
    assert hdr.addresses(hdr.parse(envelope), "To") == [BOB, QUOTED]  # the copy still parses
    assert hdr.text(hdr.parse(envelope), "From") == \
        f'"Per conto di: {ALICE}" <posta-certificata@a.test>'


def test_maildir_names_come_from_the_queue_only(
        run: tuple[ProviderDir, ProviderDir, Path]) -> None:
    a, b, base = run
    name = re.compile(r"[0-9]+\.[0-9]+-[0-9]+\.[A-Za-z0-9._-]+")
    for p in (a, b):
        root = p.root / "data" / "mail"
        for f in root.rglob("*"):
            if f.is_file():
                _domain, local, sub, filename = f.relative_to(root).parts
                assert sub in ("new", "cur", "tmp") and name.fullmatch(filename), f
                assert local in ("alice", "bob", "posta-certificata"), f
    assert not any("evil" in str(f) or "passwd" in str(f) for f in base.rglob("*"))
    assert not Path("/tmp/evil").exists()
    errors = {r["recipients"][0]: r["detail"]["error"] for r in ledger_rows(b, "non-delivery")}
    assert errors == {QUOTED: "altro", TRAVERSAL: "altro", SLASHED: "altro"}
    for p in (a, b):
        assert "ledger ok" in p.cli("ledger", "verify")


def test_internationalised_envelope_addresses_get_a_clear_refusal(
        run: tuple[ProviderDir, ProviderDir, Path]) -> None:
    """pecd does not offer SMTPUTF8 (its signed outer headers are ASCII): a UTF-8 envelope address
    is refused at once with a 5xx, never half-accepted; a control character in a quoted local
    part, which aiosmtpd would pass on, is refused too."""
    a, _, _ = run
    with serving(a, runners=False) as (svc,), \
            smtplib.SMTP("127.0.0.1", svc.ports.submission, timeout=30) as s:
        s.starttls(context=client_tls(a.ca))
        s.login(ALICE, ALICE_PW)
        assert "smtputf8" not in s.esmtp_features
        assert s.docmd("MAIL", "FROM:<alice@a.test> SMTPUTF8")[0] == 501
        assert s.mail(ALICE)[0] == 250
        s.command_encoding = "utf-8"  # a client that ignores the missing extension
        assert s.docmd("RCPT", "TO:<josé@b.test>")[0] == 500
        assert s.docmd("RCPT", 'TO:<"bo\x01b"@b.test>')[0] == 553
        assert s.docmd("RCPT", "TO:<bob@b.test>")[0] == 250  # the session goes on
