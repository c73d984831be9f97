"""Timeouts (RFC 6109 §3.1.6) and viruses (§3.1.3, §3.2.3, §3.2.4), end to end.

Viruses are judged by a real clamd from Debian, started here on a unix socket with a one-line
signature database (the MD5 of the EICAR test file): no signature download is possible offline.
Timeouts run on a ManualClock in process, and once more through the real clock path: ``pecd
serve`` under ``faketime`` 13 h and 25 h ahead. Every message produced is checked by ``openssl
cms -verify`` and by a strict parse of its daticert.xml.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from pecd import config as config_mod
from pecd.clock import ManualClock
from pecd.config import ConfigError
from pecd.format import daticert, pec
from pecd.points import timeouts, virus
from pecd.points.reception import _track
from pecd.points.timeouts import Policy, Tracked, decide
from pecd.service import Service

from .conftest import ProviderDir, free_port, openssl_verifies, submit, wait_for
from .pechelpers import queued, serve_under_faketime

# The EICAR test file, assembled at run time so this source file is not itself "infected".
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Pecd.Test.EICAR"
H = 3600.0


def message(subject: str, attachment: bytes | None = None) -> bytes:
    head = (
        "From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '-')}@client.a.test>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
    ).encode()
    if attachment is None:
        return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\nCiao Bob.\r\n"
    att = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return head + (
        b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nIn allegato.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream; name=\"fattura.com\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"fattura.com\"\r\n\r\n"
        + att + b"--b1--\r\n"
    )


# --- clamd --------------------------------------------------------------------------------------

def _clamd_binary() -> str | None:
    return shutil.which("clamd") or next(
        (p for p in ("/usr/sbin/clamd", "/usr/bin/clamd") if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def clamd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real clamd on a unix socket and a loopback TCP port; both addresses as ``[antivirus]
    clamd`` takes them."""
    binary = _clamd_binary()
    if binary is None:
        pytest.skip("!!! clamd IS NOT INSTALLED: the virus tests DID NOT RUN. Install the Debian "
                    "package clamav-daemon (scripts/setup does) and run them again. !!!")
    root = tmp_path_factory.mktemp("clamd")
    db = root / "db"
    db.mkdir()
    (db / "pecd-test.hdb").write_text(
        f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{SIGNATURE}\n")
    sock = root / "clamd.sock"
    conf = root / "clamd.conf"
    port = free_port()
    conf.write_text(
        f"LocalSocket {sock}\nLocalSocketMode 600\nTCPAddr 127.0.0.1\nTCPSocket {port}\n"
        f"DatabaseDirectory {db}\n"
        f"TemporaryDirectory {root}\nLogFile {root / 'clamd.log'}\nForeground yes\n"
        "Bytecode no\nStreamMaxLength 2M\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        scanner = virus.ClamdScanner(f"unix:{sock}", timeout=5)
        deadline = time.monotonic() + 60
        while not asyncio.run(scanner.ping()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (root / "clamd.log").read_text() if (root / "clamd.log").exists() else ""
                pytest.fail(f"clamd did not start (exit {proc.poll()}): {log[-2000:]}")
            time.sleep(0.1)
        yield f"unix:{sock}", f"tcp:127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def clamd(clamd_daemon: tuple[str, str]) -> str:
    return clamd_daemon[0]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_clamd_scanner_speaks_instream(clamd_daemon: tuple[str, str], transport: str,
                                       tmp_path: Path) -> None:
    address = clamd_daemon[0] if transport == "unix" else clamd_daemon[1]
    scanner = virus.ClamdScanner(address, chunk_size=1000)  # many chunks, even for EICAR+MIME

    async def run() -> None:
        assert await scanner.scan(message("pulito")) is None
        assert await scanner.scan(EICAR) == f"{SIGNATURE}.UNOFFICIAL"
        # inside a MIME attachment, as users send it
        assert await scanner.scan(message("fattura", EICAR)) == f"{SIGNATURE}.UNOFFICIAL"
        # over clamd's StreamMaxLength (2M here): an error, never "clean"; on a unix socket
        # clamd's own answer always arrives, over TCP its reset may swallow it
        limit = virus.ScanLimitExceeded if transport == "unix" else virus.ScanError
        with pytest.raises(limit):
            await scanner.scan(b"x" * (3 * 1024 * 1024))
        with pytest.raises(virus.ScanError):
            await virus.ClamdScanner(f"unix:{tmp_path / 'nobody.sock'}").scan(b"hello")

    asyncio.run(run())


def test_clamd_address_forms() -> None:
    assert virus.parse_address("unix:/run/clamav/clamd.ctl") == virus.ClamdAddress(
        "unix", path="/run/clamav/clamd.ctl")
    assert virus.parse_address("tcp:127.0.0.1:3310") == virus.ClamdAddress(
        "tcp", host="127.0.0.1", port=3310)
    assert virus.parse_address("tcp:[::1]:3310").host == "::1"
    for bad in ("unix:relative.sock", "tcp:127.0.0.1", "tcp:host:99999", "clamd.sock"):
        with pytest.raises(ConfigError):
            virus.parse_address(bad)
    with pytest.raises(virus.ScanError):
        virus.verdict("stream: lstat() failed: No such file. ERROR")


# --- viruses, end to end ----------------------------------------------------------------------

def _check_signed(msgs: list[bytes], tmp_path: Path, ca: Path) -> list[pec.Parsed]:
    """openssl verifies each; pec.parse (strict daticert parse) reads each."""
    parsed = []
    for i, data in enumerate(msgs):
        eml = tmp_path / f"check-{hashlib.sha1(data).hexdigest()[:10]}-{i}.eml"
        eml.write_bytes(data)
        assert openssl_verifies(eml, ca), data[:400]
        p = pec.parse(data)  # daticert.parse, strict, on the XML part
        assert p.certdata is not None and p.signed is not None
        parsed.append(p)
    return parsed


def _by_type(parsed: list[pec.Parsed]) -> dict[str, pec.Parsed]:
    out: dict[str, pec.Parsed] = {}
    for p in parsed:
        assert p.certdata is not None
        assert p.certdata.type not in out, f"two {p.certdata.type} messages"
        out[p.certdata.type] = p
    return out


def _ledger(provider: ProviderDir) -> list[sqlite3.Row]:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM ledger ORDER BY seq").fetchall()
    finally:
        conn.close()


def _tracking(provider: ProviderDir) -> list[sqlite3.Row]:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM tracking ORDER BY rowid").fetchall()
    finally:
        conn.close()


def test_virus_at_submission_is_refused_and_quarantined(
        two_providers: tuple[ProviderDir, ProviderDir], clamd: str, tmp_path: Path) -> None:
    a, _b = two_providers
    text = a.conf.read_text()  # the operator's way: uncomment the line pecd init wrote
    assert '# clamd = "unix:' in text
    a.conf.write_text(text.replace('# clamd = "unix:/run/clamav/clamd.ctl"', f'clamd = "{clamd}"'))
    assert a.config.antivirus.clamd == clamd
    infected = message("fattura", EICAR)

    async def run() -> None:
        svc = Service(a.config)
        await svc.start()
        loop = asyncio.get_running_loop()
        try:
            for data in (message("pulito"), infected):
                code, reply = await loop.run_in_executor(
                    None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                    ["bob@b.test"], data, svc.ports.submission)
                assert code == 250, reply
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
        finally:
            await svc.stop()

    asyncio.run(run())
    got = _by_type(_check_signed(a.messages("alice@a.test"), tmp_path, a.ca))
    assert set(got) == {"accettazione", "non-accettazione"}  # the clean one passed the scanner
    refusal = got["non-accettazione"]
    assert refusal.headers["X-Ricevuta"] == "non-accettazione"
    assert refusal.headers["X-VerificaSicurezza"] == "errore"
    assert str(refusal.headers["Subject"]).startswith("AVVISO DI NON ACCETTAZIONE PER VIRUS: ")
    assert refusal.certdata is not None and refusal.certdata.error == "virus"
    assert SIGNATURE in (refusal.certdata.extended_error or "")
    assert refusal.original is None  # §3.1.3: MUST NOT carry the original
    raw = next(m for m in a.messages("alice@a.test") if b"PER VIRUS" in m)
    assert base64.b64encode(EICAR)[:40] not in raw and EICAR not in raw
    assert "X-VerificaSicurezza" not in got["accettazione"].headers

    files = list((a.root / "data" / "quarantine").iterdir())
    assert [f.suffix for f in files] == [".eml"]
    assert files[0].read_bytes() == infected  # kept byte for byte
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    refused = [r for r in _ledger(a) if r["event"] == "refused"]
    assert len(refused) == 1 and files[0].name in refused[0]["detail"]
    assert refusal.certdata.identifier == refused[0]["msgid"]
    # only the clean message became a transaction
    assert [r["subject"] for r in _tracking(a)] == ["pulito"]


def test_virus_at_reception_goes_back_to_the_sender(
        two_providers: tuple[ProviderDir, ProviderDir], clamd: str, tmp_path: Path) -> None:
    a, b = two_providers
    infected = message("fattura", EICAR)

    async def run() -> None:
        # A does not scan (so the infected message leaves A inside a valid envelope); B scans
        svc_a = Service(a.config)
        svc_b = Service(dataclasses.replace(
            b.config, antivirus=config_mod.Antivirus(clamd=clamd)))
        await svc_a.start()
        await svc_b.start()
        loop = asyncio.get_running_loop()
        try:
            code, reply = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["bob@b.test"], infected, svc_a.ports.submission)
            assert code == 250, reply
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2
                           and len(a.messages("posta-certificata@a.test")) == 1)
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    assert b.messages("bob@b.test") == []  # never delivered
    got = _by_type(_check_signed(a.messages("alice@a.test"), tmp_path, a.ca))
    assert set(got) == {"accettazione", "errore-consegna"}
    pec_id = got["accettazione"].certdata.identifier  # type: ignore[union-attr]

    # scanning off at A: its acceptance receipt claims nothing about viruses
    acceptance = next(m for m in a.messages("alice@a.test") if b"X-Ricevuta: accettazione" in m)
    assert b"X-VerificaSicurezza" not in acceptance and b"virus" not in acceptance.lower()

    (detection,) = _check_signed(a.messages("posta-certificata@a.test"), tmp_path, a.ca)
    cd = detection.certdata
    assert cd is not None
    assert detection.headers["X-Ricevuta"] == "rilevazione-virus"
    assert detection.headers["X-Mittente"] == "alice@a.test"
    assert str(detection.headers["Subject"]) == "PROBLEMA DI SICUREZZA: fattura"
    assert str(detection.headers["To"]) == "posta-certificata@a.test"
    assert (cd.type, cd.error, cd.delivered_to) == ("rilevazione-virus", "virus", "bob@b.test")
    assert cd.identifier == pec_id and cd.issuer == "Provider b.test"
    assert detection.original is None

    notice = got["errore-consegna"]
    assert notice.certdata is not None
    assert str(notice.headers["Subject"]).startswith("AVVISO DI MANCATA CONSEGNA PER VIRUS: ")
    assert notice.headers["X-VerificaSicurezza"] == "errore"
    assert notice.headers["X-Ricevuta"] == "errore-consegna"
    assert (notice.certdata.error, notice.certdata.delivered_to) == ("virus", "bob@b.test")
    assert notice.certdata.identifier == pec_id and notice.certdata.issuer == "Provider a.test"

    (row,) = _tracking(a)
    assert row["closed"] is not None and row["outcome"] == "virus"
    events_b = [r["event"] for r in _ledger(b)]
    assert "virus-detected" in events_b and "taken-in-charge" not in events_b
    kept = list((b.root / "data" / "quarantine").iterdir())
    assert len(kept) == 1 and pec.parse(kept[0].read_bytes()).original == infected


# --- timeouts: the decision, pure -----------------------------------------------------------

POLICY = Policy(12 * H, 24 * H, margin=60)


def row(recipient: str = "bob@b.test", kind: str = "certificato", pec_id: str = "t1@a.test",
        **kw: float | str | None) -> Tracked:
    return Tracked(pec_id=pec_id, recipient=recipient, sender="alice@a.test", subject="s",
                   ref_msgid="<m@c>", kind=kind, accepted=0.0, **kw)  # type: ignore[arg-type]


def actions(rows: list[Tracked], now: float) -> list[tuple[str, tuple[str, ...]]]:
    return [(d.action, d.recipients) for d in decide(rows, now, POLICY)]


def test_warning_at_twelve_hours_only_without_any_receipt() -> None:
    assert actions([row()], 12 * H - 1) == []
    assert actions([row()], 12 * H) == [("warning", ("bob@b.test",))]
    assert actions([row(taken=5.0)], 12 * H) == []
    assert actions([row(delivered=5.0)], 12 * H) == []
    assert actions([row(warned=12 * H)], 13 * H) == []  # never twice
    assert actions([row(closed=1.0, outcome="errore")], 20 * H) == []


def test_final_notice_by_twenty_four_hours_never_before_twenty_two() -> None:
    assert actions([row(warned=12 * H)], 24 * H - 61) == []
    assert actions([row(warned=12 * H)], 24 * H - 60) == [("final", ("bob@b.test",))]
    assert actions([row(taken=1.0)], 24 * H) == [("final", ("bob@b.test",))]  # take-charge only
    assert actions([row(delivered=23 * H)], 30 * H) == []
    wide = Policy(12 * H, 24 * H, margin=5 * H)  # a huge tick still waits for 22 h
    assert [d.action for d in decide([row(warned=1.0)], 22 * H - 1, wide)] == []
    assert [d.action for d in decide([row(warned=1.0)], 22 * H, wide)] == ["final"]
    # down across both times: only the final notice (the warning's promise would be false)
    assert actions([row()], 30 * H) == [("final", ("bob@b.test",))]


def test_one_notice_per_transaction_and_esterno_gets_none() -> None:
    rows = [row("bob@b.test"), row("carl@b.test"), row("dan@c.test", taken=1.0),
            row("eve@gmail.test", kind="esterno"), row("bob@b.test", pec_id="t2@a.test")]
    assert actions(rows, 12 * H) == [("warning", ("bob@b.test", "carl@b.test")),
                                     ("warning", ("bob@b.test",))]
    assert actions(rows, 24 * H) == [
        ("final", ("bob@b.test", "carl@b.test", "dan@c.test")),
        ("close-esterno", ("eve@gmail.test",)),
        ("final", ("bob@b.test",))]
    with pytest.raises(ValueError):
        Policy(24 * H, 12 * H)


# --- timeouts, end to end -------------------------------------------------------------------

def _timeout_notices(provider: ProviderDir, tmp_path: Path) -> list[pec.Parsed]:
    msgs = [m for m in provider.messages("alice@a.test")
            if b"X-Ricevuta: preavviso-errore-consegna" in m]
    parsed = _check_signed(msgs, tmp_path, provider.ca)
    for p in parsed:
        assert p.headers["X-Ricevuta"] == "preavviso-errore-consegna"
        assert str(p.headers["Subject"]).startswith(
            "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: ")
        assert str(p.headers["To"]) == "alice@a.test"  # to the sender (the RFC's slip)
        assert p.original is None
    return parsed


async def _submit_and_accept(svc: Service, a: ProviderDir, subject: str) -> None:
    loop = asyncio.get_running_loop()
    code, reply = await loop.run_in_executor(
        None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
        message(subject), svc.ports.submission)
    assert code == 250, reply
    await wait_for(lambda: len(a.messages("alice@a.test")) == 1)


def test_timeouts_end_to_end_with_peer_down(two_providers: tuple[ProviderDir, ProviderDir],
                                            tmp_path: Path) -> None:
    a, _b = two_providers  # B is never started: nothing ever comes back
    clock = ManualClock()

    async def run() -> None:
        svc = Service(a.config, clock=clock)
        worker = svc.timeouts
        await svc.start()
        try:
            await _submit_and_accept(svc, a, "silenzio")
            clock.advance(timedelta(hours=12, seconds=-1))
            assert await worker.run_once() == 0
            clock.advance(timedelta(seconds=1))
            assert await worker.run_once() == 1
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            assert await worker.run_once() == 0  # never twice
            clock.advance(timedelta(hours=12) - timedelta(seconds=worker.interval + 1))
            assert await worker.run_once() == 0  # not yet the 24 h notice
            clock.advance(timedelta(seconds=worker.interval + 1))
            assert await worker.run_once() == 1
            await wait_for(lambda: len(a.messages("alice@a.test")) == 3)
            clock.advance(timedelta(days=3))
            assert await worker.run_once() == 0
        finally:
            await svc.stop()

    asyncio.run(run())
    warning, final = sorted(_timeout_notices(a, tmp_path),
                            key=lambda p: p.certdata.time)  # type: ignore[union-attr]
    assert b"entro 12 ore" in warning.signed.inner  # type: ignore[union-attr]
    assert b"entro 24 ore" in final.signed.inner  # type: ignore[union-attr]
    (tracked,) = _tracking(a)
    assert (tracked["outcome"], tracked["closed"] is not None) == ("timeout", True)
    for p in (warning, final):
        assert p.certdata is not None and p.certdata.identifier == tracked["pec_id"]
        assert p.certdata.recipients == (daticert.Recipient("bob@b.test", "certificato"),)
    events = [r["event"] for r in _ledger(a)]
    assert events.count("timeout-warning") == 1 and events.count("timeout") == 1


def test_take_charge_without_delivery_gives_only_the_final_notice(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, b = two_providers
    clock = ManualClock()

    async def run() -> None:
        svc_a = Service(a.config, clock=clock)
        svc_b = Service(b.config)
        await svc_a.start()
        await svc_b.start(runners=False)  # B is stepped by hand: it takes charge, never delivers
        try:
            await _submit_and_accept(svc_a, a, "presa")
            await wait_for(lambda: queued(b) > 0)  # the envelope reached B's inbound queue
            assert await svc_b.runners["inbound"].run_once() == 1
            assert await svc_b.runners["relay"].run_once() == 1
            await wait_for(lambda: len(a.messages("posta-certificata@a.test")) == 1)
            await wait_for(lambda: _tracking(a)[0]["taken"] is not None)
            clock.advance(timedelta(hours=13))
            assert await svc_a.timeouts.run_once() == 0
            clock.advance(timedelta(hours=11))
            assert await svc_a.timeouts.run_once() == 1
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
        finally:
            await svc_a.stop()
            await svc_b.stop()

    asyncio.run(run())
    (final,) = _timeout_notices(a, tmp_path)
    assert b"entro 24 ore" in final.signed.inner  # type: ignore[union-attr]
    assert b.messages("bob@b.test") == []


def test_a_receipt_arriving_mid_decision_cancels_the_notice(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    clock = ManualClock()

    async def run() -> None:
        svc = Service(a.config, clock=clock)
        start = clock.now().timestamp()
        await svc.db.transact(lambda conn: conn.executemany(
            "INSERT INTO tracking (pec_id, recipient, sender, subject, kind, accepted)"
            " VALUES (?, 'bob@b.test', 'alice@a.test', 's', 'certificato', ?)",
            [("race@a.test", start), ("twice@a.test", start)]))
        clock.advance(timedelta(hours=12))
        now = clock.now().timestamp()
        rows = await svc.db.transact(lambda conn: timeouts.load_open(conn, now))
        due = {d.pec_id: d for d in decide(rows, now, svc.timeouts.policy)}
        assert set(due) == {"race@a.test", "twice@a.test"}
        # the take-charge receipt is committed after the decision, before the notice
        await svc.db.transact(_track("taken", "race@a.test", ("bob@b.test",), now))
        assert await svc.timeouts.commit(due["race@a.test"]) is False
        # two passes deciding the same thing: one notice
        assert await svc.timeouts.commit(due["twice@a.test"]) is True
        assert await svc.timeouts.commit(due["twice@a.test"]) is False
        svc.cpu.shutdown()
        svc.db.close()

    asyncio.run(run())
    conn = sqlite3.connect(a.root / "data" / "pecd.sqlite")
    queued = conn.execute("SELECT count(*) FROM queue WHERE kind='deliver'").fetchone()[0]
    warned = dict(conn.execute("SELECT pec_id, warned FROM tracking").fetchall())
    events = [r[0] for r in conn.execute("SELECT event FROM ledger")]
    conn.close()
    assert queued == 1 and events.count("timeout-warning") == 1
    assert warned["race@a.test"] is None and warned["twice@a.test"] is not None


# --- the real clock path: pecd serve under faketime -----------------------------------------

def test_timeouts_on_the_system_clock_under_faketime(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, _b = two_providers

    async def accept() -> None:
        svc = Service(a.config)  # the real SystemClock
        await svc.start()
        try:
            await _submit_and_accept(svc, a, "orologio")
        finally:
            await svc.stop()

    asyncio.run(accept())
    accepted = _tracking(a)[0]["accepted"]
    serve_under_faketime(a, "+13h", lambda: len(a.messages("alice@a.test")) >= 2, "the 12 h notice")
    serve_under_faketime(a, "+25h", lambda: len(a.messages("alice@a.test")) >= 3, "the 24 h notice")
    notices = sorted(_timeout_notices(a, tmp_path), key=lambda p: p.certdata.time)  # type: ignore[union-attr]
    assert len(notices) == 2  # one warning, one final: none twice across the restarts
    warning, final = (p.certdata for p in notices)
    assert warning is not None and final is not None
    assert 13 * H - 60 <= warning.time.timestamp() - accepted < 14 * H
    assert 25 * H - 60 <= final.time.timestamp() - accepted < 26 * H
    assert b"entro 12 ore" in notices[0].signed.inner  # type: ignore[union-attr]
    assert b"entro 24 ore" in notices[1].signed.inner  # type: ignore[union-attr]
    assert _tracking(a)[0]["outcome"] == "timeout"
