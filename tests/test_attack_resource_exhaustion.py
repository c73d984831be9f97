"""Exhausting a listener: oversized messages, too many recipients, endless lines, header floods,
many connections from one address, endless commands in one session, and idle or trickling
clients (slowloris). Each gets a clear SMTP code (or, for a stalled client, ``421`` and the
connection closed) and the listener stays usable. Limits are tiny here so the tests are fast;
the time bounds below only stop a broken test from hanging, they measure nothing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pecd import replies

from .attack_support import ALICE, ALICE_PW, Raw, login, serving, set_limits, single_provider
from .conftest import ProviderDir

GUARD = 15.0  # seconds: generous bound for "the server closes", only a failure guard


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    p = single_provider(tmp_path_factory.mktemp("exhaustion"))
    set_limits(p, max_message_size=20_000, max_recipients=3, max_header_fields=20,
               max_header_bytes=4096, max_connections_per_address=3, max_commands_per_session=40)
    return p


def _message(headers: int = 3, body: bytes = b"ciao\r\n") -> bytes:
    head = b"From: alice@a.test\r\nTo: alice@a.test\r\n"
    head += b"".join(b"X-Filler-%d: x\r\n" % i for i in range(headers - 2))
    return head + b"\r\n" + body


def _data(raw: Raw, content: bytes, rcpts: int = 1) -> tuple[int, str]:
    assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
    for _ in range(rcpts):
        assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    return raw.cmd(content + b".")


def test_size_recipients_lines_and_headers(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,), Raw(svc.ports.submission) as raw:
        assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235
        # size: announced, then actual
        assert raw.cmd("MAIL FROM:<alice@a.test> SIZE=20001")[0] == 552
        code, text = _data(raw, _message(body=b"x" * 900 + b"\r\n") * 25)
        assert code == 552, text
        # recipients
        assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
        for _ in range(3):
            assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
        assert raw.cmd("RCPT TO:<alice@a.test>") == (452, replies.TOO_MANY_RCPTS[4:])
        assert raw.cmd("RSET")[0] == 250
        # line length: a DATA line and a command line
        code, text = _data(raw, _message(body=b"y" * 1200 + b"\r\n"))
        assert code == 500 and "too long" in text.lower(), text
        assert raw.cmd(b"NOOP " + b"z" * 600)[0] == 500
        # header flood: count, and size (folded lines, each short)
        code, text = _data(raw, _message(headers=21))
        assert (code, text) == (554, replies.TOO_MANY_HEADERS.format(20)[4:])
        folded = b"X-Long: a\r\n" + b"".join(b" " + b"b" * 70 + b"\r\n" for _ in range(60))
        code, text = _data(raw, folded + _message())
        assert (code, text) == (554, replies.HEADERS_TOO_BIG.format(4096)[4:])
        # and after all that the session still works: exactly at the limits is fine
        code, text = _data(raw, _message(headers=20), rcpts=3)
        assert code == 250, text


def test_connections_per_address(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,):
        port = svc.ports.inbound
        held = [Raw(port) for _ in range(3)]
        try:
            for raw in held:
                assert raw.reply()[0] == 220
            with Raw(port) as extra:
                assert extra.wait_closed(GUARD) == replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
            # the other listeners count on their own; the submission one is still open to us
            with Raw(svc.ports.submission) as other:
                assert other.reply()[0] == 220
            held.pop().sock.close()

            def greeted() -> bool:  # the freed slot is given back once the server saw the close
                with Raw(port) as again:
                    return again.reply()[0] == 220

            deadline = time.monotonic() + GUARD
            while not greeted():
                assert time.monotonic() < deadline, "slot never released"
        finally:
            for raw in held:
                raw.sock.close()


def test_commands_per_session(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,), Raw(svc.ports.inbound) as raw:
        raw.reply()
        for _ in range(40):
            assert raw.cmd("NOOP")[0] == 250
        raw.send(b"NOOP\r\n")
        assert raw.wait_closed(GUARD) == replies.TOO_MANY_COMMANDS.encode() + b"\r\n"


@pytest.fixture
def impatient(a: ProviderDir) -> Iterator[ProviderDir]:
    set_limits(a, session_timeout=1.0)
    yield a
    set_limits(a, session_timeout=300.0)


def test_idle_client_is_dropped(impatient: ProviderDir) -> None:
    with serving(impatient, runners=False) as (svc,), Raw(svc.ports.inbound) as raw:
        assert raw.reply()[0] == 220
        assert raw.wait_closed(GUARD) == replies.IDLE_TIMEOUT.encode() + b"\r\n"


def test_slowloris_command_and_data_trickles_are_dropped(impatient: ProviderDir) -> None:
    with serving(impatient, runners=False) as (svc,):
        with Raw(svc.ports.inbound) as raw:
            raw.reply()
            closed = _trickle(raw, b"EHLO " + b"x" * 400)  # one byte at a time, never a line end
            assert closed.endswith(replies.IDLE_TIMEOUT.encode() + b"\r\n")
        with Raw(svc.ports.inbound) as raw:
            raw.reply()
            assert raw.cmd("HELO slow.test")[0] == 250
            assert raw.cmd("MAIL FROM:<x@internet.test>")[0] == 250
            assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            # complete lines, each well inside the idle time: DATA as a whole still has to end
            closed = _trickle(raw, b"Subject: slow\r\n\r\n" + b"line\r\n" * 400, chunk=6)
            assert closed.endswith(replies.IDLE_TIMEOUT.encode() + b"\r\n")


def test_stalled_tls_handshake_is_dropped(impatient: ProviderDir) -> None:
    with serving(impatient, runners=False) as (svc,), \
            socket.create_connection(("127.0.0.1", svc.ports.smtps), timeout=GUARD) as sock:
        raw = Raw.__new__(Raw)
        raw.sock, raw.buf = sock, b""
        assert raw.wait_closed(GUARD) == b""  # never a ClientHello: closed, nothing said


def _trickle(raw: Raw, data: bytes, chunk: int = 1, pause: float = 0.05) -> bytes:
    """Send ``data`` slowly until the server closes; what it said last. Fails if it never does."""
    raw.sock.settimeout(pause)
    deadline = time.monotonic() + GUARD
    said = b""
    for i in range(0, len(data), chunk):
        assert time.monotonic() < deadline, "the server let the trickle go on"
        try:
            raw.sock.sendall(data[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            return said
        try:
            got = raw.sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return said
        if not got:
            return said
        said += got
    raise AssertionError("the whole trickle was accepted")
