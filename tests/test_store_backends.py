"""The storage layer on both backends: schema history, queue, ledger from several writers; and
what only PostgreSQL has (leases passed over with SKIP LOCKED, an unreachable server, a
connection killed mid-run)."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pecd.clock import ManualClock
from pecd.store import Conflict, Unavailable, Where, ledger
from pecd.store import db as db_mod
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import NewItem, Outcome, Queue
from pecd.store.spool import Spool

from . import pg_support
from .conftest import pecd

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _where(tmp_path: Path, database: Callable[[], str | None]) -> Where:
    return database() or tmp_path / "pecd.sqlite"


def test_schema_history_is_the_same_on_both(tmp_path: Path,
                                            database: Callable[[], str | None]) -> None:
    where = _where(tmp_path, database)
    conn = db_mod.open_database(where)
    try:
        db_mod.migrate(conn)  # a second time: nothing to do
        names = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
    finally:
        conn.close()
    assert names == [name for name, _ in db_mod.MIGRATIONS]


def test_queue_round_trip_and_ledger(tmp_path: Path, database: Callable[[], str | None]) -> None:
    where = _where(tmp_path, database)
    clock = ManualClock(T0)

    async def scenario() -> None:
        db = Database(where)
        q = Queue(db, Spool(tmp_path / "spool"), clock)
        try:
            ids = await q.enqueue(
                [NewItem("relay", "alice@a.test", ("bob@b.test",), data=b"small", dest="x"),
                 NewItem("relay", "alice@a.test", ("carl@b.test",), data=b"y", delay=60)],
                [LedgerEvent(event="accepted", msgid="m1", sender="alice@a.test")])
            assert ids[1] > ids[0]
            leased = await q.lease("relay", 10)
            assert [i.id for i in leased] == [ids[0]]  # the second is not due yet
            assert q.read(leased[0]) == b"small"
            assert leased[0].rcpts == ("bob@b.test",)
            assert await q.finish(leased[0], Outcome(events=[LedgerEvent(event="relayed")],
                                                     seen=("p", "m1")))
            again = await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"z")])
            item = (await q.lease("relay", 10))[0]
            assert item.id == again[0]
            # the same (provider, message id) a second time: a duplicate, not done twice
            assert not await q.finish(item, Outcome(seen=("p", "m1")))
            with pytest.raises(Conflict):
                await db.transact(lambda c: c.execute(
                    "INSERT INTO seen (provider, message_id, at) VALUES ('p', 'm1', 'now')"))
            report = await db.transact(lambda c: ledger.verify(c))
            assert report.ok and report.rows == 3
        finally:
            db.close()

    asyncio.run(scenario())


def _append_many(where: Where, writer: int, n: int) -> None:
    conn = db_mod.connect(where)
    try:
        for i in range(n):
            with ledger.transaction(conn):
                ledger.append(conn, LedgerEvent(event="accepted", msgid=f"w{writer}-{i}"), T0)
    finally:
        conn.close()


def test_ledger_appends_from_two_processes_verify(tmp_path: Path,
                                                  database: Callable[[], str | None]) -> None:
    where = _where(tmp_path, database)
    db_mod.open_database(where).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(where, w, 60)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    conn = db_mod.connect(where)
    try:
        report = ledger.verify(conn)
        writers = {r[0][:2] for r in conn.execute("SELECT msgid FROM ledger")}
    finally:
        conn.close()
    assert report.ok, report.reason
    assert report.rows == 120 and writers == {"w0", "w1"}


def test_ledger_refuses_rewrite_on_postgresql(pg_url: str) -> None:
    conn = db_mod.open_database(pg_url)
    try:
        with ledger.transaction(conn):
            ledger.append(conn, LedgerEvent(event="accepted", msgid="m"), T0)
        for sql in ("UPDATE ledger SET event = 'refused'", "DELETE FROM ledger",
                    "TRUNCATE ledger",
                    "INSERT INTO ledger (seq, at, event, recipients, related, detail, prev_hash,"
                    " hash) VALUES (1, 'x', 'x', '[]', '[]', '{}', 'x', 'x')"):
            with pytest.raises(Conflict):
                conn.execute(sql)
        assert ledger.verify(conn).ok
    finally:
        conn.close()


def test_lease_skips_rows_another_node_holds(pg_url: str, tmp_path: Path) -> None:
    """Two connections lease at once: the second passes over the rows the first has locked
    (FOR UPDATE SKIP LOCKED) instead of waiting or taking them too."""
    clock = ManualClock(T0)

    async def scenario() -> None:
        db1, db2 = Database(pg_url), Database(pg_url)
        q1 = Queue(db1, Spool(tmp_path / "s1"), clock)
        q2 = Queue(db2, Spool(tmp_path / "s2"), clock)
        try:
            await q1.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"%d" % i)
                              for i in range(4)])
            hold = db_mod.connect(pg_url)
            hold.execute("BEGIN")
            locked = hold.execute("SELECT id FROM queue ORDER BY id LIMIT 2 FOR UPDATE"
                                  ).fetchall()
            got = await asyncio.wait_for(q2.lease("relay", 10), 20)
            assert {i.id for i in got}.isdisjoint({r[0] for r in locked})
            assert len(got) == 2
            hold.execute("ROLLBACK")
            hold.close()
            rest = await q1.lease("relay", 10)
            assert len(rest) == 2 and {i.id for i in rest}.isdisjoint({i.id for i in got})
        finally:
            db1.close()
            db2.close()

    asyncio.run(scenario())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_postgresql_unreachable_at_start_is_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://pecd@127.0.0.1:{_closed_port()}/pecd"
    with pytest.raises(Unavailable):
        Database(url)
    out = pecd("init", str(tmp_path / "p"), "--domain", "p.test", "--ca", str(tmp_path / "ca"),
               "--database-url", url, ok=False)
    assert "database unreachable" in out and "Traceback" not in out


def test_connection_killed_mid_run_then_recovers(pg_url: str, pg_cluster: pg_support.Cluster,
                                                 tmp_path: Path) -> None:
    """The server drops the writer's connection: the next transaction fails as Unavailable
    (nothing half-done), the one after reconnects by itself."""
    clock = ManualClock(T0)

    async def scenario() -> None:
        db = Database(pg_url)
        q = Queue(db, Spool(tmp_path / "spool"), clock)
        try:
            await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"1")])
            dbname = pg_url.rsplit("/", 1)[1]
            pg_cluster.psql("postgres", "SELECT pg_terminate_backend(pid) FROM"
                            f" pg_stat_activity WHERE datname = '{dbname}'")
            with pytest.raises(Unavailable):
                await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"2")])
            await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"3")])
            bodies = sorted(q.read(i) for i in await q.lease("relay", 10))
            assert bodies == [b"1", b"3"]
            assert (await db.transact(lambda c: ledger.verify(c))).ok
        finally:
            db.close()

    asyncio.run(scenario())


_RSS_PROBE = r"""
import gc, os, sys
from pecd.store import db as db_mod
from pecd.store.chunks import ChunkSpool

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

