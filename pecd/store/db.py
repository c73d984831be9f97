"""The provider's one database (a SQLite file, or PostgreSQL with ``[database] url``): queue,
ledger, users, provider index, dedup keys, revocation material.

Everything that must change together (a queue state, its outputs, their ledger rows) commits in
one transaction. All writes go through one writer thread, which batches concurrent requests into
one transaction and so one fsync (group commit); each request runs in its own savepoint so one
failing request does not undo its neighbours. ``synchronous=FULL``: a commit is on disk when the
call returns (a lease's excepted: ``transact(durable=False)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pecd.store import Conflict, Connection, Unavailable, Where, dialect, durable, is_postgres, ledger

T = TypeVar("T")

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE users (
            address TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            created TEXT NOT NULL
        );
        CREATE TABLE providers (
            fingerprint TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            service_address TEXT NOT NULL,
            cert_pem TEXT NOT NULL,
            imported TEXT NOT NULL
        );
        CREATE TABLE provider_domains (
            domain TEXT NOT NULL,
            fingerprint TEXT NOT NULL REFERENCES providers(fingerprint) ON DELETE CASCADE,
            PRIMARY KEY (domain, fingerprint)
        );
        CREATE TABLE queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: ids name Maildir files
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            spool TEXT NOT NULL,
            mail_from TEXT NOT NULL,
            rcpts TEXT NOT NULL,
            dest TEXT NOT NULL DEFAULT '',
            meta TEXT NOT NULL DEFAULT '{}',
            attempts INTEGER NOT NULL DEFAULT 0,
            leases INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            lease_until REAL,
            last_error TEXT,
            created REAL NOT NULL
        );
        CREATE INDEX queue_due ON queue(state, kind, next_at);
        CREATE TABLE seen (
            provider TEXT NOT NULL,
            message_id TEXT NOT NULL,
            at TEXT NOT NULL,
            replies TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (provider, message_id)
        );
        CREATE TABLE tracking (
            pec_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            subject TEXT,
            ref_msgid TEXT,
            kind TEXT NOT NULL,
            accepted REAL NOT NULL,
            taken REAL,
            delivered REAL,
            warned REAL,
            closed REAL,
            outcome TEXT,
            PRIMARY KEY (pec_id, recipient)
        );
        CREATE INDEX tracking_open ON tracking(closed, accepted);
        """,
    ),
    (
        "0002_ready_index",
        # leasing walks ready items in due order without sorting, however deep the queue
        """
        CREATE INDEX queue_ready ON queue(kind, next_at, id)
            WHERE state IN ('incoming', 'deferred');
        """,
    ),
    (
        "0003_inline_bodies",
        # a small message's bytes live in its row (queue.INLINE_MAX); spool is then ''
        """
        ALTER TABLE queue ADD COLUMN body BLOB;
        """,
    ),
    (
        "0004_index_copy",
        # the index authority's directory (signed LDIF or LDAP read): one copy in force, replaced
        # whole (pecd.trust.index.store_copy); raw keeps the signed file as received
        """
        CREATE TABLE index_copy (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            source TEXT NOT NULL,
            kind TEXT NOT NULL,
            raw BLOB NOT NULL,
            sha256 TEXT NOT NULL,
            signer TEXT NOT NULL,
            signed_at TEXT,
            fetched TEXT NOT NULL,
            entries INTEGER NOT NULL
        );
        CREATE TABLE index_entries (
            dn TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            unit TEXT NOT NULL,
            mail_receipt TEXT NOT NULL,
            domains TEXT NOT NULL,
            cert_hashes TEXT NOT NULL,
            certs TEXT NOT NULL,
            ldif_url TEXT NOT NULL
        );
        """,
    ),
    (
        "0005_revocation_cache",
        # pecd.store.revocation_store: CRLs / OCSP responses in force, and since when a peer
        # signer's revocation status has been unknown (the grace of [reception] revocation)
        """
        CREATE TABLE revocation_cache (
            key TEXT PRIMARY KEY,
            der BLOB NOT NULL,
            this_update REAL NOT NULL,
            next_update REAL NOT NULL,
            fetched REAL NOT NULL
        );
        CREATE TABLE revocation_unknown (
            fingerprint TEXT PRIMARY KEY,
            since REAL NOT NULL
        );
        """,
    ),
    (
        "0006_seen_per_recipient",
        # an envelope's arrival is remembered per (PEC id, recipient), not per recipient set:
        # a replay that groups recipients differently must not be taken in charge again
        # (reception.recipient_key); older keys "<id> <r1>,<r2>" become one row per recipient,
        # the stored replies kept on the first
        """
        INSERT OR IGNORE INTO seen (provider, message_id, at, replies)
        WITH RECURSIVE split(provider, pec_id, rest, at, replies, first) AS (
            SELECT provider, substr(message_id, 1, instr(message_id, ' ') - 1),
                   substr(message_id, instr(message_id, ' ') + 1) || ',', at, replies, 1
            FROM seen WHERE instr(message_id, ' ') > 0 AND instr(message_id, ',') > 0
            UNION ALL
            SELECT provider, pec_id, substr(rest, instr(rest, ',') + 1), at, replies, 0
            FROM split WHERE rest <> ''
        )
        SELECT provider, pec_id || ' ' || substr(rest, 1, instr(rest, ',') - 1), at,
               CASE WHEN first THEN replies ELSE '[]' END
        FROM split WHERE instr(rest, ',') > 1;
        DELETE FROM seen WHERE instr(message_id, ' ') > 0 AND instr(message_id, ',') > 0
        """,
    ),
    (
        "0007_recipient_side",
        # pecd.points.reading: at the recipient's provider one row per certified delivery whose sender
        # asked for reading evidence; at the sender's, the read / not-read times in tracking;
        # the per-user default and the peers' card flag; the user's arrival-notice address,
        # quota and last quota warning (see pecd.store.readings)
        """
        CREATE TABLE reading (
            pec_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            subject TEXT,
            ref_msgid TEXT,
            mailbox TEXT NOT NULL,
            file TEXT NOT NULL,
            delivered REAL NOT NULL,
            deadline REAL NOT NULL,
            read REAL,
            read_via TEXT,
            read_receipt TEXT,
            not_read REAL,
            not_read_receipt TEXT,
            problem TEXT,
            PRIMARY KEY (pec_id, recipient)
        );
        CREATE UNIQUE INDEX reading_file ON reading(file);
        CREATE INDEX reading_due ON reading(deadline) WHERE read IS NULL AND not_read IS NULL;
        ALTER TABLE tracking ADD COLUMN read REAL;
        ALTER TABLE tracking ADD COLUMN not_read REAL;
        ALTER TABLE users ADD COLUMN read_evidence INTEGER;
        ALTER TABLE users ADD COLUMN notify TEXT;
        ALTER TABLE users ADD COLUMN postal_address TEXT;
        ALTER TABLE users ADD COLUMN quota INTEGER;
        ALTER TABLE users ADD COLUMN quota_warned INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE providers ADD COLUMN read_evidence INTEGER NOT NULL DEFAULT 0
        """,
    ),
    (
        "0008_http_api",
        # API tokens (only a SHA-256 of the secret is kept), one row per API submission (its
        # Idempotency-Key and the answer given, so a retry gets the same one), and "my messages"
        """
        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            mailbox TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            secret_sha256 TEXT NOT NULL,
            created TEXT NOT NULL,
            revoked TEXT
        );
        CREATE INDEX api_tokens_mailbox ON api_tokens(mailbox);
        CREATE TABLE api_submissions (
            request_id TEXT PRIMARY KEY,
            mailbox TEXT NOT NULL,
            idem_key TEXT,
            request_sha256 TEXT NOT NULL,
            queue_id INTEGER NOT NULL,
            ledger_seq INTEGER NOT NULL,
            created REAL NOT NULL,
            status INTEGER,
            response TEXT,
            UNIQUE (mailbox, idem_key)
        );
        CREATE INDEX tracking_sender ON tracking(sender COLLATE NOCASE, accepted, pec_id);
        """,
    ),
    (
        "0009_http_webhooks",
        # per-mailbox webhook subscriptions (the secret signs, so it is kept), the ledger position
        # already turned into deliveries, and the durable outbox of deliveries
        """
        CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            mailbox TEXT NOT NULL,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            created TEXT NOT NULL,
            removed TEXT
        );
        CREATE INDEX webhooks_mailbox ON webhooks(mailbox);
        CREATE TABLE webhook_cursor (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            seq INTEGER NOT NULL
        );
        CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            hook_id TEXT NOT NULL,
            msgid TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            last_error TEXT
        );
        CREATE INDEX webhook_outbox_due ON webhook_outbox(state, hook_id, msgid, id);
        """,
    ),
    (
        "0010_http_operators",
        # mailbox accounts that may open the operator page (`pecd user add --operator`)
        """
        CREATE TABLE operators (
            address TEXT PRIMARY KEY,
            created TEXT NOT NULL
        );
        """,
    ),
    (
        "0011_read_deadline_per_user",
        # the recipient's own not-read period in seconds (`pecd user set --read-deadline`);
        # NULL: [consultation] deadline, the provider's
        """
        ALTER TABLE users ADD COLUMN read_deadline REAL
        """,
    ),
    (
        "0012_http_mailbox",
        # the recipient's side of the HTTP API: one row per certified message stored in a
        # local Maildir (its file named, so a download never takes a path from the request)
        """
        CREATE TABLE inbox (
            pec_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            subject TEXT,
            delivered REAL NOT NULL,
            mailbox TEXT NOT NULL,
            file TEXT NOT NULL,
            PRIMARY KEY (pec_id, recipient)
        );
        CREATE INDEX inbox_recipient ON inbox(recipient, delivered, pec_id);
        """,
    ),


    (
        "0013_body_chunks",
        # PostgreSQL keeps a big message's bytes (over queue.INLINE_MAX) in the database, where
        # every node reads them, in 1 MiB chunks streamed on read (pecd.store.chunks); ``name``
        # is the item's ``spool`` value. SQLite keeps using spool files: the table stays empty.
        """
        CREATE TABLE body_chunks (
            name TEXT NOT NULL,
            n INTEGER NOT NULL,
            data BLOB NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (name, n)
        );
        """,
    ),
    (
        "0014_queue_lease_owner",
        # several processes on one database: who holds a lease (pecd.store.nodes names them), so
        # a starting process takes back only a dead one's, and a worker whose lease was taken
        # over commits nothing
        """
        ALTER TABLE queue ADD COLUMN lease_owner TEXT
        """,
    ),
    (
        "0015_throttle_shared",
        # failed logins of every node, so the AUTH limits count across nodes (pecd.store.throttle_store)
        """
        CREATE TABLE auth_failures (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX auth_failures_key ON auth_failures(scope, key, at);
        CREATE INDEX auth_failures_at ON auth_failures(at);
        """,
    ),
]

