"""Failed logins shared by every node, so the AUTH limits of :mod:`pecd.throttle` count across
processes and machines on one database: table ``auth_failures``, one row per failure and count
(scope ``source``, ``address`` or ``account``, with its key), kept for one window.

:class:`SharedAuthThrottle` keeps the pure in-memory throttle as the judge: before each check it
loads the three counts the attempt touches from the database (every node's failures), and each
failure is written for the others. What stays per process: the spacing of a slowed account's
checks and the addresses an account logged in from before (so with N nodes a slowed account
gets at most N times the guesses of one; the per-source and per-address refusals and the durable
account lock, in ``users``, are cluster-wide). Touches only ``auth_failures``; trusts nothing in
the keys (an attacker picks them; they are bound parameters, and rows expire with the window).
"""

from __future__ import annotations

from collections.abc import Sequence

from pecd.store import Connection
from pecd.store.db import Database
from pecd.throttle import AuthThrottle, Scope, Verdict

Keys = Sequence[tuple[Scope, str]]


def recent(conn: Connection, keys: Keys, since: float) -> dict[tuple[str, str], list[float]]:
    """The failure times after ``since`` of each (scope, key)."""
    out: dict[tuple[str, str], list[float]] = {}
    for scope, key in keys:
        out[(scope, key)] = [float(r[0]) for r in conn.execute(
            "SELECT at FROM auth_failures WHERE scope=? AND key=? AND at > ? ORDER BY at",
            (scope, key, since))]
    return out


def record(conn: Connection, keys: Keys, at: float, expired_before: float) -> None:
    """One failure for each (scope, key); rows older than the window go at the same time."""
    conn.execute("DELETE FROM auth_failures WHERE at <= ?", (expired_before,))
    for scope, key in keys:
        conn.execute("INSERT INTO auth_failures (scope, key, at) VALUES (?, ?, ?)",
                     (scope, key, at))


def clear(conn: Connection, scope: Scope, key: str) -> None:
    conn.execute("DELETE FROM auth_failures WHERE scope=? AND key=?", (scope, key))


class SharedAuthThrottle:
    """:class:`~pecd.throttle.AuthThrottle` with its counts shared through the database."""

    def __init__(self, local: AuthThrottle, db: Database) -> None:
        self.local = local
        self.db = db

    async def check(self, account: str, address: str) -> Verdict:
        keys = self.local.keys(account, address)
        since = self.local.now() - self.local.window
        # a lost count (the machine crashed before the lazy fsync) costs an attacker's guess
        # or two, not a message: no fsync of its own
        hits = await self.db.transact(lambda conn: recent(conn, keys, since), durable=False)
        self.local.adopt(hits)
        return self.local.check(account, address)

    async def failure(self, account: str, address: str) -> None:
        self.local.failure(account, address)
        keys = self.local.keys(account, address)
        now = self.local.now()
        await self.db.transact(lambda conn: record(conn, keys, now, now - self.local.window),
                               durable=False)

    async def success(self, account: str, address: str) -> None:
        """Clears the pair's count (for every node), never the address's nor the account's."""
        scope, pair = self.local.keys(account, address)[0]
        had = self.local.sources.count(pair, self.local.now()) > 0
        self.local.success(account, address)
        if had:  # most logins had no failure before: no write for them
            await self.db.transact(lambda conn: clear(conn, scope, pair), durable=False)
