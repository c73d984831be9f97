"""Reading evidence (presa visione / mancata presa visione), end to end: a real Dovecot serves
provider B's own Maildirs over IMAP, a Python ``imaplib`` client opens the envelope, and the
sender at provider A receives a signed, timestamped ``presa-visione`` receipt that openssl
accepts. The 7-day deadline runs on a ManualClock; restarts and races never evidence twice.

Dovecot runs once per module. pecd and Dovecot must run as one system user (pecd's files are
0600); these tests run as root and Dovecot refuses uid 0, so before each IMAP session the test
hands bob's Maildir to ``nobody``, the uid this Dovecot stores mail as, and lets it traverse
pecd's owner-only data directory (the watcher, as root, still sees every rename).
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from pecd.clock import ManualClock
from pecd.config import ConfigError, parse_duration
from pecd.format import pec
from pecd.points import consultation
from pecd.points.reading import ReadingWorker, seen_flag
from pecd.service import Service

from .conftest import (
    ProviderDir,
    exchange_cards,
    free_port,
    make_provider,
    openssl_timestamp_verifies,
    openssl_verifies,
    submit,
    wait_for,
)
from .interop_support import (
    RunningService,
    configure,
    dovecot_conf,
    dovecot_user,
    ledger_rows,
    require,
    runtime_dir,
    stop_process,
    wait_port,
    wait_until,
)

PASSWORD = "imap-secret"


@dataclass
class Dovecot:
    imap_port: int
    users: Path
    log: Path
    uid: int
    gid: int

    def serve(self, address: str, maildir: Path) -> None:
        """Let ``address`` log in and read ``maildir`` (pecd's own Maildir for that user)."""
        maildir.mkdir(parents=True, exist_ok=True)
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
        self.hand_over(maildir)
        tmp = self.users.with_suffix(".new")
        tmp.write_text(f"{address}:{{PLAIN}}{PASSWORD}:{self.uid}:{self.gid}::{maildir}::\n")
        tmp.rename(self.users)

    def hand_over(self, maildir: Path) -> None:
        """As root: the Maildir to Dovecot's uid, and its owner-only parent directories
        (pecd's data directory) traversable, as they are for one shared system user."""
        if os.geteuid() != 0:
            return
        for path in [maildir, *maildir.rglob("*")]:
            os.chown(path, self.uid, self.gid)
        for parent in maildir.parents:
            if parent == Path("/") or parent.name.startswith("pecd-reading-"):
                break
            parent.chmod(parent.stat().st_mode | 0o111)

    def imap(self, user: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        conn.login(user, PASSWORD)
        return conn

    def open_message(self, user: str, maildir: Path, subject: str) -> bytes:
        """What a mail client does: select INBOX, find the message, FETCH BODY[] (sets \\Seen)."""
        self.hand_over(maildir)
        conn = self.imap(user)
        try:
            typ, data = conn.select("INBOX")
            assert typ == "OK", data
            typ, data = conn.search(None, "SUBJECT", f'"{subject}"')
            assert typ == "OK", data
            (num,) = data[0].split()
            typ, parts = conn.fetch(num, "(BODY[])")
            assert typ == "OK", parts
            return next(p[1] for p in parts if isinstance(p, tuple))
        finally:
            conn.logout()


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    exe = require("dovecot", "dovecot-core dovecot-imapd", sbin=True)
    who = dovecot_user()
    uid, gid = who.uid, who.gid
    with runtime_dir("pecd-reading-dovecot-") as root:
        port = free_port()
        users = root / "users"
        users.write_text("")
        conf = root / "dovecot.conf"
        # serves pecd's own Maildirs: each user's home is its Maildir (mail_location = ~)
        conf.write_text(dovecot_conf(root, who, users, port, purpose="tests/test_reading.py",
                                     mail_location="maildir:~"))
        proc = subprocess.Popen([exe, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=open(root / "stderr.log", "wb"))  # noqa: SIM115
        try:
            wait_port(port, proc, root / "stderr.log")
            yield Dovecot(port, users, root / "dovecot.log", uid, gid)
        finally:
            stop_process(proc)


@pytest.fixture
def providers() -> Iterator[tuple[ProviderDir, ProviderDir, ProviderDir]]:
    """A and B issue reading evidence (their cards say so); C is a plain PEC provider. Below a
    directory Dovecot's unprivileged processes can traverse."""
    with runtime_dir("pecd-reading-") as base:
        ca_dir = base / "ca"
        a = make_provider(base, "a.test", ca_dir)
        b = make_provider(base, "b.test", ca_dir)
        c = make_provider(base, "c.test", ca_dir)
        for p in (a, b):
            configure(p, "consultation", enabled=True, deadline="7d")
        exchange_cards(a, b, c)
        a.add_user("alice@a.test", "alice-secret")
        b.add_user("bob@b.test", "bob-secret")
        c.add_user("carol@c.test", "carol-secret")
        yield a, b, c


def message(subject: str, to: str = "bob@b.test", ask: str | None = "si") -> bytes:
    ask_line = f"X-Presa-Visione: {ask}\r\n" if ask else ""
    return (f"From: alice@a.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.a.test>\r\n{ask_line}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Il documento e' allegato.\r\n").encode()


def evidence(provider: ProviderDir, address: str, kind: str) -> list[bytes]:
    return [m for m in provider.messages(address)
            if pec.classify(m) == "receipt" and pec.parse(m).ricevuta == kind]


def reading_rows(provider: ProviderDir) -> list[dict[str, object]]:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM reading ORDER BY rowid")]
    finally:
        conn.close()


def pec_id_of(provider: ProviderDir, subject: str) -> str:
    rows = [r for r in ledger_rows(provider, "accepted") if r["subject"] == subject]
    assert len(rows) == 1, rows
    return str(rows[0]["msgid"])


def _send(a: ProviderDir, port: int, subject: str, to: str = "bob@b.test",
          ask: str | None = "si") -> None:
    code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", [to],
                         message(subject, to, ask), port)
    assert code == 250, reply


def _judge(eml: bytes, provider: ProviderDir, path: Path) -> None:
    """The outside judge: openssl verifies the signature and the RFC 3161 token."""
    path.write_bytes(eml)
    assert openssl_verifies(path, provider.ca)
    assert openssl_timestamp_verifies(path, provider.ca, provider.tsa_cert)
    tampered = path.with_name("tampered-" + path.name)
    altered = eml.replace(b'filename="evidenza.xml"', b'filename="evidenzb.xml"', 1)
    assert altered != eml
    tampered.write_bytes(altered)
    assert not openssl_verifies(tampered, provider.ca)


# --- pure parts -------------------------------------------------------------------------------

def test_maildir_flag_names() -> None:
    assert seen_flag("1764600000.7-0.host:2,S") == ("1764600000.7-0.host", True)
    assert seen_flag("1764600000.7-0.host:2,FRS") == ("1764600000.7-0.host", True)
    assert seen_flag("1764600000.7-0.host:2,") == ("1764600000.7-0.host", False)
    assert seen_flag("1764600000.7-0.host:2,T") == ("1764600000.7-0.host", False)
    assert seen_flag("1764600000.7-0.host") is None  # still in new/ shape: nobody looked yet


def test_deadline_units() -> None:
    assert parse_duration("7d", "x") == 7 * 86400
    assert parse_duration("36h", "x") == 36 * 3600
    assert parse_duration("90m", "x") == 5400
    assert parse_duration("45s", "x") == 45
    assert parse_duration(600, "x") == 600
    for bad in ("7w", "", "-1d", "0d", True):
        with pytest.raises(ConfigError):
            parse_duration(bad, "[consultation] deadline")


def test_header_words() -> None:
    assert consultation.requested("si") is True
    assert consultation.requested(" Sì ") is True
    assert consultation.requested("no") is False
    assert consultation.requested(None) is None
    assert consultation.requested("forse") is None


# --- end to end over IMAP ---------------------------------------------------------------------

def test_presa_visione_over_imap_reaches_the_sender_verified(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir], dovecot: Dovecot,
        tmp_path: Path) -> None:
    a, b, _c = providers
    box = b.maildir("bob@b.test")
    dovecot.serve("bob@b.test", box)
    with RunningService(a.config) as svc_a, RunningService(b.config) as svc_b:
        assert svc_b.service is not None
        worker = svc_b.service.reading
        _send(a, svc_a.submission_port, "Verbale uno")
        _send(a, svc_a.submission_port, "Verbale due")
        wait_until(lambda: len(a.messages("alice@a.test")) == 4, what="acceptance and delivery")
        assert [r["read"] for r in reading_rows(b)] == [None, None]
        wait_until(lambda: worker.watched() == (str(box),), what="bob's cur/ watched")
        assert evidence(a, "alice@a.test", "presa-visione") == []

        fetched = dovecot.open_message("bob@b.test", box, "Verbale uno")
        assert pec.parse(fetched).headers["X-Presa-Visione"] == "si"
        wait_until(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 1,
                   what="presa-visione at the sender", log=dovecot.log)

        # bob marks it unread and reads it again; then opens the second message: the second
        # message's evidence arriving shows the first one's new flag was seen and ignored
        dovecot.hand_over(box)
        conn = dovecot.imap("bob@b.test")
        conn.select("INBOX")
        conn.store("1:*", "-FLAGS", "(\\Seen)")
        conn.store("1:*", "+FLAGS", "(\\Seen)")
        conn.store("1:*", "-FLAGS", "(\\Seen)")
        conn.logout()
        dovecot.open_message("bob@b.test", box, "Verbale uno")
        dovecot.open_message("bob@b.test", box, "Verbale due")
        wait_until(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 2,
                   what="the second presa-visione")
        wait_until(lambda: worker.watched() == (), what="the watch given back")

    receipts = evidence(a, "alice@a.test", "presa-visione")
    ids = sorted(pec.parse(m).certdata.identifier for m in receipts)  # type: ignore[union-attr]
    assert ids == sorted([pec_id_of(a, "Verbale uno"), pec_id_of(a, "Verbale due")])
    first = next(m for m in receipts if b"Verbale uno" in m)
    parsed = pec.parse(first)
    assert parsed.headers["Subject"] == "PRESA VISIONE: Verbale uno"
    assert parsed.headers["X-Ricevuta"] == "presa-visione"
    cd = parsed.certdata
    assert cd is not None and cd.type == "presa-visione" and cd.delivered_to == "bob@b.test"
    assert cd.issuer == "Provider b.test"
    xml = _part(first, consultation.EVIDENCE_FILE)
    ev = consultation.parse(xml)
    assert (ev.event, ev.identifier, ev.recipient, ev.via) == \
        ("ContentHandover", cd.identifier, "bob@b.test", "imap")
    _judge(first, b, tmp_path / "presa-visione.eml")

    # the ledgers: one read row at B per message; A recorded the receipts and the read times
    reads = ledger_rows(b, "read")
    assert len(reads) == 2 and {r["detail"]["via"] for r in reads} == {"imap"}  # type: ignore[index]
    status = a.cli("status", cd.identifier)
    assert "recipient bob@b.test:" in status and "; read " in status
    assert "reading bob@b.test: delivered" in b.cli("status", cd.identifier)
    assert "read " in b.cli("status", cd.identifier)


def _part(eml: bytes, filename: str) -> bytes:
    import email
    from email import policy

    msg = email.message_from_bytes(eml, policy=policy.compat32)
    for part in msg.walk():
        if part.get_filename() == filename:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload
    raise AssertionError(f"no {filename} part")


# --- the deadline, on the test clock ----------------------------------------------------------

def test_mancata_presa_visione_after_seven_days_then_a_late_read(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir], dovecot: Dovecot,
        tmp_path: Path) -> None:
    a, b, _c = providers
    box = b.maildir("bob@b.test")
    dovecot.serve("bob@b.test", box)
    clock = ManualClock()

    async def run() -> None:
        svc_a, svc_b = Service(a.config, clock=clock), Service(b.config, clock=clock)
        await svc_a.start()
        await svc_b.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _send, a, svc_a.ports.submission, "Diffida")
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            await wait_for(lambda: len(reading_rows(b)) == 1)
            clock.advance(timedelta(days=7, seconds=-1))
            assert await svc_b.reading.run_once() == 0  # not a second early
            clock.advance(timedelta(seconds=1))
            await wait_for(lambda: len(evidence(a, "alice@a.test", "mancata-presa-visione")) == 1)
            clock.advance(timedelta(days=30))
            assert await svc_b.reading.run_once() == 0  # never twice
            # bob opens it at last: the read is still evidenced
            await loop.run_in_executor(None, dovecot.open_message, "bob@b.test", box, "Diffida")
            await wait_for(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 1)
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    (late,) = evidence(a, "alice@a.test", "mancata-presa-visione")
    parsed = pec.parse(late)
    assert parsed.headers["Subject"] == "MANCATA PRESA VISIONE: Diffida"
    assert parsed.certdata is not None and parsed.certdata.type == "mancata-presa-visione"
    ev = consultation.parse(_part(late, consultation.EVIDENCE_FILE))
    assert ev.event == "ContentHandoverFailure" and ev.recipient == "bob@b.test"
    assert ev.deadline is not None and ev.delivered is not None
    assert ev.deadline - ev.delivered == timedelta(days=7)
    _judge(late, b, tmp_path / "mancata.eml")
    (row,) = reading_rows(b)
    assert row["not_read"] is not None and row["read"] is not None
    assert [r["event"] for r in ledger_rows(b) if r["event"] in ("read", "not-read")] == \
        ["not-read", "read"]
    status = a.cli("status", str(row["pec_id"]))
    assert "; read " in status and "; not read " in status


