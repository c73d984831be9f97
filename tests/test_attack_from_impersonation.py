"""A From: that reads as someone else although its address is the sender's own: mallory, logged
in as herself, writes alice's address where mail readers show it (a display name, a comment, an
encoded word), or hides a second ``From :`` behind a line that is no header field, which Python
reads as the start of the body and lenient parsers skip. Each is refused at DATA with ``550`` /
``554`` and a ``submission-refused`` ledger row; the access point's formal checks refuse the
same (a signed non-acceptance notice) should anything get that far."""

from __future__ import annotations

import smtplib

import pytest

from pecd.format import checks, headers

from .attack_support import add_user_fast, ledger_rows, serving, single_provider
from .conftest import ProviderDir, client_tls

MALLORY, MALLORY_PW = "mallory@a.test", "mallory-secret"

IMPERSONATIONS = {
    "quoted display name": ['From: "alice@a.test" <mallory@a.test>'],
    "bare display name": ["From: alice@a.test <mallory@a.test>"],
    "comment": ["From: mallory@a.test (alice@a.test)"],
    "comment before": ["From: (alice@a.test) mallory@a.test"],
    "encoded word q": ["From: =?utf-8?q?alice=40a=2Etest?= <mallory@a.test>"],
    "encoded word b": ["From: =?utf-8?b?YWxpY2VAYS50ZXN0?= <mallory@a.test>"],
    "encoded word in quotes": ['From: "=?utf-8?q?alice=40a.test?=" <mallory@a.test>'],
    "full-width at sign": ["From: alice\uff20a.test <mallory@a.test>"],
    "another provider": ['From: "bob@b.test via PEC" <mallory@a.test>'],
    "sender display name": ["From: mallory@a.test", 'Sender: "alice@a.test" <mallory@a.test>'],
}
MALFORMED = {
    "junk line then From :": ["From: mallory@a.test", "X-Junk line without a colon",
                              "From : alice@a.test"],
    "space before colon": ["From : mallory@a.test"],
    "mbox From line": ["From mallory@a.test Tue Dec  1 10:00:00 2026", "From: mallory@a.test"],
    "folding before any field": [" From: alice@a.test", "From: mallory@a.test"],
    "blank-looking line": ["From: mallory@a.test", " \t", "From: alice@a.test"],
    "8-bit field name": ["From: mallory@a.test", "Oggettò: x"],
}
HONEST = {
    "own address as display name": ['From: "mallory@a.test" <mallory@a.test>'],
    "a plain name": ["From: Mallory Rossi <mallory@a.test>"],
    "UTF-8 name": ['From: "Màllory Rossì" <mallory@a.test>'],
    "encoded name": ["From: =?utf-8?q?M=C3=A0llory?= <mallory@a.test>"],
    "folded field": ["From: Mallory Rossi", "\t<mallory@a.test>"],
}


def _message(*header_lines: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in header_lines)
    return (head + "To: mallory@a.test\r\nSubject: prova\r\n\r\nciao\r\n").encode()


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    p = single_provider(tmp_path_factory.mktemp("impersonation"))
    add_user_fast(p, MALLORY, MALLORY_PW)
    return p


def _submit_all(a: ProviderDir, cases: dict[str, list[str]]) -> dict[str, tuple[int, bytes]]:
    got = {}
    with serving(a, runners=False) as (svc,), \
            smtplib.SMTP("127.0.0.1", svc.ports.submission, timeout=15) as s:
        s.starttls(context=client_tls(a.ca))
        s.login(MALLORY, MALLORY_PW)
        for name, lines in cases.items():
            assert s.mail(MALLORY)[0] == 250
            assert s.rcpt(MALLORY)[0] == 250
            got[name] = s.data(_message(*lines))
            s.rset()
    return got


def test_attack_from_impersonation_in_display_names_and_comments(a: ProviderDir) -> None:
    before = len(ledger_rows(a, "submission-refused"))
    submitted = len(ledger_rows(a, "submitted"))
    got = _submit_all(a, IMPERSONATIONS)
    for name, (code, text) in got.items():
        assert code == 550, (name, text)
    rows = ledger_rows(a, "submission-refused")[before:]
    assert len(rows) == len(IMPERSONATIONS)
    assert all(r["sender"] == MALLORY for r in rows)
    assert {r["detail"]["header"] for r in rows} == {"alice@a.test", "bob@b.test"}
    # the bare display name parses as a second author (already refused before this issue)
    assert {r["detail"]["reason"] for r in rows} == {"From header names another address",
                                                     "Sender header names another address",
                                                     "From header not owned"}
    assert sum(r["detail"]["reason"] == "From header not owned" for r in rows) == 1
    assert len(ledger_rows(a, "submitted")) == submitted  # nothing queued


def test_attack_from_impersonation_behind_a_line_that_is_no_field(a: ProviderDir) -> None:
    before = len(ledger_rows(a, "submission-refused"))
    got = _submit_all(a, MALFORMED)
    for name, (code, text) in got.items():
        assert code == 554 and b"Malformed header section" in text, (name, text)
    rows = ledger_rows(a, "submission-refused")[before:]
    assert [r["detail"]["reason"] for r in rows] == ["header line is not a field"] * len(MALFORMED)
    assert rows[0]["detail"]["line"] == 2  # the junk line, not the From : after it


def test_honest_names_still_go_through(a: ProviderDir) -> None:
    submitted = len(ledger_rows(a, "submitted"))
    got = _submit_all(a, HONEST)
    for name, (code, text) in got.items():
        assert code == 250, (name, text)
    assert len(ledger_rows(a, "submitted")) == submitted + len(HONEST)


@pytest.mark.parametrize("lines", [*IMPERSONATIONS.values(), *MALFORMED.values()],
                         ids=[*IMPERSONATIONS, *MALFORMED])
def test_formal_checks_refuse_the_same(lines: list[str]) -> None:
    """Behind the SMTP check, the access point would send a non-acceptance notice."""
    data = _message(*lines)
    limits = checks.Limits(30_000_000, 50)
    with pytest.raises(checks.FormalCheckFailed):
        checks.formal_checks(headers.parse(data), MALLORY, (MALLORY,), len(data), limits,
                             headers.header_block(data))


@pytest.mark.parametrize("lines", HONEST.values(), ids=list(HONEST))
def test_formal_checks_pass_honest_names(lines: list[str]) -> None:
    data = _message(*lines)
    checks.formal_checks(headers.parse(data), MALLORY, (MALLORY,), len(data),
                         checks.Limits(30_000_000, 50), headers.header_block(data))