url, size = sys.argv[1], int(sys.argv[2])
db_mod.open_database(url).close()
spool = ChunkSpool(url)
data = os.urandom(size)
digest = hash(data)
name = spool.write_many([data])[0]
del data
gc.collect()
spool.read(spool.write_many([b"warm-up" * 1000])[0])  # the connection's buffers, once
with open("/proc/self/clear_refs", "w") as f:  # peak RSS starts again from here
    f.write("5")
base = status("VmRSS")
body = spool.read(name)
peak = status("VmHWM")
assert hash(body) == digest and len(body) == size
with spool.open(name) as stream:
    assert stream.read(10) == body[:10] and len(stream.read()) == size - 10
assert spool.exists(name)
spool.remove([name])
assert not spool.exists(name)
print(peak - base)
"""


def test_big_body_in_chunks_round_trip_costs_at_most_twice_its_size(pg_url: str) -> None:
    """A 25 MB body goes into 1 MiB chunks and comes back whole; reading it grows the process
    by at most twice its size (the chunks received, and the body they make)."""
    import subprocess
    import sys

    size = 25 * 1024 * 1024
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, pg_url, str(size)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = int(done.stdout.split()[-1])
    assert growth <= 2 * size, f"reading {size} bytes grew RSS by {growth}"


def test_serve_with_postgresql_unreachable_exits_with_one_line(tmp_path: Path,
                                                               pg_url: str) -> None:
    import subprocess
    import sys

    from pecd import config

    root = tmp_path / "p"
    pecd("init", str(root), "--domain", "p.test", "--ca", str(tmp_path / "ca"),
         "--database-url", pg_url)
    config.use_database(root / "pecd.toml", f"postgresql://pecd@127.0.0.1:{_closed_port()}/x")
    done = subprocess.run([sys.executable, "-m", "pecd.cli", "-c", str(root / "pecd.toml"),
                           "serve"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "database unreachable" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_database_lost_mid_run_answers_4xx_then_recovers_without_restart(
        tmp_path: Path, pg_cluster: pg_support.Cluster) -> None:
    """PostgreSQL refuses connections and drops the live ones while a client sends: DATA is
    answered 451 (never 250 without a commit); once it is back, the same running pecd takes
    and certifies the next message."""
    import smtplib

    from .conftest import ProviderDir, _two_providers, client_tls, running, wait_for
    from .test_end_to_end import ORIGINAL

    a, b = _two_providers(tmp_path, (pg_cluster.database(), pg_cluster.database()))
    dbname = str(a.config.paths.database).rsplit("/", 1)[1]

    def cut(off: bool) -> None:
        pg_cluster.psql("postgres", f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS {not off}")
        if off:
            pg_cluster.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            f" WHERE datname = '{dbname}'")

    def session(p: ProviderDir, port: int, during_cut: bool) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.starttls(context=client_tls(p.ca))
            s.login("alice@a.test", "alice-secret")
            s.mail("alice@a.test")
            s.rcpt("bob@b.test")
            if during_cut:
                cut(True)
            try:
                return s.data(ORIGINAL)
            finally:
                if during_cut:
                    cut(False)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with running(a, b) as (svc_a, _svc_b):
            port = svc_a.ports.submission
            code, reply = await loop.run_in_executor(None, session, a, port, True)
            assert code == 451 and b"Storage temporarily unavailable" in reply, reply
            code, reply = await loop.run_in_executor(None, session, a, port, False)
            assert code == 250, reply
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1, 60)

    asyncio.run(scenario())
    assert len(b.messages("bob@b.test")) == 1  # the refused one was not delivered after all
    assert "ledger ok" in a.cli("ledger", "verify")


def test_placeholders_rewritten_outside_quotes_only() -> None:
    from pecd.store.pg import translate

    assert translate("SELECT a FROM t WHERE b = ? AND c LIKE 'x?%' AND d = ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x?%%' AND d = %s", False, False)
    assert translate("SELECT 1 WHERE ?1 IS NULL OR at >= ?1")[0] == (
        "SELECT 1 WHERE %(p1)s IS NULL OR at >= %(p1)s")
    assert translate("BEGIN IMMEDIATE") == ("BEGIN", False, False)
    assert translate("INSERT INTO queue (kind) VALUES (?)") == (
        "INSERT INTO queue (kind) VALUES (%s) RETURNING id", False, True)


def test_quoted_text_stays_data_on_postgresql(pg_url: str) -> None:
    """A value full of SQL and placeholder syntax is stored and read back as it is."""
    conn = db_mod.open_database(pg_url)
    try:
        nasty = "x'); DROP TABLE users; -- ? %s %(p1)s ?1 \\ '"
        conn.execute("INSERT INTO operators (address, created) VALUES (?, ?)", (nasty, "now"))
        row = conn.execute("SELECT address FROM operators WHERE address = ?", (nasty,)).fetchone()
        assert row["address"] == nasty and row[0] == nasty
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    finally:
        conn.close()


def test_operator_commands_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The CLI's nouns work the same on a provider kept in PostgreSQL."""
    root = tmp_path / "p"
    pecd("init", str(root), "--domain", "p.test", "--ca", str(tmp_path / "ca"),
         "--database-url", pg_url)
    conf = str(root / "pecd.toml")
    pecd("-c", conf, "user", "add", "u@p.test", "--password-stdin", input="pw-secret\n")
    assert "exists" in pecd("-c", conf, "user", "add", "u@p.test", "--password-stdin",
                            input="pw-secret\n", ok=False)
    assert "p.test" in pecd("-c", conf, "index", "list")
    pecd("-c", conf, "queue", "list")
    assert "ledger rows" in pecd("-c", conf, "status")
    assert "ledger ok" in pecd("-c", conf, "ledger", "verify")
    pecd("-c", conf, "ledger", "export", "-o", str(tmp_path / "l.jsonl"))
    assert "hash chain intact" in pecd("-c", conf, "verify", str(tmp_path / "l.jsonl"))
    assert not list((root / "data").glob("pecd.sqlite*"))


