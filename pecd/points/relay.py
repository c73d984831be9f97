"""Where a message goes (routing) and how it gets there (the relay stage).

Routing is pure: a local domain stays here, a domain in the provider index goes to that
provider, anything else is ordinary Internet mail (``esterno``) for the smarthost. The relay
stage sends ``relay`` items over SMTP with aiosmtplib, STARTTLS always to PEC peers, reusing one
connection per destination. It trusts nothing it receives; a peer's 250 is what ends its duty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

import aiosmtplib

from pecd.clock import Clock
from pecd.config import Config
from pecd.format.blob import Blob
from pecd.format.compose import has_bare_eol
from pecd.store import Connection
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Item, Kind, NewItem, Outcome, backoff, defer_destination
from pecd.trust.index import ProviderIndex

log = logging.getLogger("pecd.relay")

EXTERNAL = "external"
REUSE_LIMIT = 100  # messages per connection: peers limit commands per session (pecd: 1000)
PER_HOP = 4  # parallel connections to one destination
CHUNK = 1 << 20  # DATA is read from the spool and sent in pieces of about this size


@dataclass(frozen=True)
class Route:
    kind: Kind
    rcpts: tuple[str, ...]
    dest: str


class Router:
    def __init__(self, config: Config, index: ProviderIndex) -> None:
        self.config = config
        self.index = index

    def is_certified(self, address: str) -> bool:
        return self.config.is_local(address) or self.index.for_address(address) is not None

    def route(self, rcpts: Sequence[str], local_kind: Kind) -> list[Route]:
        """Group recipients by next hop; local ones become ``local_kind`` items."""
        groups: dict[str, list[str]] = {}
        for rcpt in rcpts:
            if self.config.is_local(rcpt):
                key = ""
            else:
                provider = self.index.for_address(rcpt)
                if provider is None:
                    key = EXTERNAL
                elif provider.host:
                    key = f"pec:{provider.fingerprint}"
                else:  # an index-copy entry: one hop per domain (see RelayStage.hop)
                    key = f"pec:{provider.fingerprint}:{rcpt.rpartition('@')[2].lower()}"
            groups.setdefault(key, []).append(rcpt)
        return [
            Route(local_kind if key == "" else "relay", tuple(group), key)
            for key, group in groups.items()
        ]

    def items(self, mail_from: str, rcpts: Sequence[str], data: bytes | Blob, local_kind: Kind,
              meta: dict[str, object] | None = None) -> list[NewItem]:
        routes = self.route(rcpts, local_kind)
        first: list[NewItem] = []
        for r in routes:
            first.append(NewItem(kind=r.kind, mail_from=mail_from, rcpts=r.rcpts, data=data,
                                 dest=r.dest, meta=dict(meta or {})))
        return first


class PermanentFailure(Exception):
    """The next hop refused for good (5xx); retrying will not help."""


class TemporaryFailure(Exception):
    """The next hop is unreachable or said 4xx; retry later."""


class PartialDelivery(Exception):
    """The next hop took the message for some recipients and refused the others."""

    def __init__(self, refused: dict[str, str]) -> None:
        super().__init__(", ".join(f"{r}: {why}" for r, why in refused.items()))
        self.refused = refused


@dataclass(frozen=True)
class Hop:
    host: str
    port: int
    tls: bool  # STARTTLS required


@dataclass
class _Conn:
    client: aiosmtplib.SMTP
    sent: int = 0


class Connections:
    """A few live SMTP connections per destination, reused across messages.

    Up to ``PER_HOP`` transactions to one destination run at once, each on its own connection;
    an idle connection is kept for the next message (RSET, no new TLS handshake)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._idle: dict[Hop, list[_Conn]] = {}
        self._slots: dict[Hop, asyncio.Semaphore] = {}
        self._tls = ssl.create_default_context(cafile=str(config.paths.ca_certs))
        if not config.relay.tls_verify:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

    async def _checkout(self, hop: Hop) -> tuple[_Conn, bool]:
        """A connected client and whether it is a reused one."""
        idle = self._idle.setdefault(hop, [])
        while idle:
            conn = idle.pop()
            if conn.client.is_connected and conn.sent < REUSE_LIMIT:
                try:
                    await conn.client.rset()
                    return conn, True
                except aiosmtplib.SMTPException:
                    pass
            conn.client.close()
        client = aiosmtplib.SMTP(
            hostname=hop.host, port=hop.port, local_hostname=self.config.hostname,
            timeout=self.config.relay.connect_timeout, tls_context=self._tls,
            start_tls=hop.tls, use_tls=False,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from None
        return _Conn(client), False

    async def send(self, hop: Hop, mail_from: str, rcpts: Sequence[str],
                   source: Callable[[], BinaryIO]) -> None:
        """One transaction; ``source`` opens the message (in a worker thread) for each try."""
        async with self._slots.setdefault(hop, asyncio.Semaphore(PER_HOP)):
            conn, reused = await self._checkout(hop)
            try:
                await self._transaction(hop, conn, mail_from, rcpts, source)
            except TemporaryFailure:
                if not reused:
                    raise
                # a reused connection may have been closed by the peer meanwhile (idle time,
                # command limits): one more try on a fresh one before deferring. A duplicate
                # that could result is recognised by the peer's reception point.
                conn, _ = await self._checkout(hop)
                await self._transaction(hop, conn, mail_from, rcpts, source)

    async def _transaction(self, hop: Hop, conn: _Conn, mail_from: str,
                           rcpts: Sequence[str], source: Callable[[], BinaryIO]) -> None:
        client = conn.client
        errors: dict[str, aiosmtplib.SMTPRecipientRefused] = {}
        loop = asyncio.get_running_loop()
        reader: _DataReader | None = None
        try:
            reader = await loop.run_in_executor(None, lambda: _DataReader(source()))
            if client.last_ehlo_response is None:
                await client.ehlo()  # its extensions say whether SIZE may be declared
            options = [f"SIZE={reader.size}"] if client.supports_extension("size") else []
            await client.mail(mail_from, options=options)
            for rcpt in rcpts:
                try:
                    await client.rcpt(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    errors[rcpt] = exc
            if len(errors) == len(rcpts):
                raise aiosmtplib.SMTPRecipientsRefused(list(errors.values()))
            await _send_data(client, reader)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            client.close()
            if all(r.code >= 500 for r in exc.recipients):
                raise PermanentFailure(str(exc)) from None
            raise TemporaryFailure(str(exc)) from None
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            if exc.code >= 500:
                raise PermanentFailure(f"{exc.code} {exc.message}") from None
            raise TemporaryFailure(f"{exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from None
        finally:
            if reader is not None:
                reader.close()  # closing a regular file read to its end does not block
        conn.sent += 1
        self._idle.setdefault(hop, []).append(conn)
        if errors:
            raise PartialDelivery({r: f"{e.code} {e.message}" for r, e in errors.items()})

    async def close(self) -> None:
        for conns in self._idle.values():
            while conns:
                client = conns.pop().client
                try:
                    if client.is_connected:
                        await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()


_LINE_END = re.compile(rb"\r\n|\r|\n")


class _DataReader:
    """The message as the DATA command carries it: CRLF lines with a leading dot doubled
    (RFC 5321 §4.5.2), in pieces cut at line ends, so a 30 MB spool file is never in memory
    whole and a dot that starts a line is never cut off from it. Blocking: runs in a worker
    thread."""

    def __init__(self, source: BinaryIO) -> None:
        self._file = source
        self._carry = b""
        self.size = source.seek(0, os.SEEK_END)  # what SIZE declares (RFC 1870)
        source.seek(0)

    def next(self) -> tuple[bytes, bool]:
        """The next piece to send, and whether it is the last (the file is then closed)."""
        while True:
            block = self._file.read(CHUNK)
            data = self._carry + block
            if len(block) < CHUNK:  # a short read of a regular file or a buffer: the end
                self.close()
                self._carry = b""
                if data and not data.endswith((b"\n", b"\r")):
                    data += b"\r\n"  # a last line without its line break gets one
                return _stuff(data), True
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a piece: read on
                self._carry = data
                continue
            self._carry = data[cut:]
            return _stuff(data[:cut]), False

    def close(self) -> None:
        self._file.close()


def _stuff(lines: bytes) -> bytes:
    """Whole lines (a piece starts at a line start) as DATA carries them: CRLF, dots doubled."""
    if has_bare_eol(lines):  # never in what pecd queues; normalised rather than trusted
        lines = _LINE_END.sub(b"\r\n", lines)
    stuffed = lines.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed[:1] == b"." else stuffed


async def _send_data(client: aiosmtplib.SMTP, reader: _DataReader) -> None:
    """DATA streamed from the spool file, paced by the peer (transport flow control).

    aiosmtplib's ``data()`` takes the whole message as one bytes object and copies it three
    times (line endings, dot-stuffing, terminator); this writes the pieces on its protocol
    instead (``write``, ``_drain_helper``, ``read_response``: aiosmtplib 5.x, pinned below 6).
    """
    loop = asyncio.get_running_loop()
    timeout = client.timeout
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    last = False
    while not last:  # one worker-thread hop per piece: a small message is one piece
        piece, last = await loop.run_in_executor(None, reader.next)
        protocol.write(piece)
        await asyncio.wait_for(protocol._drain_helper(), timeout)
    protocol.write(b".\r\n")
    response = await protocol.read_response(timeout=timeout)  # no await between: no reply lost
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)


class RelayStage:
    def __init__(self, config: Config, index: ProviderIndex, connections: Connections,
                 open_item: Callable[[Item], BinaryIO], clock: Clock) -> None:
        self.config = config
        self.index = index
        self.connections = connections
        self.open_item = open_item
        self.clock = clock

    def hop(self, item: Item) -> Hop:
        if item.dest.startswith("pec:"):
            provider = self.index.for_address(item.rcpts[0])
            if provider is None:
                raise PermanentFailure(f"no provider in the index for {item.rcpts[0]}")
            # an entry of the authority's index names no host: the recipient's domain, SMTP port
            host = provider.host or item.rcpts[0].rpartition("@")[2].lower()
            return Hop(host, provider.port, tls=True)
        if self.config.relay.smarthost:
            return Hop(self.config.relay.smarthost, self.config.relay.smarthost_port, tls=False)
        raise PermanentFailure("no smarthost configured for non-PEC recipients")

    async def handle(self, item: Item) -> Outcome:
        event = LedgerEvent(
            event="relayed", msgid=str(item.meta.get("msgid") or "") or None,
            sender=item.mail_from, recipients=item.rcpts,
            detail={"dest": item.dest, "what": item.meta.get("what", "")},
        )
        try:
            hop = self.hop(item)
            await self.connections.send(hop, item.mail_from, item.rcpts,
                                        lambda: self.open_item(item))
        except TemporaryFailure as exc:
            if item.attempts + 1 >= self.config.relay.max_attempts:
                return Outcome(state="hold", error=str(exc), events=[LedgerEvent(
                    event="relay-failed", msgid=event.msgid, sender=item.mail_from,
                    recipients=item.rcpts, detail={"reason": str(exc), "final": True})])
            delay = backoff(item.attempts, self.config.relay.retry_base,
                            self.config.relay.retry_max, random.random())
            until = self.clock.now().timestamp() + delay
            return Outcome(
                state="deferred", delay=delay, error=str(exc),
                events=[LedgerEvent(event="deferred", msgid=event.msgid, sender=item.mail_from,
                                    recipients=item.rcpts,
                                    detail={"reason": str(exc), "retry_in": round(delay, 1)})],
                effects=[_defer_destination(item.dest, until)],
            )
        except PermanentFailure as exc:
            return Outcome(state="hold", error=str(exc), events=[LedgerEvent(
                event="relay-failed", msgid=event.msgid, sender=item.mail_from,
                recipients=item.rcpts, detail={"reason": str(exc), "final": True})])
        except PartialDelivery as exc:
            # done for the recipients taken; the refused ones go on as an item of their own
            refused = tuple(r for r in item.rcpts if r in exc.refused)
            delay = backoff(item.attempts, self.config.relay.retry_base,
                            self.config.relay.retry_max, random.random())
            rest = NewItem("relay", item.mail_from, refused, same_as=item, dest=item.dest,
                           meta=item.meta, delay=delay)
            taken = tuple(r for r in item.rcpts if r not in exc.refused)
            return Outcome(outputs=[rest], events=[
                replace(event, recipients=taken),
                LedgerEvent(event="deferred", msgid=event.msgid, sender=item.mail_from,
                            recipients=refused, detail={"reason": str(exc),
                                                        "retry_in": round(delay, 1)}),
            ])
        return Outcome(events=[event])


def _defer_destination(dest: str, until: float) -> Callable[[Connection], None]:
    """Per-destination backoff: the other messages waiting for a hop that just failed wait too,
    instead of each failing on its own. Kept in the queue, so it survives restarts and an
    operator's ``pecd queue retry`` still overrides it."""

    def effect(conn: Connection) -> None:
        defer_destination(conn, dest, until)

    return effect
