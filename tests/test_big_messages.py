"""Big messages are streamed, not copied: the relay sends DATA from the spool in pieces, and the
envelope and complete delivery receipt hold the original as a view, joined nowhere.

Memory is asserted with tracemalloc (bytes allocated by Python, not time): the old code held
three to six copies of the original at once, these bounds allow less than one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from pecd.clock import SystemClock
from pecd.format import compose, pec, receipts
from pecd.format.daticert import Recipient
from pecd.format.envelope import transport_envelope
from pecd.format.pec import Issuer, Transaction
from pecd.points import relay
from pecd.service import Service, make_issuer, make_timestamper
from pecd.store.queue import INLINE_MAX
from pecd.store.spool import Spool
from pecd.trust import pki
from pecd.trust.cms import verify_detached

from .conftest import ProviderDir, free_port, openssl_verifies, running, submit, wait_for
from .pechelpers import queued

T = TypeVar("T")
SIZE = 4_000_000


def _original(size: int) -> bytes:
    """A message with a base64 attachment of about ``size`` bytes, CRLF lines."""
    blob = base64.encodebytes(bytes(range(256)) * (size // 342 + 1)).replace(b"\n", b"\r\n")
    return (b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: big\r\n"
            b"Message-ID: <big-1@a.test>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: application/octet-stream; name="big.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + blob[:size])


def _peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the most Python memory it held at once beyond what existed before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _issuer(p: ProviderDir) -> Issuer:
    clock = SystemClock()
    return make_issuer(p.config, clock, make_timestamper(p.config, clock))


def _transaction(issuer: Issuer) -> Transaction:
    at = datetime.now(UTC).replace(microsecond=0)
    return Transaction(identifier=compose.message_id(issuer.domain, at), ref_msgid="<big-1@a.test>",
                       sender="alice@a.test", recipients=(Recipient("bob@b.test"),),
                       reply_to="alice@a.test", subject="big", accepted_at=at,
                       issuer_name=issuer.name)


def test_big_envelope_and_receipt_hold_no_copy_of_the_original(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, b = two_providers
    original = _original(SIZE)
    issuer_a, issuer_b = _issuer(a), _issuer(b)
    tx = _transaction(issuer_a)
    spool = Spool(tmp_path / "spool")

    def build_and_spool() -> str:
        return spool.write(transport_envelope(tx, original, issuer_a, tx.accepted_at))

    name, peak = _peak(build_and_spool)
    assert peak < SIZE // 4, f"building the envelope held {peak / SIZE:.2f} × the original"
    env_path = spool.path(name)
    assert openssl_verifies(env_path, a.ca)
    data = env_path.read_bytes()
    roots = pki.load_certs(a.config.paths.ca_certs)

    def parse_and_verify() -> pec.Parsed:
        parsed = pec.parse(data)
        assert parsed.signed is not None
        verify_detached(parsed.signed.signature, parsed.signed.inner_view, roots)
        return parsed

    parsed, peak = _peak(parse_and_verify)
    assert peak < SIZE // 4, f"parsing and verifying held {peak / SIZE:.2f} × the original"
    assert parsed.original == original

    def complete_receipt() -> str:
        _, receipt = receipts.delivery(tx, "bob@b.test", "completa", parsed.original_view,
                                       issuer_b, datetime.now(UTC))
        return spool.write(receipt)

    name, peak = _peak(complete_receipt)
    assert peak < SIZE // 4, f"the complete receipt held {peak / SIZE:.2f} × the original"
    assert openssl_verifies(spool.path(name), b.ca)
    assert pec.parse(spool.path(name).read_bytes()).original == original


class _Sink:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.got.append(envelope.original_content or b"")
        return "250 OK"


@pytest.mark.parametrize("in_row", [False, True], ids=["spool-file", "row-bytes"])
@pytest.mark.parametrize("chunk", [16, 1 << 20])
def test_relay_streams_data_with_dots_and_line_ends_intact(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, chunk: int, in_row: bool) -> None:
    """Pieces cut at line ends: a leading dot is doubled whatever piece it starts, a line longer
    than a piece is read on, and a last line without a line break gets one; the same from a
    spool file and from a queue row's bytes."""
    monkeypatch.setattr(relay, "CHUNK", chunk)
    message = (b"Subject: dots\r\n\r\n.\r\n..two\r\n" + b"x" * 40 + b"\r\n.start\r\n"
               + b"".join(b".%d\r\n" % i for i in range(50)) + b"no line break at the end")
    path = tmp_path / "m.eml"
    path.write_bytes(message)
    sink = _Sink()
    a, _ = two_providers

    def source() -> BinaryIO:
        return io.BytesIO(message) if in_row else path.open("rb")

    async def run() -> None:
        port = free_port()
        server = await asyncio.get_running_loop().create_server(
            lambda: AioSMTP(sink, hostname="sink"), "127.0.0.1", port)
        conns = relay.Connections(a.config)
        try:
            for _ in range(2):  # the second on the reused connection
                await conns.send(relay.Hop("127.0.0.1", port, tls=False), "alice@a.test",
                                 ["x@sink.test"], source)
        finally:
            await conns.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())
    assert sink.got == [message + b"\r\n"] * 2