# --- exactly once -----------------------------------------------------------------------------

def test_a_read_while_pecd_is_down_is_evidenced_once_after_restarts(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir], dovecot: Dovecot) -> None:
    a, b, _c = providers
    box = b.maildir("bob@b.test")
    dovecot.serve("bob@b.test", box)
    with RunningService(a.config) as svc_a:
        with RunningService(b.config):
            _send(a, svc_a.submission_port, "Mentre dorme")
            wait_until(lambda: len(a.messages("alice@a.test")) == 2, what="delivery")
        dovecot.open_message("bob@b.test", box, "Mentre dorme")  # B is down
        assert any(seen_flag(p.name) == (str(reading_rows(b)[0]["file"]), True)
                   for p in (box / "cur").iterdir())

        async def restart() -> int:
            svc = Service(b.config)
            await svc.start(listeners=False, runners=False)
            try:
                found = await svc.reading.run_once()
                await svc.runners["relay"].run_once()
                return found
            finally:
                await svc.stop()

        assert asyncio.run(restart()) == 1
        wait_until(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 1,
                   what="evidence after the restart")
        assert asyncio.run(restart()) == 0  # and again: nothing more
        assert asyncio.run(restart()) == 0
    assert len(ledger_rows(b, "read")) == 1


def test_two_workers_racing_on_one_read_commit_once(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    """Two passes (or a pass and an inotify event) deciding on the same read at once: the row's
    update inside the commit lets exactly one through."""
    a, b, _c = providers

    async def run() -> tuple[int, int]:
        svc_a, svc_b = Service(a.config), Service(b.config)
        await svc_a.start()
        await svc_b.start(runners=False)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _send, a, svc_a.ports.submission, "Gara")
            await wait_for(lambda: _queued_inbound(b))
            for kind in ("inbound", "deliver"):
                await svc_b.runners[kind].run_once()
            (row,) = reading_rows(b)
            new = Path(str(row["mailbox"])) / "new" / str(row["file"])
            new.rename(Path(str(row["mailbox"])) / "cur" / f"{row['file']}:2,S")
            other = ReadingWorker(svc_b.config, svc_b.issuer, svc_b.queue, svc_b.router,
                                  svc_b.clock, svc_b.cpu)
            try:
                results = await asyncio.gather(svc_b.reading.run_once(), other.run_once())
            finally:
                other.close()
                svc_b.reading.close()
            return results[0], results[1]
        finally:
            await svc_a.stop()
            await svc_b.stop()

    assert sorted(asyncio.run(run())) == [0, 1]
    assert len(ledger_rows(b, "read")) == 1


