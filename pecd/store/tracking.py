"""The sender side's view of each certified transaction: one ``tracking`` row per (PEC id,
recipient), opened by the access point, filled in by the receipts that come back (reception)
and closed by the 12 h / 24 h timers (timeouts). The stages decide; these functions hold the SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pecd.store import Connection

Column = Literal["delivered", "taken", "closed", "warned"]
Due = Literal["warning", "final", "close-esterno"]

# which column each timer action sets, and the state its rows must still be in
_STILL_DUE: dict[Due, tuple[Column, str]] = {
    "warning": ("warned", "closed IS NULL AND warned IS NULL AND taken IS NULL"
                          " AND delivered IS NULL"),
    "final": ("closed", "closed IS NULL AND delivered IS NULL"),
    "close-esterno": ("closed", "closed IS NULL"),
}


def open_rows(conn: Connection, pec_id: str, sender: str, subject: str | None,
              ref_msgid: str | None, recipients: Sequence[tuple[str, str]],
              accepted: float) -> None:
    """One row per (recipient, kind) of an accepted message; a retried step adds nothing."""
    conn.executemany(
        "INSERT INTO tracking (pec_id, recipient, sender, subject, ref_msgid,"
        " kind, accepted) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [(pec_id, addr, sender, subject, ref_msgid, kind, accepted) for addr, kind in recipients],
    )


def note(conn: Connection, column: Column, pec_id: str, recipients: Sequence[str], at: float,
         outcome: str | None = None) -> None:
    """A receipt came back: the first time of each kind (and the first outcome) is kept."""
    assert column in ("delivered", "taken", "closed")
    for rcpt in recipients:
        conn.execute(
            f"UPDATE tracking SET {column}=coalesce({column}, ?),"
            " outcome=coalesce(outcome, ?) WHERE pec_id=? AND lower(recipient)=lower(?)",
            (at, outcome, pec_id, rcpt),
        )


def mark_due(conn: Connection, action: Due, pec_id: str, recipient: str, at: float,
             outcome: str | None) -> bool:
    """Record a timer's notice for one row; False when the row is no longer due for it."""
    column, condition = _STILL_DUE[action]
    cur = conn.execute(
        f"UPDATE tracking SET {column}=?, outcome=coalesce(?, outcome)"
        f" WHERE pec_id=? AND recipient=? AND {condition}",
        (at, outcome, pec_id, recipient),
    )
    return cur.rowcount == 1


def open_transactions(conn: Connection, accepted_before: float) -> list[Any]:
    """Every row of each transaction that has an open, undelivered row accepted by then."""
    return conn.execute(
        "SELECT * FROM tracking WHERE pec_id IN (SELECT pec_id FROM tracking"
        " WHERE closed IS NULL AND delivered IS NULL AND accepted <= ?) ORDER BY rowid",
        (accepted_before,),
    ).fetchall()
