"""Storage of reading evidence (see :mod:`pecd.points.reading`): every SQL statement the feature needs.

At the recipient's provider, table ``reading``: one row per certified delivery whose sender asked
for evidence, naming the Maildir file; ``read`` / ``not_read`` are set once, in the same
transaction that queues the evidence message, so it is issued exactly once. At the sender's
provider, columns ``read`` / ``not_read`` of ``tracking``, set when the evidence comes back.
Also the recipient's own settings on ``users``: the reading-evidence default
(``read_evidence``, NULL: the provider's), the arrival-notice address (``notify``), the quota
(``quota`` bytes, NULL: the provider's), the last quota warning sent (``quota_warned``),
the postal address the print fallback uses (``postal_address``) and the not-read period
(``read_deadline`` seconds, NULL: ``[consultation] deadline``). And table ``inbox``: the
certified messages stored in each local Maildir, which the HTTP API lists and serves.

Touches only those tables and columns; callers run these inside ``Database.transact``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pecd.store import Connection, users

Event = Literal["read", "not_read"]


class Stale(Exception):
    """The row was already evidenced (another pass or a restart got there first)."""


@dataclass(frozen=True)
class Reading:
    """One ``reading`` row; times are POSIX seconds."""

    rowid: int
    pec_id: str
    recipient: str
    sender: str
    subject: str | None
    ref_msgid: str | None
    mailbox: str
    file: str
    delivered: float
    deadline: float
    read: float | None = None
    read_via: str | None = None
    not_read: float | None = None
    problem: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Reading:
        return cls(rowid=row["rowid"], pec_id=row["pec_id"], recipient=row["recipient"],
                   sender=row["sender"], subject=row["subject"], ref_msgid=row["ref_msgid"],
                   mailbox=row["mailbox"], file=row["file"], delivered=row["delivered"],
                   deadline=row["deadline"], read=row["read"], read_via=row["read_via"],
                   not_read=row["not_read"], problem=row["problem"])


_COLUMNS = "rowid, *"


def record(conn: Connection, *, pec_id: str, recipient: str, sender: str,
           subject: str | None, ref_msgid: str | None, mailbox: str, file: str,
           delivered: float, deadline: float) -> None:
    """A delivery to watch; a retried delivery of the same message changes nothing."""
    conn.execute(
        "INSERT INTO reading (pec_id, recipient, sender, subject, ref_msgid, mailbox,"
        " file, delivered, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (pec_id, recipient, sender, subject, ref_msgid, mailbox, file, delivered, deadline))


def unread_since(conn: Connection, rowid: int) -> list[Reading]:
    """Rows not yet read, added after ``rowid`` (0: all of them, as at start)."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM reading WHERE rowid > ? AND read IS NULL"
                        " ORDER BY rowid", (rowid,)).fetchall()
    return [Reading.from_row(r) for r in rows]


def by_file(conn: Connection, file: str) -> Reading | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM reading WHERE file = ?", (file,)).fetchone()
    return None if row is None else Reading.from_row(row)


def due_not_read(conn: Connection, now: float) -> list[Reading]:
    """Rows past their deadline with neither read nor not-read evidence yet."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM reading WHERE read IS NULL AND not_read IS NULL"
                        " AND deadline <= ? ORDER BY deadline", (now,)).fetchall()
    return [Reading.from_row(r) for r in rows]


def of_recipient(conn: Connection, pec_id: str, recipient: str) -> Reading | None:
    """The row of one message and recipient (the recipient's case as delivered, or any)."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM reading WHERE pec_id = ?"
                       " AND lower(recipient) = lower(?)", (pec_id, recipient)).fetchone()
    return None if row is None else Reading.from_row(row)


def for_message(conn: Connection, pec_id: str) -> list[Reading]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM reading WHERE pec_id = ? ORDER BY rowid",
                        (pec_id,)).fetchall()
    return [Reading.from_row(r) for r in rows]


