"""Storage for the HTTP API: mailbox tokens, API submissions (with their Idempotency-Key and the
answer given), and the read-only views the API serves (a message's events, a mailbox's messages,
figures for ``/metrics``).

Every function takes the caller's connection and runs inside the caller's transaction (the
writer's, through :meth:`pecd.store.db.Database.transact`, or the CLI's). Trusts its callers for who
is asking: scoping a query to a mailbox is the caller's argument, never guessed here.

A token is ``pecd_<id>_<secret>``: the id (public, 16 hex digits) finds the row, the secret
(32 random bytes, URL-safe base64) is kept only as its SHA-256: a high-entropy secret needs no
slow hash, and the database alone cannot be turned back into working tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pecd.store import Connection, dialect, ledger, users
from pecd.store.ledger import LedgerEvent

TOKEN_RE = re.compile(r"pecd_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class TokenError(users.UserError):
    """A token command that cannot be carried out (unknown mailbox or token)."""


@dataclass(frozen=True)
class TokenInfo:
    id: str
    mailbox: str
    name: str
    created: str
    revoked: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def create_token(conn: Connection, mailbox: str, name: str, at: datetime) -> tuple[str, str]:
    """A new token for an existing mailbox: (token id, the token itself, to show once)."""
    address = users.normalise(mailbox)
    if users.mailbox_state(conn, address) == "unknown":
        raise TokenError(f"no such user: {address}")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    conn.execute("INSERT INTO api_tokens (id, mailbox, name, secret_sha256, created)"
                 " VALUES (?, ?, ?, ?, ?)", (token_id, address, name, _digest(secret), at.isoformat()))
    ledger.append(conn, LedgerEvent(event="api-token-created", sender=address,
                                    detail={"token_id": token_id, "name": name}), at)
    return token_id, f"pecd_{token_id}_{secret}"


def list_tokens(conn: Connection, mailbox: str | None = None) -> list[TokenInfo]:
    rows = conn.execute(
        "SELECT id, mailbox, name, created, revoked FROM api_tokens"
        " WHERE ?1 IS NULL OR mailbox = ?1 ORDER BY mailbox, created, id",
        (users.normalise(mailbox) if mailbox else None,)).fetchall()
    return [TokenInfo(str(r[0]), str(r[1]), str(r[2]), str(r[3]), r[4]) for r in rows]


def revoke_token(conn: Connection, token_id: str, at: datetime) -> str:
    """Revoke by id; returns the token's mailbox."""
    row = conn.execute("SELECT mailbox, revoked FROM api_tokens WHERE id = ?",
                       (token_id,)).fetchone()
    if row is None:
        raise TokenError(f"no such token: {token_id}")
    if row[1] is None:
        conn.execute("UPDATE api_tokens SET revoked = ? WHERE id = ?", (at.isoformat(), token_id))
        ledger.append(conn, LedgerEvent(event="api-token-revoked", sender=str(row[0]),
                                        detail={"token_id": token_id}), at)
    return str(row[0])


