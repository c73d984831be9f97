"""The durable queue that joins the stages, and its one ``enqueue`` path.

Listeners call :meth:`Queue.enqueue` and answer ``250`` only after it returns: by then the row
is committed with the bytes in it or, for a message over ``INLINE_MAX``, naming a spool file
already fsynced. A stage leases items, works on them without touching the queue, and hands
back an :class:`Outcome`; :meth:`Queue.finish` commits the outcome
(new items, ledger rows, the item's new state) in one transaction, so a crash either loses the
whole step (and it runs again) or none of it.

States: ``incoming`` → ``active`` (leased) → removed when done, or ``deferred`` (retry later with
backoff), ``hold`` (an operator looks), ``corrupt`` (spool file missing).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Literal, TypeVar

from pecd.clock import Clock
from pecd.format.blob import Blob
from pecd.store import Connection, dialect, ledger, nodes
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent
from pecd.store.spool import Bodies

T = TypeVar("T")
Kind = Literal["submission", "inbound", "deliver", "relay", "fallback"]
KINDS: tuple[Kind, ...] = ("submission", "inbound", "deliver", "relay", "fallback")
# A message up to this size lives in its queue row, not in a spool file: the row's commit is
# then its only fsync (a spool file costs two more, a create, a rename and an unlink), which is
# most of what a small message costs at each stage. Bigger ones stay in the spool, streamed.
INLINE_MAX = 128 * 1024
MAX_LEASES = 5  # leased this often with no outcome (each time the process died): park in hold
# a spool file this old that no row names was never acknowledged, even with other processes
# running beside the one that looks (a file being written is younger)
ORPHAN_AGE = 3600.0


@dataclass(frozen=True)
class NewItem:
    kind: Kind
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes | Blob | None = None
    same_as: Item | None = None  # the item whose bytes this one shares (row copy or hard link)
    dest: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    delay: float = 0.0  # not to be tried before this many seconds from now


@dataclass(frozen=True)
class Item:
    id: int
    kind: Kind
    mail_from: str
    rcpts: tuple[str, ...]
    dest: str
    meta: Mapping[str, Any]
    attempts: int
    spool: str  # '' when the bytes are in the row (``body``)
    created: float
    body: bytes | None = None
    # this lease's expiry as written when it was taken: with ``owner``, what :meth:`Queue.finish`
    # checks to be sure the lease is still this worker's (not taken over after it expired)
    lease_until: float | None = None

    @property
    def name(self) -> str:
        """A stable name for the item's bytes (quarantine files are named after it)."""
        return self.spool or f"item-{self.id}"


Effect = Callable[[Connection], None]
Stored = tuple[str, bytes | None]  # where an item's bytes went: (spool name, None) or ('', bytes)


def _in_spool(item: NewItem) -> bool:
    """Whether the item's bytes go to a spool file (big, or sharing a spool file's bytes)."""
    if item.data is not None:
        return len(item.data) > INLINE_MAX
    return item.same_as is not None and item.same_as.body is None


def _files(stored: Sequence[Stored]) -> list[str]:
    return [name for name, _ in stored if name]


@dataclass
class Outcome:
    """What a stage decided about one item; committed atomically by :meth:`Queue.finish`."""

    state: Literal["done", "deferred", "hold"] = "done"
    outputs: list[NewItem] = field(default_factory=list)
    events: list[LedgerEvent] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    seen: tuple[str, str] | None = None  # (provider, message id): refuse to do this twice
    # (provider, keys) this outcome takes for itself, each at most once ever: the outcome
    # commits only if none of them is taken yet; if one is (another item took it since the
    # stage looked, see :meth:`Queue.claimed`), nothing commits and the item is judged again
    claims: tuple[str, tuple[str, ...]] | None = None
    # outputs to send again when the same (provider, message id) comes back (a peer that lost
    # our 250 and retried gets the same take-charge receipt, and nobody gets a second delivery);
    # with ``claims``, kept with the first key
    replay: list[NewItem] = field(default_factory=list)
    delay: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Recovery:
    released: int
    held: int
    corrupt: int
    orphans_removed: int


