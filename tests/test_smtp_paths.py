"""MAIL FROM / RCPT TO paths: PecdSMTP's one-regex reading of the usual ``<local@domain>`` must
give exactly what aiosmtpd's stdlib-based parser gives, or hand the path to it."""

from __future__ import annotations

import random

import pytest
from aiosmtpd.smtp import SMTP

from pecd.config import Limits
from pecd.edges.smtp import _PLAIN_PATH, PecdSMTP

USUAL = ["<alice@a.test>", "<alice@a.test> SIZE=10240", "<alice@a.test> SIZE=10 BODY=8BITMIME",
         "<a.b+c@x-y.z.it>", "<Alice@A.TEST>  SIZE=1", "<a@b>x", "<a@b> ", "<a@b>\tX=1",
         "<posta-certificata@pec.example.it> SMTPUTF8", "<a@b> <c@d>", "<o'neil@b.c>"]
UNUSUAL = ["<a..b@c>", "<a@-b>", '<"q"@b>', "<a@[1.2.3.4]>", "<>", " <a@b>", "<a@b.>", "<",
           "<a@b> (comment) SIZE=1", "<@x,@y:a@b>", "a@b", "<a@b", "<à@b.it>", "<a@b>\r\n"]


class _Handler:
    pass


def _server() -> PecdSMTP:
    return PecdSMTP(_Handler(), limits=Limits())  # type: ignore[arg-type]


def _stdlib(arg: str) -> tuple[str | None, str | None]:
    try:
        return SMTP(_Handler())._getaddr(arg)
    except (IndexError, ValueError, TypeError, AttributeError):
        return "", ""


@pytest.mark.parametrize("arg", USUAL + UNUSUAL)
def test_a_path_reads_as_the_stdlib_parser_reads_it(arg: str) -> None:
    assert _server()._getaddr(arg) == _stdlib(arg)


def test_the_usual_paths_take_the_short_way_and_the_others_do_not() -> None:
    assert all(_PLAIN_PATH.match(a) for a in USUAL)
    assert not any(_PLAIN_PATH.match(a) for a in UNUSUAL)


def test_random_paths_read_as_the_stdlib_parser_reads_them() -> None:
    rng = random.Random(17)
    alphabet = "ab.-+_@<> \t\"()[]:,=\\'x9"
    server = _server()
    for _ in range(3000):
        arg = "<" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14)))
        assert server._getaddr(arg) == _stdlib(arg), arg


def test_the_local_part_limit_holds_on_the_short_way() -> None:
    server = _server()
    server.local_part_limit = 5
    assert server._getaddr("<abcdef@b.c>") == (None, None)
    assert server._getaddr("<abcde@b.c>") == ("abcde@b.c", "")
