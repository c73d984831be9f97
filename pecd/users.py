"""Mailbox accounts of this provider: who may submit, and as whom.

Passwords are stored as argon2id hashes (the hash string carries its parameters). Checking a
password costs ~0.1 s of CPU on purpose, so callers on the event loop run :func:`check` in a
thread. An unknown user costs the same as a wrong password, so timing does not reveal accounts.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

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


def add(conn: sqlite3.Connection, address: str, password: str) -> None:
    address = normalise(address)
    if not password:
        raise UserError("empty password")
    try:
        conn.execute(
            "INSERT INTO users (address, password_hash, created) VALUES (?, ?, ?)",
            (address, _hasher.hash(password), datetime.now(UTC).isoformat()),
        )
    except sqlite3.IntegrityError:
        raise UserError(f"user {address} exists") from None


def set_password(conn: sqlite3.Connection, address: str, password: str) -> None:
    if not password:
        raise UserError("empty password")
    _require(conn.execute(
        "UPDATE users SET password_hash=?, failures=0 WHERE address=?",
        (_hasher.hash(password), normalise(address)),
    ), address)


def set_disabled(conn: sqlite3.Connection, address: str, disabled: bool) -> None:
    _require(conn.execute(
        "UPDATE users SET disabled=?, failures=0 WHERE address=?",
        (int(disabled), normalise(address)),
    ), address)


def _require(cur: sqlite3.Cursor, address: str) -> None:
    if cur.rowcount == 0:
        raise UserError(f"no such user: {address}")


def listing(conn: sqlite3.Connection) -> list[tuple[str, bool]]:
    rows = conn.execute("SELECT address, disabled FROM users ORDER BY address").fetchall()
    return [(r[0], bool(r[1])) for r in rows]


def exists(conn: sqlite3.Connection, address: str) -> bool:
    """A mailbox that can receive (exists and is not disabled)."""
    try:
        address = normalise(address)
    except UserError:
        return False
    row = conn.execute("SELECT disabled FROM users WHERE address=?", (address,)).fetchone()
    return row is not None and not row[0]


def password_hash(conn: sqlite3.Connection, address: str) -> str | None:
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