def test_postgresql_restarted_immediately_then_the_writer_carries_on(
        pg_url: str, pg_cluster: pg_support.Cluster, tmp_path: Path) -> None:
    """``pg_ctl restart -m immediate`` (a crash and recovery of the server): what committed
    before is there after, the first transaction may fail as Unavailable, later ones commit."""
    clock = ManualClock(T0)

    async def scenario() -> None:
        db = Database(pg_url)
        q = Queue(db, Spool(tmp_path / "spool"), clock)
        try:
            await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"before")],
                            [LedgerEvent(event="accepted", msgid="before")])
            pg_cluster.pg_ctl("restart", "-m", "immediate", "-w", "-t", "60",
                              "-l", str(pg_cluster.root / "log"))
            for _ in range(3):
                try:
                    await q.enqueue([NewItem("relay", "a@a.test", ("b@b.test",), data=b"after")],
                                    [LedgerEvent(event="accepted", msgid="after")])
                    break
                except Unavailable:
                    continue
            else:
                raise AssertionError("the writer did not reconnect")
            bodies = sorted(q.read(i) for i in await q.lease("relay", 10))
            assert bodies == [b"after", b"before"]
            assert (await db.transact(lambda c: ledger.verify(c))).ok
        finally:
            db.close()

    asyncio.run(scenario())
