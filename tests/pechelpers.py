"""Helpers for catalogue tests: judge every PEC message a test produced (openssl + strict
daticert + the RFC 6109 shape of its type), read the parts of a signed message, edit a
provider's configuration, and an SMTP sink that stands in for an ordinary mail server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from pecd.format import compose, daticert, headers
from pecd.format.daticert import CertData
from pecd.trust import smime

from .conftest import ProviderDir, client_tls, openssl_verifies

# X-Ricevuta / X-Trasporto value -> (daticert tipo, subject prefix); design §2
KINDS: dict[str, tuple[str | None, str]] = {
    "posta-certificata": ("posta-certificata", "POSTA CERTIFICATA: "),
    "errore": (None, "ANOMALIA MESSAGGIO: "),
    "accettazione": ("accettazione", "ACCETTAZIONE: "),
    "non-accettazione": ("non-accettazione", "AVVISO DI NON ACCETTAZIONE"),
    "presa-in-carico": ("presa-in-carico", "PRESA IN CARICO: "),
    "avvenuta-consegna": ("avvenuta-consegna", "CONSEGNA: "),
    "errore-consegna": ("errore-consegna", "AVVISO DI MANCATA CONSEGNA"),
    "preavviso-errore-consegna": ("preavviso-errore-consegna",
                                  "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: "),
    "rilevazione-virus": ("rilevazione-virus", "PROBLEMA DI SICUREZZA: "),
}


@dataclass(frozen=True)
class Part:
    content_type: str
    filename: str | None
    info: Message
    body: bytes  # as it travelled (transfer-encoded)

    @property
    def decoded(self) -> bytes:
        return compose.decode_body(self.info, self.body)


@dataclass(frozen=True)
class Pec:
    """One signed PEC message a test produced, already judged by :func:`judge`."""

    path: Path
    raw: bytes
    headers: Message
    kind: str  # the X-Ricevuta or X-Trasporto value
    parts: tuple[Part, ...]
    certdata: CertData | None  # None only for anomaly envelopes

    @property
    def subject(self) -> str:
        return headers.text(self.headers, "Subject") or ""

    def part(self, content_type: str) -> Part | None:
        found = [p for p in self.parts if p.content_type == content_type]
        return found[0] if found else None

    @property
    def original(self) -> bytes | None:
        part = self.part("message/rfc822")
        return part.body if part else None


def parts_of(entity: bytes) -> tuple[Part, ...]:
    out = []
    for raw in compose.split_multipart(entity):
        head, body = compose.split_entity(raw)
        info = headers.parse(head)
        out.append(Part(info.get_content_type(), info.get_filename(), info, body))
    return tuple(out)


def judge(path: Path, ca: Path) -> Pec:
    """openssl verifies the signature; the daticert.xml parses strictly; the message has the
    shape RFC 6109 gives its type (subject prefix, From, which parts, original or not)."""
    raw = path.read_bytes()
    assert openssl_verifies(path, ca), f"{path}: openssl cms -verify failed"
    msg = headers.parse(raw)
    kind = str(msg.get("X-Ricevuta") or msg.get("X-Trasporto") or "").strip()
    assert kind in KINDS, f"{path}: not a PEC system message (kind {kind!r})"
    tipo, prefix = KINDS[kind]
    assert (headers.text(msg, "Subject") or "").startswith(prefix), (path, msg["Subject"])
    assert headers.addresses(msg, "From")[0].startswith("posta-certificata@"), path
    parts = parts_of(smime.split_signed(raw).inner)
    assert parts[0].content_type == "text/plain", path
    xml = [p for p in parts if p.content_type == "application/xml"]
    originals = [p for p in parts if p.content_type == "message/rfc822"]
    if tipo is None:  # anomaly envelope: the text and what arrived, nothing else (§3.2.2)
        assert [p.content_type for p in parts] == ["text/plain", "message/rfc822"], path
        return Pec(path, raw, msg, kind, parts, None)
    assert len(xml) == 1 and xml[0].filename == "daticert.xml", path
    data = daticert.parse(xml[0].decoded)  # strict: the DTD of §4.4, nothing else
    assert data.type == tipo, (path, data.type, kind)
    with_original = tipo == "posta-certificata" or (
        tipo == "avvenuta-consegna" and data.receipt_kind in ("completa", "breve"))
    assert len(originals) == (1 if with_original else 0), (path, tipo, data.receipt_kind)
    if originals:
        assert originals[0].filename == "postacert.eml", path
    if tipo == "avvenuta-consegna":
        assert msg["X-TipoRicevuta"] == data.receipt_kind, path
    return Pec(path, raw, msg, kind, parts, data)


def mail_files(*providers: ProviderDir) -> list[Path]:
    files: list[Path] = []
    for p in providers:
        files += sorted((p.root / "data" / "mail").glob("*/*/new/*"))
    return files


def judge_all(*providers: ProviderDir, extra: tuple[Path, ...] = ()) -> list[Pec]:
    """Every file in every Maildir of ``providers`` (and ``extra`` files) must pass
    :func:`judge`; the CA is shared by all test providers."""
    ca = providers[0].ca
    return [judge(f, ca) for f in [*mail_files(*providers), *extra]]


def mailbox(provider: ProviderDir, address: str) -> list[Pec]:
    new = provider.maildir(address) / "new"
    return [judge(f, provider.ca) for f in sorted(new.iterdir())] if new.exists() else []


def count(provider: ProviderDir, address: str) -> int:
    new = provider.maildir(address) / "new"
    return len(list(new.iterdir())) if new.exists() else 0


def configure(provider: ProviderDir, section: str, **values: Any) -> None:
    """Set ``key = value`` lines in a section of the provider's pecd.toml (replacing a line
    that sets the same key, commented out or not)."""
    lines = provider.conf.read_text().splitlines()
    start = lines.index(f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in values.items():
        line = f"{key} = {json.dumps(value)}"
        pattern = re.compile(rf"^#?\s*{re.escape(key)}\s*=")
        hit = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
        if hit is None:
            lines.insert(start + 1, line)
            end += 1
        else:
            lines[hit] = line
    provider.conf.write_text("\n".join(lines) + "\n")


def ledger(provider: ProviderDir, event: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    try:
        rows = conn.execute("SELECT msgid, sender, recipients, related, detail FROM ledger"
                            " WHERE event=? ORDER BY seq", (event,)).fetchall()
    finally:
        conn.close()
    return [{"msgid": r[0], "sender": r[1], "recipients": json.loads(r[2]),
             "related": json.loads(r[3]), "detail": json.loads(r[4])} for r in rows]


def queued(provider: ProviderDir) -> int:
    """Items in the provider's queue, whatever their state."""
    return int(provider.query("SELECT count(*) FROM queue")[0][0])


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class SinkHandler:
    got: list[Received] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.got.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                 envelope.original_content or b""))
        return "250 2.0.0 Ok: kept"