# added after the mechanical mapping on PostgreSQL: SQLite's implicit ``rowid``, which some
# queries order by, as an identity column of the same name
PG_EXTRA: dict[str, str] = {
    "0001_core": "ALTER TABLE tracking ADD COLUMN rowid BIGINT GENERATED BY DEFAULT AS IDENTITY;",
    "0007_recipient_side":
        ";ALTER TABLE reading ADD COLUMN rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE;",
}

# PostgreSQL's text of a migration where SQLite's cannot serve after the mechanical type
# mapping of ``pg_text`` (INTEGER → BIGINT, REAL → DOUBLE PRECISION, BLOB → BYTEA,
# AUTOINCREMENT → identity).
PG_MIGRATIONS: dict[str, str] = {
    # a PostgreSQL database is born after this data conversion: nothing to convert
    "0006_seen_per_recipient": "",
    # no COLLATE NOCASE: the index is on lower(sender), which the queries compare
    "0008_http_api": """
        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY,
            mailbox TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            secret_sha256 TEXT NOT NULL,
            created TEXT NOT NULL,
            revoked TEXT
        );
        CREATE INDEX api_tokens_mailbox ON api_tokens(mailbox);
        CREATE TABLE api_submissions (
            request_id TEXT PRIMARY KEY,
            mailbox TEXT NOT NULL,
            idem_key TEXT,
            request_sha256 TEXT NOT NULL,
            queue_id BIGINT NOT NULL,
            ledger_seq BIGINT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            status BIGINT,
            response TEXT,
            UNIQUE (mailbox, idem_key)
        );
        CREATE INDEX tracking_sender ON tracking(lower(sender), accepted, pec_id);
        """,
}

