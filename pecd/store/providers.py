"""The provider index's rows: cards the operator imported (``providers``, ``provider_domains``)
and the index authority's copy in force (``index_copy``, ``index_entries``).

Receives values already judged by :mod:`pecd.trust.index` (which owns what a card or a copy
means and whether to take it); holds only the SQL, in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pecd.store import Connection


def replace_card(conn: Connection, fingerprint: str, name: str, host: str, port: int,
                 service_address: str, cert_pem: str, domains: Sequence[str],
                 imported: str) -> None:
    """Insert or replace the card of this certificate, with its domains."""
    conn.execute("DELETE FROM providers WHERE fingerprint=?", (fingerprint,))
    conn.execute(
        "INSERT INTO providers (fingerprint, name, host, port, service_address, cert_pem, imported)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (fingerprint, name, host, port, service_address, cert_pem, imported),
    )
    conn.executemany("INSERT INTO provider_domains (domain, fingerprint) VALUES (?, ?)",
                     [(d, fingerprint) for d in domains])


def remove_card(conn: Connection, fingerprint: str) -> int:
    """Rows removed (its domains go with it: ON DELETE CASCADE)."""
    return conn.execute("DELETE FROM providers WHERE fingerprint=?", (fingerprint,)).rowcount


def cards(conn: Connection) -> tuple[list[Any], dict[str, list[str]]]:
    """The cards' rows (by name, then import time) and each fingerprint's domains."""
    domains: dict[str, list[str]] = {}
    for d, fp in conn.execute("SELECT domain, fingerprint FROM provider_domains ORDER BY domain"):
        domains.setdefault(fp, []).append(d)
    rows = conn.execute("SELECT * FROM providers ORDER BY name, imported").fetchall()
    return rows, domains


def replace_copy(conn: Connection, copy_row: tuple[Any, ...],
                 entries: Sequence[tuple[Any, ...]]) -> None:
    """The index copy in force, replaced whole: ``copy_row`` is (source, kind, raw, sha256,
    signer, signed_at, fetched, entries); each entry (dn, name, unit, mail_receipt, domains,
    cert_hashes, certs, ldif_url), the lists as JSON text."""
    conn.execute("DELETE FROM index_entries")
    conn.execute("DELETE FROM index_copy")
    conn.execute(
        "INSERT INTO index_copy (id, source, kind, raw, sha256, signer, signed_at, fetched, entries)"
        " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)", copy_row)
    conn.executemany(
        "INSERT INTO index_entries (dn, name, unit, mail_receipt, domains, cert_hashes, certs,"
        " ldif_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entries)


def copy_row(conn: Connection) -> Any:
    """The copy in force's description (no raw bytes), or None."""
    return conn.execute(
        "SELECT source, kind, sha256, signer, signed_at, fetched, entries FROM index_copy WHERE id=1"
    ).fetchone()


def copy_signed_at(conn: Connection) -> str | None:
    row = conn.execute("SELECT signed_at FROM index_copy WHERE id=1").fetchone()
    return None if row is None or row[0] is None else str(row[0])


def copy_raw(conn: Connection) -> bytes | None:
    row = conn.execute("SELECT raw FROM index_copy WHERE id=1").fetchone()
    return None if row is None else bytes(row[0])


def copy_entries(conn: Connection) -> list[Any]:
    return conn.execute("SELECT * FROM index_entries ORDER BY name, dn").fetchall()


def version(conn: Connection) -> tuple[int, str, str]:
    """Changes whenever a card or the index copy changes."""
    row = conn.execute("SELECT count(*), coalesce(max(imported), '') FROM providers").fetchone()
    copy = conn.execute("SELECT coalesce(max(fetched || sha256), '') FROM index_copy").fetchone()
    return int(row[0]), str(row[1]), str(copy[0])
