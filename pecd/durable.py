"""The one way pecd writes a file that must survive a crash: write a temporary file (0600),
fsync it, rename it into place, fsync the directory. Used by the spool, Maildir delivery and
the quarantine, so the rule lives in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

from pecd.blob import Blob, as_blob


def write_synced(path: Path, data: bytes | Blob, exclusive: bool = True) -> None:
    """Write ``data`` to a new file and fsync it (the caller renames it into place)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        for piece in as_blob(data):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """Make renames and links in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, data: bytes | Blob, final: Path) -> None:
    """``data`` appears at ``final`` whole or not at all, and stays there after a crash."""
    write_synced(tmp, data, exclusive=False)
    os.rename(tmp, final)
    sync_dir(final.parent)
