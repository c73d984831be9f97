"""Nothing lost, nothing doubled: recovery, replay, operator actions, SIGTERM, checkpoints,
signed ledger exports, and a short run of scripts/crash_test (SIGKILLs at random moments)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope

from pecd import replies
from pecd.clock import ManualClock
from pecd.service import Service
from pecd.store import ledger
from pecd.store.db import Database
from pecd.store.queue import NewItem, Queue
from pecd.trust import cms, pki

from .conftest import ProviderDir, free_port, openssl, running, submit, wait_for
from .pechelpers import SinkHandler, configure, count
from .test_end_to_end import ORIGINAL

ROOT = Path(__file__).resolve().parent.parent


def test_crash_test_short_run(tmp_path: Path) -> None:
    """The crash test script, shortened: SIGKILLs of both daemons while clients submit."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "crash_test"), "-n", "30", "--kills", "4", "--clients", "2",
         "--seed", "7", "--timeout", "200", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["acknowledged"] == 30
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    assert figures["kills_total"] == 4
    assert figures["delivery_receipts"] >= 60


def test_recovery_releases_leases_and_drops_unacknowledged_files(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, _ = two_providers_db

    async def scenario() -> None:
        svc = Service(a.config)
        q = svc.queue
        ids = await q.enqueue([NewItem("relay", "alice@a.test", ("bob@b.test",), data=b"x",
                                       dest="pec:test")])
        leased = await q.lease("relay", 10)
        assert [i.id for i in leased] == ids
        svc.db.close()  # the process "dies" holding the lease
        on_pg = a.config.paths.database_url is not None
        if on_pg:  # chunks written an hour ago that no queue row names (and one just written)
            svc.db = Database(a.config.paths.database)
            await svc.db.transact(lambda c: c.executemany(
                "INSERT INTO body_chunks (name, n, data, created) VALUES (?, 0, ?, ?)",
                [("never-acknowledged", b"half written", time.time() - 7200),
                 ("another-node-committing", b"fresh", time.time())]))
            svc.db.close()
        else:
            orphan = svc.spool.q / "never-acknowledged"  # type: ignore[attr-defined]
            orphan.write_bytes(b"half written")
            (svc.spool.tmp / "partial").write_bytes(b"half")  # type: ignore[attr-defined]
        svc2 = Service(a.config)
        recovery = svc2.queue.recover()
        assert recovery.released == 1 and recovery.orphans_removed == 1
        if on_pg:
            assert svc2.spool.exists("another-node-committing")
            assert not svc2.spool.exists("never-acknowledged")
        else:
            assert not orphan.exists() and not (svc2.spool.tmp / "partial").exists()  # type: ignore[attr-defined]
        again = await svc2.queue.lease("relay", 10)
        assert [i.id for i in again] == ids
        svc2.db.close()
        svc2.cpu.shutdown()
        svc.cpu.shutdown()

    asyncio.run(scenario())


def test_replayed_envelope_is_delivered_once(two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    """A peer that lost our 250 and sends the envelope again gets its take-charge again,
    and the recipient does not get the message twice."""
    a, b = two_providers_db

    async def scenario() -> None:
        async with running(a, b) as (svc_a, svc_b):
            loop = asyncio.get_running_loop()
            code, _ = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                ORIGINAL, svc_a.ports.submission)
            assert code == 250
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2
                           and len(a.messages("posta-certificata@a.test")) == 1)
            envelope = b.messages("bob@b.test")[0]

            def replay() -> None:  # what A's relay would send after a lost reply
                with smtplib.SMTP("127.0.0.1", svc_b.ports.inbound, timeout=30) as s:
                    s.starttls()
                    s.sendmail("alice@a.test", ["bob@b.test"], envelope)

            await loop.run_in_executor(None, replay)
            await wait_for(lambda: b.query(
                "SELECT count(*) FROM ledger WHERE event='duplicate'")[0][0] == 1)
            await wait_for(lambda: a.query(
                "SELECT count(*) FROM ledger WHERE event='duplicate'")[0][0] == 1)
        assert len(b.messages("bob@b.test")) == 1
        assert len(a.messages("alice@a.test")) == 2  # one acceptance, one delivery receipt
        assert len(a.messages("posta-certificata@a.test")) == 1  # same take-charge, kept once

    asyncio.run(scenario())


