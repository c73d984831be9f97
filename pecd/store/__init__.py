"""Storage: the only modules that hold SQL (queue, ledger, accounts, reading, API and revocation
state) and durable file writes.

Two backends share one schema history and one connection interface: SQLite (a file in the data
directory, the default) and PostgreSQL (``[database] url``, through :mod:`pecd.store.pg`, which
offers the subset of the ``sqlite3`` API the store modules use). Code outside this package sees
only :class:`Connection` and the typed errors below, never a driver's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

# Where the provider's database lives: a SQLite file, or a ``postgresql://`` URL.
Where = Path | str


class StoreError(Exception):
    """Base of the storage layer's own errors."""


class Conflict(StoreError):
    """A write broke a uniqueness or integrity rule (the row exists, the ledger refused it)."""


class Unavailable(StoreError):
    """The database cannot be reached or lost the connection mid-transaction: nothing of the
    transaction committed, and trying again later is right (SMTP answers 4xx)."""


class Cursor(Protocol):
    """What the store modules use of a cursor (``sqlite3.Cursor`` and ``pg.Cursor`` both fit)."""

    @property
    def rowcount(self) -> int: ...
    @property
    def lastrowid(self) -> int | None: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the store modules use of a connection: the ``sqlite3`` API subset both backends
    offer. Rows answer by index and by column name."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...
    def cursor(self) -> Any: ...
    def close(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None, /) -> Literal[False]: ...


def is_postgres(where: Where) -> bool:
    """Whether ``where`` names a PostgreSQL database (a ``postgresql://`` or ``postgres://`` URL)."""
    return isinstance(where, str) and where.split(":", 1)[0].lower() in ("postgresql", "postgres")


def dialect(conn: Connection) -> Literal["sqlite", "postgresql"]:
    """Which SQL the connection speaks, for the few statements that differ."""
    return "postgresql" if getattr(conn, "dialect", "sqlite") == "postgresql" else "sqlite"
