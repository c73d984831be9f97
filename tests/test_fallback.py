"""The fallback channel when a certified message is not read by its deadline: a webhook received
by a real HTTP server on loopback (HMAC checked, a 500 retried from the queue), a command fed the
event on stdin (and one that fails), and a print-and-post PDF read back by an independent reader
(``pdftotext`` from poppler-utils). The 7 days pass on a ManualClock."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fpdf import FPDF

from pecd.clock import ManualClock
from pecd.config import ConfigError
from pecd.service import Service

from .conftest import ProviderDir, exchange_cards, make_provider, submit, wait_for
from .interop_support import configure, ledger_rows, require

SECRET = b"webhook-shared-secret"


class Hook:
    """A loopback HTTP server that answers the given statuses in turn and keeps what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.got: list[tuple[dict[str, str], bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = hook.statuses.pop(0) if hook.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook([500])  # the first call fails: the queue must retry
    try:
        yield h
    finally:
        h.close()


def _pdf(text: str) -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=14)
    pdf.cell(0, 10, text)
    return bytes(pdf.output())


def _original() -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@a.test"
    msg["To"] = "bob@b.test"
    msg["Subject"] = "Atto di citazione"
    msg["Message-ID"] = "<atto@client.a.test>"
    msg["X-Presa-Visione"] = "si"
    msg.set_content("Egregio signor Rossi,\nla convochiamo in udienza il 12 gennaio.\n")
    msg.add_attachment(_pdf("Allegato firmato numero 7"), maintype="application",
                       subtype="pdf", filename="atto.pdf")
    msg.add_attachment(b"%PDF-1.4 this is not really a PDF", maintype="application",
                       subtype="pdf", filename="rotto.pdf")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_fallback_runs_webhook_command_and_print_once(tmp_path: Path, hook: Hook) -> None:
    pdftotext = require("pdftotext", "poppler-utils")
    ca = tmp_path / "ca"
    a, b = make_provider(tmp_path, "a.test", ca), make_provider(tmp_path, "b.test", ca)
    for p in (a, b):
        configure(p, "consultation", enabled=True, deadline="7d")
    (b.root / "hook.secret").write_bytes(SECRET + b"\n")
    out = tmp_path / "command-out"
    out.mkdir()
    configure(b, "fallback", webhook=f"http://127.0.0.1:{hook.port}/pec",
              webhook_secret_file="hook.secret", print_dir="print-outbox",
              command=f"cat > {out}/event.json")
    configure(b, "relay", retry_base=0.5, retry_max=1.0)
    exchange_cards(a, b)
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")
    b.cli("user", "set", "bob@b.test", "--postal-address",
          "Mario Rossi\\nVia Roma 1\\n00100 Roma RM")
    clock = ManualClock()

    async def run() -> None:
        svc_a, svc_b = Service(a.config, clock=clock), Service(b.config, clock=clock)
        await svc_a.start()
        await svc_b.start()
        try:
            code, reply = await asyncio.get_running_loop().run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["bob@b.test"], _original(), svc_a.ports.submission)
            assert code == 250, reply
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            clock.advance(timedelta(days=7, seconds=1))
            await wait_for(lambda: len(ledger_rows(b, "fallback-failed")) == 1)  # the 500
            await wait_for(lambda: len(ledger_rows(b, "fallback")) == 2)  # command, print
            clock.advance(timedelta(seconds=5))  # the retry is due
            await wait_for(lambda: len(ledger_rows(b, "fallback")) == 3)
            clock.advance(timedelta(days=30))
            assert await svc_b.reading.run_once() == 0
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    rows = ledger_rows(b, "fallback")
    assert sorted(r["detail"]["channel"] for r in rows) == ["command", "print", "webhook"]  # type: ignore[index]

    # the webhook: two calls (500, then 200), the same signed body each time
    assert len(hook.got) == 2 and hook.got[0][1] == hook.got[1][1]
    headers, body = hook.got[1]
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-pecd-signature"], expected)
    event = json.loads(body)
    assert event["event"] == "ContentHandoverFailure" and event["recipient"] == "bob@b.test"
    assert event["postal_address"] == "Mario Rossi\nVia Roma 1\n00100 Roma RM"
    assert "mailbox" not in event and "file" not in event  # no server paths leave the provider
    assert json.loads((out / "event.json").read_bytes()) == event

    # the print job, read by an independent PDF reader
    (pdf,) = (b.root / "print-outbox").glob("*.pdf")
    assert pdf.name == f"{event['id']}.pdf"
    text = subprocess.run([pdftotext, "-layout", str(pdf), "-"], capture_output=True,
                          text=True, check=True).stdout
    for expected_text in ("Mario Rossi", "Via Roma 1", event["pec_id"], "alice@a.test",
                          "Atto di citazione", "la convochiamo in udienza",
                          "Allegato firmato numero 7", "rotto.pdf: not a readable PDF"):
        assert expected_text in text, expected_text
    (printed,) = [r for r in rows if r["detail"]["channel"] == "print"]  # type: ignore[index]
    assert printed["detail"]["left_out"] == [  # type: ignore[index]
        "attachment rotto.pdf: not a readable PDF, not printed"]
    assert len(ledger_rows(b, "not-read")) == 1
    status = b.cli("status", event["pec_id"])
    for channel in ("webhook", "command", "print"):
        assert f"fallback bob@b.test: {channel} run " in status
    assert "fallback bob@b.test: webhook failed " in status


