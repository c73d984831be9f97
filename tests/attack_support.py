"""Shared by the ``test_attack_*`` modules: providers running in a background event loop (so a
test can be a plain blocking SMTP client, as an attacker's script is), a raw SMTP client that
sends exactly the bytes it is given, and readers for the ledger, the queue and the mailboxes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from pecd.format import pec
from pecd.service import Service

from .conftest import ProviderDir, client_tls, exchange_cards, make_provider

ALICE, ALICE_PW = "alice@a.test", "alice-secret"
BOB, BOB_PW = "bob@b.test", "bob-secret"


def provider_pair(base: Path) -> tuple[ProviderDir, ProviderDir]:
    """``a.test`` (alice) and ``b.test`` (bob) sharing a CA, each in the other's index."""
    a = make_provider(base, "a.test", base / "ca")
    b = make_provider(base, "b.test", base / "ca")
    exchange_cards(a, b)
    add_user_fast(a, ALICE, ALICE_PW)
    add_user_fast(b, BOB, BOB_PW)
    return a, b


# The stored hash carries its argon2id parameters, so an account made with light ones costs
# milliseconds to check: tests can try many passwords. Unknown and locked accounts still cost
# the full dummy hash, as in production.
LIGHT = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def add_user_fast(p: ProviderDir, address: str, password: str) -> None:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        with conn:
            conn.execute("INSERT INTO users (address, password_hash, created) VALUES (?, ?, ?)",
                         (address, LIGHT.hash(password), "2026-01-01T00:00:00+00:00"))
    finally:
        conn.close()


def single_provider(base: Path, domain: str = "a.test") -> ProviderDir:
    p = make_provider(base, domain, base / "ca")
    local = {"a.test": (ALICE, ALICE_PW), "b.test": (BOB, BOB_PW)}.get(domain)
    if local:
        add_user_fast(p, *local)
    return p


def set_limits(provider: ProviderDir, **values: float) -> None:
    """Rewrite ``[limits]`` keys of the provider's pecd.toml (read by the next ``Service``)."""
    text = provider.conf.read_text()
    for key, value in values.items():
        line = f"{key} = {value!r}"
        text, n = re.subn(rf"(?m)^#?\s*{key}\s*=.*$", line, text)
        if n == 0:
            text = text.replace("[limits]\n", f"[limits]\n{line}\n", 1)
    provider.conf.write_text(text)


class Loop:
    """An event loop in a thread, for services the blocking test code talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def serving(*providers: ProviderDir, runners: bool = True) -> Iterator[list[Service]]:
    """Start one :class:`Service` per provider (listeners on, stage runners as asked)."""
    bg = Loop()
    services: list[Service] = []
    try:
        for p in providers:
            svc = bg.run(_make(p))
            services.append(svc)
            bg.run(svc.start(runners=runners))
        yield services
    finally:
        for svc in services:
            bg.run(svc.stop())
        bg.close()


async def _make(p: ProviderDir) -> Service:
    return Service(p.config)  # built inside the loop: its Database and queues bind to it


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll a condition (disk, database) until it holds; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s: {what}")
        time.sleep(0.02)


def ledger_rows(p: ProviderDir, event: str | None = None) -> list[dict[str, Any]]:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        conn.row_factory = sqlite3.Row
        sql, args = "SELECT * FROM ledger", tuple[str, ...]()
        if event is not None:
            sql, args = sql + " WHERE event=?", (event,)
        rows = [dict(r) for r in conn.execute(sql + " ORDER BY seq", args)]
    finally:
        conn.close()
    for r in rows:
        for key in ("recipients", "related", "detail"):
            r[key] = json.loads(r[key])
    return rows


def queue_states(p: ProviderDir) -> list[str]:
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        return [r[0] for r in conn.execute("SELECT state FROM queue")]
    finally:
        conn.close()


def kind_of(msg: bytes) -> str:
    """``X-Ricevuta`` or ``X-Trasporto`` of a message pecd stored."""
    parsed = pec.parse(msg)
    return str(parsed.headers.get("X-Ricevuta") or parsed.headers.get("X-Trasporto") or "")


class Raw:
    """A blocking SMTP client that sends exactly the bytes it is given and reads whole replies."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, ca: Path) -> None:
        code, text = self.cmd("STARTTLS")
        assert code == 220, text
        self.sock = client_tls(ca).wrap_socket(self.sock, server_hostname="localhost")

    def wait_closed(self, timeout: float) -> bytes:
        """Everything the server still sends until it closes; fails if it does not in time."""
        self.sock.settimeout(timeout)
        data, self.buf = self.buf, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except TimeoutError:
            raise AssertionError(f"server did not close within {timeout} s; got {data!r}") from None
        except (ConnectionResetError, ssl.SSLError):
            pass
        return data


def login(raw: Raw, ca: Path, user: str, password: str) -> tuple[int, str]:
    """EHLO, STARTTLS, EHLO, AUTH PLAIN on a :class:`Raw` session; the AUTH reply."""
    import base64

    raw.reply()  # greeting
    raw.cmd("EHLO attacker.test")
    raw.starttls(ca)
    raw.cmd("EHLO attacker.test")
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return raw.cmd(f"AUTH PLAIN {blob}")
