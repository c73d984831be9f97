"""Virus scanning (RFC 6109 §3.1.3, §3.2.3, §5.4) and the quarantine store.

Receives message bytes and answers with the name of the virus found, or ``None``. A
:class:`Scanner` is anything with ``async scan(data)``; :class:`ClamdScanner` speaks clamd's
``INSTREAM`` command over its unix or TCP socket (configured as ``[antivirus] clamd =
"unix:/run/clamav/clamd.ctl"`` or ``"tcp:127.0.0.1:3310"``). When ``[antivirus]`` is not
configured there is no scanner and pecd claims nothing about viruses anywhere.

Trusts: clamd's verdict, nothing in the message. The bytes are only read, never altered (§5.4).
A scanner that cannot give a verdict (clamd down, an error reply, a stream over clamd's
``StreamMaxLength``) raises :class:`ScanError`; the stage then defers the item and tries again
later (or parks it in ``hold`` when retrying cannot help), so nothing passes unscanned.

Touches: clamd's socket, and ``<data>/quarantine/``, where infected messages are kept, one file
per message (mode 0600, written to a temporary name, fsynced, renamed, directory fsynced), named
after the queue spool file that carried it so a retried step writes the same file again. The
ledger row of the refusal or detection names the file. Retention is policy: infected messages
are kept 30 months (design §8), pecd itself never deletes them; the operator's purge job removes
older files, e.g. ``find <data>/quarantine -name '*.eml' -mtime +913 -delete``.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pecd.config import Config, ConfigError
from pecd.store import durable
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Item, Outcome, backoff

CHUNK = 64 * 1024
MAX_REPLY = 64 * 1024
RETRY_BASE = 30.0
RETRY_MAX = 900.0
MAX_ATTEMPTS = 200  # about two days of a missing clamd at RETRY_MAX
_NAME = re.compile(r"[^A-Za-z0-9._:/+-]")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Scanner(Protocol):
    async def scan(self, data: bytes) -> str | None:
        """The name of the virus found in ``data``, or ``None`` when it is clean."""
        ...


class ScanError(Exception):
    """The scanner gave no verdict (unreachable, error reply, timeout); try again later."""


class ScanLimitExceeded(ScanError):
    """The message is larger than the scanner accepts (clamd ``StreamMaxLength``)."""


@dataclass(frozen=True)
class ClamdAddress:
    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(value: str) -> ClamdAddress:
    """``unix:/absolute/path`` or ``tcp:host:port`` (``tcp:[::1]:3310`` for IPv6)."""
    scheme, _, rest = value.strip().partition(":")
    if scheme == "unix" and rest.startswith("/"):
        return ClamdAddress("unix", path=rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ClamdAddress("tcp", host=host, port=int(port))
    raise ConfigError(f"[antivirus] clamd = {value!r}: expected 'unix:/path' or 'tcp:host:port'")


class ClamdScanner:
    """clamd's ``zINSTREAM``: the data in length-prefixed chunks, a zero-length chunk, one reply."""

    def __init__(self, address: ClamdAddress | str, chunk_size: int = CHUNK,
                 timeout: float = 120.0) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.chunk_size = chunk_size
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ClamdScanner({str(self.address)!r})"

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self.address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[Any, ...] = self.address.path
        else:
            infos = await loop.getaddrinfo(self.address.host, self.address.port,
                                           type=socket.SOCK_STREAM)
            if not infos:
                raise OSError(f"cannot resolve {self.address.host}")
            family, type_, proto, _, target = infos[0]
            sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _command(self, command: bytes, data: bytes | None) -> str:
        # Plain sockets rather than streams: clamd answers a stream over its limit and closes
        # while we are still writing, and a stream transport would drop that answer with the
        # write error; the kernel keeps it for the recv below.
        loop = asyncio.get_running_loop()
        try:
            sock = await self._connect()
        except OSError as exc:
            raise ScanError(f"clamd unreachable at {self.address}: {exc}") from None
        try:
            try:
                await loop.sock_sendall(sock, b"z" + command + b"\0")
                if data is not None:
                    view = memoryview(data)
                    for start in range(0, len(view), self.chunk_size):
                        chunk = view[start:start + self.chunk_size]
                        await loop.sock_sendall(sock, struct.pack("!I", len(chunk)))
                        await loop.sock_sendall(sock, chunk)
                    await loop.sock_sendall(sock, b"\0\0\0\0")
            except ConnectionError:
                pass  # clamd stopped reading (size limit) and closed; its reply says why
            reply = b""
            while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
                try:
                    part = await loop.sock_recv(sock, 4096)
                except ConnectionError as exc:
                    raise ScanError(f"clamd at {self.address}: {exc}") from None
                if not part:
                    break
                reply += part
        finally:
            sock.close()
        if not reply.endswith(b"\0"):
            raise ScanError(f"clamd at {self.address} gave no complete reply")
        return reply.rstrip(b"\0").decode("utf-8", "replace").strip()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._command(b"PING", None) == "PONG"
        except (ScanError, TimeoutError):
            return False

    async def scan(self, data: bytes) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._command(b"INSTREAM", data)
        except TimeoutError:
            raise ScanError(f"clamd at {self.address} did not answer in {self.timeout:.0f} s") from None
        return verdict(reply)