@pytest.mark.parametrize("size", [2_000, INLINE_MAX + 50_000], ids=["in-rows", "in-spool-files"])
def test_a_certified_cycle_through_either_queue_storage(
        two_providers_db: tuple[ProviderDir, ProviderDir], size: int) -> None:
    """A message up to INLINE_MAX is queued in its row, a bigger one in spool files (each item
    its own file or hard link; on PostgreSQL in chunks of body_chunks, each item its own copy);
    both complete the whole cycle, and across a restart: recovery takes a row's bytes as
    present, not as a missing file."""
    a, b = two_providers_db
    on_pg = a.config.paths.database_url is not None
    original = _original(size).rstrip(b"\r\n") + b"\r\n"  # as SMTP carries it

    async def run() -> None:
        svc = Service(a.config)
        await svc.start(runners=False)  # the listener only: the item stays queued
        try:
            code, reply = await asyncio.get_running_loop().run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["bob@b.test"], original, svc.ports.submission)
            assert code == 250, reply
        finally:
            await svc.stop()
        spool, body = _queued_storage(a)
        if size <= INLINE_MAX:
            assert spool == "" and body is not None and len(body) == len(original)
            assert on_pg or not list((a.root / "data" / "spool" / "q").iterdir())
        elif on_pg:
            assert body is None and spool.startswith("pg-")
            assert a.query("SELECT sum(length(data)) FROM body_chunks WHERE name = ?",
                           (spool,))[0][0] == len(original)
        else:
            assert body is None
            assert (a.root / "data" / "spool" / "q" / spool).stat().st_size == len(original)
        async with running(a, b):
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2
                           and len(b.messages("bob@b.test")) == 1)
            await wait_for(lambda: not queued(a) and not queued(b))

    asyncio.run(run())
    (delivered,) = b.messages("bob@b.test")
    assert pec.parse(delivered).original == original
    (b.root / "env.eml").write_bytes(delivered)
    assert openssl_verifies(b.root / "env.eml", b.ca)
    for p in (a, b):  # every item's bytes went with it
        if on_pg:
            assert p.query("SELECT count(*) FROM body_chunks")[0][0] == 0
            assert not (p.root / "data" / "spool").exists()  # nothing kept locally
        else:
            assert not list((p.root / "data" / "spool" / "q").iterdir())
    assert "ledger ok" in a.cli("ledger", "verify") and "ledger ok" in b.cli("ledger", "verify")


def _queued_storage(p: ProviderDir) -> tuple[str, bytes | None]:
    row = p.query("SELECT spool, body, state FROM queue")
    assert len(row) == 1 and row[0][2] == "incoming"
    return row[0][0], row[0][1]


@pytest.mark.parametrize("window", [3, 4, 1 << 20])
def test_bare_line_ends_and_8bit_found_in_bytes_and_views_whatever_the_window(
        monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """A view is read in windows: a CRLF cut between two is still one CRLF, and a bare CR or
    LF is found wherever it falls."""
    monkeypatch.setattr(compose, "_WINDOW", window)
    clean = b"ab\r\ncd\r\n\r\n.\r\nlast line\r\n"
    for data in (clean, memoryview(clean)):
        assert not compose.has_bare_eol(data) and compose.is_ascii(data)
    for bad in (b"ab\ncd\r\n", b"ab\r\ncd\r", b"\n\r", b"ab\rcd\r\n", b"x" * 7 + b"\n"):
        assert compose.has_bare_eol(bad) and compose.has_bare_eol(memoryview(bad)), bad
    assert not compose.is_ascii(memoryview(b"abc\r\n\xe8\r\n"))
