"""Mailbox accounts of this provider: who may submit, and as whom.

Passwords are stored as argon2id hashes (the hash string carries its parameters). Checking a
password costs ~0.1 s of CPU on purpose, so callers on the event loop run :func:`check` in a
thread. An unknown user costs the same as a wrong password, so timing does not reveal accounts.

When the operator chose a durable lock (``lock_after_failures`` > 0; off by default, because
anyone who knows an address could then lock its owner out), consecutive failed logins are
counted in ``users.failures``; at the threshold the account is locked: it answers every
password, the right one too, like a wrong one (so guessing on cannot tell when it hit), until
the operator runs ``pecd user enable`` or ``pecd user passwd``, which reset the count. Without
it, guessing is kept slow by :mod:`pecd.throttle` alone. :class:`Authenticator` does all of
this off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pecd.store import Conflict, Connection
from pecd.store.db import Database

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("pecd-dummy-password")


class UserError(Exception):
    """A user command that cannot be carried out (unknown user, bad address, ...)."""


def normalise(address: str) -> str:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address):
        raise UserError(f"not a mail address: {address!r}")
    return f"{local}@{domain.lower()}"


def add(conn: Connection, address: str, password: str) -> None:
    address = normalise(address)
    if not password:
        raise UserError("empty password")
    try:
        conn.execute(
            "INSERT INTO users (address, password_hash, created) VALUES (?, ?, ?)",
            (address, _hasher.hash(password), datetime.now(UTC).isoformat()),
        )
    except Conflict:
        raise UserError(f"user {address} exists") from None


def set_password(conn: Connection, address: str, password: str) -> None:
    if not password:
        raise UserError("empty password")
    _require(conn.execute(
        "UPDATE users SET password_hash=?, failures=0 WHERE address=?",
        (_hasher.hash(password), normalise(address)),
    ), address)


def set_disabled(conn: Connection, address: str, disabled: bool) -> None:
    _require(conn.execute(
        "UPDATE users SET disabled=?, failures=0 WHERE address=?",
        (int(disabled), normalise(address)),
    ), address)


def _require(cur: Any, address: str) -> None:
    if cur.rowcount == 0:
        raise UserError(f"no such user: {address}")


def listing(conn: Connection) -> list[tuple[str, bool]]:
    rows = conn.execute("SELECT address, disabled FROM users ORDER BY address").fetchall()
    return [(r[0], bool(r[1])) for r in rows]


def exists(conn: Connection, address: str) -> bool:
    """A mailbox that can receive (exists and is not disabled)."""
    try:
        address = normalise(address)
    except UserError:
        return False
    row = conn.execute("SELECT disabled FROM users WHERE address=?", (address,)).fetchone()
    return row is not None and not row[0]


def mailbox_state(conn: Connection, address: str) -> Literal["active", "disabled", "unknown"]:
    """Whether ``address`` is an account here, and whether it may receive."""
    try:
        address = normalise(address)
    except UserError:
        return "unknown"
    row = conn.execute("SELECT disabled FROM users WHERE address=?", (address,)).fetchone()
    if row is None:
        return "unknown"
    return "disabled" if row[0] else "active"


def password_hash(conn: Connection, address: str) -> str | None:
    """The stored hash of an enabled account; None for unknown or disabled ones."""
    try:
        address = normalise(address)
    except UserError:
        return None
    row = conn.execute(
        "SELECT password_hash, disabled FROM users WHERE address=?", (address,)
    ).fetchone()
    if row is None or row[1]:
        return None
    return str(row[0])


def check(stored_hash: str | None, password: str) -> bool:
    """Constant work whether or not the account exists. Blocking: call from a thread."""
    try:
        return _hasher.verify(stored_hash or _DUMMY, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def credentials(conn: Connection, address: str) -> tuple[str | None, int]:
    """The stored hash of an enabled account (None for unknown or disabled ones) and its count
    of consecutive failed logins."""
    try:
        address = normalise(address)
    except UserError:
        return None, 0
    row = conn.execute(
        "SELECT password_hash, disabled, failures FROM users WHERE address=?", (address,)
    ).fetchone()
    if row is None or row[1]:
        return None, 0
    return str(row[0]), int(row[2])


def record_failure(conn: Connection, address: str) -> int:
    """One more consecutive failure; the new count (0 for an address that is no account)."""
    try:
        address = normalise(address)
    except UserError:
        return 0
    conn.execute("UPDATE users SET failures = failures + 1 WHERE address=?", (address,))
    row = conn.execute("SELECT failures FROM users WHERE address=?", (address,)).fetchone()
    return 0 if row is None else int(row[0])


def record_success(conn: Connection, address: str) -> None:
    conn.execute("UPDATE users SET failures=0 WHERE address=? AND failures != 0",
                 (normalise(address),))


def locked(conn: Connection, address: str, lock_after: int) -> bool:
    _, failures = credentials(conn, address)
    return failures >= lock_after


@dataclass(frozen=True)
class Login:
    """The outcome of one login attempt. ``locked``: the account is locked (now or already);
    ``just_locked``: this attempt locked it; ``failures``: consecutive failures so far."""

    ok: bool
    locked: bool = False
    just_locked: bool = False
    failures: int = 0


class Authenticator:
    """Password checks for the SMTP listeners: the hash in a worker thread, the counts in the
    database's writer thread, the event loop never blocked."""

    def __init__(self, db: Database, cpu: Executor, lock_after: int) -> None:
        """``lock_after``: consecutive failures that lock the account; 0: never lock."""
        if lock_after < 0:
            raise ValueError("lock_after must be >= 0")
        self.db = db
        self.cpu = cpu
        self.lock_after = lock_after

    async def login(self, user: str, password: str) -> Login:
        stored, failures = await self.db.transact(lambda conn: credentials(conn, user))
        # with no durable lock, a count left from when there was one locks nothing
        was_locked = (bool(self.lock_after) and stored is not None
                      and failures >= self.lock_after)
        loop = asyncio.get_running_loop()
        # a locked account costs the same dummy hash as an unknown one, and never says yes
        ok = await loop.run_in_executor(self.cpu, check, None if was_locked else stored, password)
        if ok:
            if failures:
                await self.db.transact(lambda conn: record_success(conn, user))
            return Login(True)
        if not self.lock_after:
            return Login(False)
        # counted for unknown names too (a no-op UPDATE), so both cost the same transaction
        count = await self.db.transact(lambda conn: record_failure(conn, user))
        if stored is None:
            return Login(False)
        return Login(False, locked=count >= self.lock_after,
                     just_locked=count == self.lock_after, failures=count)