def token_mailbox(conn: Connection, token_id: str) -> str | None:
    """The mailbox a token id names (revoked or not), for throttling by account."""
    row = conn.execute("SELECT mailbox FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else str(row[0])


def check_token(conn: Connection, token: str) -> str | None:
    """The mailbox a token acts for; None when malformed, unknown, revoked, or its mailbox is
    disabled or gone."""
    m = TOKEN_RE.fullmatch(token)
    if m is None:
        return None
    row = conn.execute("SELECT mailbox, secret_sha256, revoked FROM api_tokens WHERE id = ?",
                       (m[1],)).fetchone()
    if row is None or row[2] is not None:
        return None
    if not hmac.compare_digest(str(row[1]), _digest(m[2])):
        return None
    mailbox = str(row[0])
    return mailbox if users.mailbox_state(conn, mailbox) == "active" else None


# --- submissions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    request_id: str
    mailbox: str
    idem_key: str | None
    request_sha256: str
    queue_id: int
    ledger_seq: int
    status: int | None
    response: dict[str, Any] | None


def record_submission(conn: Connection, request_id: str, mailbox: str,
                      idem_key: str | None, request_sha256: str, created: float) -> None:
    """An effect for :meth:`pecd.store.queue.Queue.enqueue`: runs in its transaction right after the
    queue row and the ``submitted`` ledger row went in, so the newest of each are this
    request's. A second request with the same (mailbox, key) fails here with IntegrityError,
    which undoes its whole enqueue: one key never makes two messages."""
    conn.execute(
        "INSERT INTO api_submissions (request_id, mailbox, idem_key, request_sha256, queue_id,"
        " ledger_seq, created) VALUES (?, ?, ?, ?, (SELECT max(id) FROM queue),"
        " (SELECT max(seq) FROM ledger), ?)",
        (request_id, mailbox, idem_key, request_sha256, created))


def _submission(row: Any | tuple[Any, ...] | None) -> Submission | None:
    if row is None:
        return None
    return Submission(str(row[0]), str(row[1]), row[2], str(row[3]), int(row[4]), int(row[5]),
                      row[6], json.loads(row[7]) if row[7] else None)


_SUBMISSION = ("SELECT request_id, mailbox, idem_key, request_sha256, queue_id, ledger_seq, status,"
               " response FROM api_submissions")


def submission_by_key(conn: Connection, mailbox: str, idem_key: str) -> Submission | None:
    return _submission(conn.execute(f"{_SUBMISSION} WHERE mailbox = ? AND idem_key = ?",
                                    (mailbox, idem_key)).fetchone())


def submission(conn: Connection, request_id: str) -> Submission | None:
    return _submission(conn.execute(f"{_SUBMISSION} WHERE request_id = ?",
                                    (request_id,)).fetchone())


def store_answer(conn: Connection, request_id: str, status: int,
                 response: dict[str, Any]) -> None:
    """The final answer to a submission, kept for retries with the same Idempotency-Key."""
    conn.execute("UPDATE api_submissions SET status = ?, response = ? WHERE request_id = ?"
                 " AND status IS NULL", (status, json.dumps(response, sort_keys=True), request_id))


def access_outcome(conn: Connection, queue_id: int,
                   after_seq: int) -> dict[str, object] | None:
    """The access point's ledger row (``accepted`` or ``refused``) for a submission queue item,
    once committed; looks only past the submission's own row."""
    row = conn.execute(
        "SELECT seq, at, event, msgid, recipients, related, detail FROM ledger WHERE seq > ?"
        f" AND event IN ('accepted', 'refused') AND {_json_field(conn, 'detail', 'queue_id')} = ?"
        " ORDER BY seq LIMIT 1",
        (after_seq, str(queue_id) if dialect(conn) == "postgresql" else queue_id)).fetchone()
    if row is None:
        return None
    return {"seq": int(row[0]), "at": str(row[1]), "event": str(row[2]), "msgid": row[3],
            "recipients": json.loads(row[4]), "related": json.loads(row[5]),
            "detail": json.loads(row[6])}


# --- reading ------------------------------------------------------------------------------------

def message_events(conn: Connection, pec_id: str,
                   mailbox: str) -> tuple[list[dict[str, object]], list[Any]] | None:
    """A message's ledger rows and tracking rows, or None when ``mailbox`` did not send it (an
    unknown id and another mailbox's message look the same)."""
    rows = ledger.events_for(conn, pec_id)
    owned = any(r["msgid"] == pec_id and r["event"] in ("accepted", "refused")
                and str(r["sender"] or "").lower() == mailbox.lower() for r in rows)
    if not owned:
        return None
    tracked = conn.execute(
        "SELECT recipient, kind, accepted, taken, delivered, warned, closed, outcome FROM tracking"
        " WHERE pec_id = ? ORDER BY recipient", (pec_id,)).fetchall()
    return rows, tracked


def messages_of(conn: Connection, mailbox: str, since: float, after: tuple[float, str] | None,
                limit: int) -> list[dict[str, Any]]:
    """Everything the mailbox sent from ``since`` on, by SMTP or by the API: accepted messages
    (from tracking) and refused ones (the access point's ``refused`` ledger rows), oldest first
    by the time of that verdict, ``limit`` at most, continuing after the (time, pec_id) key
    ``after`` (keyset pagination)."""
    a_time, a_id = after if after is not None else (since - 1.0, "")
    accepted = conn.execute(
        "SELECT pec_id, min(subject), min(ref_msgid), min(accepted),"
        f" {_joined(conn, 'recipient')} FROM tracking"
        f" WHERE {_same_address(conn, 'sender')} AND accepted >= ? AND (accepted > ? OR"
        " (accepted = ? AND pec_id > ?))"
        " GROUP BY pec_id ORDER BY min(accepted), pec_id LIMIT ?",
        (mailbox, since, a_time, a_time, a_id, limit)).fetchall()
    found = [{"id": r[0], "status": "accepted", "subject": r[1], "ref_msgid": r[2],
              "at": float(r[3]), "recipients": str(r[4]).split("\n")} for r in accepted]
    # refusals are few: the partial index ledger_refused (pecd.store.ledger) finds them
    for msgid, subject, ref_msgid, at, rcpts in conn.execute(
            "SELECT msgid, subject, ref_msgid, at, recipients FROM ledger"
            f" WHERE event = 'refused' AND {_same_address(conn, 'sender')}", (mailbox,)):
        when = datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()
        if when >= since and (when, str(msgid)) > (a_time, a_id):
            found.append({"id": msgid, "status": "refused", "subject": subject,
                          "ref_msgid": ref_msgid, "at": when, "recipients": json.loads(rcpts)})
    found.sort(key=lambda m: (m["at"], m["id"]))
    return found[:limit]


def ledger_counts(conn: Connection, after_seq: int) -> tuple[dict[str, int], int]:
    """Ledger rows per event past ``after_seq``, and the head seq they reach. Anomalies are
    also counted per verdict class, as ``anomaly:<verdict>``."""
    counts: dict[str, int] = {}
    head = after_seq
    for event, n, top in conn.execute(
            "SELECT event, count(*), max(seq) FROM ledger WHERE seq > ? GROUP BY event",
            (after_seq,)):
        counts[str(event)] = int(n)
        head = max(head, int(top))
    for verdict, n in conn.execute(
            f"SELECT {_json_field(conn, 'detail', 'verdict')}, count(*) FROM ledger WHERE seq > ?"
            " AND seq <= ? AND event = 'anomaly' GROUP BY 1", (after_seq, head)):
        counts[f"anomaly:{verdict or 'none'}"] = int(n)
    return counts, head


def latencies(conn: Connection, after_seq: int, head: int
              ) -> tuple[list[float], list[float]]:
    """Seconds of the certified cycle, as the ledger rows from ``after_seq`` (excluded) to
    ``head`` saw it: submitted to accepted, per message accepted (the ``submitted`` row with
    the same original Message-ID just before); accepted to delivered, per delivery receipt
    taken in (``receipt-received`` of type ``avvenuta-consegna``, to the ``accepted`` row of
    its PEC identifier). Rows without their partner (pruned, or another provider's) count not."""
    acceptance = [_seconds(start, end) for end, start in conn.execute(
        "SELECT a.at, (SELECT s.at FROM ledger s WHERE s.ref_msgid = a.ref_msgid AND"
        " s.event = 'submitted' AND s.seq < a.seq ORDER BY s.seq DESC LIMIT 1) FROM ledger a"
        " WHERE a.seq > ? AND a.seq <= ? AND a.event = 'accepted' AND a.ref_msgid IS NOT NULL",
        (after_seq, head)) if start is not None]
    delivery = [_seconds(start, end) for end, start in conn.execute(
        "SELECT r.at, (SELECT a.at FROM ledger a WHERE a.msgid = r.msgid AND a.event = 'accepted'"
        " ORDER BY a.seq LIMIT 1) FROM ledger r WHERE r.seq > ? AND r.seq <= ? AND"
        f" r.event = 'receipt-received' AND {_json_field(conn, 'r.detail', 'type')}"
        " = 'avvenuta-consegna'",
        (after_seq, head)) if start is not None]
    return acceptance, delivery


def _seconds(start: str, end: str) -> float:
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


MAX_LINKS = 200_000  # chain links put in one evidence archive (about 30 MB of JSON)


def evidence_ledger(conn: Connection, last_seq: int, first_seq: int
                    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The first checkpoint whose range reaches ``last_seq`` (None while none does), and the
    chain links (seq, prev_hash, hash) from ``first_seq`` to that checkpoint's head: enough to
    see the message's rows chain into a timestamped head without the content of other rows."""
    cp = conn.execute("SELECT id, seq_from, seq_to, head_hash, at, token FROM ledger_checkpoint"
                      " WHERE seq_to >= ? ORDER BY id LIMIT 1", (last_seq,)).fetchone()
    if cp is None:
        return None, []
    checkpoint = {"id": int(cp[0]), "seq_from": int(cp[1]), "seq_to": int(cp[2]),
                  "head_hash": str(cp[3]), "at": str(cp[4]), "token": bytes(cp[5])}
    if int(cp[2]) - first_seq > MAX_LINKS:
        return checkpoint, []
    links = [{"seq": int(r[0]), "prev_hash": str(r[1]), "hash": str(r[2])} for r in conn.execute(
        "SELECT seq, prev_hash, hash FROM ledger WHERE seq BETWEEN ? AND ? ORDER BY seq",
        (first_seq, int(cp[2])))]
    return checkpoint, links


# --- webhooks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Webhook:
    id: str
    mailbox: str
    url: str
    created: str
    removed: str | None


@dataclass(frozen=True)
class Delivery:
    id: int
    hook_id: str
    url: str
    secret: str
    msgid: str
    event: str
    payload: str
    attempts: int


def add_webhook(conn: Connection, mailbox: str, url: str, at: datetime) -> tuple[str, str]:
    """A subscription for a mailbox's message events: (id, signing secret, shown once). Only
    events logged from now on are sent."""
    address = users.normalise(mailbox)
    if users.mailbox_state(conn, address) == "unknown":
        raise TokenError(f"no such user: {address}")
    if not (url.startswith("https://") or url.startswith("http://")) or any(
            c.isspace() for c in url):
        raise TokenError(f"not an http(s) URL: {url!r}")
    hook_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    conn.execute("INSERT INTO webhook_cursor (one, seq) VALUES"
                 " (1, (SELECT coalesce(max(seq), 0) FROM ledger)) ON CONFLICT DO NOTHING")
    conn.execute("INSERT INTO webhooks (id, mailbox, url, secret, created) VALUES (?, ?, ?, ?, ?)",
                 (hook_id, address, url, secret, at.isoformat()))
    ledger.append(conn, LedgerEvent(event="webhook-added", sender=address,
                                    detail={"webhook_id": hook_id, "url": url}), at)
    return hook_id, secret


def list_webhooks(conn: Connection, mailbox: str | None = None) -> list[Webhook]:
    rows = conn.execute("SELECT id, mailbox, url, created, removed FROM webhooks"
                        " WHERE ?1 IS NULL OR mailbox = ?1 ORDER BY mailbox, created, id",
                        (users.normalise(mailbox) if mailbox else None,)).fetchall()
    return [Webhook(str(r[0]), str(r[1]), str(r[2]), str(r[3]), r[4]) for r in rows]


def remove_webhook(conn: Connection, hook_id: str, at: datetime) -> str:
    row = conn.execute("SELECT mailbox FROM webhooks WHERE id = ?", (hook_id,)).fetchone()
    if row is None:
        raise TokenError(f"no such webhook: {hook_id}")
    conn.execute("UPDATE webhooks SET removed = ? WHERE id = ? AND removed IS NULL",
                 (at.isoformat(), hook_id))
    conn.execute("UPDATE webhook_outbox SET state = 'dropped' WHERE hook_id = ? AND state = 'pending'",
                 (hook_id,))
    ledger.append(conn, LedgerEvent(event="webhook-removed", sender=str(row[0]),
                                    detail={"webhook_id": hook_id}), at)
    return str(row[0])


def fan_out(conn: Connection, now: float, batch: int = 500) -> int:
    """Turn ledger rows past the cursor into outbox deliveries for the subscriptions of their
    sender (rows about a message: with a msgid and a sender); the cursor moves in the same
    transaction, so each row is turned exactly once. Returns how many rows were read."""
    # PostgreSQL: one node fans out at a time (SQLite's write lock does the same)
    lock = " FOR UPDATE" if dialect(conn) == "postgresql" else ""
    cur = conn.execute("SELECT seq FROM webhook_cursor WHERE one = 1" + lock).fetchone()
    if cur is None:  # no subscription was ever made
        return 0
    rows = conn.execute(
        "SELECT seq, at, event, msgid, ref_msgid, sender, recipients, subject, related, detail"
        " FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?", (int(cur[0]), batch)).fetchall()
    if not rows:
        return 0
    hooks: dict[str, list[str]] = {}
    for hook_id, mailbox in conn.execute("SELECT id, mailbox FROM webhooks WHERE removed IS NULL"):
        hooks.setdefault(str(mailbox).lower(), []).append(str(hook_id))
    for r in rows:
        if not r[3] or not r[5]:
            continue
        for hook_id in hooks.get(str(r[5]).lower(), []):
            detail = json.loads(r[9])
            payload = {"seq": r[0], "at": r[1], "event": r[2], "id": r[3], "ref_msgid": r[4],
                       "sender": r[5], "recipients": json.loads(r[6]), "subject": r[7],
                       "related": json.loads(r[8]), "type": detail.get("type"),
                       "error": detail.get("error"), "reason": detail.get("reason")}
            conn.execute("INSERT INTO webhook_outbox (hook_id, msgid, seq, event, payload, next_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (hook_id, r[3], r[0], r[2], json.dumps(payload, sort_keys=True), now))
    conn.execute("UPDATE webhook_cursor SET seq = ? WHERE one = 1", (int(rows[-1][0]),))
    return len(rows)


def due_deliveries(conn: Connection, now: float, limit: int,
                   lease: float = 120.0) -> list[Delivery]:
    """Per (subscription, message), only its oldest pending delivery, and only when due: a
    message's events reach the receiver in ledger order, a failing one holding back the rest.

    The deliveries returned are not due again for ``lease`` seconds (longer than one POST may
    take), so another node's worker does not send them too; the sender's outcome
    (:func:`delivered`, :func:`delivery_failed`) sets what follows, and a node that died while
    sending leaves them due again when the lease runs out."""
    rows = conn.execute(
        "SELECT o.id, o.hook_id, w.url, w.secret, o.msgid, o.event, o.payload, o.attempts"
        " FROM webhook_outbox o JOIN webhooks w ON w.id = o.hook_id"
        " WHERE o.id IN (SELECT min(id) FROM webhook_outbox WHERE state = 'pending'"
        "                GROUP BY hook_id, msgid)"
        " AND o.next_at <= ? ORDER BY o.id LIMIT ?"
        + (" FOR UPDATE OF o SKIP LOCKED" if dialect(conn) == "postgresql" else ""),
        (now, limit)).fetchall()
    for r in rows:
        conn.execute("UPDATE webhook_outbox SET next_at = ? WHERE id = ?", (now + lease, r[0]))
    return [Delivery(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]),
                     int(r[7])) for r in rows]


def delivered(conn: Connection, delivery_id: int) -> None:
    conn.execute("UPDATE webhook_outbox SET state = 'done', attempts = attempts + 1"
                 " WHERE id = ?", (delivery_id,))


def delivery_failed(conn: Connection, delivery: Delivery, error: str, next_at: float,
                    give_up: bool, at: datetime) -> None:
    """One more failed attempt; past the last one the delivery is marked failed, logged, and
    the message's next event may go."""
    conn.execute("UPDATE webhook_outbox SET attempts = attempts + 1, next_at = ?, last_error = ?,"
                 " state = ? WHERE id = ?",
                 (next_at, error[:500], "failed" if give_up else "pending", delivery.id))
    if give_up:
        ledger.append(conn, LedgerEvent(event="webhook-failed", msgid=delivery.msgid,
                                        detail={"webhook_id": delivery.hook_id,
                                                "delivery": delivery.id, "error": error[:500],
                                                "attempts": delivery.attempts + 1}), at)


# --- pages --------------------------------------------------------------------------------------

def set_operator(conn: Connection, address: str, at: datetime) -> None:
    """Let a mailbox account open the operator page."""
    address = users.normalise(address)
    if users.mailbox_state(conn, address) == "unknown":
        raise TokenError(f"no such user: {address}")
    conn.execute("INSERT INTO operators (address, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                 (address, at.isoformat()))


def is_operator(conn: Connection, address: str) -> bool:
    return conn.execute("SELECT 1 FROM operators WHERE address = ?",
                        (users.normalise(address),)).fetchone() is not None


REFUSALS = ("refused", "smtp-refused", "submission-refused", "anomaly", "auth-throttled",
            "account-locked", "held", "corrupt", "webhook-failed")


def operator_view(conn: Connection, recent: int = 20) -> dict[str, Any]:
    """Queue by state, the latest refusals and incidents, ledger head, last checkpoint."""
    from pecd.store import queue as queue_mod  # storage module of the queue

    marks = ", ".join("?" * len(REFUSALS))
    refusals = [{"seq": r[0], "at": r[1], "event": r[2], "sender": r[3],
                 "reason": json.loads(r[4]).get("reason")}
                for r in conn.execute(f"SELECT seq, at, event, sender, detail FROM ledger"
                                      f" WHERE event IN ({marks}) ORDER BY seq DESC LIMIT ?",
                                      (*REFUSALS, recent))]
    head = conn.execute("SELECT seq, at, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
    cp = conn.execute("SELECT id, seq_to, at FROM ledger_checkpoint ORDER BY id DESC LIMIT 1"
                      ).fetchone()
    return {"queue": queue_mod.figures(conn), "refusals": refusals,
            "head": None if head is None else {"seq": head[0], "at": head[1], "hash": head[2]},
            "checkpoint": None if cp is None else {"id": cp[0], "seq_to": cp[1], "at": cp[2]}}


# --- the few expressions SQLite and PostgreSQL write differently --------------------------------

def _json_field(conn: Connection, column: str, key: str) -> str:
    """A top-level member of a JSON text column (PostgreSQL: as text)."""
    if dialect(conn) == "postgresql":
        return f"({column}::jsonb ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


def _joined(conn: Connection, column: str) -> str:
    """The group's values joined by newlines."""
    if dialect(conn) == "postgresql":
        return f"string_agg({column}, chr(10))"
    return f"group_concat({column}, char(10))"


def _same_address(conn: Connection, column: str) -> str:
    """``column`` equals the parameter, case aside, as the index on it is built."""
    if dialect(conn) == "postgresql":
        return f"lower({column}) = lower(?)"
    return f"{column} = ? COLLATE NOCASE"
