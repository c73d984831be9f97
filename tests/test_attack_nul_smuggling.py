"""NUL smuggling: ``<CRLF><NUL>.<CRLF>`` is not the end of the data for aiosmtpd, but a next hop
that handles lines as C strings may read it as one, and the bytes after it as a second message.
No Internet message may hold a NUL (RFC 5322 §2.3, RFC 5321 §4.5.2, RFC 6152 for 8BITMIME), so
both listeners refuse it with ``554 5.6.0`` and an ``smtp-refused`` ledger row; nothing is queued.

The submission listener also refuses other control characters (C0 but HT, CR, LF; DEL) in the
header section: RFC 5322 keeps them only as obsolete syntax no sender may generate. The inbound
listener takes those from peers and the Internet (old mailers still send them) and the reception
point reads them as U+FFFD: they never reach an outer header or daticert.xml."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd import replies
from pecd.config import Limits
from pecd.edges.smtp import content_refusal

from .attack_support import (
    ALICE,
    ALICE_PW,
    Raw,
    ledger_rows,
    login,
    queue_states,
    serving,
    single_provider,
)
from .conftest import ProviderDir

FIRST = b"From: alice@a.test\r\nTo: alice@a.test\r\nSubject: innocuo\r\n\r\nciao"
SMUGGLED = (b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n"
            b"From: alice@a.test\r\nTo: alice@a.test\r\nSubject: contrabbando\r\n\r\n"
            b"pagate subito\r\n")
IMPOSTORS = {
    "CRLF NUL . CRLF": b"\r\n\x00.\r\n",
    "CRLF . NUL CRLF": b"\r\n.\x00\r\n",
    "NUL only": b"\r\n\x00\r\n",
}

# --- the pure check ------------------------------------------------------------------------------

chunks = st.lists(st.sampled_from([b"\r\n", b".", b"a", b"From: x", b" ", b"\x00", b"\t", b"\xff"]),
                  max_size=40)


@given(chunks)
@settings(max_examples=300, deadline=None)
def test_attack_nul_smuggling_any_nul_is_refused(parts: list[bytes]) -> None:
    data = b"".join(parts)
    for strict in (False, True):
        refusal = content_refusal(data, Limits(), strict_headers=strict)
        if b"\x00" in data:
            assert isinstance(refusal, replies.ForbiddenBytes)
            assert refusal.reply == replies.NUL_IN_MESSAGE
        else:
            assert refusal is None


@pytest.mark.parametrize("control", [b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1b", b"\x7f"])
def test_header_controls_refused_only_where_mail_is_written(control: bytes) -> None:
    data = b"From: alice@a.test\r\nSubject: a" + control + b"b\r\n\r\nbody" + control + b"\r\n"
    refusal = content_refusal(data, Limits(), strict_headers=True)
    assert refusal is not None and refusal.reply == replies.CONTROL_IN_HEADERS
    assert content_refusal(data, Limits(), strict_headers=False) is None
    # in the body they are RFC 5322 text (obsolete but allowed): only the header is strict
    body_only = b"From: alice@a.test\r\nSubject: ab\r\n\r\nbody" + control + b"\r\n"
    assert content_refusal(body_only, Limits(), strict_headers=True) is None


def test_tabs_and_8bit_headers_are_fine() -> None:
    data = "From: alice@a.test\r\nSubject:\tcaffè\r\n\tpiegato\r\n\r\nciao\r\n".encode()
    assert content_refusal(data, Limits(), strict_headers=True) is None


# --- pecd's listeners ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("nul"))


def _transaction(raw: Raw, data: bytes) -> tuple[int, str]:
    assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
    assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    return raw.cmd(data + b"\r\n.")


def _open(raw: Raw, a: ProviderDir, listener: str) -> None:
    if listener == "submission":
        assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235
    else:
        raw.reply()
        raw.cmd("EHLO mx.internet.test")


@pytest.mark.parametrize("listener", ["submission", "inbound"])
def test_attack_nul_smuggling_end_of_data_lookalike(a: ProviderDir, listener: str) -> None:
    before = len(ledger_rows(a, "smtp-refused"))
    queued = len(queue_states(a))
    with serving(a, runners=False) as (svc,), Raw(getattr(svc.ports, listener)) as raw:
        _open(raw, a, listener)
        for name, impostor in IMPOSTORS.items():
            code, text = _transaction(raw, FIRST + impostor + SMUGGLED)
            # had the smuggled MAIL/RCPT/DATA run, their 250/354 would come first
            assert (code, text) == (554, replies.NUL_IN_MESSAGE[4:]), name
        code, text = _transaction(raw, b"From: alice@a.test\r\nSubject: nul\x00\r\n\r\nx")
        assert (code, text) == (554, replies.NUL_IN_MESSAGE[4:])  # in a header too
        assert raw.cmd("NOOP")[0] == 250
        raw.send(b"QUIT\r\n")
        assert raw.wait_closed(15) == b"221 Bye\r\n"  # nothing else was ever answered
    assert len(queue_states(a)) == queued  # nothing queued, neither message nor smuggled one
    rows = ledger_rows(a, "smtp-refused")[before:]
    assert len(rows) == len(IMPOSTORS) + 1
    assert all(r["detail"]["reason"].startswith("NUL byte at offset") for r in rows)
    assert all(r["detail"]["reply"] == replies.NUL_IN_MESSAGE for r in rows)


def test_attack_nul_smuggling_header_controls_at_submission(a: ProviderDir) -> None:
    before = len(ledger_rows(a, "smtp-refused"))
    queued = len(queue_states(a))
    bad = b"From: alice@a.test\r\nTo: alice@a.test\r\nSubject: a\x1b[31mrosso\r\n\r\nx"
    with serving(a, runners=False) as (svc,):
        with Raw(svc.ports.submission) as raw:
            _open(raw, a, "submission")
            assert _transaction(raw, bad) == (554, replies.CONTROL_IN_HEADERS[4:])
            code, text = _transaction(raw, FIRST)  # the same client, clean headers: fine
            assert code == 250 and "queued" in text, text
        with Raw(svc.ports.inbound) as raw:  # a peer's old mailer: taken, judged later
            _open(raw, a, "inbound")
            code, text = _transaction(raw, bad)
            assert code == 250 and "queued" in text, text
    assert len(queue_states(a)) == queued + 2
    rows = ledger_rows(a, "smtp-refused")[before:]
    assert [r["detail"]["reason"] for r in rows] == [
        "control byte 0x1b in the header section at offset 48"]