def marker(pec_id: str, recipient: str, event: Event, at: float, receipt_id: str,
           via: str | None = None) -> _Marker:
    """The update that makes ``event`` happen once: raises :class:`Stale` (undoing the whole
    commit, evidence message included) when the row already has it."""
    return _Marker(pec_id, recipient, event, at, receipt_id, via)


@dataclass(frozen=True)
class _Marker:
    pec_id: str
    recipient: str
    event: Event
    at: float
    receipt_id: str
    via: str | None

    def __call__(self, conn: Connection) -> None:
        if self.event == "read":
            cur = conn.execute(
                "UPDATE reading SET read=?, read_via=?, read_receipt=?"
                " WHERE pec_id=? AND recipient=? AND read IS NULL",
                (self.at, self.via, self.receipt_id, self.pec_id, self.recipient))
        else:
            cur = conn.execute(
                "UPDATE reading SET not_read=?, not_read_receipt=?"
                " WHERE pec_id=? AND recipient=? AND read IS NULL AND not_read IS NULL",
                (self.at, self.receipt_id, self.pec_id, self.recipient))
        if cur.rowcount != 1:
            raise Stale(f"{self.pec_id} {self.recipient}: {self.event} already evidenced")


def note_problem(conn: Connection, rowid: int, problem: str) -> bool:
    """Remember a watch problem; False when this same problem was already noted (so the
    ledger gets one row per problem, not one per pass)."""
    cur = conn.execute("UPDATE reading SET problem=? WHERE rowid=? AND coalesce(problem, '') != ?",
                       (problem, rowid, problem))
    return cur.rowcount == 1


# --- at the sender's provider ----------------------------------------------------------------

def track(conn: Connection, pec_id: str, recipient: str, event: Event, at: float) -> None:
    """The evidence came back: the first time of each kind is kept."""
    column = "read" if event == "read" else "not_read"
    conn.execute(f"UPDATE tracking SET {column}=coalesce({column}, ?)"
                 " WHERE pec_id=? AND lower(recipient)=lower(?)", (at, pec_id, recipient))


def tracked(conn: Connection, pec_id: str) -> list[Any]:
    """The sender-side view of one transaction, for ``pecd status``."""
    return conn.execute(
        "SELECT recipient, kind, accepted, taken, delivered, closed, outcome, read, not_read"
        " FROM tracking WHERE pec_id=? ORDER BY rowid", (pec_id,)).fetchall()


# --- per-user default -------------------------------------------------------------------------

def set_user_default(conn: Connection, address: str, wanted: bool | None) -> bool:
    """False when there is no such user."""
    cur = conn.execute("UPDATE users SET read_evidence=? WHERE address=?",
                       (None if wanted is None else int(wanted), users.normalise(address)))
    return cur.rowcount == 1


def user_default(conn: Connection, address: str) -> bool | None:
    """The user's own choice; None when unset (or no such user)."""
    row = conn.execute("SELECT read_evidence FROM users WHERE address=?",
                       (users.normalise(address),)).fetchone()
    if row is None or row[0] is None:
        return None
    return bool(row[0])


# --- the peers' card flag ---------------------------------------------------------------------

def set_provider_flag(conn: Connection, fingerprint: str, issues: bool) -> None:
    conn.execute("UPDATE providers SET read_evidence=? WHERE fingerprint=?",
                 (int(issues), fingerprint))


def provider_flags(conn: Connection) -> dict[str, bool]:
    """Fingerprint → whether that provider's card declares reading evidence."""
    return {r[0]: bool(r[1]) for r in conn.execute("SELECT fingerprint, read_evidence"
                                                    " FROM providers")}


# --- the recipient's settings -----------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    notify: str | None = None
    quota: int | None = None
    quota_warned: int = 0
    postal_address: str | None = None
    read_deadline: float | None = None  # seconds; None: [consultation] deadline


