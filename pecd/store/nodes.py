"""Which pecd processes on this machine are alive, so that one starting process takes back the
queue leases of a dead one at once, and never those of a live one.

Several processes may serve one provider (``pecd serve --workers N``, or several nodes on one
database). Each holds, for its whole life, an exclusive ``flock`` on ``run/<id>.lock`` in the
data directory; the kernel drops it when the process dies, however it dies (SIGKILL included).
A lock file nobody holds names a dead process. Lease owners are ``<hostname>/<id>``: a process
judges only owners of its own host (another machine's leases come back when they expire, see
:meth:`pecd.store.queue.Queue.lease`). ``run/spool.lock`` is held shared by every live process:
a starting process that gets it exclusively is alone, and only then may it remove spool files
that no queue row names (another process may be writing one that is not committed yet).

Touches only files under ``run/``; trusts the kernel's locks and nothing in the file names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import uuid
from pathlib import Path

from pecd.store import durable


def new_owner() -> str:
    """A lease owner name for one process's life: this host, and a fresh id."""
    return f"{socket.gethostname()}/{uuid.uuid4().hex[:16]}"


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Node:
    """This process's registration under ``run_dir``; :meth:`close` (or death) ends it."""

    def __init__(self, run_dir: Path, owner: str) -> None:
        durable.private_dir(run_dir)
        self.run_dir = run_dir
        self.owner = owner
        self.host, _, self.id = owner.partition("/")
        self._spool_fd = os.open(run_dir / "spool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        # alone on this data directory (no other live process) until :meth:`started`
        self.alone = _try_lock(self._spool_fd, fcntl.LOCK_EX)
        if not self.alone:
            fcntl.flock(self._spool_fd, fcntl.LOCK_SH)
        self._fd = os.open(run_dir / f"{self.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def started(self) -> None:
        """Recovery is over: from now on other processes may start beside this one."""
        if self.alone:
            fcntl.flock(self._spool_fd, fcntl.LOCK_SH)
            self.alone = False

    def dead(self, owner: str | None) -> bool:
        """Whether ``owner`` is a process of this host that no longer runs (a lease without an
        owner, from before owners were recorded, counts as dead too)."""
        if not owner:
            return True
        host, _, ident = owner.partition("/")
        if host != self.host or ident == self.id:
            return False
        if not ident or "/" in ident or ident.startswith("."):
            return True
        path = self.run_dir / f"{ident}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True  # ended cleanly, or never registered (a tool, a test)
        try:
            return _try_lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)  # closing drops the probe's lock, if it got one

    def sweep(self) -> int:
        """Remove the lock files of dead processes; how many went."""
        removed = 0
        for path in self.run_dir.glob("*.lock"):
            ident = path.stem
            if path.name == "spool.lock" or ident == self.id:
                continue
            if self.dead(f"{self.host}/{ident}"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed += 1
        return removed

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / f"{self.id}.lock").unlink()
        os.close(self._fd)
        os.close(self._spool_fd)
