"""The recipient's side of the HTTP API: bob lists his certified messages and downloads one with a
real HTTP client; that first download is a read, evidenced to alice's provider exactly as an
IMAP read is (the same signed, timestamped ``presa-visione`` receipt, ``modalita`` ``http``),
once: a second download and a later IMAP read through a real Dovecot send nothing. And the
not-read period per user: ``pecd user set --read-deadline`` against ``[consultation] deadline``.

Reuses test_reading's providers (A and B issue reading evidence) and its module-scoped Dovecot.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

from pecd.clock import ManualClock
from pecd.format import pec
from pecd.points import consultation
from pecd.service import Service

from . import test_reading as reading_tests
from .conftest import ProviderDir, submit, wait_for
from .http_support import api, token_for
from .interop_support import ledger_rows
from .test_reading import Dovecot, evidence, message, reading_rows

providers = reading_tests.providers  # A and B declare reading evidence, C does not
dovecot = reading_tests.dovecot  # one Dovecot per module, serving pecd's own Maildirs


def _send(a: ProviderDir, port: int, subject: str, to: str = "bob@b.test",
          ask: str | None = "si") -> None:
    rcpts = to.split(",")
    data = message(subject, to, ask)
    code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", rcpts, data, port)
    assert code == 250, reply


def _part(eml: bytes, filename: str) -> bytes:
    import email
    from email import policy

    for part in email.message_from_bytes(eml, policy=policy.compat32).walk():
        if part.get_filename() == filename:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload
    raise AssertionError(f"no {filename} part")


def _stored_file(box: Path, subject: str) -> bytes:
    """The envelope as it lies in bob's Maildir (new/ or cur/)."""
    for path in [*(box / "new").iterdir(), *(box / "cur").iterdir()]:
        data = path.read_bytes()
        if f"Subject: POSTA CERTIFICATA: {subject}".encode() in data:
            return data
    raise AssertionError(f"{subject!r} is not in {box}")


def test_http_download_is_a_read_evidenced_once_and_imap_after_it_sends_nothing(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir], dovecot: Dovecot,
        tmp_path: Path) -> None:
    a, b, _c = providers
    box = b.maildir("bob@b.test")
    dovecot.serve("bob@b.test", box)
    token = token_for(b, "bob@b.test")

    async def scenario() -> tuple[str, str]:
        async with api(b, a) as client:
            svc_a = client.services[1]
            loop = asyncio.get_running_loop()
            for subject, ask in (("Verbale uno", "si"), ("Verbale due", "si"),
                                 ("Senza richiesta", None)):
                await loop.run_in_executor(None, _send, a, svc_a.ports.submission, subject,
                                           "bob@b.test", ask)
            await wait_for(lambda: len(a.messages("alice@a.test")) == 6)  # 3 accepted, 3 delivered

            status, listing, _ = await client.call("GET", "/api/v1/mailbox", token=token)
            assert status == 200, listing
            by_subject = {m["subject"]: m for m in listing["messages"]}
            assert set(by_subject) == {"Verbale uno", "Verbale due", "Senza richiesta"}
            first = by_subject["Verbale uno"]
            assert first["sender"] == "alice@a.test" and first["delivered"]
            assert first["read"] is None and first["read_via"] is None
            uno, due = first["id"], by_subject["Verbale due"]["id"]
            assert uno.endswith("@a.test")

            # a page of one, and its next link, walk the same three messages
            status, page, _ = await client.call("GET", "/api/v1/mailbox?limit=1", token=token)
            assert status == 200 and len(page["messages"]) == 1 and page["next"], page
            status, page2, _ = await client.call("GET", page["next"], token=token)
            assert status == 200 and page2["messages"][0]["id"] != page["messages"][0]["id"]

            # the first download: the envelope's bytes as delivered, and a read committed
            # before they were sent (the row is read once the answer is in)
            status, body, hdrs = await client.call(
                "GET", f"/api/v1/mailbox/{uno}", basic=("bob@b.test", "bob-secret"))
            assert status == 200, body
            assert hdrs["Content-Type"].startswith("message/rfc822")
            assert body.encode() == _stored_file(box, "Verbale uno")
            envelope = pec.parse(body.encode())
            assert envelope.certdata is not None and envelope.certdata.identifier == uno
            row = next(r for r in reading_rows(b) if r["pec_id"] == uno)
            assert row["read"] is not None and row["read_via"] == "http"
            await wait_for(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 1)

            status, listing, _ = await client.call("GET", "/api/v1/mailbox", token=token)
            read_now = {m["id"]: m for m in listing["messages"]}[uno]
            assert read_now["read"] and read_now["read_via"] == "http"

            # a second download: the same bytes, no second evidence
            status, again, _ = await client.call("GET", f"/api/v1/mailbox/{uno}", token=token)
            assert status == 200 and again == body
            # a message whose sender did not ask: served, evidences nothing
            plain = by_subject["Senza richiesta"]["id"]
            status, _body, _ = await client.call("GET", f"/api/v1/mailbox/{plain}", token=token)
            assert status == 200

            # bob now opens both in his mail client over IMAP: the first was read already (over
            # HTTP), so only the second one's evidence goes out; its arrival shows the watcher
            # saw the first one's flag too, and ignored it
            await loop.run_in_executor(None, dovecot.open_message, "bob@b.test", box,
                                       "Verbale uno")
            await loop.run_in_executor(None, dovecot.open_message, "bob@b.test", box,
                                       "Verbale due")
            await wait_for(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 2)
            await client.services[0].reading.run_once()
            return uno, due

    uno, due = asyncio.run(scenario())
    receipts = evidence(a, "alice@a.test", "presa-visione")
    assert len(receipts) == 2
    vias = {}
    for receipt in receipts:
        ev = consultation.parse(_part(receipt, consultation.EVIDENCE_FILE))
        assert ev.event == "ContentHandover" and ev.recipient == "bob@b.test"
        vias[ev.identifier] = ev.via
    assert vias == {uno: "http", due: "imap"}
    http_receipt = next(m for m in receipts if b"Verbale uno" in m)
    parsed = pec.parse(http_receipt)
    assert parsed.headers["X-Ricevuta"] == "presa-visione"
    assert parsed.headers["Subject"] == "PRESA VISIONE: Verbale uno"
    reading_tests._judge(http_receipt, b, tmp_path / "presa-visione-http.eml")  # openssl cms, ts
    reads = ledger_rows(b, "read")
    assert sorted((r["msgid"], r["detail"]["via"]) for r in reads) == \
        sorted([(uno, "http"), (due, "imap")])  # type: ignore[index]
    assert len(reading_rows(b)) == 2  # the message without a request never had a row