def settings(conn: Connection, address: str) -> Settings:
    """Defaults for an address that is not a user (the service mailbox, say)."""
    try:
        key = users.normalise(address)
    except users.UserError:
        return Settings()
    row = conn.execute("SELECT notify, quota, quota_warned, postal_address, read_deadline"
                       " FROM users WHERE address=?", (key,)).fetchone()
    if row is None:
        return Settings()
    return Settings(row["notify"], row["quota"], int(row["quota_warned"]), row["postal_address"],
                    row["read_deadline"])


def set_read_deadline(conn: Connection, address: str, seconds: float | None) -> bool:
    """The user's own not-read period; None returns to the provider's. False: no such user."""
    cur = conn.execute("UPDATE users SET read_deadline=? WHERE address=?",
                       (seconds, users.normalise(address)))
    return cur.rowcount == 1


def set_postal_address(conn: Connection, address: str, postal: str | None) -> bool:
    cur = conn.execute("UPDATE users SET postal_address=? WHERE address=?",
                       (postal, users.normalise(address)))
    return cur.rowcount == 1


def set_notify(conn: Connection, address: str, notify: str | None) -> bool:
    cur = conn.execute("UPDATE users SET notify=? WHERE address=?",
                       (None if notify is None else users.normalise(notify),
                        users.normalise(address)))
    return cur.rowcount == 1


def set_quota(conn: Connection, address: str, quota: int | None) -> bool:
    cur = conn.execute("UPDATE users SET quota=? WHERE address=?",
                       (quota, users.normalise(address)))
    return cur.rowcount == 1


def set_quota_warned(conn: Connection, address: str, level: int) -> None:
    conn.execute("UPDATE users SET quota_warned=? WHERE address=?",
                 (level, users.normalise(address)))


# --- the recipient's certified messages (the HTTP mailbox) ------------------------------------

@dataclass(frozen=True)
class Stored:
    """One certified message in a local Maildir, with its evidenced read (if any)."""

    pec_id: str
    recipient: str
    sender: str
    subject: str | None
    delivered: float
    mailbox: str
    file: str
    read: float | None
    read_via: str | None


def record_stored(conn: Connection, *, pec_id: str, recipient: str, sender: str,
                  subject: str | None, delivered: float, mailbox: str, file: str) -> None:
    """A certified message stored for ``recipient``; a retried delivery changes nothing."""
    conn.execute(
        "INSERT INTO inbox (pec_id, recipient, sender, subject, delivered, mailbox,"
        " file) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (pec_id, users.normalise(recipient), sender, subject, delivered, mailbox, file))


_STORED = ("SELECT i.pec_id, i.recipient, i.sender, i.subject, i.delivered, i.mailbox, i.file,"
           " r.read, r.read_via FROM inbox i LEFT JOIN reading r"
           " ON r.pec_id = i.pec_id AND lower(r.recipient) = lower(i.recipient)")


def _stored(row: Any) -> Stored:
    return Stored(row["pec_id"], row["recipient"], row["sender"], row["subject"],
                  row["delivered"], row["mailbox"], row["file"], row["read"], row["read_via"])


def stored_for(conn: Connection, recipient: str, after: tuple[float, str] | None,
               limit: int) -> list[Stored]:
    """The recipient's certified messages, oldest first, ``limit`` at most, continuing after
    the (delivered, pec_id) key ``after`` (keyset pagination)."""
    d_time, d_id = after if after is not None else (-1.0, "")
    rows = conn.execute(
        _STORED + " WHERE i.recipient = ? AND (i.delivered > ? OR (i.delivered = ? AND"
        " i.pec_id > ?)) ORDER BY i.delivered, i.pec_id LIMIT ?",
        (users.normalise(recipient), d_time, d_time, d_id, limit)).fetchall()
    return [_stored(r) for r in rows]


def stored_one(conn: Connection, pec_id: str, recipient: str) -> Stored | None:
    """One certified message of ``recipient``; None for an unknown id and for another
    mailbox's message alike."""
    row = conn.execute(_STORED + " WHERE i.pec_id = ? AND i.recipient = ?",
                       (pec_id, users.normalise(recipient))).fetchone()
    return None if row is None else _stored(row)
