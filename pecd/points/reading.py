"""The reading point: proof of reading (presa visione) and of not reading (mancata presa visione)
at the recipient's provider. Beyond RFC 6109; see :mod:`pecd.points.consultation` for the messages.

Receives: the ``reading`` rows the delivery point writes when it stores a certified message
whose sender asked for evidence (``X-Presa-Visione: si`` on the envelope, from a provider whose
card declares reading evidence), and Linux inotify events on those mailboxes' ``cur/``
directories; and reads reported by the HTTP API (:meth:`ReadingWorker.record_read`, a download
of the message). Dovecot, serving pecd's Maildirs, marks a message read by renaming its file to
``cur/<name>:2,<flags>`` with ``S`` among the flags (RFC 3501 ``\\Seen``, set when a client
fetches the body); the first such rename of a watched file is the read.

Trusts: its own table and the file names in the Maildirs it watches (a flag on a file it has no
row for is logged and ignored). Touches: the queue (the evidence messages, through the one
``enqueue`` path), the ledger (``read``, ``not-read``, ``reading-unwatchable``) and ``reading``.

Exactly once per message and recipient: the evidence message, its ledger row and the row's
``read`` / ``not_read`` time commit in one transaction, and that update only applies while the
row is still unset (:func:`pecd.store.readings.marker`). A crash before the commit loses nothing: at
start every unread row's mailbox is watched again and its ``cur/`` listed once, so a read made
while pecd was down is found then (its time is when pecd noticed it).

No full scan per tick: each mailbox's ``cur/`` is listed once when its watch is added (new rows
are picked up every ``interval``, a cheap indexed query), then only inotify events are read.
Not-read evidence is due at ``deadline`` by the clock object, so tests reach 7 days at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path

import inotify_simple

from pecd.clock import Clock
from pecd.config import Config
from pecd.format import daticert
from pecd.format.pec import Issuer, Transaction
from pecd.points import consultation, fallback
from pecd.points.relay import Router
from pecd.store import Connection, ledger, readings
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import NewItem, Queue
from pecd.store.readings import Reading

log = logging.getLogger("pecd.reading")

_MASK = inotify_simple.flags.MOVED_TO | inotify_simple.flags.CREATE


def seen_flag(name: str) -> tuple[str, bool] | None:
    """A Maildir file name in ``cur/`` → (base name, whether ``S`` is among its flags); None for
    a name without the ``:2,`` info part (not yet seen by any reader)."""
    base, sep, flags = name.partition(":2,")
    if not sep:
        return None
    return base, "S" in flags


def transaction(row: Reading, issuer_name: str) -> Transaction:
    """The facts the evidence message repeats, from the row the delivery point wrote."""
    return Transaction(
        identifier=row.pec_id, ref_msgid=row.ref_msgid, sender=row.sender,
        recipients=(daticert.Recipient(row.recipient, "certificato"),), reply_to=row.sender,
        subject=row.subject or "", accepted_at=_time(row.delivered), issuer_name=issuer_name)


class ReadingWorker:
    """Watches the mailboxes of unread rows and evidences reads and deadlines.
    ``run_once`` (one pass: new rows, due deadlines) and ``process_events`` for tests."""

    def __init__(self, config: Config, issuer: Issuer, queue: Queue, router: Router,
                 clock: Clock, cpu: Executor, interval: float = 1.0) -> None:
        self.config = config
        self.issuer = issuer
        self.queue = queue
        self.router = router
        self.clock = clock
        self.cpu = cpu
        self.interval = interval
        self._inotify: inotify_simple.INotify | None = None
        self._watches: dict[str, int] = {}  # mailbox path → inotify watch descriptor
        self._by_wd: dict[int, str] = {}
        self._unread: dict[str, set[str]] = {}  # mailbox path → its unread files (base names)
        self._last_rowid = 0
        self._lock = asyncio.Lock()
        self._events: asyncio.Queue[list[tuple[str, str]]] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- the watcher ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the inotify instance and hook it to the running loop (idempotent)."""
        if self._inotify is not None:
            return
        self._inotify = inotify_simple.INotify(nonblocking=True)
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)

    def close(self) -> None:
        if self._inotify is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may be closing already
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
        self._inotify.close()
        self._inotify = None
        self._watches.clear()
        self._by_wd.clear()
        self._unread.clear()
        self._last_rowid = 0

    def watched(self) -> tuple[str, ...]:
        """The mailboxes watched now (those with unread rows)."""
        return tuple(sorted(self._watches))

    def _readable(self) -> None:
        """The loop's reader callback: collect the names, hand them to the worker task."""
        assert self._inotify is not None
        found: list[tuple[str, str]] = []
        for ev in self._inotify.read(timeout=0):
            if ev.mask & inotify_simple.flags.Q_OVERFLOW:  # events were lost: list again
                log.warning("inotify queue overflowed; listing the watched mailboxes again")
                self._last_rowid = 0
                continue
            box = self._by_wd.get(ev.wd)
            if box is None:
                continue
            if ev.mask & inotify_simple.flags.IGNORED:
                found.append((box, ""))  # the directory went away (deleted, unmounted)
            elif ev.name:
                found.append((box, ev.name))
        if found:
            self._events.put_nowait(found)

    async def process_events(self) -> int:
        """Handle every event collected so far; returns how many reads were evidenced."""
        done = 0
        while not self._events.empty():
            for box, name in self._events.get_nowait():
                if not name:
                    await self._lost(box)
                    continue
                parsed = seen_flag(name)
                if parsed is not None and parsed[1] and await self._read(parsed[0]):
                    done += 1
        return done

    async def _watch_new_rows(self) -> int:
        """Watch the mailboxes of rows added since the last pass, then look once in each new
        ``cur/`` for reads that happened before the watch (or while pecd was down)."""
        last = self._last_rowid
        rows = await self.queue.db.transact(lambda conn: readings.unread_since(conn, last))
        done = 0
        fresh: dict[str, list[Reading]] = {}
        for row in rows:
            self._last_rowid = max(self._last_rowid, row.rowid)
            if row.mailbox not in self._watches:
                try:
                    self._add_watch(row.mailbox)
                except OSError as exc:
                    await self._unwatchable(row, f"cannot watch the mailbox: {exc.strerror}")
                    continue
            fresh.setdefault(row.mailbox, []).append(row)
            self._unread.setdefault(row.mailbox, set()).add(row.file)
        for box, box_rows in fresh.items():
            seen = await asyncio.get_running_loop().run_in_executor(self.cpu, _seen_in, box)
            for row in box_rows:
                if row.file in seen and await self._read(row.file):
                    done += 1
        return done

    def _add_watch(self, mailbox: str) -> None:
        assert self._inotify is not None
        cur = Path(mailbox) / "cur"
        if not cur.is_dir():
            raise FileNotFoundError(2, "no cur/ directory", str(cur))
        wd = self._inotify.add_watch(str(cur), _MASK)
        self._watches[mailbox] = wd
        self._by_wd[wd] = mailbox

    async def _lost(self, box: str) -> None:
        wd = self._watches.pop(box, None)
        if wd is None:
            return
        self._by_wd.pop(wd, None)
        self._unread.pop(box, None)
        rows = await self.queue.db.transact(lambda conn: readings.unread_since(conn, 0))
        for row in rows:
            if row.mailbox == box:
                await self._unwatchable(row, "the mailbox was removed or renamed")

    async def _unwatchable(self, row: Reading, problem: str) -> None:
        """A ledger row, once per row and problem; the deadline still applies to it."""
        event = LedgerEvent(event="reading-unwatchable", msgid=row.pec_id, sender=row.sender,
                            recipients=(row.recipient,), subject=row.subject,
                            detail={"reason": problem, "mailbox": row.mailbox})
        log.warning("reading evidence for %s to %s: %s", row.pec_id, row.recipient, problem)

        def txn(conn: Connection) -> None:
            if readings.note_problem(conn, row.rowid, problem):
                ledger.append(conn, event, self.clock.now())

        await self.queue.db.transact(txn)

    # --- evidence ---------------------------------------------------------------------------

    async def _read(self, file: str) -> bool:
        row = await self.queue.db.transact(lambda conn: readings.by_file(conn, file))
        if row is None:
            log.info("read flag on %s: not a certified message delivered with reading evidence;"
                     " ignored", file)
            return False
        return await self.record_read(row, "imap")

    async def record_read(self, row: Reading, via: str) -> bool:
        """The one path for a read, however it happened (``imap``: the Maildir ``S`` flag;
        ``http``: the first download through the HTTP API): the evidence, its ledger row and
        the row's ``read`` commit together, once. False when the row was already read."""
        if row.read is not None:
            return False
        return await self._commit(row, "ContentHandover", via=via)

    async def _commit(self, row: Reading, event: consultation.Event,
                      via: str | None = None) -> bool:
        """Sign the evidence and commit it with the row's update and its ledger row; False when
        it was already evidenced (nothing is committed then)."""
        async with self._lock:
            at = self.clock.now()
            ev = consultation.Evidence(
                event=event, identifier=row.pec_id, recipient=row.recipient, time=at, via=via,
                delivered=_time(row.delivered),
                deadline=_time(row.deadline) if event == "ContentHandoverFailure" else None)
            tx = transaction(row, self.issuer.name)
            loop = asyncio.get_running_loop()
            receipt_id, receipt = await loop.run_in_executor(
                self.cpu, consultation.build_evidence, tx, ev, self.issuer)
            what = "read-receipt" if event == "ContentHandover" else "not-read-receipt"
            items: list[NewItem] = self.router.items(
                self.issuer.service_address, [row.sender], receipt, local_kind="inbound",
                meta={"msgid": receipt_id, "what": what})
            kind: readings.Event = "read" if event == "ContentHandover" else "not_read"
            detail: dict[str, object] = {"event": event}
            if via is not None:
                detail["via"] = via
            if event == "ContentHandoverFailure":
                detail["deadline_seconds"] = row.deadline - row.delivered
            ledger_event = LedgerEvent(
                event="read" if kind == "read" else "not-read", msgid=row.pec_id,
                ref_msgid=row.ref_msgid, sender=row.sender, recipients=(row.recipient,),
                subject=row.subject, provider=self.issuer.name, related=(receipt_id,),
                detail=detail)
            if kind == "not_read":
                items += await self._fallbacks(row, receipt_id)
            try:
                await self.queue.enqueue(items, [ledger_event], effects=[readings.marker(
                    row.pec_id, row.recipient, kind, at.timestamp(), receipt_id, via)])
            except readings.Stale as exc:
                log.info("reading evidence dropped: %s", exc)
                return False
            if kind == "read":
                self._done_with(row.mailbox, row.file)
            return True

    async def _fallbacks(self, row: Reading, evidence_id: str) -> list[NewItem]:
        """One ``fallback`` item per configured channel, committed with the not-read evidence
        (so queued exactly once); pecd.points.fallback runs them."""
        channels = self.config.fallback.channels
        if not channels:
            return []
        recipient = row.recipient
        settings = await self.queue.db.transact(lambda conn: readings.settings(conn, recipient))
        ev = fallback.event(pec_id=row.pec_id, recipient=row.recipient, sender=row.sender,
                            subject=row.subject, delivered=row.delivered, deadline=row.deadline,
                            evidence_id=evidence_id, provider=self.issuer.name,
                            postal_address=settings.postal_address, mailbox=row.mailbox,
                            file=row.file)
        data = json.dumps(ev, sort_keys=True).encode()
        return [NewItem("fallback", self.issuer.service_address, (row.recipient,), data=data,
                        meta={"fallback": channel, "msgid": row.pec_id})
                for channel in channels]

    def _done_with(self, mailbox: str, file: str) -> None:
        """A read file needs no watching; a mailbox with none left unread gives its watch back
        (inotify watches are a per-user kernel budget, ``fs.inotify.max_user_watches``)."""
        left = self._unread.get(mailbox)
        if left is None:
            return
        left.discard(file)
        if left:
            return
        del self._unread[mailbox]
        wd = self._watches.pop(mailbox, None)
        if wd is not None and self._inotify is not None:
            self._by_wd.pop(wd, None)  # so the IN_IGNORED of our own removal is not a loss
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)

    async def _deadlines(self) -> int:
        now = self.clock.now().timestamp()
        rows = await self.queue.db.transact(lambda conn: readings.due_not_read(conn, now))
        done = 0
        loop = asyncio.get_running_loop()
        for row in rows:
            # a read whose event was missed is a read, not a failure: look once before saying no
            if row.file in await loop.run_in_executor(self.cpu, _seen_in, row.mailbox):
                if await self._read(row.file):
                    done += 1
                continue
            if await self._commit(row, "ContentHandoverFailure"):
                done += 1
        return done

    async def run_once(self) -> int:
        """One pass: watch new rows (finding reads they already had), handle collected events,
        issue due not-read evidence. Returns how many evidence messages were committed."""
        self.open()
        done = await self._watch_new_rows()
        done += await self.process_events()
        done += await self._deadlines()
        return done

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            while not self._stopping.is_set():
                try:
                    await self.run_once()
                except Exception:  # a bad moment (disk full, TSA down) must not end the worker
                    log.exception("reading pass failed; retrying")
                wait_stop = asyncio.ensure_future(self._stopping.wait())
                wait_event = asyncio.ensure_future(self._wait_event())
                _done, pending = await asyncio.wait({wait_stop, wait_event},
                                                    timeout=self.interval,
                                                    return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.close()

    async def _wait_event(self) -> None:
        batch = await self._events.get()
        self._events.put_nowait(batch)  # handled by the next pass, in order

    async def drain(self, timeout: float) -> None:
        """Stop after the pass under way, if any (so no commit is cut off halfway)."""
        self._stopping.set()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)


def _seen_in(mailbox: str) -> set[str]:
    """Base names of the files in ``<mailbox>/cur`` flagged ``S`` (one listing)."""
    out: set[str] = set()
    try:
        with os.scandir(Path(mailbox) / "cur") as entries:
            for entry in entries:
                parsed = seen_flag(entry.name)
                if parsed is not None and parsed[1]:
                    out.add(parsed[0])
    except OSError:
        pass
    return out


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