def verdict(reply: str) -> str | None:
    """clamd's answer to INSTREAM: ``stream: OK``, ``stream: <name> FOUND`` or ``... ERROR``."""
    if reply == "stream: OK":
        return None
    if reply.startswith("stream: ") and reply.endswith(" FOUND"):
        name = _NAME.sub("_", reply.removeprefix("stream: ").removesuffix(" FOUND").strip())
        return name[:200] or "unknown"
    if "size limit exceeded" in reply:
        raise ScanLimitExceeded(f"clamd: {reply}")
    raise ScanError(f"clamd: {reply[:200]}")


def scanner_for(config: Config) -> Scanner | None:
    """The configured scanner; ``None`` (scanning off) when ``[antivirus] clamd`` is unset."""
    if not config.antivirus.clamd:
        return None
    return ClamdScanner(parse_address(config.antivirus.clamd))


def unavailable(item: Item, exc: ScanError) -> Outcome:
    """The stage's answer when no verdict could be had: try the item again later; park it for
    the operator when retrying cannot help (a message over clamd's ``StreamMaxLength``, which
    should be at least ``[limits] max_message_size``) or clamd stays away too long."""
    if isinstance(exc, ScanLimitExceeded) or item.attempts + 1 >= MAX_ATTEMPTS:
        return Outcome(state="hold", error=str(exc), events=[LedgerEvent(
            event="held", sender=item.mail_from, recipients=item.rcpts,
            detail={"reason": f"virus scan: {exc}", "queue_id": item.id})])
    delay = backoff(item.attempts, RETRY_BASE, RETRY_MAX, random.random())
    return Outcome(state="deferred", delay=delay, error=str(exc), events=[LedgerEvent(
        event="deferred", sender=item.mail_from, recipients=item.rcpts,
        detail={"reason": f"virus scan: {exc}", "queue_id": item.id,
                "retry_in": round(delay, 1)})])


class Quarantine:
    """Infected messages, kept byte for byte (30 months by policy; see the module text)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_config(cls, config: Config) -> Quarantine:
        return cls(config.paths.data_dir / "quarantine")

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"unsafe quarantine key {key!r}")
        return self.root / f"{key}.eml"

    def store(self, key: str, data: bytes) -> Path:
        """Durably keep ``data`` under ``key``; blocking, idempotent for the same key."""
        final = self.path(key)
        if final.exists():
            return final
        durable.private_dir(self.root)
        durable.publish(self.root / f".{key}.tmp", data, final)
        return final
