"""The access point's formal checks, pure: headers and SMTP envelope in, a reason out."""

from __future__ import annotations

import pytest

from pecd.format import headers
from pecd.format.checks import FormalCheckFailed, Limits, formal_checks

LIMITS = Limits(max_message_size=1000, max_recipients=2)


def _check(head: str, rcpts: tuple[str, ...], mail_from: str = "alice@a.test") -> None:
    data = (head.replace("\n", "\r\n") + "\r\nbody\r\n").encode()
    formal_checks(headers.parse(data), mail_from, rcpts, len(data), LIMITS)


def test_needless_quotes_in_to_match_the_smtp_recipient() -> None:
    # aiosmtpd reports RCPT TO:<"b.c"@b.test> as b.c@b.test; To: keeps the quotes
    _check('From: alice@a.test\nTo: "b.c"@B.test\n', ("b.c@b.test",))


def test_needed_quotes_are_kept() -> None:
    _check('From: alice@a.test\nTo: "b c"@b.test\n', ('"b c"@b.test',))
    with pytest.raises(FormalCheckFailed, match="neither To nor Cc"):
        _check('From: alice@a.test\nTo: "b c"@b.test\n', ("bc@b.test",))


@pytest.mark.parametrize(("head", "rcpts", "reason"), [
    ("To: bob@b.test\n", ("bob@b.test",), "From header is missing"),
    ("From: alice@a.test, eve@a.test\nTo: bob@b.test\n", ("bob@b.test",), "exactly one address"),
    ("From: alice@a.test\nTo: bob@b.test\nBcc: eve@b.test\n", ("bob@b.test",), "Bcc"),
    ("From: alice@a.test\n", ("bob@b.test",), "at least one address"),
    ("From: alice@a.test\nTo: bob@b.test\n", ("bob@b.test", "eve@b.test"), "neither To nor Cc"),
    ("From: alice@a.test\nTo: a@b.test, b@b.test, c@b.test\n", ("a@b.test", "b@b.test", "c@b.test"),
     "too many recipients"),
    ("From: alice@a.test\nTo: bob@b.test\nX-Pad: " + "x" * 1000 + "\n", ("bob@b.test",),
     "exceeds the limit"),
])
def test_each_rule_names_its_reason(head: str, rcpts: tuple[str, ...], reason: str) -> None:
    with pytest.raises(FormalCheckFailed, match=reason):
        _check(head, rcpts)


def test_mail_from_must_be_the_from_address() -> None:
    with pytest.raises(FormalCheckFailed, match="MAIL FROM"):
        _check("From: alice@a.test\nTo: bob@b.test\n", ("bob@b.test",), mail_from="eve@a.test")