async def smtp_sink() -> tuple[asyncio.Server, SinkHandler, int]:
    """An ordinary mail server on 127.0.0.1, port 0, that keeps what it receives."""
    handler = SinkHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="sink.test", loop=loop),
                                      "127.0.0.1", 0)
    return server, handler, int(server.sockets[0].getsockname()[1])


def send_inbound(provider: ProviderDir, port: int, mail_from: str, rcpts: list[str],
                 data: bytes, tls: bool) -> tuple[int, bytes]:
    """Another server delivering to the inbound listener (blocking: run it in an executor)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        if tls:
            s.starttls(context=client_tls(provider.ca))
            s.ehlo()
        code, msg = s.mail(mail_from)
        assert code == 250, msg
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code != 250:
                return code, msg
        return s.data(data)


def serve_under_faketime(provider: ProviderDir, offset: str, until: Callable[[], bool],
                         what: str) -> None:
    """``faketime -f <offset> pecd serve`` until ``until()`` holds (offset: "+13h", or
    "@2018-12-08 12:00:00" for an absolute start that then runs on).

    The faketime wrapper forks and does not pass SIGTERM on, so the pair runs in its own
    session and the signal goes to that process group; we wait until the group is empty."""
    faketime = shutil.which("faketime")
    assert faketime, "faketime is not installed (apt-get install faketime; scripts/setup does)"
    pecd = Path(sys.executable).with_name("pecd")
    env = dict(os.environ, FAKETIME_DONT_FAKE_MONOTONIC="1")
    proc = subprocess.Popen([faketime, "-f", offset, str(pecd), "-c", str(provider.conf), "serve"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while not until():
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, f"under faketime: no {what}"
            time.sleep(0.05)
    finally:
        _stop_group(proc)
        # the wrapper, stopped by a signal, leaves its shared memory named after its pid; a
        # later wrapper given the same pid would refuse to start ("sem_open: File exists")
        for leftover in (f"sem.faketime_sem_{proc.pid}", f"faketime_shm_{proc.pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(Path("/dev/shm") / leftover)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.05)
