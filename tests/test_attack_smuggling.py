"""SMTP smuggling: an end-of-data look-alike (``<LF>.<CR><LF>``, ``<CR>.<CR>``, ...) that one
server reads as part of the message and a later hop reads as its end, so the bytes after it
become a second message with whatever envelope the attacker wrote.

aiosmtpd 1.4.6 itself only ends DATA on ``<CR><LF>.<CR><LF>`` (shown below), but pecd relays
what it accepts, signed and byte for byte, to peers it does not control. So pecd refuses any
message with a bare CR or LF on both listeners: nothing is queued, the smuggled commands are
never executed, and the ledger says what happened."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd import replies
from pecd.config import Limits
from pecd.edges.smtp import content_refusal

from .attack_support import ALICE, ALICE_PW, Raw, ledger_rows, login, queue_states, serving, single_provider
from .conftest import ProviderDir

IMPOSTORS = {
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
}

FIRST = b"From: alice@a.test\r\nTo: alice@a.test\r\nSubject: innocuo\r\n\r\nciao"
SMUGGLED = (b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n"
            b"From: alice@a.test\r\nTo: alice@a.test\r\nSubject: contrabbando\r\n\r\n"
            b"pagate subito\r\n")


def payload(impostor: bytes) -> bytes:
    return FIRST + impostor + SMUGGLED + b"\r\n.\r\n"


# --- the pure check ------------------------------------------------------------------------------

line_chunks = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"a", b"From: x", b" "]),
                       max_size=40)


@given(line_chunks)
@settings(max_examples=300, deadline=None)
def test_content_with_any_bare_cr_or_lf_is_refused(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    bare = b"\r" in data.replace(b"\r\n", b"") or b"\n" in data.replace(b"\r\n", b"")
    refusal = content_refusal(data, Limits())
    assert isinstance(refusal, replies.BareLineEnding) == bare
    if not bare:
        assert refusal is None


# --- what aiosmtpd 1.4.6 does on its own -------------------------------------------------------


def test_aiosmtpd_alone_keeps_impostors_inside_one_message() -> None:
    """Upstream 1.4.6 reads DATA up to CRLF.CRLF only: the smuggled part stays in the first
    message, which is exactly what would be handed to the next hop if pecd accepted it."""
    got: list[bytes] = []

    class Collect:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            got.append(envelope.original_content or b"")
            return "250 OK"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Collect(), loop=loop), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> list[int]:
            codes = []
            with Raw(port) as raw:
                raw.reply()
                raw.cmd("HELO x")
                for impostor in IMPOSTORS.values():
                    raw.cmd("MAIL FROM:<alice@a.test>")
                    raw.cmd("RCPT TO:<alice@a.test>")
                    raw.cmd("DATA")
                    codes.append(raw.cmd(payload(impostor) + b"NOOP")[0])
                    codes.append(raw.reply()[0])
            return codes

        try:
            assert await loop.run_in_executor(None, client) == [250, 250] * len(IMPOSTORS)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
    assert len(got) == len(IMPOSTORS)
    for content in got:  # one message each, the impostor and the smuggled part inside it
        assert content.startswith(FIRST) and content.endswith(SMUGGLED + b"\r\n")


# --- pecd's listeners ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("smuggling"))


def _transaction(raw: Raw, impostor: bytes) -> tuple[int, str]:
    assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
    assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    return raw.cmd(payload(impostor)[:-2])


@pytest.mark.parametrize("listener", ["submission", "inbound"])
def test_impostor_end_of_data_smuggles_nothing(a: ProviderDir, listener: str) -> None:
    before = len(ledger_rows(a, "smtp-refused"))
    with serving(a, runners=False) as (svc,), Raw(getattr(svc.ports, listener)) as raw:
        if listener == "submission":
            assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235
        else:
            raw.reply()
            raw.cmd("EHLO mx.internet.test")
        for name, impostor in IMPOSTORS.items():
            code, text = _transaction(raw, impostor)
            # the first reply after our CRLF.CRLF is the refusal: had the smuggled MAIL, RCPT and
            # DATA been executed, their 250 / 354 replies would come first
            assert (code, text) == (554, replies.BARE_LINE_ENDING[4:]), name
        assert raw.cmd("NOOP")[0] == 250
        raw.send(b"QUIT\r\n")
        assert raw.wait_closed(15) == b"221 Bye\r\n"  # nothing else was ever answered
    assert queue_states(a) == []  # nothing queued, neither the message nor a smuggled one
    assert not ledger_rows(a, "submitted") and not ledger_rows(a, "received")
    rows = ledger_rows(a, "smtp-refused")[before:]
    assert len(rows) == len(IMPOSTORS)
    assert {r["detail"]["reason"] for r in rows} == {"bare CR or LF"}
    assert {r["sender"] for r in rows} == {ALICE}


def test_the_same_client_is_fine_with_proper_line_ends(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,), Raw(svc.ports.submission) as raw:
        assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235
        assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
        assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        # a dot-stuffed line and pipelined commands after the real end are ordinary SMTP
        code, text = raw.cmd(FIRST + b"\r\n..\r\nfine\r\n.\r\nNOOP")
        assert code == 250 and "queued" in text, text
        assert raw.reply()[0] == 250
    assert len(queue_states(a)) == 1
