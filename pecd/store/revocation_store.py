"""Storage for revocation material: the CRLs and OCSP responses in force, and since when a
signer's revocation status has been unknown. SQL for :mod:`pecd.trust.revocation` lives here only.

Receives: material already checked by :mod:`pecd.trust.revocation` (parsed, signed by the issuer,
nextUpdate ahead). Trusts: the database file.
"""

from __future__ import annotations

from dataclasses import dataclass

from pecd.store import Connection


@dataclass(frozen=True)
class Copy:
    """One CRL or OCSP response in force; ``key`` names its source (see pecd.trust.revocation)."""

    key: str
    der: bytes
    this_update: float
    next_update: float
    fetched: float


def load_copies(conn: Connection) -> list[Copy]:
    rows = conn.execute("SELECT key, der, this_update, next_update, fetched"
                        " FROM revocation_cache").fetchall()
    return [Copy(str(r[0]), bytes(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows]


def store_copy(conn: Connection, copy: Copy) -> None:
    """Replace the copy in force for that source (the caller checked it is newer)."""
    conn.execute("INSERT INTO revocation_cache (key, der, this_update, next_update, fetched)"
                 " VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET der=excluded.der,"
                 " this_update=excluded.this_update, next_update=excluded.next_update,"
                 " fetched=excluded.fetched",
                 (copy.key, copy.der, copy.this_update, copy.next_update, copy.fetched))


def load_unknown(conn: Connection) -> dict[str, float]:
    """Certificate fingerprint → since when its status has been unknown."""
    return {str(r[0]): float(r[1])
            for r in conn.execute("SELECT fingerprint, since FROM revocation_unknown")}


def unknown_since(conn: Connection, fingerprint: str, now: float) -> float:
    """When the certificate's status was first found unknown (``now`` if it is now)."""
    conn.execute("INSERT INTO revocation_unknown (fingerprint, since) VALUES (?, ?)"
                 " ON CONFLICT DO NOTHING",
                 (fingerprint, now))
    row = conn.execute("SELECT since FROM revocation_unknown WHERE fingerprint=?",
                       (fingerprint,)).fetchone()
    return float(row[0])


def status_known(conn: Connection, fingerprint: str) -> None:
    """The status is known again: a later outage starts its own grace period."""
    conn.execute("DELETE FROM revocation_unknown WHERE fingerprint=?", (fingerprint,))