_PG_TYPES: tuple[tuple[str, str], ...] = (
    (r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (r"\bINTEGER\b", "BIGINT"),
    (r"\bREAL\b", "DOUBLE PRECISION"),
    (r"\bBLOB\b", "BYTEA"),
)


def pg_text(name: str, sql: str) -> str:
    """The PostgreSQL text of migration ``name``: its own if it has one, else SQLite's with the
    column types mapped."""
    if name in PG_MIGRATIONS:
        return PG_MIGRATIONS[name]
    for pattern, replacement in _PG_TYPES:
        sql = re.sub(pattern, replacement, sql)
    return sql + PG_EXTRA.get(name, "")


class SqliteConflict(Conflict, sqlite3.IntegrityError):
    """SQLite's integrity error as the store's :class:`Conflict` (still a ``sqlite3`` one)."""


class SqliteUnavailable(Unavailable, sqlite3.OperationalError):
    """SQLite busy past its timeout, or its disk failing, as the store's :class:`Unavailable`."""


# OperationalErrors that say "the database cannot serve now", not "this SQL is wrong"
_SQLITE_AWAY = ("database is locked", "disk i/o error", "unable to open database",
                "database or disk is full")


class SqliteConnection(sqlite3.Connection):
    """``sqlite3.Connection`` whose errors are the store's: :class:`pecd.store.Conflict` for
    integrity, :class:`pecd.store.Unavailable` for a locked or failing database (both still
    ``sqlite3`` errors too)."""

    dialect = "sqlite"

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.IntegrityError as exc:
            raise SqliteConflict(*exc.args) from exc
        except sqlite3.OperationalError as exc:
            if str(exc).lower().startswith(_SQLITE_AWAY):
                raise SqliteUnavailable(*exc.args) from exc
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.IntegrityError as exc:
            raise SqliteConflict(*exc.args) from exc
        except sqlite3.OperationalError as exc:
            if str(exc).lower().startswith(_SQLITE_AWAY):
                raise SqliteUnavailable(*exc.args) from exc
            raise


def connect(where: Where) -> Connection:
    """A connection with pecd's durability settings; the caller owns transactions.

    ``where``: a SQLite file, or a ``postgresql://`` URL (psycopg imported only then)."""
    if is_postgres(where):
        from pecd.store import pg

        return pg.connect(str(where))
    conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False, timeout=30.0,
                           factory=SqliteConnection)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


