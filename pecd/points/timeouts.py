"""Timeouts of our own transactions (RFC 6109 §3.1.6): the 12 h warning and the 24 h end.

Receives the ``tracking`` rows the access point writes at acceptance (one per transaction and
recipient) and the reception point updates as take-charge, delivery and non-delivery receipts
come back. Trusts only that table and the clock; touches the queue (the notices, through the one
``enqueue`` path) and ``tracking``.

:func:`decide` is pure: rows and a time in, what is due out.

- **Warning** (``warning_after``, 12 h): a ``certificato`` recipient for whom neither take-charge
  nor delivery came. The transaction stays open.
- **Final** (``give_up_after``, 24 h): a ``certificato`` recipient with no delivery and no
  non-delivery. Due ``margin`` (the worker's tick) before ``give_up_after`` so that it is out by
  then, and never before 22/24 of it (22 h with the legal durations). The recipient's tracking
  row is closed with outcome ``timeout``: the transaction ends negative, and a delivery receipt
  arriving later is still passed on and recorded, but changes neither.
- When a recipient is due both notices at once (pecd was down across the warning time), only
  the final one goes: a warning that promises "another notice within 12 hours" would be false.
- **esterno** recipients (ordinary Internet mail) never send receipts, so they get no timeout
  notice: the acceptance receipt already told the sender they are "posta ordinaria". Their rows
  are closed silently (outcome ``esterno``) at ``give_up_after`` so the open set stays small.

Notices are one per transaction and kind, listing the recipients concerned, addressed to the
sender (§2.1.1.1.2; the RFC's "To: original recipient" in §3.1.6 is a slip).

:class:`TimeoutWorker` runs :func:`decide` every ``min(60 s, warning_after / 10)``, signs the
notices in the executor, and commits each notice with its tracking update and its ledger row
(``timeout-warning`` / ``timeout``) in one transaction. The update re-checks inside that
transaction that the rows are still in the state the decision saw; if a receipt (or another
pass) changed them meanwhile, the whole commit is undone. So a notice is never sent twice, and
a crash before the commit loses only work that the next pass redoes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from pecd.clock import Clock
from pecd.config import Config
from pecd.format import daticert, receipts
from pecd.format.pec import Issuer, Transaction
from pecd.store import Connection, tracking
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Effect, NewItem, Queue

log = logging.getLogger("pecd.timeouts")

Action = Literal["warning", "final", "close-esterno"]
EARLIEST_FINAL = 22 / 24  # §3.1.6: the 24 h notice never before 22 h


@dataclass(frozen=True)
class Tracked:
    """One ``tracking`` row; times are POSIX seconds."""

    pec_id: str
    recipient: str
    sender: str
    subject: str | None
    ref_msgid: str | None
    kind: str
    accepted: float
    taken: float | None = None
    delivered: float | None = None
    warned: float | None = None
    closed: float | None = None
    outcome: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Tracked:
        return cls(
            pec_id=row["pec_id"], recipient=row["recipient"], sender=row["sender"],
            subject=row["subject"], ref_msgid=row["ref_msgid"], kind=row["kind"],
            accepted=row["accepted"], taken=row["taken"], delivered=row["delivered"],
            warned=row["warned"], closed=row["closed"], outcome=row["outcome"],
        )


@dataclass(frozen=True)
class Policy:
    warning_after: float
    give_up_after: float
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.warning_after < self.give_up_after:
            raise ValueError("[timeouts] needs 0 < warning_after < give_up_after")
        if self.margin < 0:
            raise ValueError("margin must not be negative")

    @property
    def final_after(self) -> float:
        return max(self.give_up_after - self.margin, self.give_up_after * EARLIEST_FINAL)


@dataclass(frozen=True)
class Due:
    """One decision: a notice (or a silent close) for ``recipients`` of transaction ``pec_id``.
    ``rows`` are all the transaction's rows, for the notice's recipient list."""

    action: Action
    pec_id: str
    recipients: tuple[str, ...]
    rows: tuple[Tracked, ...]


def decide(rows: Iterable[Tracked], now: float, policy: Policy) -> list[Due]:
    """What is due at ``now``; at most one decision per transaction and action."""
    by_tx: dict[str, list[Tracked]] = {}
    for row in rows:
        by_tx.setdefault(row.pec_id, []).append(row)
    out: list[Due] = []
    for pec_id, tx_rows in by_tx.items():
        final, warning, esterno = [], [], []
        for r in tx_rows:
            if r.closed is not None:
                continue
            age = now - r.accepted
            if r.kind != "certificato":
                if age >= policy.give_up_after:
                    esterno.append(r.recipient)
            elif r.delivered is not None:
                continue
            elif age >= policy.final_after:
                final.append(r.recipient)
            elif (age >= policy.warning_after and r.warned is None and r.taken is None):
                warning.append(r.recipient)
        for action, recipients in (("warning", warning), ("final", final),
                                   ("close-esterno", esterno)):
            if recipients:
                out.append(Due(cast(Action, action), pec_id, tuple(recipients), tuple(tx_rows)))
    return out


def transaction(rows: Sequence[Tracked], issuer_name: str) -> Transaction:
    """The transaction as the acceptance receipt described it, rebuilt from its tracking rows.
    (The table keeps no Reply-To: ``risposte`` repeats the sender.)"""
    first = rows[0]
    return Transaction(
        identifier=first.pec_id, ref_msgid=first.ref_msgid, sender=first.sender,
        recipients=tuple(
            daticert.Recipient(r.recipient, "esterno" if r.kind == "esterno" else "certificato")
            for r in rows
        ),
        reply_to=first.sender, subject=first.subject or "",
        accepted_at=datetime.fromtimestamp(first.accepted, UTC), issuer_name=issuer_name,
    )


class Stale(Exception):
    """The tracking rows changed after the decision; the notice is no longer due."""


_OUTCOME = {"warning": None, "final": "timeout", "close-esterno": "esterno"}


def mark(due: Due, at: float) -> Effect:
    """The tracking update of ``due``; raises :class:`Stale` (undoing the commit) when any of
    its rows is no longer in the state the decision saw."""
    outcome = _OUTCOME[due.action]

    def effect(conn: Connection) -> None:
        for rcpt in due.recipients:
            if not tracking.mark_due(conn, due.action, due.pec_id, rcpt, at, outcome):
                raise Stale(f"{due.pec_id} {rcpt}: no longer due for {due.action}")

    return effect


def load_open(conn: Connection, accepted_before: float) -> list[Tracked]:
    """Every row of each transaction that has an open, undelivered row old enough to matter."""
    return [Tracked.from_row(r) for r in tracking.open_transactions(conn, accepted_before)]


class TimeoutWorker:
    """Runs :func:`decide` periodically and commits what is due; ``run_once`` for tests."""

    def __init__(self, config: Config, issuer: Issuer, queue: Queue, clock: Clock,
                 cpu: Executor) -> None:
        t = config.timeouts
        self.interval = min(60.0, t.warning_after / 10)
        self.policy = Policy(t.warning_after, t.give_up_after, margin=self.interval)
        self.issuer = issuer
        self.queue = queue
        self.clock = clock
        self.cpu = cpu
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """One pass: returns how many decisions were committed."""
        now = self.clock.now().timestamp()
        horizon = now - min(self.policy.warning_after, self.policy.final_after)
        rows = await self.queue.db.transact(lambda conn: load_open(conn, horizon))
        done = 0
        for due in decide(rows, now, self.policy):
            if await self.commit(due):
                done += 1
        return done

    async def commit(self, due: Due) -> bool:
        """Build the notice of ``due`` and commit it with its tracking update and ledger row;
        False when the rows changed since the decision (nothing is committed then)."""
        at = self.clock.now()
        items: list[NewItem] = []
        events: list[LedgerEvent] = []
        if due.action != "close-esterno":
            loop = asyncio.get_running_loop()
            tx = transaction(due.rows, self.issuer.name)
            final = due.action == "final"
            notice_id, notice = await loop.run_in_executor(
                self.cpu, receipts.timeout_notice, tx, due.recipients, self.issuer, at, final)
            items.append(NewItem("deliver", self.issuer.service_address, (tx.sender,),
                                 data=notice, meta={"mode": "plain", "msgid": notice_id,
                                                    "what": "timeout"}))
            events.append(LedgerEvent(
                event="timeout" if final else "timeout-warning", msgid=tx.identifier,
                ref_msgid=tx.ref_msgid, sender=tx.sender, recipients=due.recipients,
                subject=tx.subject, provider=self.issuer.name, related=(notice_id,),
                detail={"after_seconds": self.policy.give_up_after if final
                        else self.policy.warning_after}))
        try:
            await self.queue.enqueue(items, events, effects=[mark(due, at.timestamp())])
        except Stale as exc:
            log.info("timeout notice dropped: %s", exc)
            return False
        return True

    async def run(self) -> None:
        self._task = asyncio.current_task()
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:  # a bad moment (disk full, TSA down) must not end the worker
                log.exception("timeout pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def drain(self, timeout: float) -> None:
        """Stop after the pass under way, if any (so no commit is cut off halfway)."""
        self._stopping.set()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)
