"""The one way pecd writes a file that must survive a crash: write a temporary file (0600),
fsync it, rename it into place, fsync the directory. Used by the spool, Maildir delivery and
the quarantine, so the rule lives in one place.

Also the one way pecd makes a directory or a file only its owner may read (mail, ledger,
exports): :func:`private_dir` and :func:`write_private` set the mode explicitly, so a loose
umask (022 is the common default) never opens them to other local users.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pecd.format.blob import Blob, as_blob


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


PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """``path`` and any missing parents made owner-only (0700) whatever the umask; directories
    that already exist are left as the operator made them. Returns ``path``."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:  # made concurrently: fine, but not ours to chmod
            continue
        os.chmod(directory, PRIVATE_DIR)  # the umask can only have removed bits; be exact
    if not path.is_dir():
        raise NotADirectoryError(str(path))
    return path


def write_private(path: Path, data: bytes | Blob) -> None:
    """``data`` at ``path``, owner-only (0600) whatever the umask, whole or not at all: it is
    written under a fresh temporary name (created 0600, so it is never readable by others,
    even for a moment) and renamed over ``path``."""
    publish(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"), data, path)