def test_peer_down_defers_then_operator_retry_delivers(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers_db

    async def scenario() -> None:
        svc_a = Service(a.config)
        await svc_a.start()
        loop = asyncio.get_running_loop()
        try:
            code, _ = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                ORIGINAL, svc_a.ports.submission)
            assert code == 250
            await wait_for(lambda: "relay/deferred" in a.cli("status"))
            listing = a.cli("queue", "list", "--state", "deferred")
            item_id = listing.split()[0]
            a.cli("queue", "hold", item_id)
            assert "relay/hold: 1" in a.cli("status")
            a.cli("queue", "hold", item_id, ok=False)  # already held: a clear refusal
            a.cli("queue", "release", item_id)
            svc_b = Service(b.config)
            await svc_b.start()
            try:
                a.cli("queue", "retry", item_id, ok=False)  # released items are not deferred
                await wait_for(lambda: len(a.messages("alice@a.test")) == 2, timeout=60)
            finally:
                await svc_b.stop()
        finally:
            await svc_a.stop()
        assert len(b.messages("bob@b.test")) == 1
        events = a.cli("status", "<original-1@client.a.test>")
        assert '"event": "accepted"' in events
        rows = [r[0] for r in a.query(
            "SELECT event FROM ledger WHERE event LIKE 'operator-%' OR event='deferred'")]
        assert "deferred" in rows and "operator-hold" in rows and "operator-release" in rows

    asyncio.run(scenario())