def _queued_inbound(provider: ProviderDir) -> bool:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    try:
        return bool(conn.execute("SELECT count(*) FROM queue WHERE kind='inbound'"
                                 " AND state='incoming'").fetchone()[0])
    finally:
        conn.close()


# --- who asks, who issues ---------------------------------------------------------------------

def test_evidence_only_when_asked_and_never_towards_a_provider_without_it(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, c = providers
    assert '"read_evidence": true' in a.cli("index", "export")
    assert "read_evidence" not in c.cli("index", "export")
    with RunningService(a.config) as svc_a, RunningService(b.config), \
            RunningService(c.config) as svc_c:
        _send(a, svc_a.submission_port, "Senza richiesta", ask=None)  # default: false
        _send(a, svc_a.submission_port, "Rifiutata", ask="no")
        a.cli("user", "set", "alice@a.test", "--read-evidence")
        _send(a, svc_a.submission_port, "Per abitudine", ask=None)  # the user's default
        # C is a plain PEC provider: its user asks, B's card says yes, but C's card does not
        code, reply = submit(c, "carol@c.test", "carol-secret", "carol@c.test", ["bob@b.test"],
                             message("Da C", "bob@b.test").replace(b"alice@a.test",
                                                                  b"carol@c.test"),
                             svc_c.submission_port)
        assert code == 250, reply
        wait_until(lambda: len(b.messages("bob@b.test")) == 4, what="four deliveries")
        wait_until(lambda: len(c.messages("carol@c.test")) == 2, what="C's receipts")
    rows = reading_rows(b)
    assert [r["subject"] for r in rows] == ["Per abitudine"]
    a.cli("user", "set", "alice@a.test", "--no-read-evidence")
    assert "no such user" in a.cli("user", "set", "ghost@a.test", "--read-evidence", ok=False)


# --- bad input --------------------------------------------------------------------------------

def test_a_read_flag_on_a_message_pecd_did_not_deliver_is_ignored(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir], dovecot: Dovecot) -> None:
    a, b, _c = providers
    box = b.maildir("bob@b.test")
    dovecot.serve("bob@b.test", box)
    with RunningService(a.config) as svc_a, RunningService(b.config):
        _send(a, svc_a.submission_port, "Vero")
        wait_until(lambda: len(a.messages("alice@a.test")) == 2, what="delivery")
        # a message bob put there himself (IMAP APPEND), already \Seen: no row, no evidence
        dovecot.hand_over(box)
        conn = dovecot.imap("bob@b.test")
        typ, data = conn.append("INBOX", "(\\Seen)", None,
                                b"From: bob@b.test\r\nSubject: Mio\r\n\r\nappunti\r\n")
        assert typ == "OK", data
        conn.logout()
        dovecot.open_message("bob@b.test", box, "Vero")
        wait_until(lambda: len(evidence(a, "alice@a.test", "presa-visione")) == 1,
                   what="the real message's evidence")
    assert len(ledger_rows(b, "read")) == 1


def test_a_deleted_mailbox_is_a_ledger_row_and_the_deadline_still_holds(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, _c = providers
    clock = ManualClock()

    async def run() -> None:
        svc_a, svc_b = Service(a.config, clock=clock), Service(b.config, clock=clock)
        await svc_a.start()
        await svc_b.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _send, a, svc_a.ports.submission, "Sparito")
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            await wait_for(lambda: len(reading_rows(b)) == 1)
            await svc_b.reading.run_once()  # watched now
            shutil.rmtree(b.maildir("bob@b.test"))
            await wait_for(lambda: len(ledger_rows(b, "reading-unwatchable")) == 1)
            clock.advance(timedelta(days=8))
            await wait_for(lambda: len(evidence(a, "alice@a.test", "mancata-presa-visione"))
                           == 1)
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    (row,) = ledger_rows(b, "reading-unwatchable")
    assert "removed or renamed" in str(row["detail"])

    async def again() -> int:  # a restart with the mailbox still gone: one more clear row
        svc = Service(b.config, clock=clock)
        await svc.start(listeners=False, runners=False)
        try:
            return await svc.reading.run_once()
        finally:
            await svc.stop()

    assert asyncio.run(again()) == 0
