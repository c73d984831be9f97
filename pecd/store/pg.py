"""PostgreSQL behind the ``sqlite3`` API the store modules use (psycopg 3, synchronous).

Receives SQL written for SQLite's ``qmark`` style (``?`` and ``?NNN``) and rewrites only the
placeholders (``%s`` / ``%(pNNN)s``; a literal ``%`` doubled), ``BEGIN IMMEDIATE`` (plain
``BEGIN``: PostgreSQL locks rows, not the file) and an INSERT into a table with an identity
``id`` (``RETURNING id``, so ``lastrowid`` works). Everything else must already be SQL both
engines speak, or the caller branches on :func:`pecd.store.dialect`. Rows answer by index and
by column name, as ``Any`` does. Driver errors become :class:`pecd.store.Conflict`
(integrity, a refused ledger write) and :class:`pecd.store.Unavailable` (connection lost,
server gone, serialisation failure); nothing else of psycopg leaves this module.

Parameters are bound client-side (``ClientCursor``): a value goes into the text as a literal
whose type the server infers from where it stands, as SQLite's loose typing expects (``? IS
NULL`` with a None, an int compared with a float column).

The connection runs in autocommit mode and the caller opens transactions itself with
``BEGIN``, exactly as with ``sqlite3.connect(isolation_level=None)``.

Imported only when a ``postgresql://`` URL is configured: a SQLite provider never needs psycopg.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.adapt import Dumper, Loader

from pecd.store import Conflict, Unavailable

# tables whose rows get an identity ``id`` that callers read back as ``lastrowid``
_IDENTITY_TABLES = ("queue", "webhook_outbox")
_INSERT_IDENTITY = re.compile(
    r"\s*INSERT\s+INTO\s+(?:" + "|".join(_IDENTITY_TABLES) + r")\b(?![\s\S]*\bRETURNING\b)",
    re.IGNORECASE,
)


class Row(tuple[Any, ...]):
    """A result row addressable by position and by column name (``row["id"]``, ``dict(row)``)."""

    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        row = Row(values)
        row._names = names
        return row

    return make


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str, bool, bool]:
    """``(sql for psycopg, numbered placeholders?, returning id?)`` for a qmark-style text."""
    if re.fullmatch(r"\s*BEGIN\s+IMMEDIATE\s*", sql, re.IGNORECASE):
        return "BEGIN", False, False
    out: list[str] = []
    numbered = False
    i, n = 0, len(sql)
    quote: str | None = None
    while i < n:
        ch = sql[i]
        if quote is not None:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "?":
            j = i + 1
            while j < n and sql[j].isdigit():
                j += 1
            if j > i + 1:
                numbered = True
                out.append(f"%(p{sql[i + 1:j]})s")
                i = j
                continue
            out.append("%s")
        else:
            out.append(ch)
        i += 1
    text = "".join(out)
    returning = bool(_INSERT_IDENTITY.match(text))
    if returning:
        text = text.rstrip().rstrip(";") + " RETURNING id"
    return text, numbered, returning


def _args(params: Any, numbered: bool) -> Any:
    if params is None:
        return ()
    if numbered and not isinstance(params, dict):
        return {f"p{i}": v for i, v in enumerate(params, start=1)}
    return params


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Driver errors as the store's typed ones."""
    try:
        yield
    except (psycopg.errors.IntegrityError, psycopg.errors.RaiseException) as exc:
        raise Conflict(_one_line(exc)) from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise Unavailable(f"PostgreSQL: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """libpq's message folded onto one line (it adds hints on lines of their own)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Cursor:
    """One statement's results (the ``sqlite3.Cursor`` subset the store modules use)."""

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn
        self._cur = psycopg.ClientCursor(conn.raw, row_factory=_row_factory)
        self.lastrowid: int | None = None
        self.row_factory: Any = None  # rows are tuples already; kept for ledger._cursor

    def execute(self, sql: str, parameters: Any = None) -> Cursor:
        text, numbered, returning = translate(sql)
        with errors():
            if parameters is None or (not numbered and len(parameters) == 0):
                self._cur.execute(text.replace("%%", "%"))  # no params: no placeholder parsing
            else:
                self._cur.execute(text, _args(parameters, numbered))
            if returning:
                row = self._cur.fetchone()
                self.lastrowid = None if row is None else int(row[0])
        return self

    def executemany(self, sql: str, seq: Any) -> Cursor:
        text, numbered, returning = translate(sql)
        if returning:
            text = text[: -len(" RETURNING id")]
        with errors():
            self._cur.executemany(text, [_args(p, numbered) for p in seq])
        return self

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    @property
    def description(self) -> Any:
        return self._cur.description

    def fetchone(self) -> Any:
        if self._cur.description is None:
            return None
        with errors():
            return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        if self._cur.description is None:
            return []
        with errors():
            return list(self._cur.fetchall())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    def close(self) -> None:
        self._cur.close()


class _BoolAsInt(Dumper):
    """SQLite stores booleans as 0/1 in INTEGER columns; the schema keeps that on PostgreSQL."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


class _NumericLoader(Loader):
    """``sum()`` and ``avg()`` answer ``numeric``: give the int or float SQLite would."""

    def load(self, data: Any) -> Any:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


def _adapt(raw: psycopg.Connection[Any]) -> None:
    raw.adapters.register_dumper(bool, _BoolAsInt)
    raw.adapters.register_loader("numeric", _NumericLoader)


class PgConnection:
    """A PostgreSQL connection speaking the ``Connection`` subset (see the module doc)."""

    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        with errors():
            self.raw: psycopg.Connection[Any] = psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
        _adapt(self.raw)
        self.url = url

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status in (
            pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR, pq.TransactionStatus.ACTIVE)

    @property
    def broken(self) -> bool:
        """The server or the network dropped us: only a new connection helps."""
        return bool(self.raw.broken or self.raw.closed)

    def execute(self, sql: str, parameters: Any = None, /) -> Cursor:
        return Cursor(self).execute(sql, parameters)

    def executemany(self, sql: str, seq: Any, /) -> Cursor:
        return Cursor(self).executemany(sql, seq)

    def script(self, sql: str) -> None:
        """Run DDL as written (several statements, PL/pgSQL bodies): no placeholder rewriting."""
        with errors():
            self.raw.execute(sql.encode())

    def cursor(self) -> Cursor:
        return Cursor(self)

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction and not self.broken:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None, /) -> Literal[False]:
        # as sqlite3: commit an open transaction on success, roll it back on error
        if t is None:
            self.commit()
        else:
            with contextlib.suppress(Unavailable):
                self.rollback()
        return False


def connect(url: str, connect_timeout: float = 10.0) -> PgConnection:
    return PgConnection(url, connect_timeout)
