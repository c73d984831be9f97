"""The PEC log (RFC 6109 §2.3): an append-only, hash-chained table in the queue's database.

Receives events from the pipeline stages inside *their* transaction (the caller owns the
connection, BEGIN IMMEDIATE and COMMIT), so that a state change and its log row commit or roll
back together. Trusts the caller for an event's content and time. When verifying it trusts
nothing in the file: the triggers stop accidents and careless tools, but whoever owns the file can
drop them, so integrity rests on the hash chain, and truncation of the tail or a rewrite of the
whole chain on checkpoints whose head hash is timestamped by a third party.

Canonical row hash (``row_hash``)::

    hash = lowercase hex of SHA-256( ASCII(prev_hash) || UTF-8(canonical JSON of the row) )

where ``prev_hash`` is the previous row's ``hash`` (``GENESIS``, 64 zeros, for seq 1) as its 64
lowercase hex characters, and the row is the JSON object of exactly the fields ``HASHED_FIELDS``:
``seq`` (integer), ``at`` (the stored text, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``), ``event``, ``msgid``,
``ref_msgid``, ``sender``, ``subject``, ``provider`` (string or null), ``recipients``, ``related``
(arrays of strings) and ``detail`` (object), written as Python's
``json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)``:
keys sorted at every level, no whitespace, non-ASCII as UTF-8. The columns ``recipients``,
``related`` and ``detail`` store the same canonical JSON text, so an exported row can be checked
by anyone with a JSON library and SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pecd.store import Connection

GENESIS: Final = "0" * 64

HASHED_FIELDS: Final = (
    "seq",
    "at",
    "event",
    "msgid",
    "ref_msgid",
    "sender",
    "recipients",
    "subject",
    "provider",
    "related",
    "detail",
)

_COLUMNS: Final = (*HASHED_FIELDS, "prev_hash", "hash")
_EVENT_NAME = re.compile(r"[a-z]+(?:-[a-z]+)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(Exception):
    """Base of this module's errors."""


class LedgerInvalid(LedgerError, ValueError):
    """An event, time or hash that cannot go into the ledger."""


class LedgerUsageError(LedgerError):
    """The caller broke the transaction contract (e.g. appended outside a transaction)."""


