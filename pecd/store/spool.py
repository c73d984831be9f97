"""Message bytes on disk, durable before anyone is told they are.

A spool file counts only once it is written, fsynced, renamed into ``q/`` and the directory
fsynced; only then may a queue row point at it. Files in ``q/`` that no row names were never
acknowledged (their transaction did not commit) and recovery removes them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Protocol

from pecd.format.blob import Blob
from pecd.store import durable


class Bodies(Protocol):
    """Where the queue keeps bytes too big for a row: files here (:class:`Spool`), or chunks in
    PostgreSQL (:class:`pecd.store.chunks.ChunkSpool`) where every node reads them."""

    def write_many(self, blobs: Iterable[bytes | Blob]) -> list[str]: ...
    def link(self, name: str) -> str: ...
    def sync_dir(self) -> None: ...
    def read(self, name: str) -> bytes: ...
    def open(self, name: str) -> BinaryIO: ...
    def exists(self, name: str) -> bool: ...
    def remove(self, names: Iterable[str]) -> None: ...
    def orphans(self, referenced: set[str], older_than: float | None = None) -> list[str]: ...
    def clear_tmp(self, older_than: float | None = None) -> int: ...


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.q = root / "q"
        durable.private_dir(self.tmp)
        durable.private_dir(self.q)

    def path(self, name: str) -> Path:
        return self.q / name

    def write(self, data: bytes | Blob) -> str:
        """Durably store ``data``; returns its spool name."""
        return self.write_many([data])[0]

    def write_many(self, blobs: Iterable[bytes | Blob]) -> list[str]:
        names = []
        for data in blobs:
            name = uuid.uuid4().hex
            tmp = self.tmp / name
            durable.write_synced(tmp, data)
            os.rename(tmp, self.q / name)
            names.append(name)
        if names:
            self.sync_dir()
        return names

    def link(self, name: str) -> str:
        """A second name for the same bytes, so each queue item owns (and removes) its own file."""
        new = uuid.uuid4().hex
        os.link(self.q / name, self.q / new)
        return new

    def adopt(self, tmp_path: Path) -> str:
        """Move a file written (and fsynced) by a streaming writer into the queue directory."""
        name = uuid.uuid4().hex
        os.rename(tmp_path, self.q / name)
        self.sync_dir()
        return name

    def sync_dir(self) -> None:
        durable.sync_dir(self.q)

    def read(self, name: str) -> bytes:
        return (self.q / name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return (self.q / name).open("rb")

    def exists(self, name: str) -> bool:
        return (self.q / name).exists()

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.q / name)

    def orphans(self, referenced: set[str], older_than: float | None = None) -> list[str]:
        """Files no row names; with ``older_than`` (POSIX time), only those last written before
        it (another process may be writing a younger one that it has not committed yet)."""
        return [p.name for p in self.q.iterdir()
                if p.name not in referenced and _older(p, older_than)]

    def clear_tmp(self, older_than: float | None = None) -> int:
        count = 0
        for p in self.tmp.iterdir():
            if _older(p, older_than):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                count += 1
        return count


def _older(path: Path, than: float | None) -> bool:
    if than is None:
        return True
    try:
        return path.stat().st_mtime < than
    except FileNotFoundError:
        return False


def open_bodies(where: Path | str, root: Path) -> Bodies:
    """Big bodies beside the database: spool files for SQLite, chunks in PostgreSQL."""
    if isinstance(where, str) and where.split(":", 1)[0].lower() in ("postgresql", "postgres"):
        from pecd.store.chunks import ChunkSpool

        return ChunkSpool(where)
    return Spool(root)
