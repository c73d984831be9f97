"""An authenticated user sending as someone else: the SMTP envelope sender and every address in
From: and Sender: must be the login's own address, or the transaction is refused (553 / 550)
with a ledger row; nothing refused is queued."""

from __future__ import annotations

import smtplib

import pytest

from .attack_support import ALICE, ALICE_PW, kind_of, ledger_rows, serving, single_provider, wait_until
from .conftest import ProviderDir, client_tls


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("spoofing"))


def _message(*header_lines: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in header_lines)
    return (head + "To: alice@a.test\r\nSubject: prova\r\n\r\nciao\r\n").encode()


SPOOFED_ENVELOPE = ["mallory@a.test", "bob@b.test", "Alice@a.test", "alice@a.test.evil.test",
                    "alice@a.test@evil.test", '"alice@a.test"@evil.test']
SPOOFED_HEADERS = {
    "another user": ["From: mallory@a.test"],
    "display name says alice": ['From: "alice@a.test" <mallory@a.test>'],
    "bare display name": ["From: alice@a.test <mallory@a.test>"],
    "encoded display name": ["From: =?utf-8?q?alice=40a=2Etest?= <mallory@a.test>"],
    "two authors": ["From: alice@a.test, mallory@a.test"],
    "two From fields": ["From: alice@a.test", "From: mallory@a.test"],
    "Sender differs": ["From: alice@a.test", "Sender: mallory@a.test"],
    "group syntax": ["From: friends: mallory@a.test;"],
    "comment trick": ["From: mallory@a.test (alice@a.test)"],
    "local part case": ["From: ALICE@a.test"],
}


def test_envelope_and_header_senders_are_bound_to_the_login(a: ProviderDir) -> None:
    before = len(ledger_rows(a, "submission-refused"))
    with serving(a, runners=False) as (svc,), \
            smtplib.SMTP("127.0.0.1", svc.ports.submission, timeout=15) as s:
        s.starttls(context=client_tls(a.ca))
        s.login(ALICE, ALICE_PW)
        for sender in SPOOFED_ENVELOPE:
            code, msg = s.mail(sender)
            assert code == 553, (sender, msg)
            s.rset()
        code, msg = s.docmd("AUTH", "PLAIN AG1hbGxvcnlAYS50ZXN0AHg=")
        assert code == 503, msg  # one identity per session
        for name, lines in SPOOFED_HEADERS.items():
            assert s.mail(ALICE)[0] == 250
            assert s.rcpt(ALICE)[0] == 250
            code, msg = s.data(_message(*lines))
            assert code == 550, (name, msg)
        # what is allowed: the domain in any case, a display name, raw UTF-8 in it, Sender = self
        assert s.mail("alice@A.TEST")[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        code, msg = s.data(_message('From: "Alìce Rossi" <alice@a.test>', "Sender: alice@a.test"))
        assert code == 250, msg
    refused = ledger_rows(a, "submission-refused")[before:]
    assert all(r["sender"] == ALICE for r in refused)
    by_envelope = [r["detail"]["mail_from"] for r in refused if "mail_from" in r["detail"]]
    # aiosmtpd itself answers 553 to what is not an address at all (alice@a.test@evil.test)
    assert set(by_envelope) <= set(SPOOFED_ENVELOPE) and len(by_envelope) >= 5
    assert len(refused) - len(by_envelope) == len(SPOOFED_HEADERS)
    assert len(ledger_rows(a, "submitted")) == 1  # only the honest message was queued


def test_a_message_without_from_is_accepted_then_refused_with_a_signed_notice(
        a: ProviderDir) -> None:
    with serving(a) as (svc,), \
            smtplib.SMTP("127.0.0.1", svc.ports.submission, timeout=15) as s:
        s.starttls(context=client_tls(a.ca))
        s.login(ALICE, ALICE_PW)
        refused = s.sendmail(ALICE, [ALICE], b"To: alice@a.test\r\nSubject: anonima\r\n\r\nx\r\n")
        assert refused == {}

        def notices() -> list[bytes]:
            return [m for m in a.messages(ALICE) if kind_of(m) == "non-accettazione"]

        wait_until(lambda: len(notices()) == 1, what="non-acceptance notice")
    assert b"From header is missing" in notices()[0]
