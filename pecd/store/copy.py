"""``pecd db copy``: a SQLite provider's whole state into an empty PostgreSQL database.

Receives the SQLite file (and its spool directory) and a ``postgresql://`` URL. Trusts neither
ledger: both are verified before and after. Touches the SQLite side only to read it. Every table
is copied row for row in one PostgreSQL transaction (nothing half-copied ever shows); the queue
keeps its ids (they name Maildir files) and the sequences continue past SQLite's; bodies that
live in spool files become chunks of ``body_chunks`` under the same names. Afterwards pointing
``[database] url`` at the copy is all it takes to serve from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pecd.store import Connection, StoreError, ledger
from pecd.store import db as db_mod

# parents before children (provider_domains → providers), the chain before what points into it
_FIRST = ("providers", "ledger", "ledger_checkpoint", "ledger_anchor", "ledger_related")
_SKIP = ("migrations", "sqlite_sequence", "sqlite_stat1", "body_chunks")
# identity columns whose sequence must continue past the copied rows
_SEQUENCES = (("queue", "id"), ("webhook_outbox", "id"), ("tracking", "rowid"),
              ("reading", "rowid"))
_ROWID_TABLES = ("tracking", "reading")  # SQLite's implicit rowid is a column on PostgreSQL
_BATCH = 500
_CHUNK = 1024 * 1024

Verifier = Callable[[bytes, bytes], None]


class CopyRefused(StoreError):
    """The copy cannot start or did not verify (a non-empty target, a broken ledger)."""


@dataclass
class CopyReport:
    rows: dict[str, int] = field(default_factory=dict)
    spool_bodies: int = 0
    missing_bodies: list[str] = field(default_factory=list)
    ledger_rows: int = 0
    checkpoints: int = 0


def _verify(conn: Connection, side: str, when: str, token_verifier: Verifier | None) -> int:
    report = ledger.verify(conn, token_verifier=token_verifier)
    if not report.ok:
        raise CopyRefused(f"{side} ledger BROKEN {when} the copy (row {report.first_bad_seq},"
                          f" checkpoint {report.bad_checkpoint}): {report.reason}")
    return report.rows


def _tables(src: Connection) -> list[str]:
    names = [r[0] for r in src.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    names = [n for n in names if n not in _SKIP]
    return [n for n in _FIRST if n in names] + [n for n in names if n not in _FIRST]


def _columns(conn: Connection, table: str, postgres: bool) -> list[str]:
    if postgres:
        return [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
            " AND table_schema = current_schema() ORDER BY ordinal_position", (table,))]
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _target_rows(dst: Connection) -> dict[str, int]:
    tables = [r[0] for r in dst.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        " AND table_type = 'BASE TABLE' AND table_name <> 'migrations'")]
    counts = {t: int(dst.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}
    return {t: n for t, n in counts.items() if n}


def copy(sqlite_file: Path, spool_root: Path, url: str,
         token_verifier: Verifier | None = None) -> CopyReport:
    """Copy everything; raises :class:`CopyRefused` (nothing written) if it cannot."""
    report = CopyReport()
    src = db_mod.open_database(sqlite_file)
    try:
        before = _verify(src, "SQLite", "before", token_verifier)
        dst = db_mod.open_database(url)
        try:
            busy = _target_rows(dst)
            if busy:
                raise CopyRefused("the target database is not empty ("
                                  + ", ".join(f"{t}: {n} rows" for t, n in sorted(busy.items()))
                                  + "): refusing to copy over it")
            _verify(dst, "PostgreSQL", "before", token_verifier)
            with ledger.transaction(dst):
                dst.execute("SELECT set_config('pecd.ledger_copy', 'on', true)")
                for table in _tables(src):
                    report.rows[table] = _copy_table(src, dst, table)
                _bodies(src, dst, spool_root, report)
                _continue_sequences(src, dst)
                dst.execute("SELECT set_config('pecd.ledger_copy', 'off', true)")
            report.ledger_rows = _verify(dst, "PostgreSQL", "after", token_verifier)
            after = _verify(src, "SQLite", "after", token_verifier)
            if report.ledger_rows != before or after < before:
                raise CopyRefused(f"ledger rows differ: SQLite {before}, PostgreSQL"
                                  f" {report.ledger_rows}")
            report.checkpoints = int(dst.execute(
                "SELECT count(*) FROM ledger_checkpoint").fetchone()[0])
        finally:
            dst.close()
    finally:
        src.close()
    return report


def _copy_table(src: Connection, dst: Connection, table: str) -> int:
    ours = _columns(dst, table, postgres=True)
    if not ours:
        raise CopyRefused(f"table {table} has no counterpart in the PostgreSQL schema")
    theirs = _columns(src, table, postgres=False)
    if table in _ROWID_TABLES:
        theirs = ["rowid", *theirs]
    columns = [c for c in theirs if c in ours]
    order = {"ledger": "seq", "ledger_related": "seq, msgid", "ledger_checkpoint": "id",
             "ledger_anchor": "seq"}.get(table, "rowid")
    select = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"
    insert = (f"INSERT INTO {table} ({', '.join(columns)})"
              f" VALUES ({', '.join('?' * len(columns))})")
    cur = src.cursor()
    cur.execute(select)
    count = 0
    while True:
        rows = cur.fetchmany(_BATCH)
        if not rows:
            return count
        dst.executemany(insert, [tuple(row) for row in rows])
        count += len(rows)


def _bodies(src: Connection, dst: Connection, spool_root: Path, report: CopyReport) -> None:
    """Spool files of queued items → chunks under the same names (streamed, 1 MiB at a time)."""
    for (name,) in src.execute("SELECT DISTINCT spool FROM queue WHERE body IS NULL"
                               " AND spool <> ''").fetchall():
        path = spool_root / "q" / name
        if not path.exists():  # recovery marks its item corrupt, as it would have here
            report.missing_bodies.append(name)
            continue
        with path.open("rb") as f:
            n = 0
            while True:
                data = f.read(_CHUNK)
                if not data and n:
                    break
                dst.execute("INSERT INTO body_chunks (name, n, data, created)"
                            " VALUES (?, ?, ?, extract(epoch FROM now()))", (name, n, data))
                n += 1
                if len(data) < _CHUNK:
                    break
        report.spool_bodies += 1


def _continue_sequences(src: Connection, dst: Connection) -> None:
    """Identity sequences start past every copied id (and past SQLite's own AUTOINCREMENT
    high-water mark: a queue id is never reused, even for a row since deleted)."""
    high = {str(r[0]): int(r[1]) for r in src.execute("SELECT name, seq FROM sqlite_sequence")}
    for table, column in _SEQUENCES:
        top = dst.execute(f"SELECT coalesce(max({column}), 0) FROM {table}").fetchone()[0]
        last = max(int(top), high.get(table, 0))
        if last > 0:
            dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), ?)",
                        (last,))
