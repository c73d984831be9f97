"""The DATA reader (``PecdSMTP.smtp_DATA``), read in blocks: the end of the data is only a dot
line, dots are unstuffed wherever a block boundary falls, an over-long line is refused and the
session stays in step, and pipelined commands after the data are answered as commands.

A bare PecdSMTP with a recording handler, on 127.0.0.1, over a raw socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import Envelope, Session

from pecd.config import Limits
from pecd.edges.smtp import PecdSMTP
from pecd.throttle import ConnectionLimiter

from .attack_support import Raw

T = TypeVar("T")


class _Recorder:
    """What PecdSMTP asks of its handler (smtp._Base), and the messages it got."""

    closing = False

    def __init__(self) -> None:
        self.connections = ConnectionLimiter(10)
        self.sessions: set[PecdSMTP] = set()
        self.got: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.got.append(envelope.original_content or b"")
        return "250 OK"

    async def refused(self, session: Session, envelope: Envelope, refusal: Any) -> str:
        return str(refusal.reply)

    strict_headers = False

    def tls_failures_allow(self, address: str) -> bool:
        return True


def _session(client: Callable[[Raw], T]) -> tuple[T, list[bytes]]:
    handler = _Recorder()

    async def scenario() -> T:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: PecdSMTP(handler, limits=Limits(), data_size_limit=200_000,  # type: ignore[arg-type]
                             auth_required=False, loop=loop),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def run() -> T:
            with Raw(port) as raw:
                raw.reply()
                assert raw.cmd("EHLO client.test")[0] == 250
                return client(raw)

        try:
            return await loop.run_in_executor(None, run)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(scenario()), handler.got


def _send(raw: Raw, data: bytes, then: bytes = b"") -> tuple[int, str]:
    assert raw.cmd("MAIL FROM:<a@a.test>")[0] == 250
    assert raw.cmd("RCPT TO:<b@b.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(data + b".\r\n" + then)
    return raw.reply()


DOTS = (b"Subject: dots\r\n\r\n.\r\n..\r\n.two\r\nends with a dot.\r\n"
        + b"x" * 900 + b".\r\n" + b".x\r\n")


@pytest.mark.parametrize("body", [
    b"",  # the dot line right after 354
    b"Subject: s\r\n\r\nhello\r\n",
    DOTS,
    # lines that end in a dot, long enough that the reader's limit cuts blocks among them
    b"Subject: s\r\n\r\n" + b"".join(b"line %d ends here.\r\n" % i for i in range(400)),
    b"Subject: s\r\n\r\n" + (b"y" * 1001 + b"\r\n") * 5,  # at the line limit: taken
    b"Subject: s\r\n\r\n" + (b"QUJD" * 19 + b"\r\n") * 2000,  # base64-like, no dot at all
])
def test_data_arrives_unstuffed_and_byte_exact(body: bytes) -> None:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    replies, got = _session(lambda raw: [_send(raw, stuffed), raw.cmd("NOOP")])
    assert [code for code, _ in replies] == [250, 250]
    assert got == [body]


def test_a_long_line_ending_in_a_dot_does_not_end_the_data() -> None:
    """The line is refused (500) only at the real end, and what follows it is still data: a
    dot that ends the long line, or a command-like line after it, is never taken as a command."""
    long_line = b"z" * 3000 + b".\r\n"  # cut by the reader's limit, its dot in the next block
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@b.test>\r\n"

    def client(raw: Raw) -> list[tuple[int, str]]:
        first = _send(raw, b"Subject: s\r\n\r\n" + long_line + smuggled + b"tail\r\n")
        return [first, raw.cmd("NOOP"), _send(raw, b"Subject: ok\r\n\r\nfine\r\n")]

    replies, got = _session(client)
    assert replies[0][0] == 500 and "too long" in replies[0][1].lower()
    assert [code for code, _ in replies[1:]] == [250, 250]
    assert got == [b"Subject: ok\r\n\r\nfine\r\n"]  # the refused message was never handed on


def test_commands_pipelined_after_the_data_are_answered_as_commands() -> None:
    def client(raw: Raw) -> list[tuple[int, str]]:
        first = _send(raw, b"Subject: p\r\n\r\nbody.\r\n", then=b"RSET\r\nNOOP\r\n")
        return [first, raw.reply(), raw.reply()]

    replies, got = _session(client)
    assert [code for code, _ in replies] == [250, 250, 250]
    assert got == [b"Subject: p\r\n\r\nbody.\r\n"]


def test_too_much_data_is_refused_at_the_end_and_kept_nowhere() -> None:
    replies, got = _session(lambda raw: [_send(raw, (b"w" * 998 + b"\r\n") * 300),
                                         raw.cmd("NOOP")])
    assert replies[0][0] == 552 and [c for c, _ in replies[1:]] == [250]
    assert got == []