def test_sigterm_stops_gracefully(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _ = two_providers
    proc = subprocess.Popen([sys.executable, "-m", "pecd.cli", "-c", str(a.conf), "serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        port = a.config.listen.submission_port
        while True:
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
                time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_mid_flight_leaves_no_task_and_loses_nothing(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    """``stop`` with no grace while stages are busy: nothing keeps running after it (a task still
    pending when the loop closes is work cut off unseen), and a restart finishes every message."""
    a, b = two_providers_db
    n = 12
    for p in (a, b):  # a relay cut off by the stop is retried soon, not in 30 s
        configure(p, "relay", retry_base=0.2)

    async def scenario() -> None:
        async with running(a, b) as (svc_a, svc_b):
            port = svc_a.ports.submission
            loop = asyncio.get_running_loop()
            clients = ThreadPoolExecutor(n)  # not the default pool: the server's spool uses it
            answers = await asyncio.gather(*(loop.run_in_executor(
                clients, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                ORIGINAL.replace(b"original-1@", f"original-{i}@".encode()), port)
                for i in range(n)))
            clients.shutdown()
            assert [code for code, _ in answers] == [250] * n
            reader, writer = await asyncio.open_connection("127.0.0.1", svc_b.ports.inbound)
            assert (await reader.readline()).startswith(b"220")  # an idle session ...
            for svc in (svc_a, svc_b):  # in the middle of signing, relaying, delivering
                await svc.stop(timeout=0.0)
            assert await reader.read() == (replies.SHUTTING_DOWN + "\r\n").encode()  # ... told
            writer.close()
            assert asyncio.all_tasks() == {asyncio.current_task()}
        async with running(a, b):
            await wait_for(lambda: count(b, "bob@b.test") == n
                           and count(a, "alice@a.test") == 2 * n, timeout=60)
        assert count(b, "bob@b.test") == n and count(a, "alice@a.test") == 2 * n

    asyncio.run(scenario())
    assert "ledger ok" in a.cli("ledger", "verify") and "ledger ok" in b.cli("ledger", "verify")


def test_checkpoints_and_signed_export_verify_with_openssl(
        two_providers_db: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, _ = two_providers_db
    clock = ManualClock()

    async def scenario() -> None:
        svc = Service(a.config, clock)
        q: Queue = svc.queue
        for i in range(5):
            await q.record([ledger.LedgerEvent(event="test-event", msgid=f"m{i}")])
        assert svc.checkpoint() is not None
        assert svc.checkpoint() is None  # nothing new since
        await q.record([ledger.LedgerEvent(event="test-event", msgid="m5")])
        assert svc.checkpoint() is not None
        svc.db.close()
        svc.cpu.shutdown()

    asyncio.run(scenario())
    assert "2 checkpoints" in a.cli("ledger", "verify")
    # the checkpoint token is an RFC 3161 token over the head hash: openssl judges it
    head, token = a.query(
        "SELECT head_hash, token FROM ledger_checkpoint ORDER BY id DESC LIMIT 1")[0]
    (tmp_path / "head.bin").write_bytes(bytes.fromhex(head))
    (tmp_path / "tok.der").write_bytes(token)
    openssl("ts", "-verify", "-data", str(tmp_path / "head.bin"), "-in", str(tmp_path / "tok.der"),
            "-token_in", "-CAfile", str(a.ca), "-untrusted", str(a.tsa_cert))
    # signed export: pecd verify and openssl both accept it; one changed byte fails both
    export = tmp_path / "ledger.jsonl"
    a.cli("ledger", "export", "-o", str(export))
    assert "hash chain intact" in a.cli("verify", str(export))
    openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", f"{export}.p7s", "-content",
            str(export), "-CAfile", str(a.ca), "-out", "/dev/null")
    sig = Path(f"{export}.p7s").read_bytes()
    assert cms.extract_timestamp_token(sig) is not None
    data = export.read_bytes()
    export.write_bytes(data.replace(b"test-event", b"tost-event", 1))
    a.cli("verify", str(export), ok=False)
    openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", f"{export}.p7s", "-content",
            str(export), "-CAfile", str(a.ca), "-out", "/dev/null", ok=False)
    assert pki.load_cert(a.ca)  # the CA the auditor needs is a plain PEM file


class _RefusesOnce(SinkHandler):
    """An ordinary server that refuses one recipient with 451 the first time only."""

    refused_once = False

    async def handle_RCPT(self, server: object, session: object, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address == "x2@ext.test" and not self.refused_once:
            self.refused_once = True
            return "451 4.2.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_partial_refusal_retries_only_the_refused_recipient(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _ = two_providers

    async def scenario() -> None:
        handler = _RefusesOnce()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="sink.test", loop=loop),
                                          "127.0.0.1", 0)
        configure(a, "relay", smarthost="127.0.0.1",
                  smarthost_port=int(server.sockets[0].getsockname()[1]), retry_base=0.1,
                  retry_max=0.2)
        svc = Service(a.config)
        await svc.start()
        msg = ORIGINAL.replace(b"To: Bob <bob@b.test>", b"To: x1@ext.test, x2@ext.test")
        try:
            code, _ = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["x1@ext.test", "x2@ext.test"], msg, svc.ports.submission)
            assert code == 250
            await wait_for(lambda: len(handler.got) == 2)
            await svc.run_once()
        finally:
            await svc.stop()
            server.close()
        assert handler.refused_once
        assert [g.rcpts for g in handler.got] == [["x1@ext.test"], ["x2@ext.test"]]

    asyncio.run(scenario())


def test_mail_store_down_defers_delivery(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    """LMTP store unreachable: the certified delivery waits in the queue, nothing is lost and
    no receipt is sent before the message is really stored."""
    a, b = two_providers
    configure(b, "delivery", method="lmtp", lmtp_host="127.0.0.1", lmtp_port=free_port())

    async def scenario() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            loop = asyncio.get_running_loop()
            code, _ = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                ORIGINAL, svc_a.ports.submission)
            assert code == 250
            await wait_for(lambda: "deliver/deferred: 1" in b.cli("status"))
        assert "ConnectionRefused" in b.cli("queue", "list", "--state", "deferred")
        kinds = [pec_kind(m) for m in a.messages("alice@a.test")]
        assert kinds == ["accettazione"]  # no delivery receipt for an undelivered message

    asyncio.run(scenario())


def pec_kind(msg: bytes) -> str:
    from pecd.format import pec

    parsed = pec.parse(msg)
    assert parsed.certdata is not None
    return parsed.certdata.type


def test_retention_prunes_only_what_a_signed_export_holds(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    a, _ = two_providers

    async def scenario() -> None:
        svc = Service(a.config)
        for i in range(5):
            await svc.queue.record([ledger.LedgerEvent(event="old-event", msgid=f"m{i}")])
        assert svc.checkpoint() is not None
        for i in range(3):
            await svc.queue.record([ledger.LedgerEvent(event="new-event", msgid=f"n{i}")])
        assert svc.checkpoint() is not None
        svc.db.close()
        svc.cpu.shutdown()

    asyncio.run(scenario())
    db = a.root / "data" / "pecd.sqlite"
    old_rows = sqlite3.connect(db).execute(
        "SELECT count(*) FROM ledger WHERE event != 'new-event'").fetchone()[0]
    full = tmp_path / "full.jsonl"
    a.cli("ledger", "export", "-o", str(full))
    # by default only rows older than 30 months may go: none here
    assert "nothing to prune" in a.cli("ledger", "prune", "--export", str(full), ok=False)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    tail = tmp_path / "tail.jsonl"  # an export without the oldest rows does not allow pruning
    tail.write_text("".join(full.read_text().splitlines(keepends=True)[3:]))
    Path(f"{tail}.p7s").write_bytes(Path(f"{full}.p7s").read_bytes())
    assert "NOT VALID" in a.cli("ledger", "prune", "--before", tomorrow, "--export", str(tail),
                                ok=False)
    # the first checkpointed range leaves; the head's range stays
    out = a.cli("ledger", "prune", "--before", tomorrow, "--export", str(full))
    assert f"pruned {old_rows} rows" in out
    report = a.cli("ledger", "verify")
    assert "ledger ok" in report and "2 checkpoints" in report
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM ledger WHERE event='old-event'").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM ledger WHERE event='new-event'").fetchone()[0] == 3
    assert "hash chain intact" in a.cli("verify", str(full))  # the archive still proves them
    # forging the anchor (triggers dropped, as the file's owner could) is caught
    conn.executescript("DROP TRIGGER ledger_anchor_no_update;"
                       f"UPDATE ledger_anchor SET hash='{'0' * 64}';")
    conn.commit()
    assert "BROKEN" in a.cli("ledger", "verify", ok=False)


def test_only_a_batch_of_leases_commits_without_fsync(tmp_path: Path) -> None:
    """Leases are the one change a machine crash may undo (recovery returns them anyway): a
    batch of leases alone commits with ``synchronous=NORMAL``; any durable change in the batch,
    and every batch after, gets ``FULL``. Seen from inside the jobs, on the writer's connection."""
    db = Database(tmp_path / "pecd.sqlite")

    def level(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    async def one_batch(durable: list[bool]) -> list[int]:
        """The jobs queued while the writer is held inside an earlier batch: one batch."""
        entered, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            entered.set()
            release.wait(10)

        held = asyncio.ensure_future(db.transact(hold))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        jobs = [asyncio.ensure_future(db.transact(level, durable=d)) for d in durable]
        await asyncio.sleep(0)  # every job is queued before the writer is let go
        release.set()
        await held
        return list(await asyncio.gather(*jobs))

    async def scenario() -> tuple[list[int], list[int], int]:
        return (await one_batch([False] * 3), await one_batch([False, True, False]),
                await db.transact(level))

    try:
        lazy_alone, mixed, after = asyncio.run(scenario())
    finally:
        db.close()
    normal, full = 1, 2
    assert lazy_alone == [normal] * 3
    assert mixed == [full] * 3  # one durable job makes the whole batch's commit synced
    assert after == full