# every process that may migrate takes this lock first (several nodes starting at once)
_MIGRATE_LOCK = 0x7065636D  # "pecm"


def migrate(conn: Connection) -> None:
    """Apply named migrations once each; idempotent."""
    postgres = dialect(conn) == "postgresql"
    if postgres:
        with ledger.transaction(conn):
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT)")
            done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
            for name, sql in MIGRATIONS:
                if name not in done:
                    text = pg_text(name, sql)
                    if text.strip():
                        conn.script(text)  # type: ignore[attr-defined]
                    conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, _now()))
            ledger.install(conn)
        return
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT)")
    done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        with ledger.transaction(conn):
            # another process starting beside this one may have applied it meanwhile
            if conn.execute("SELECT 1 FROM migrations WHERE name=?", (name,)).fetchone():
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, _now()))
    ledger.install(conn)


def ping(conn: Connection) -> None:
    """A round trip to the database (readiness checks)."""
    conn.execute("SELECT 1").fetchone()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def open_database(where: Where) -> Connection:
    """Connect and bring the schema up to date (a missing SQLite file is created, owner-only)."""
    if is_postgres(where):
        conn = connect(where)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn
    path = Path(where)
    durable.private_dir(path.parent)
    # password hashes and the ledger: owner only (SQLite gives -wal/-shm the file's own mode)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    conn = connect(path)
    migrate(conn)
    return conn


_Job = tuple[Callable[[Connection], Any], "Future[Any]", bool]  # (fn, result, durable)