def test_per_user_read_deadline_one_day_against_the_provider_seven(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, _c = providers
    b.add_user("dan@b.test", "dan-secret")
    assert "read deadline 86400 seconds" in b.cli("user", "set", "bob@b.test",
                                                   "--read-deadline", "1d")
    assert "read deadline 7200 seconds" in b.cli("user", "set", "dan@b.test",
                                                  "--read-deadline", "2h")
    assert "provider default" in b.cli("user", "set", "dan@b.test", "--read-deadline", "default")
    assert "--read-deadline" in b.cli("user", "set", "dan@b.test", "--read-deadline", "3w",
                                      ok=False)
    assert "no such user" in b.cli("user", "set", "ghost@b.test", "--read-deadline", "1d",
                                   ok=False)
    conn = sqlite3.connect(b.root / "data" / "pecd.sqlite")
    try:
        assert dict(conn.execute("SELECT address, read_deadline FROM users").fetchall()) == \
            {"bob@b.test": 86400.0, "dan@b.test": None}
    finally:
        conn.close()
    clock = ManualClock()

    def not_read() -> dict[str, consultation.Evidence]:
        out = {}
        for m in evidence(a, "alice@a.test", "mancata-presa-visione"):
            ev = consultation.parse(_part(m, consultation.EVIDENCE_FILE))
            out[ev.recipient] = ev
        return out

    async def run() -> None:
        svc_a, svc_b = Service(a.config, clock=clock), Service(b.config, clock=clock)
        await svc_a.start()
        await svc_b.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _send, a, svc_a.ports.submission, "Termine",
                                       "bob@b.test,dan@b.test")
            await wait_for(lambda: len(reading_rows(b)) == 2)
            clock.advance(timedelta(days=1, seconds=-1))
            assert await svc_b.reading.run_once() == 0  # not a second early
            clock.advance(timedelta(seconds=1))
            await wait_for(lambda: set(not_read()) == {"bob@b.test"})
            clock.advance(timedelta(days=6, seconds=-1))
            assert await svc_b.reading.run_once() == 0  # dan keeps the provider's 7 days
            assert set(not_read()) == {"bob@b.test"}
            clock.advance(timedelta(seconds=1))
            await wait_for(lambda: set(not_read()) == {"bob@b.test", "dan@b.test"})
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    found = not_read()
    for who, days in (("bob@b.test", 1), ("dan@b.test", 7)):
        ev = found[who]
        assert ev.deadline is not None and ev.delivered is not None
        assert ev.deadline - ev.delivered == timedelta(days=days)
    assert sorted(r["detail"]["deadline_seconds"] for r in ledger_rows(b, "not-read")) == \
        [86400, 7 * 86400]  # type: ignore[index]