@dataclass(frozen=True)
class LedgerEvent:
    """One logged operation (§2.3: message id, time, sender, recipients, subject, event type,
    ids of related generated messages, sending provider); the time is given to ``append``."""

    event: str
    msgid: str | None = None
    ref_msgid: str | None = None
    sender: str | None = None
    recipients: tuple[str, ...] = ()
    subject: str | None = None
    provider: str | None = None
    related: tuple[str, ...] = ()
    detail: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not _EVENT_NAME.fullmatch(self.event):
            raise LedgerInvalid(f"event name {self.event!r} is not [a-z]+(-[a-z]+)*")
        for name in ("msgid", "ref_msgid", "sender", "subject", "provider"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LedgerInvalid(f"{name} must be str or None, not {type(value).__name__}")
        for name in ("recipients", "related"):
            values = tuple(getattr(self, name))
            if not all(isinstance(v, str) for v in values):
                raise LedgerInvalid(f"{name} must hold only str")
            object.__setattr__(self, name, values)
        if not isinstance(self.detail, Mapping):
            raise LedgerInvalid("detail must be a mapping")
        # A private copy: the caller mutating its dict later must not change what we log.
        object.__setattr__(self, "detail", dict(self.detail))


@dataclass(frozen=True)
class LedgerReport:
    """``rows``/``checkpoints``: how many verified good (all of them when ``ok``).

    ``first_bad_seq`` names the first row that is wrong or missing; ``bad_checkpoint`` the id of
    a checkpoint that does not match the chain or whose token does not verify. For a checkpoint
    fault ``first_bad_seq`` is the checkpoint's ``seq_from``: its rows can no longer be vouched
    for (a head that differs from the chain means a rewritten range or a forged checkpoint, and
    only the token tells which; a bad token over a matching head is what a full rewrite of
    chain and checkpoints looks like).
    """

    ok: bool
    rows: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str | None
    bad_checkpoint: int | None = None


# ---------------------------------------------------------------------------------------- schema

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS ledger (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        msgid TEXT,
        ref_msgid TEXT,
        sender TEXT,
        recipients TEXT NOT NULL,
        subject TEXT,
        provider TEXT,
        related TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_msgid ON ledger(msgid)",
    # a sender's refused messages, for "my messages" (pecd.store.apistore.messages_of)
    "CREATE INDEX IF NOT EXISTS ledger_refused ON ledger(sender COLLATE NOCASE) WHERE event = 'refused'",
    "CREATE INDEX IF NOT EXISTS ledger_ref_msgid ON ledger(ref_msgid)",
    """CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE refused'); END""",
    # INSERT OR REPLACE deletes the conflicting row without firing DELETE triggers (unless
    # recursive_triggers is on), so the only safe guard is on INSERT: a new row must extend the
    # head, never land on an existing seq, and chain onto the current head hash.
    f"""CREATE TRIGGER IF NOT EXISTS ledger_append_at_head BEFORE INSERT ON ledger
    WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger)
      OR NEW.prev_hash IS NOT COALESCE(
             (SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1), '{GENESIS}')
      OR typeof(NEW.hash) IS NOT 'text' OR length(NEW.hash) IS NOT 64
      OR NEW.hash GLOB '*[^0-9a-f]*'
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: a row must extend the chain head'); END""",
    # Which rows name a generated message in ``related``: derived from the ledger (not hashed),
    # kept so that ``events_for`` needs no scan of 30 months of rows.
    """CREATE TABLE IF NOT EXISTS ledger_related (
        msgid TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (msgid, seq)
    ) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS ledger_related_no_update BEFORE UPDATE ON ledger_related
    BEGIN SELECT RAISE(ABORT, 'ledger_related is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_related_no_delete BEFORE DELETE ON ledger_related
    BEGIN SELECT RAISE(ABORT, 'ledger_related is append-only: DELETE refused'); END""",
    # SQLite's JSON functions cut strings at NUL, so for an id holding one only the row is checked.
    """CREATE TRIGGER IF NOT EXISTS ledger_related_matches BEFORE INSERT ON ledger_related
    WHEN NOT EXISTS (
        SELECT 1 FROM ledger WHERE ledger.seq = NEW.seq AND ledger.related <> '[]' AND (
            instr(NEW.msgid, char(0)) > 0
            OR EXISTS (SELECT 1 FROM json_each(ledger.related) AS r WHERE r.value = NEW.msgid)))
    BEGIN SELECT RAISE(ABORT, 'ledger_related: no such related id on that row'); END""",
    """CREATE TABLE IF NOT EXISTS ledger_checkpoint (
        id INTEGER PRIMARY KEY,
        seq_from INTEGER NOT NULL,
        seq_to INTEGER NOT NULL,
        head_hash TEXT NOT NULL,
        at TEXT NOT NULL,
        token BLOB NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS ledger_checkpoint_no_update
    BEFORE UPDATE ON ledger_checkpoint
    BEGIN SELECT RAISE(ABORT, 'ledger_checkpoint is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_checkpoint_no_delete
    BEFORE DELETE ON ledger_checkpoint
    BEGIN SELECT RAISE(ABORT, 'ledger_checkpoint is append-only: DELETE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_checkpoint_extends BEFORE INSERT ON ledger_checkpoint
    WHEN NEW.id IS NOT (SELECT COALESCE(MAX(id), 0) + 1 FROM ledger_checkpoint)
      OR NEW.seq_from IS NOT COALESCE(
             (SELECT seq_to FROM ledger_checkpoint ORDER BY id DESC LIMIT 1), 0) + 1
      OR NEW.seq_to < NEW.seq_from
      OR NEW.head_hash IS NOT (SELECT hash FROM ledger WHERE seq = NEW.seq_to)
    BEGIN SELECT RAISE(ABORT,
        'ledger_checkpoint: must continue the last checkpoint and match the chain'); END""",
    # Retention: rows older than 30 months leave the live ledger through a signed export; the
    # anchor keeps the hash (and the checkpoint) the remaining chain starts from.
    """CREATE TABLE IF NOT EXISTS ledger_anchor (
        seq INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        at TEXT NOT NULL,
        export_sha256 TEXT NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS ledger_anchor_no_update BEFORE UPDATE ON ledger_anchor
    BEGIN SELECT RAISE(ABORT, 'ledger_anchor is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS ledger_anchor_no_delete BEFORE DELETE ON ledger_anchor
    BEGIN SELECT RAISE(ABORT, 'ledger_anchor is append-only: DELETE refused'); END""",
)


# PostgreSQL: the same tables and the same protection, by trigger functions. ``pecd db copy``
# alone sets ``pecd.ledger_copy`` for its transaction, to move a chain (pruned or not) row for
# row; ``verify`` judges the copy afterwards, as it judges any chain. Appends from
# several processes are serialised by a transaction-scoped advisory lock (``append_many``), so
# the head each one reads is the committed head; the trigger checks the chain regardless.
_PG_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS ledger (
    seq BIGINT PRIMARY KEY,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    msgid TEXT,
    ref_msgid TEXT,
    sender TEXT,
    recipients TEXT NOT NULL,
    subject TEXT,
    provider TEXT,
    related TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_msgid ON ledger(msgid);
CREATE INDEX IF NOT EXISTS ledger_refused ON ledger(lower(sender)) WHERE event = 'refused';
CREATE INDEX IF NOT EXISTS ledger_ref_msgid ON ledger(ref_msgid);
CREATE TABLE IF NOT EXISTS ledger_related (
    msgid TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (msgid, seq)
);
CREATE TABLE IF NOT EXISTS ledger_checkpoint (
    id BIGINT PRIMARY KEY,
    seq_from BIGINT NOT NULL,
    seq_to BIGINT NOT NULL,
    head_hash TEXT NOT NULL,
    at TEXT NOT NULL,
    token BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_anchor (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    at TEXT NOT NULL,
    export_sha256 TEXT NOT NULL
);
-- UPDATE, DELETE and TRUNCATE refused; ledger.prune alone lifts DELETE, for its transaction
CREATE OR REPLACE FUNCTION ledger_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('pecd.ledger_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
END $$;
CREATE OR REPLACE FUNCTION ledger_append_at_head() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE head_seq BIGINT; head_hash TEXT;
BEGIN
    IF current_setting('pecd.ledger_copy', true) = 'on' THEN RETURN NEW; END IF;
    SELECT seq, hash INTO head_seq, head_hash FROM ledger ORDER BY seq DESC LIMIT 1;
    IF NEW.seq IS DISTINCT FROM COALESCE(head_seq, 0) + 1
       OR NEW.prev_hash IS DISTINCT FROM COALESCE(head_hash, '{GENESIS}')
       OR NEW.hash IS NULL OR NEW.hash !~ '^[0-9a-f]{{64}}$' THEN
        RAISE EXCEPTION 'ledger is append-only: a row must extend the chain head';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION ledger_related_matches() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pecd.ledger_copy', true) = 'on' THEN RETURN NEW; END IF;
    IF NOT EXISTS (SELECT 1 FROM ledger WHERE ledger.seq = NEW.seq
                   AND jsonb_exists(ledger.related::jsonb, NEW.msgid)) THEN
        RAISE EXCEPTION 'ledger_related: no such related id on that row';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION ledger_checkpoint_extends() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE last_id BIGINT; last_to BIGINT;
BEGIN
    IF current_setting('pecd.ledger_copy', true) = 'on' THEN RETURN NEW; END IF;
    SELECT id, seq_to INTO last_id, last_to FROM ledger_checkpoint ORDER BY id DESC LIMIT 1;
    IF NEW.id IS DISTINCT FROM COALESCE(last_id, 0) + 1
       OR NEW.seq_from IS DISTINCT FROM COALESCE(last_to, 0) + 1
       OR NEW.seq_to < NEW.seq_from
       OR NEW.head_hash IS DISTINCT FROM (SELECT hash FROM ledger WHERE seq = NEW.seq_to) THEN
        RAISE EXCEPTION 'ledger_checkpoint: must continue the last checkpoint and match the chain';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER ledger_no_change BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_append_at_head BEFORE INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_at_head();
CREATE OR REPLACE TRIGGER ledger_related_no_change BEFORE UPDATE OR DELETE ON ledger_related
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_related_no_truncate BEFORE TRUNCATE ON ledger_related
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_related_matches BEFORE INSERT ON ledger_related
    FOR EACH ROW EXECUTE FUNCTION ledger_related_matches();
CREATE OR REPLACE TRIGGER ledger_checkpoint_no_change BEFORE UPDATE OR DELETE ON ledger_checkpoint
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_checkpoint_no_truncate BEFORE TRUNCATE ON ledger_checkpoint
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_checkpoint_extends BEFORE INSERT ON ledger_checkpoint
    FOR EACH ROW EXECUTE FUNCTION ledger_checkpoint_extends();
CREATE OR REPLACE TRIGGER ledger_anchor_no_change BEFORE UPDATE OR DELETE ON ledger_anchor
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse();
CREATE OR REPLACE TRIGGER ledger_anchor_no_truncate BEFORE TRUNCATE ON ledger_anchor
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();
"""
# the advisory lock key that orders appends to the chain across connections ("pecl")
APPEND_LOCK: Final = 0x7065636C


def _postgres(conn: Connection) -> bool:
    return getattr(conn, "dialect", "sqlite") == "postgresql"


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """Inside the caller's transaction if one is open (it commits or rolls back with it); else
    in a write transaction of our own, committed at the end and rolled back on any error."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def install(conn: Connection) -> None:
    """Create the tables, indexes and triggers if missing; idempotent."""
    if _postgres(conn):
        with transaction(conn):
            conn.script(_PG_SCHEMA)  # type: ignore[attr-defined]
        return
    with transaction(conn):
        for statement in _SCHEMA:
            conn.execute(statement)


# ----------------------------------------------------------------------------------------- hash


def canonical_json(value: object) -> str:
    """The one JSON text pecd hashes and stores (see the module docstring)."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise LedgerInvalid(f"not canonically JSON-serialisable: {exc}") from exc


def row_hash(prev_hash: str, row: Mapping[str, object]) -> str:
    """SHA-256 hex of ``prev_hash`` (ASCII hex) followed by the canonical JSON of the row.

    ``row`` must hold every key of ``HASHED_FIELDS`` with the stored values (``recipients`` and
    ``related`` as lists, ``detail`` as a dict); other keys, such as ``prev_hash`` and ``hash``
    of an exported row, are ignored.
    """
    if not isinstance(prev_hash, str) or not _HEX64.fullmatch(prev_hash):
        raise LedgerInvalid("prev_hash must be 64 lowercase hex digits")
    try:
        fields = {name: row[name] for name in HASHED_FIELDS}
    except KeyError as exc:
        raise LedgerInvalid(f"row lacks hashed field {exc}") from exc
    try:
        payload = canonical_json(fields).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a surrogateescape'd header
        raise LedgerInvalid(f"row holds text that is not valid Unicode: {exc}") from exc
    return hashlib.sha256(prev_hash.encode("ascii") + payload).hexdigest()


_json_str: Final[Callable[[str], str]] = json.encoder.encode_basestring
_TEXT_FIELDS: Final = ("at", "event", "msgid", "provider", "ref_msgid", "sender", "subject")


def _plain_payload(
    row: Mapping[str, object], recipients_json: str, related_json: str, detail_json: str
) -> str | None:
    """The canonical JSON ``row_hash`` hashes, written field by field from the parts already
    in canonical form: the same text as ``canonical_json`` of the whole row (keys in sorted
    order, strings as ``json.dumps(ensure_ascii=False)`` writes them; tests/test_ledger_payload.py
    holds the two to identical output) without encoding the row a second time. None when a
    field is not plainly a string or null (or ``seq`` not an int): ``row_hash`` then decides."""
    text: dict[str, str] = {}
    for name in _TEXT_FIELDS:
        value = row[name]
        if value is None:
            text[name] = "null"
        elif type(value) is str:
            text[name] = _json_str(value)
        else:
            return None
    seq = row["seq"]
    if type(seq) is not int:
        return None
    return (
        f'{{"at":{text["at"]},"detail":{detail_json},"event":{text["event"]},'
        f'"msgid":{text["msgid"]},"provider":{text["provider"]},"recipients":{recipients_json},'
        f'"ref_msgid":{text["ref_msgid"]},"related":{related_json},"sender":{text["sender"]},'
        f'"seq":{seq!r},"subject":{text["subject"]}}}'
    )


def format_at(at: datetime) -> str:
    """An aware time as the ledger stores it: UTC, microseconds, fixed width, sortable as text."""
    if not isinstance(at, datetime) or at.utcoffset() is None:
        raise LedgerInvalid("ledger times must be timezone-aware datetimes")
    u = at.astimezone(UTC)
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T"
        f"{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"
    )


# --------------------------------------------------------------------------------------- append

_INSERT: Final = (
    f"INSERT INTO ledger ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_HEAD: Final = "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1"


def append(conn: Connection, event: LedgerEvent, at: datetime) -> int:
    """Log ``event`` at ``at`` inside the caller's open transaction; returns its seq.

    Begins and commits nothing, so the row lives or dies with the caller's state change. The
    head is read afresh each time (one rowid lookup): nothing is cached that another connection
    could make stale. Open the transaction with BEGIN IMMEDIATE, or a concurrent writer can
    make the commit fail with SQLITE_BUSY.
    """
    return append_many(conn, [(event, at)])[0]


def serialize_with_appends(conn: Connection) -> None:
    """Take now the lock an append would take (PostgreSQL; SQLite's write transaction already
    serialises): what the caller reads next is what the last appender committed, and no other
    node acts on the same reading before this transaction ends (the index refresh decides so
    whether another node took the same copy)."""
    if _postgres(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (APPEND_LOCK,))


def append_many(
    conn: Connection, events: Sequence[tuple[LedgerEvent, datetime]]
) -> list[int]:
    """``append`` for several events, in order, with one head lookup."""
    if not conn.in_transaction:
        raise LedgerUsageError(
            "ledger.append must run inside the caller's transaction (BEGIN IMMEDIATE first)"
        )
    if not events:
        return []
    if _postgres(conn):  # one appender at a time across processes, until this one commits
        conn.execute("SELECT pg_advisory_xact_lock(?)", (APPEND_LOCK,))
    head = _cursor(conn).execute(_HEAD).fetchone()
    seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS)
    rows: list[tuple[object, ...]] = []
    seqs: list[int] = []
    related: list[tuple[str, int]] = []
    for event, at in events:
        if not isinstance(event, LedgerEvent):
            raise LedgerInvalid(f"not a LedgerEvent: {type(event).__name__}")
        seq += 1
        detail_json = canonical_json(event.detail)
        detail = json.loads(detail_json)
        if canonical_json(detail) != detail_json:  # e.g. keys 1 and "1" collapsed into one
            raise LedgerInvalid("detail does not survive a JSON round trip unchanged")
        row: dict[str, object] = {
            "seq": seq,
            "at": format_at(at),
            "event": event.event,
            "msgid": event.msgid,
            "ref_msgid": event.ref_msgid,
            "sender": event.sender,
            "recipients": list(event.recipients),
            "subject": event.subject,
            "provider": event.provider,
            "related": list(event.related),
            "detail": detail,
        }
        recipients_json = canonical_json(row["recipients"])
        related_json = canonical_json(row["related"])
        payload = _plain_payload(row, recipients_json, related_json, detail_json)
        if payload is None:
            digest = row_hash(prev, row)
        else:
            try:
                digest = hashlib.sha256(prev.encode("ascii") + payload.encode("utf-8")).hexdigest()
            except UnicodeEncodeError as exc:  # as row_hash says it
                raise LedgerInvalid(f"row holds text that is not valid Unicode: {exc}") from exc
        rows.append(
            (
                seq,
                row["at"],
                event.event,
                event.msgid,
                event.ref_msgid,
                event.sender,
                recipients_json,
                event.subject,
                event.provider,
                related_json,
                detail_json,
                prev,
                digest,
            )
        )
        seqs.append(seq)
        related += [(r, seq) for r in dict.fromkeys(event.related)]
        prev = digest
    conn.executemany(_INSERT, rows)
    if related:
        conn.executemany("INSERT INTO ledger_related (msgid, seq) VALUES (?, ?)", related)
    return seqs


# --------------------------------------------------------------------------------------- verify


def verify(
    conn: Connection,
    token_verifier: Callable[[bytes, bytes], None] | None = None,
) -> LedgerReport:
    """Recompute the chain from genesis and check every checkpoint against it; stop at the first
    fault and name it. ``token_verifier(token, head_hash_bytes)`` must raise on a bad token;
    ``head_hash_bytes`` is the 32-byte digest (``bytes.fromhex(head_hash)``).

    Reads one snapshot: inside the caller's transaction if one is open, else in a read
    transaction of its own, so rows and checkpoints appended meanwhile cannot confuse it.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if _postgres(conn)
                     else "BEGIN")
    try:
        return _verify(conn, token_verifier)
    finally:
        if own:
            conn.execute("ROLLBACK")


def _verify(
    conn: Connection, token_verifier: Callable[[bytes, bytes], None] | None
) -> LedgerReport:
    checkpoints = (
        _cursor(conn)
        .execute("SELECT id, seq_from, seq_to, head_hash, token FROM ledger_checkpoint ORDER BY id")
        .fetchall()
    )
    good_rows = 0
    good_cps = 0

    def fail(seq: int | None, reason: str, checkpoint: int | None = None) -> LedgerReport:
        return LedgerReport(False, good_rows, good_cps, seq, reason, checkpoint)

    # Checkpoints must form a contiguous series: a deleted one would hide a rewritten range.
    expected_from = 1
    for number, (cp_id, seq_from, seq_to, _head, _token) in enumerate(checkpoints, start=1):
        if cp_id != number or seq_from != expected_from or seq_to < seq_from:
            return fail(
                None,
                f"checkpoint {cp_id}: expected id {number} covering seq {expected_from}.., "
                f"found seq {seq_from}..{seq_to} (checkpoints missing or reordered)",
                cp_id,
            )
        expected_from = seq_to + 1

    pending = iter(checkpoints)
    cp = next(pending, None)
    prev = GENESIS
    expected = 1
    anchor = _anchor(conn)
    if anchor is not None:
        # rows up to the anchor were pruned: the checkpoints over them still verify, and the
        # one ending at the anchor must carry exactly the anchor's hash
        a_seq, a_hash = anchor
        while cp is not None and cp[2] <= a_seq:
            problem = _checkpoint_problem(cp, a_hash if cp[2] == a_seq else cp[3],
                                          token_verifier)
            if problem:
                return fail(cp[1], f"checkpoint {cp[0]}: {problem}", cp[0])
            if cp[2] == a_seq:
                prev, expected = a_hash, a_seq + 1
            good_cps += 1
            cp = next(pending, None)
        if expected != a_seq + 1:
            return fail(a_seq, f"the pruning anchor at seq {a_seq} matches no checkpoint")
    for values in _cursor(conn).execute(f"SELECT {', '.join(_COLUMNS)} FROM ledger ORDER BY seq"):
        stored = dict(zip(_COLUMNS, values, strict=True))
        seq = stored["seq"]
        if seq != expected:
            return fail(expected, f"seq {expected} is missing (next row is seq {seq})")
        problem = _row_problem(stored, prev)
        if problem:
            return fail(expected, f"seq {expected}: {problem}")
        prev = str(stored["hash"])
        good_rows += 1
        while cp is not None and cp[2] == expected:
            problem = _checkpoint_problem(cp, prev, token_verifier)
            if problem:
                return fail(cp[1], f"checkpoint {cp[0]}: {problem}", cp[0])
            good_cps += 1
            cp = next(pending, None)
        expected += 1
    if cp is not None:
        return fail(
            expected,
            f"checkpoint {cp[0]} covers seq {cp[1]}..{cp[2]} but the ledger ends at seq "
            f"{expected - 1}: rows from seq {expected} are missing (truncated)",
            cp[0],
        )
    return LedgerReport(True, good_rows, good_cps, None, None)


def _row_problem(stored: dict[str, object], prev: str) -> str | None:
    """Why a stored row does not extend the chain whose head hash is ``prev``, or None."""
    if stored["prev_hash"] != prev:
        return "prev_hash is not the previous row's hash (row edited, removed or reordered)"
    row = dict(stored)
    for name in ("recipients", "related", "detail"):
        text = stored[name]
        try:
            if not isinstance(text, str):
                raise ValueError("not text")
            row[name] = json.loads(text)
            canonical = canonical_json(row[name])
        except (ValueError, LedgerInvalid) as exc:
            return f"{name} is not JSON: {exc}"
        if canonical != text:
            return f"{name} is not in canonical JSON form (edited)"
    try:
        digest = row_hash(prev, row)
    except LedgerInvalid as exc:
        return f"content cannot be hashed: {exc}"
    if digest != stored["hash"]:
        return "hash does not match the row's content (content or hash edited)"
    return None


def _checkpoint_problem(
    cp: tuple[int, int, int, str, bytes],
    chain_hash: str,
    token_verifier: Callable[[bytes, bytes], None] | None,
) -> str | None:
    _, _, seq_to, head_hash, token = cp
    if token_verifier is not None:
        try:
            head_bytes = bytes.fromhex(head_hash)
            token_verifier(bytes(token), head_bytes)
        except Exception as exc:  # whatever the verifier raises means "bad token"
            return f"timestamp token does not verify: {type(exc).__name__}: {exc}"
    if head_hash != chain_hash:
        return (
            f"head hash differs from the chain at seq {seq_to}: rows in its range rewritten, "
            "or the checkpoint forged"
        )
    return None


# ----------------------------------------------------------------------------------- retention


class PruneRefused(LedgerError):
    """The rows asked for cannot leave the ledger (no checkpoint ends there, the head, ...)."""


def _anchor(conn: Connection) -> tuple[int, str] | None:
    row = _cursor(conn).execute(
        "SELECT seq, hash FROM ledger_anchor ORDER BY seq DESC LIMIT 1").fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def prune_point(conn: Connection, before: datetime) -> int | None:
    """The last seq that may leave: the end of a checkpoint whose rows are all older than
    ``before``, short of the head (the chain must keep a row to extend)."""
    row = _cursor(conn).execute(
        "SELECT max(c.seq_to) FROM ledger_checkpoint c JOIN ledger l ON l.seq = c.seq_to"
        " WHERE l.at < ? AND c.seq_to < (SELECT max(seq) FROM ledger)"
        " AND c.seq_to > coalesce((SELECT max(seq) FROM ledger_anchor), 0)",
        (format_at(before),),
    ).fetchone()
    return None if row[0] is None else int(row[0])


def prune(conn: Connection, up_to: int, export_sha256: str, at: datetime) -> int:
    """Remove rows ``..up_to`` (already exported, signed, kept by the operator) inside the
    caller's transaction; the anchor records where the live chain now starts. Returns the
    number of rows removed."""
    if not conn.in_transaction:
        raise LedgerUsageError("ledger.prune must run inside the caller's transaction")
    cur = _cursor(conn)
    cp = cur.execute("SELECT head_hash FROM ledger_checkpoint WHERE seq_to = ?",
                     (up_to,)).fetchone()
    head = cur.execute(_HEAD).fetchone()
    anchor = _anchor(conn)
    if cp is None:
        raise PruneRefused(f"no checkpoint ends at seq {up_to}")
    if head is None or up_to >= int(head[0]):
        raise PruneRefused("the chain head cannot be pruned")
    if anchor is not None and up_to <= anchor[0]:
        raise PruneRefused(f"rows up to seq {anchor[0]} are already pruned")
    # the triggers stop accidents; this one deliberate removal lifts them inside the transaction
    if _postgres(conn):
        cur.execute("SELECT set_config('pecd.ledger_prune', 'on', true)")
    else:
        cur.execute("DROP TRIGGER ledger_no_delete")
        cur.execute("DROP TRIGGER ledger_related_no_delete")
    cur.execute("DELETE FROM ledger_related WHERE seq <= ?", (up_to,))
    removed = cur.execute("DELETE FROM ledger WHERE seq <= ?", (up_to,)).rowcount
    cur.execute("INSERT INTO ledger_anchor (seq, hash, at, export_sha256) VALUES (?, ?, ?, ?)",
                (up_to, str(cp[0]), format_at(at), export_sha256))
    if _postgres(conn):
        cur.execute("SELECT set_config('pecd.ledger_prune', 'off', true)")
    else:
        install(conn)
    return int(removed)


# ----------------------------------------------------------------------------------- checkpoint


def checkpoint(
    conn: Connection, at: datetime, timestamper: Callable[[bytes], bytes]
) -> int | None:
    """If rows were added since the last checkpoint, timestamp the head and record it.

    ``timestamper(head_hash_bytes)`` (the 32-byte digest) returns a token, e.g. an RFC 3161
    response. Outside a transaction (the normal case) the timestamper, which may be a network
    round trip, runs before the write lock is taken, so appenders never wait on a TSA; inside
    the caller's transaction everything happens there. Returns the new checkpoint's id, or None
    if there was nothing new (or a concurrent checkpoint already covered it).
    """
    at_text = format_at(at)
    cur = _cursor(conn)
    head = cur.execute(_HEAD).fetchone()
    if head is None:
        return None
    seq_to, head_hash = int(head[0]), str(head[1])
    last = cur.execute(
        "SELECT id, seq_to FROM ledger_checkpoint ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if last is not None and int(last[1]) >= seq_to:
        return None
    token = timestamper(bytes.fromhex(head_hash))
    if not isinstance(token, bytes | bytearray | memoryview):
        raise LedgerInvalid("timestamper must return bytes")
    with transaction(conn):
        if _postgres(conn):  # the write lock SQLite's BEGIN IMMEDIATE gives: the append lock
            conn.execute("SELECT pg_advisory_xact_lock(?)", (APPEND_LOCK,))
        # Re-read under the write lock: another process may have checkpointed meanwhile (then
        # nothing is written, and the empty transaction commits).
        last = cur.execute(
            "SELECT id, seq_to FROM ledger_checkpoint ORDER BY id DESC LIMIT 1"
        ).fetchone()
        cp_id, seq_from = (int(last[0]) + 1, int(last[1]) + 1) if last else (1, 1)
        if seq_from > seq_to:
            return None
        conn.execute(
            "INSERT INTO ledger_checkpoint (id, seq_from, seq_to, head_hash, at, token)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (cp_id, seq_from, seq_to, head_hash, at_text, bytes(token)),
        )
    return cp_id


# ---------------------------------------------------------------------------------------- query


def figures(conn: Connection) -> tuple[int, int, int]:
    """(rows, head seq, checkpoints), for ``pecd status``."""
    rows = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM ledger").fetchone()
    cps = conn.execute("SELECT count(*) FROM ledger_checkpoint").fetchone()
    return int(rows[0]), int(rows[1]), int(cps[0])


def first_seq(conn: Connection) -> int:
    """The oldest live row's seq (past a prune, not 1); 0 for an empty ledger."""
    row = conn.execute("SELECT coalesce(min(seq), 0) FROM ledger").fetchone()
    return int(row[0])


def hash_at(conn: Connection, seq: int) -> str | None:
    row = conn.execute("SELECT hash FROM ledger WHERE seq=?", (seq,)).fetchone()
    return None if row is None else str(row[0])


def rows_since_checkpoint(conn: Connection) -> int:
    """How many rows no checkpoint covers yet (the service timestamps the head past a limit)."""
    row = conn.execute(
        "SELECT coalesce((SELECT max(seq) FROM ledger), 0)"
        " - coalesce((SELECT max(seq_to) FROM ledger_checkpoint), 0)"
    ).fetchone()
    return int(row[0])


def events_for(conn: Connection, msgid: str) -> list[dict[str, object]]:
    """Rows about ``msgid``: as the message, as the client's original Message-ID, or as a
    related generated message; in ledger order (for ``pecd status``)."""
    cur = _cursor(conn).execute(
        f"SELECT {', '.join(_COLUMNS)} FROM ledger"
        " WHERE msgid = ?1 OR ref_msgid = ?1"
        " OR seq IN (SELECT seq FROM ledger_related WHERE msgid = ?1)"
        " ORDER BY seq",
        (msgid,),
    )
    return [_decoded(values) for values in cur]


def export_rows(
    conn: Connection, since: datetime | None, until: datetime | None
) -> Iterator[dict[str, object]]:
    """Rows with ``since <= at < until`` (either bound optional), in ledger order, JSON-ready.

    Each dict carries ``prev_hash`` and ``hash``: ``row_hash(r["prev_hash"], r) == r["hash"]``
    lets a reader check an export without pecd.
    """
    lo = format_at(since) if since is not None else None
    hi = format_at(until) if until is not None else None
    cur = _cursor(conn).execute(
        f"SELECT {', '.join(_COLUMNS)} FROM ledger"
        " WHERE (?1 IS NULL OR at >= ?1) AND (?2 IS NULL OR at < ?2) ORDER BY seq",
        (lo, hi),
    )
    for values in cur:
        yield _decoded(values)


def _decoded(values: Sequence[object]) -> dict[str, object]:
    row = dict(zip(_COLUMNS, values, strict=True))
    for name in ("recipients", "related", "detail"):
        row[name] = json.loads(str(row[name]))
    return row


def _cursor(conn: Connection) -> Any:
    """A cursor yielding plain tuples whatever ``row_factory`` the caller's connection uses
    (PostgreSQL's rows are tuples already)."""
    cur = conn.cursor()
    cur.row_factory = None
    return cur
