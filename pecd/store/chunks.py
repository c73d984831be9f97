"""Big message bodies in PostgreSQL, where every node reads them: the file spool's job
(:class:`pecd.store.spool.Spool`) done with rows of ``body_chunks`` (1 MiB each).

The same contract as spool files: a body is written and committed (durably) before any queue
row names it, under a fresh name; a queue row whose transaction did not commit leaves chunks no
row names, which :meth:`ChunkSpool.orphans` finds once they are old enough that no other node
can still be about to commit a row for them. Chunks are written and read through a connection
of their own (not the writer's), one chunk per statement, so a 25 MB body is never held twice
over plus its encoding: what the reader builds is the body, and one chunk in flight.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pecd.format.blob import Blob
from pecd.store import Unavailable, pg

CHUNK = 1024 * 1024
# chunks no queue row names are removed only when older than this: another node may be between
# writing its chunks and committing the row that names them
ORPHAN_AGE = 3600.0


def _pieces(data: bytes | Blob) -> Iterator[memoryview]:
    """``data`` cut into CHUNK-sized views (copied only where a chunk spans two pieces)."""
    pending = bytearray()
    for piece in (data if isinstance(data, Blob) else (data,)):
        view = memoryview(piece).cast("B")
        while len(view):
            if not pending and len(view) >= CHUNK:
                yield view[:CHUNK]
                view = view[CHUNK:]
                continue
            take = CHUNK - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) == CHUNK:
                yield memoryview(bytes(pending))
                pending.clear()
    if pending:
        yield memoryview(bytes(pending))


def _fetch(conn: pg.PgConnection, name: str, n: int) -> bytes | None:
    """One chunk, received in binary (no hex text twice its size on the way)."""
    with pg.errors():
        row = conn.raw.execute("SELECT data FROM body_chunks WHERE name = %s AND n = %s",
                               (name, n), binary=True).fetchone()
    return None if row is None else bytes(row[0])


class ChunkSpool:
    """:class:`pecd.store.spool.Bodies` on PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._conn: pg.PgConnection | None = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[pg.PgConnection]:
        with self._lock:
            if self._conn is None or getattr(self._conn, "broken", False):
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                self._conn = None
                self._conn = pg.connect(self.url)
            conn = self._conn
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    if conn.in_transaction and not getattr(conn, "broken", False):
                        conn.execute("ROLLBACK")
                raise

    def write_many(self, blobs: Iterable[bytes | Blob]) -> list[str]:
        names = []
        now = time.time()
        with self._connection() as conn:
            conn.execute("BEGIN")
            for data in blobs:
                name = "pg-" + uuid.uuid4().hex
                for n, chunk in enumerate(_pieces(data)):
                    with pg.errors():  # the bytes travel as they are (binary), not as hex text
                        conn.raw.execute("INSERT INTO body_chunks (name, n, data, created)"
                                         " VALUES (%s, %s, %b, %s)", (name, n, chunk, now))
                names.append(name)
            conn.execute("COMMIT")
        return names

    def link(self, name: str) -> str:
        """A copy under a new name, so each queue item owns (and removes) its own chunks."""
        new = "pg-" + uuid.uuid4().hex
        with self._connection() as conn:
            conn.execute("INSERT INTO body_chunks (name, n, data, created)"
                         " SELECT ?, n, data, ? FROM body_chunks WHERE name = ?",
                         (new, time.time(), name))
        return new

    def sync_dir(self) -> None:
        """Nothing to do: each write commits durably."""

    def size(self, name: str) -> int:
        """The body's length in bytes; FileNotFoundError if there is no such body."""
        with self._connection() as conn, pg.errors():
            row = conn.raw.execute("SELECT count(*), sum(length(data))::bigint FROM body_chunks"
                                   " WHERE name = %s", (name,)).fetchone()
        if row is None or int(row[0]) == 0:
            raise FileNotFoundError(f"no body chunks named {name}")
        return int(row[1])

    def read(self, name: str) -> bytes:
        """The whole body: one buffer of its exact size, filled chunk by chunk, handed over
        without a copy (BytesIO gives its own buffer away when nothing else holds it)."""
        with self._connection() as conn:
            with pg.errors():
                row = conn.raw.execute("SELECT count(*), sum(length(data))::bigint FROM body_chunks"
                                       " WHERE name = %s", (name,)).fetchone()
            total, size = (int(row[0]), int(row[1] or 0)) if row else (0, 0)
            if total == 0:
                raise FileNotFoundError(f"no body chunks named {name}")
            out = io.BytesIO()
            out.seek(size - 1)
            out.write(b"\0")
            out.seek(0)
            for n in range(total):
                data = _fetch(conn, name, n)
                if data is None:
                    raise Unavailable(f"body {name}: chunk {n} missing")
                out.write(data)
                del data
        if out.tell() != size:
            raise Unavailable(f"body {name}: chunks changed while read")
        return out.getvalue()

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(_ChunkReader(self, name), CHUNK)

    def exists(self, name: str) -> bool:
        with self._connection() as conn:
            return conn.execute("SELECT 1 FROM body_chunks WHERE name = ? AND n = 0",
                                (name,)).fetchone() is not None

    def chunk(self, name: str, n: int) -> bytes | None:
        with self._connection() as conn:
            return _fetch(conn, name, n)

    def remove(self, names: Iterable[str]) -> None:
        todo = [n for n in names if n]
        if not todo:
            return
        with self._connection() as conn:
            conn.executemany("DELETE FROM body_chunks WHERE name = ?", [(n,) for n in todo])

    def orphans(self, referenced: set[str], older_than: float | None = None) -> list[str]:
        """Always only old ones (every node writes here), whatever ``older_than`` says."""
        with self._connection() as conn:
            rows = conn.execute("SELECT name FROM body_chunks WHERE n = 0 AND created < ?",
                                (time.time() - ORPHAN_AGE,)).fetchall()
        return [r[0] for r in rows if r[0] not in referenced]

    def clear_tmp(self, older_than: float | None = None) -> int:
        return 0


class _ChunkReader(io.RawIOBase):
    """A body read chunk by chunk (one query each), for streaming; seekable, since every chunk
    but the last is CHUNK bytes long."""

    def __init__(self, spool: ChunkSpool, name: str) -> None:
        self._spool = spool
        self._name = name
        self._pos = 0  # offset in the body
        self._n = -1  # the chunk in _buf
        self._buf = b""
        self._size = spool.size(name)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._size + offset
        if self._pos < 0:
            raise ValueError("negative seek position")
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n, at = divmod(self._pos, CHUNK)
        if n != self._n:
            self._buf, self._n = self._spool.chunk(self._name, n) or b"", n
        size = max(0, min(len(b), len(self._buf) - at))
        b[:size] = self._buf[at:at + size]
        self._pos += size
        return size