class Database:
    """The single writer: ``await db.transact(fn)`` runs ``fn(conn)`` inside a committed transaction.

    On PostgreSQL a lost connection fails the batch in flight with :class:`Unavailable` (none
    of it committed, or, if the connection died during COMMIT itself, possibly all of it: the
    caller answered 4xx and the client's retry is then a duplicate the dedup keys catch) and
    the next batch connects again: the process needs no restart."""

    def __init__(self, where: Where) -> None:
        self.path = where
        self.where = where
        self.postgres = is_postgres(where)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._conn: Connection | None = open_database(where)
        self._thread = threading.Thread(target=self._run, name="pecd-db-writer", daemon=True)
        self._thread.start()

    async def transact(self, fn: Callable[[Connection], T], *, durable: bool = True) -> T:
        """``durable=False``: a change that a crash of the machine (not of the process) may undo
        without harm, such as a lease, which recovery returns anyway. Its commit skips the fsync
        when no durable change shares the batch; the next durable commit syncs it with its own."""
        fut: Future[T] = Future()
        self._jobs.put((fn, fut, durable))
        return await asyncio.wrap_future(fut)

    def transact_sync(self, fn: Callable[[Connection], T]) -> T:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut, True))
        return fut.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < 256:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            if self.postgres:
                self._commit_batch_pg(batch)
            else:
                assert self._conn is not None
                self._commit_batch(self._conn, batch)
            if stop:
                return

    def _pg_connection(self) -> Connection:
        """The writer's connection, made again if the last one was lost."""
        if self._conn is not None and not getattr(self._conn, "broken", False):
            return self._conn
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        self._conn = connect(self.where)  # raises Unavailable while the server is away
        return self._conn

    def _commit_batch_pg(self, batch: list[_Job]) -> None:
        try:
            conn = self._pg_connection()
        except Unavailable as exc:
            for _fn, fut, _durable in batch:
                _resolve(fut, False, exc)
            return
        results: list[tuple[Future[Any], bool, Any]] = []
        lazy = not any(durable for _fn, _fut, durable in batch)
        try:
            conn.execute("BEGIN")
            if lazy:  # the WAL record is written, its flush not awaited (see ``transact``)
                conn.execute("SET LOCAL synchronous_commit TO OFF")
            for fn, fut, _durable in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(conn)
                except BaseException as exc:  # handed to the caller, not swallowed
                    if getattr(conn, "broken", False):
                        raise
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((fut, False, exc))
                else:
                    conn.execute("RELEASE job")
                    results.append((fut, True, value))
            conn.execute("COMMIT")
        except BaseException as exc:
            if getattr(conn, "broken", False) and not isinstance(exc, Unavailable):
                exc = Unavailable(f"PostgreSQL connection lost: {exc}")
            with contextlib.suppress(Exception):
                if conn.in_transaction and not getattr(conn, "broken", False):
                    conn.execute("ROLLBACK")
            for _fn, fut, _durable in batch:
                _resolve(fut, False, exc)
            return
        for fut, ok, value in results:
            _resolve(fut, ok, value)

    @staticmethod
    def _commit_batch(conn: Connection, batch: list[_Job]) -> None:
        results: list[tuple[Future[Any], bool, Any]] = []
        lazy = not any(durable for _fn, _fut, durable in batch)
        if lazy:  # WAL: the commit is written to the log, unsynced (see ``transact``)
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut, _durable in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = fn(conn)
                except BaseException as exc:  # handed to the caller, not swallowed
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((fut, False, exc))
                else:
                    conn.execute("RELEASE job")
                    results.append((fut, True, value))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _fn, fut, _durable in batch:
                _resolve(fut, False, exc)
            return
        finally:
            if lazy:
                conn.execute("PRAGMA synchronous=FULL")
        for fut, ok, value in results:
            _resolve(fut, ok, value)


def _resolve(fut: Future[Any], ok: bool, value: Any) -> None:
    """Hand the outcome over unless the caller stopped waiting (its task was cancelled): the
    work is done and committed either way, and the writer thread must never die of it."""
    if fut.done():
        return
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except InvalidStateError:  # cancelled between the check and the set
        pass