def test_a_failing_command_and_a_missing_postal_address_are_ledger_rows(
        tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    a, b = make_provider(tmp_path, "a.test", ca), make_provider(tmp_path, "b.test", ca)
    for p in (a, b):
        configure(p, "consultation", enabled=True, deadline="1h")
    configure(b, "fallback", command="echo refused >&2; exit 3", print_dir="outbox")
    configure(b, "relay", max_attempts=2, retry_base=0.5, retry_max=1.0)
    exchange_cards(a, b)
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")
    clock = ManualClock()

    async def run() -> None:
        svc_a, svc_b = Service(a.config, clock=clock), Service(b.config, clock=clock)
        await svc_a.start()
        await svc_b.start()
        try:
            code, reply = await asyncio.get_running_loop().run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["bob@b.test"], _original(), svc_a.ports.submission)
            assert code == 250, reply
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            clock.advance(timedelta(hours=1))
            await wait_for(lambda: len(ledger_rows(b, "fallback-failed")) == 2)
            clock.advance(timedelta(seconds=5))
            await wait_for(lambda: len(ledger_rows(b, "fallback-failed")) == 4)
            await wait_for(lambda: len(a.messages("alice@a.test")) == 3)  # the not-read receipt
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    reasons = sorted(str(r["detail"]["reason"]) for r in ledger_rows(b, "fallback-failed"))  # type: ignore[index]
    assert sum("command exited with 3: refused" in r for r in reasons) == 2
    assert sum("no postal address for bob@b.test" in r for r in reasons) == 2
    held = [line for line in b.cli("queue", "list", "--state", "hold").splitlines()
            if "\tfallback\thold\t" in line]
    assert len(held) == 2  # parked after max_attempts, never dropped
    assert not list((b.root / "outbox").glob("*.pdf"))


def test_a_webhook_url_must_be_http_and_needs_a_secret(tmp_path: Path) -> None:
    p: ProviderDir = make_provider(tmp_path, "a.test", tmp_path / "ca")
    configure(p, "fallback", webhook="ftp://example.test/x", webhook_secret_file="s")
    with pytest.raises(ConfigError, match="http or https"):
        p.config  # noqa: B018
    configure(p, "fallback", webhook="https://example.test/x", webhook_secret_file="")
    with pytest.raises(ConfigError, match="needs webhook_secret_file"):
        p.config  # noqa: B018