class Queue:
    def __init__(self, db: Database, spool: Bodies, clock: Clock, owner: str | None = None) -> None:
        self.db = db
        self.spool = spool
        self.clock = clock
        self.owner = owner or nodes.new_owner()  # whose leases this queue's are (lease_owner)
        # leases whose outcome failed to commit (the database was away): given back as soon as
        # it answers again (:meth:`take_back`), not left to expire
        self._unfinished: dict[int, float] = {}
        self._unknown_leases: set[float] = set()  # lease_until of lease calls that failed
        self.wakeup: dict[str, asyncio.Event] = {}
        self._commits: set[asyncio.Future[Any]] = set()

    def _event(self, kind: str) -> asyncio.Event:
        if kind not in self.wakeup:
            self.wakeup[kind] = asyncio.Event()
        return self.wakeup[kind]

    async def _write_outputs(self, items: Sequence[NewItem]) -> list[Stored]:
        if not any(_in_spool(i) for i in items):
            return self._write_outputs_sync(items)  # rows only: no file to write, no thread hop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._write_outputs_sync, items)

    def _write_outputs_sync(self, items: Sequence[NewItem]) -> list[Stored]:
        """Where each item's bytes go: small ones into the row, big ones into the spool."""
        written = iter(self.spool.write_many(i.data for i in items
                                             if i.data is not None and _in_spool(i)))
        stored: list[Stored] = []
        linked = False
        for i in items:
            if i.data is not None:
                stored.append((next(written), None) if _in_spool(i) else ("", bytes(i.data)))
            elif i.same_as is not None and i.same_as.body is not None:
                stored.append(("", i.same_as.body))
            elif i.same_as is not None:
                stored.append((self.spool.link(i.same_as.spool), None))
                linked = True
            else:
                raise ValueError("a queue item needs data or same_as")
        if linked:
            self.spool.sync_dir()
        return stored

    def _insert(self, conn: Connection, items: Sequence[NewItem],
                stored: Sequence[Stored]) -> list[int]:
        now = self.clock.now().timestamp()
        ids = []
        for item, (name, body) in zip(items, stored, strict=True):
            cur = conn.execute(
                "INSERT INTO queue (kind, state, spool, body, mail_from, rcpts, dest, meta,"
                " next_at, created) VALUES (?, 'incoming', ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.kind, name, body, item.mail_from, json.dumps(list(item.rcpts)), item.dest,
                 json.dumps(dict(item.meta), sort_keys=True), now + item.delay, now),
            )
            assert cur.lastrowid is not None
            ids.append(cur.lastrowid)
        return ids

    def wake(self, *kinds: str) -> None:
        """Tell the runners of these kinds to look at the queue now rather than at their next poll."""
        for kind in kinds:
            self._event(kind).set()

    def _notify(self, items: Iterable[NewItem]) -> None:
        self.wake(*{i.kind for i in items})

    async def enqueue(self, items: Sequence[NewItem], events: Sequence[LedgerEvent] = (),
                      effects: Sequence[Effect] = ()) -> list[int]:
        """The one way in: returns only when bytes and rows are durable. ``effects`` run in the
        same transaction; one that raises undoes the whole call (nothing queued, nothing logged)."""
        stored = await self._write_outputs(items)
        at = self.clock.now()

        def txn(conn: Connection) -> list[int]:
            ids = self._insert(conn, items, stored)
            for ev in events:
                ledger.append(conn, ev, at)
            for effect in effects:
                effect(conn)
            return ids

        ids = await self._commit(txn, _files(stored))
        self._notify(items)
        return ids

    async def _commit(self, txn: Callable[[Connection], T], names: list[str]) -> T:
        """Run ``txn`` in the writer. A cancelled caller (client gone) does not cancel the
        transaction: it may still commit, so its spool files must stay; if it then fails they are
        orphans that recovery removes."""
        job = asyncio.ensure_future(self.db.transact(txn))
        self._commits.add(job)
        job.add_done_callback(self._commits.discard)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.spool.remove(names)
            raise

    async def settle(self) -> None:
        """Wait for commits whose callers were cancelled: they still land before the DB closes."""
        if self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)

    async def record(self, events: Sequence[LedgerEvent]) -> None:
        """Ledger rows for things that create no queue item (a refused session, say)."""
        at = self.clock.now()

        def txn(conn: Connection) -> None:
            for ev in events:
                ledger.append(conn, ev, at)

        await self.db.transact(txn)

    async def lease(self, kind: Kind, limit: int, lease_seconds: float = 600.0) -> list[Item]:
        """Up to ``limit`` items due now, leased to this queue's owner until ``lease_seconds``
        from now. An item whose lease expired (its node died, or hangs) is taken back first:
        another node's lease returns once it expires, never before."""
        at = self.clock.now()
        now = at.timestamp()
        until = now + lease_seconds
        while until in self._unknown_leases:  # never the mark of a lease take_back returns
            until = math.nextafter(until, math.inf)

        def txn(conn: Connection) -> list[Item]:
            expired = conn.execute(
                "SELECT * FROM queue WHERE state='active' AND kind=? AND lease_until <= ?"
                " ORDER BY id LIMIT ?" + _skip_locked(conn), (kind, now, limit)).fetchall()
            rows = [r for r in expired if not _hold_if_worn(conn, r, at)]
            if len(rows) < limit:
                rows += conn.execute(
                    "SELECT * FROM queue WHERE state IN ('incoming', 'deferred') AND kind = ?"
                    " AND next_at <= ? ORDER BY next_at, id LIMIT ?" + _skip_locked(conn),
                    (kind, now, limit - len(rows)),
                ).fetchall()
            items = []
            for row in rows:
                conn.execute(
                    "UPDATE queue SET state='active', lease_until=?, lease_owner=?,"
                    " leases=leases+1 WHERE id=?", (until, self.owner, row["id"]),
                )
                items.append(_item(row, until))
            return items

        # a lease lost with the machine (power, kernel; a killed process loses nothing) costs
        # nothing: recovery returns a dead process's leases, and MAX_LEASES counts process deaths
        try:
            return await self.db.transact(txn, durable=False)
        except Exception:
            # the commit may have landed with its answer lost (PostgreSQL restarted): rows
            # leased to this live process that it never got; take_back returns them
            self._unknown_leases.add(until)
            raise

    async def next_due(self, kind: Kind) -> float | None:
        def txn(conn: Connection) -> float | None:
            row = conn.execute(
                "SELECT min(next_at) FROM queue WHERE state IN ('incoming','deferred') AND kind=?",
                (kind,),
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self.db.transact(txn)

    async def wait(self, kind: Kind, timeout: float) -> None:
        event = self._event(kind)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    async def claimed(self, provider: str, keys: Sequence[str]) -> dict[str, list[NewItem]]:
        """Which of ``keys`` were already taken for ``provider`` (see ``Outcome.claims``), each
        with the outputs kept to send again (empty for all but a transaction's first key)."""
        def txn(conn: Connection) -> dict[str, list[NewItem]]:
            found: dict[str, list[NewItem]] = {}
            for key in dict.fromkeys(keys):
                row = conn.execute("SELECT replies FROM seen WHERE provider=? AND message_id=?",
                                   (provider, key)).fetchone()
                if row is not None:
                    found[key] = [_reply_item(r) for r in json.loads(row[0] or "[]")]
            return found

        return await self.db.transact(txn, durable=False)

    async def finish(self, item: Item, outcome: Outcome) -> bool:
        """Commit a stage's outcome; False when ``outcome.seen`` shows it was already done, or
        when one of ``outcome.claims`` was taken meanwhile (the item is then judged again)."""
        stored = await self._write_outputs(outcome.outputs) if outcome.state == "done" else []
        at = self.clock.now()
        now = at.timestamp()

        def txn(conn: Connection) -> Literal["fresh", "duplicate", "conflict", "lost"]:
            if not self._still_ours(conn, item):
                return "lost"
            if outcome.claims is not None:
                provider, keys = outcome.claims
                if any(conn.execute("SELECT 1 FROM seen WHERE provider=? AND message_id=?",
                                    (provider, key)).fetchone() for key in keys):
                    conn.execute("UPDATE queue SET state='incoming', next_at=?, lease_until=NULL,"
                                 " leases=0 WHERE id=?", (now, item.id))
                    return "conflict"
                for n, key in enumerate(dict.fromkeys(keys)):
                    conn.execute(
                        "INSERT INTO seen (provider, message_id, at, replies) VALUES (?, ?, ?, ?)",
                        (provider, key, at.isoformat(),
                         _replies_json(outcome.replay) if n == 0 else "[]"))
            if outcome.seen is not None:
                provider, message_id = outcome.seen
                dup = conn.execute(
                    "SELECT 1 FROM seen WHERE provider=? AND message_id=?", (provider, message_id)
                ).fetchone()
                if dup:
                    self._replay(conn, provider, message_id)
                    ledger.append(conn, LedgerEvent(
                        event="duplicate", msgid=message_id, provider=provider,
                        detail={"queue_id": item.id},
                    ), at)
                    conn.execute("DELETE FROM queue WHERE id=?", (item.id,))
                    return "duplicate"
                conn.execute("INSERT INTO seen (provider, message_id, at, replies) VALUES (?, ?, ?, ?)",
                             (provider, message_id, at.isoformat(), _replies_json(outcome.replay)))
            self._insert(conn, outcome.outputs, stored)
            for ev in outcome.events:
                ledger.append(conn, ev, at)
            for effect in outcome.effects:
                effect(conn)
            if outcome.state == "done":
                conn.execute("DELETE FROM queue WHERE id=?", (item.id,))
            elif outcome.state == "deferred":
                conn.execute(
                    "UPDATE queue SET state='deferred', attempts=attempts+1, next_at=?,"
                    " lease_until=NULL, leases=0, last_error=? WHERE id=?",
                    (now + outcome.delay, outcome.error, item.id),
                )
            else:
                conn.execute(
                    "UPDATE queue SET state='hold', lease_until=NULL, leases=0, last_error=?"
                    " WHERE id=?",
                    (outcome.error, item.id),
                )
            return "fresh"

        names = _files(stored)
        try:
            verdict = await self._commit(txn, names)
        except Exception:
            self.abandon(item)
            raise
        if verdict == "lost":  # another worker holds the item now: its outcome is the one
            self.spool.remove(names)
            return False
        if verdict != "fresh":
            self.spool.remove(names)
            self.wake(*KINDS)  # replayed replies may have been queued; a conflict is due again
            if verdict == "conflict":
                return False
        if outcome.state == "done" and item.spool:
            self.spool.remove([item.spool])
        self._notify(outcome.outputs)
        return verdict == "fresh"

    def abandon(self, item: Item) -> None:
        """This process gives up on ``item`` with no outcome (its stage or its commit failed,
        PostgreSQL away, say): :meth:`take_back` returns the lease once the database answers.

        Not left to the lease's expiry: the owner is alive, so nothing else returns it before,
        and the item (a certified message, a receipt) would wait ten minutes for nothing."""
        if item.lease_until is not None:
            self._unfinished[item.id] = item.lease_until

    def _still_ours(self, conn: Connection, item: Item) -> bool:
        """Whether ``item`` is still leased to this queue's owner, by the lease it was given
        (an item from elsewhere than :meth:`lease`, with no ``lease_until``, is not checked)."""
        if item.lease_until is None:
            return True
        # PostgreSQL: the row stays locked until this commit, so no node takes the lease over
        # in between; one that took it first is waited for, and then the row is not ours
        row = conn.execute("SELECT 1 FROM queue WHERE id=? AND state='active' AND lease_owner=?"
                           " AND lease_until=?" + _for_update(conn),
                           (item.id, self.owner, item.lease_until)).fetchone()
        return row is not None

    def _replay(self, conn: Connection, provider: str, message_id: str) -> None:
        row = conn.execute("SELECT replies FROM seen WHERE provider=? AND message_id=?",
                           (provider, message_id)).fetchone()
        replies = [_reply_item(r) for r in json.loads(row[0] or "[]")]
        if replies:
            # rare path: written from the writer thread, still fsynced before the commit
            self._insert(conn, replies, self._write_outputs_sync(replies))

    def read(self, item: Item) -> bytes:
        return item.body if item.body is not None else self.spool.read(item.spool)

    def open(self, item: Item) -> BinaryIO:
        """The item's bytes as a file, to stream (blocking for a spool file: a worker thread)."""
        return io.BytesIO(item.body) if item.body is not None else self.spool.open(item.spool)

    def recover(self, node: nodes.Node | None = None) -> Recovery:
        """Run once at start, before any listener: take back the leases of dead processes, drop
        what nobody acknowledged.

        With ``node``, a lease is dead when it expired or its owner is a process of this host
        that no longer runs (live nodes keep theirs), and unacknowledged spool files are removed
        only when no other process runs on this data directory (``node.alone``; else only those
        older than ``ORPHAN_AGE``). Without, this process is taken to be the only one."""
        at = self.clock.now()
        now = at.timestamp()

        def dead(owner: str | None, until: float | None) -> bool:
            if owner == self.owner:
                return False
            if node is None or until is None or until <= now:
                return True
            return node.dead(owner)

        def txn(conn: Connection) -> Recovery:
            released, held = _take_back(conn, dead, at)
            corrupt = 0
            referenced = set()
            for row in conn.execute(
                    "SELECT id, spool, state FROM queue WHERE body IS NULL").fetchall():
                referenced.add(row[1])
                if row[2] != "corrupt" and not self.spool.exists(row[1]):
                    conn.execute("UPDATE queue SET state='corrupt' WHERE id=?", (row[0],))
                    ledger.append(conn, LedgerEvent(event="corrupt", detail={
                        "queue_id": row[0], "reason": "spool file missing"}), at)
                    corrupt += 1
            orphans = self.spool.orphans(referenced, None if alone else now - ORPHAN_AGE)
            self.spool.remove(orphans)
            return Recovery(released, held, corrupt, len(orphans))

        alone = node is None or node.alone
        if node is not None:
            node.sweep()
        if alone:
            self.spool.clear_tmp()
        else:
            self.spool.clear_tmp(older_than=now - ORPHAN_AGE)
        return self.db.transact_sync(txn)

    async def take_back(self, node: nodes.Node) -> int:
        """While running: return to the queue the leases of processes of this host that died
        since (a sibling worker killed, say), so they need not wait for its restart or for
        their expiry, and this process's own leases whose outcome failed to commit. How many
        came back (parked ones included)."""
        at = self.clock.now()
        mine = 0
        if self._unfinished:
            unfinished = dict(self._unfinished)

            def give_back(conn: Connection) -> int:
                return sum(conn.execute(
                    "UPDATE queue SET state='incoming', lease_until=NULL, lease_owner=NULL"
                    " WHERE id=? AND state='active' AND lease_owner=? AND lease_until=?",
                    (item_id, self.owner, until)).rowcount for item_id, until in unfinished.items())

            mine = await self.db.transact(give_back)
            for item_id in unfinished:
                self._unfinished.pop(item_id, None)
        if self._unknown_leases:
            unknown = set(self._unknown_leases)

            def give_back_unknown(conn: Connection) -> int:
                return sum(conn.execute(
                    "UPDATE queue SET state='incoming', lease_until=NULL, lease_owner=NULL"
                    " WHERE state='active' AND lease_owner=? AND lease_until=?",
                    (self.owner, until)).rowcount for until in unknown)

            mine += await self.db.transact(give_back_unknown)
            self._unknown_leases -= unknown
        if mine:
            self.wake(*KINDS)
        owners = await self.db.transact(lambda conn: [r[0] for r in conn.execute(
            "SELECT DISTINCT lease_owner FROM queue WHERE state='active'").fetchall()],
            durable=False)
        gone = {o for o in owners if o != self.owner and node.dead(o)}
        if not gone:
            return mine

        def txn(conn: Connection) -> int:
            released, held = _take_back(conn, lambda owner, until: owner in gone, at)
            return released + held

        n = await self.db.transact(txn)
        if n:
            self.wake(*KINDS)
        return mine + n


def _take_back(conn: Connection, dead: Callable[[str | None, float | None], bool],
               at: datetime) -> tuple[int, int]:
    """Leases whose (owner, expiry) ``dead`` judges dead go back to ``incoming``, or to
    ``hold`` when worn out; (released, held)."""
    released = held = 0
    # no lock on the rows looked at (PostgreSQL: live nodes' rows must not wait on this
    # transaction); each update applies only if the lease is still the one judged dead
    for row in conn.execute("SELECT * FROM queue WHERE state='active'").fetchall():
        if not dead(row["lease_owner"], row["lease_until"]):
            continue
        if _hold_if_worn(conn, row, at):
            held += 1
            continue
        released += conn.execute(
            "UPDATE queue SET state='incoming', lease_until=NULL, lease_owner=NULL"
            " WHERE id=? AND state='active' AND coalesce(lease_owner, '')=?"
            " AND coalesce(lease_until, -1)=?",
            (row["id"], row["lease_owner"] or "",
             -1 if row["lease_until"] is None else row["lease_until"])).rowcount
    return released, held


def _hold_if_worn(conn: Connection, row: Any, at: datetime) -> bool:
    """Park an item whose handling was cut off ``MAX_LEASES`` times (each time its process
    died), with a ledger row; True when it was parked."""
    if row["leases"] < MAX_LEASES:
        return False
    conn.execute("UPDATE queue SET state='hold', lease_until=NULL, lease_owner=NULL,"
                 " last_error='handling interrupted too often' WHERE id=?", (row["id"],))
    ledger.append(conn, LedgerEvent(event="held", detail={
        "queue_id": row["id"], "reason": "handling interrupted too often"}), at)
    return True


def defer_destination(conn: Connection, dest: str, until: float) -> None:
    """Every waiting item for ``dest`` waits at least until ``until`` (a hop that just failed)."""
    # PostgreSQL: rows another node is leasing right now are left alone (SKIP LOCKED), not
    # waited for: that node's transaction may be waiting for the ledger lock this one holds
    conn.execute(
        "UPDATE queue SET state='deferred', next_at=CASE WHEN next_at > ? THEN next_at ELSE ? END"
        " WHERE id IN (SELECT id FROM queue WHERE dest=? AND state IN ('incoming', 'deferred')"
        + _skip_locked(conn) + ")",
        (until, until, dest),
    )


def _for_update(conn: Connection) -> str:
    return " FOR UPDATE" if dialect(conn) == "postgresql" else ""


def _skip_locked(conn: Connection) -> str:
    """PostgreSQL: rows another node is leasing right now are passed over, not waited for."""
    return " FOR UPDATE SKIP LOCKED" if dialect(conn) == "postgresql" else ""


def _replies_json(items: Sequence[NewItem]) -> str:
    return json.dumps([
        {"kind": i.kind, "mail_from": i.mail_from, "rcpts": list(i.rcpts), "dest": i.dest,
         "meta": dict(i.meta), "data": base64.b64encode(bytes(i.data or b"")).decode()}
        for i in items if i.data is not None
    ], sort_keys=True)


def _reply_item(raw: dict[str, Any]) -> NewItem:
    return NewItem(kind=raw["kind"], mail_from=raw["mail_from"], rcpts=tuple(raw["rcpts"]),
                   data=base64.b64decode(raw["data"]), dest=raw["dest"], meta=raw["meta"])


def _item(row: Any, lease_until: float | None = None) -> Item:
    return Item(
        id=row["id"], kind=row["kind"], mail_from=row["mail_from"],
        rcpts=tuple(json.loads(row["rcpts"])), dest=row["dest"], meta=json.loads(row["meta"]),
        attempts=row["attempts"], spool=row["spool"], created=row["created"], body=row["body"],
        lease_until=lease_until,
    )


def backoff(attempts: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff; ``jitter`` in [0, 1) spreads retries of many items apart."""
    return float(min(cap, base * (2 ** min(attempts, 30))) * (0.75 + 0.5 * jitter))



# --- operator actions (``pecd queue ...``); each runs in the caller's transaction ------------

class QueueError(Exception):
    """An operator action that does not apply (unknown id, wrong state)."""


def figures(conn: Connection) -> dict[str, int]:
    counts = {f"{k}/{s}": 0 for k in KINDS for s in ("incoming", "active", "deferred", "hold")}
    for kind, state, n in conn.execute("SELECT kind, state, count(*) FROM queue GROUP BY 1, 2"):
        counts[f"{kind}/{state}"] = n
    return counts


def listing(conn: Connection, state: str | None = None) -> list[dict[str, Any]]:
    columns = "id, kind, state, mail_from, rcpts, dest, attempts, next_at, last_error"
    if state:
        rows = conn.execute(f"SELECT {columns} FROM queue WHERE state = ? ORDER BY id", (state,))
    else:
        rows = conn.execute(f"SELECT {columns} FROM queue ORDER BY id")
    return [dict(row) for row in rows.fetchall()]


def show(conn: Connection, item_id: int) -> dict[str, Any]:
    """The item's row; its bytes only as a size (``pecd queue show`` prints it)."""
    found = conn.execute("SELECT * FROM queue WHERE id = ?", (item_id,)).fetchone()
    if found is None:
        raise QueueError(f"no queue item {item_id}")
    row = dict(found)
    body = row.pop("body", None)
    row["inline_bytes"] = None if body is None else len(body)
    return row


def _operator(conn: Connection, item_id: int, at: datetime, event: str,
              allowed: tuple[str, ...], sql: str, args: tuple[Any, ...]) -> None:
    row = show(conn, item_id)
    if row["state"] not in allowed:
        raise QueueError(f"item {item_id} is {row['state']}; {event} needs {' or '.join(allowed)}")
    conn.execute(sql, (*args, item_id))
    ledger.append(conn, LedgerEvent(event=event, detail={"queue_id": item_id,
                                                         "was": row["state"]}), at)


def retry(conn: Connection, item_id: int, at: datetime) -> None:
    """Try a deferred or held item now."""
    _operator(conn, item_id, at, "operator-retry", ("deferred", "hold"),
              "UPDATE queue SET state='incoming', next_at=? WHERE id=?", (at.timestamp(),))


def hold(conn: Connection, item_id: int, at: datetime) -> None:
    """Park an item until an operator releases it."""
    _operator(conn, item_id, at, "operator-hold", ("incoming", "deferred"),
              "UPDATE queue SET state='hold' WHERE id=?", ())


def release(conn: Connection, item_id: int, at: datetime) -> None:
    """Return a held item to the queue (its attempt count starts again)."""
    _operator(conn, item_id, at, "operator-release", ("hold",),
              "UPDATE queue SET state='incoming', attempts=0, next_at=? WHERE id=?",
              (at.timestamp(),))
