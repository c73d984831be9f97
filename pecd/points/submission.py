"""The access point (punto di accesso, RFC 6109 §3.1): what an authenticated user submitted
becomes an acceptance receipt for the sender and a signed transport envelope for the recipients,
or a non-acceptance notice saying why not.

Trusts: the SMTP layer for who the user is (AUTH) and that MAIL FROM and From: are theirs; the
queue for durability. Everything else about the message is checked here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from datetime import datetime

from pecd.clock import Clock
from pecd.config import Config
from pecd.format import checks, compose, daticert, envelope, headers, receipts
from pecd.format.checks import FormalCheckFailed
from pecd.format.pec import Issuer, ReceiptKind, Transaction
from pecd.points import consultation, virus
from pecd.points.relay import Router
from pecd.store import Connection, readings, tracking, users
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Item, NewItem, Outcome

RECEIPT_KINDS: dict[str, ReceiptKind] = {
    "completa": "completa", "breve": "breve", "sintetica": "sintetica",
}


def transaction_for(data: bytes, mail_from: str, rcpts: tuple[str, ...], router: Router,
                    issuer: Issuer, at: datetime, reading_default: bool = False) -> Transaction:
    """The certification facts of a submission; the PEC id is new, the rest comes from it.
    Reading evidence: the message's ``X-Presa-Visione`` header, else ``reading_default``."""
    msg = headers.parse(data)
    asked = consultation.requested(msg.get(consultation.REQUEST_HEADER))
    kind = RECEIPT_KINDS.get(str(msg.get("X-TipoRicevuta", "")).strip().lower(), "completa")
    reply_to = (headers.addresses(msg, "Reply-To") or [mail_from])[0]
    return Transaction(
        identifier=compose.message_id(issuer.domain, at),
        ref_msgid=headers.message_id(msg),
        sender=mail_from,
        recipients=tuple(
            daticert.Recipient(r, "certificato" if router.is_certified(r) else "esterno")
            for r in rcpts
        ),
        reply_to=reply_to,
        subject=headers.text(msg, "Subject") or "",
        accepted_at=at,
        receipt_kind=kind,
        issuer_name=issuer.name,
        read_evidence=reading_default if asked is None else asked,
    )


class AccessPoint:
    def __init__(self, config: Config, issuer: Issuer, router: Router, clock: Clock,
                 read: Callable[[Item], bytes], cpu: Executor,
                 scanner: virus.Scanner | None = None, db: Database | None = None) -> None:
        self.config = config
        self.db = db  # for the sender's reading-evidence default (pecd.store.readings)
        self.issuer = issuer
        self.router = router
        self.clock = clock
        self.read = read
        self.cpu = cpu
        self.limits = checks.Limits(config.limits.max_message_size, config.limits.max_recipients)
        self.scanner = scanner  # None: scanning is off, and no receipt says otherwise
        self.quarantine = virus.Quarantine.for_config(config)

    async def handle(self, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        if self.scanner is not None:  # I/O first, then the CPU part in the executor
            data = await loop.run_in_executor(self.cpu, self.read, item)
            try:
                found = await self.scanner.scan(data)
            except virus.ScanError as exc:
                return virus.unavailable(item, exc)
            if found is not None:
                return await loop.run_in_executor(self.cpu, self._infected, item, data, found)
        return await loop.run_in_executor(self.cpu, self._handle, item,
                                          await self.reading_default(item.mail_from))

    async def reading_default(self, sender: str) -> bool:
        """The user's ``--read-evidence`` choice, else ``[consultation] default``."""
        own = None
        if self.db is not None:
            with contextlib.suppress(users.UserError):
                own = await self.db.transact(lambda conn: readings.user_default(conn, sender))
        return self.config.consultation.default if own is None else own

    def _handle(self, item: Item, reading_default: bool = False) -> Outcome:
        data = self.read(item)
        at = self.clock.now()
        tx = transaction_for(data, item.mail_from, item.rcpts, self.router, self.issuer, at,
                             reading_default)
        base = LedgerEvent(event="accepted", msgid=tx.identifier, ref_msgid=tx.ref_msgid,
                           sender=tx.sender, recipients=item.rcpts, subject=tx.subject,
                           provider=self.issuer.name)
        try:
            checks.formal_checks(headers.parse(data), item.mail_from, item.rcpts, len(data),
                                 self.limits, headers.header_block(data))
        except FormalCheckFailed as exc:
            notice_id, notice = receipts.non_acceptance(tx, self.issuer, at, str(exc))
            return Outcome(
                outputs=[NewItem("deliver", self.issuer.service_address, (tx.sender,),
                                 data=notice, meta={"mode": "plain", "msgid": notice_id})],
                events=[replace(base, event="refused", related=(notice_id,),
                                detail={"reason": str(exc), "queue_id": item.id})],
            )
        acc_id, acc = receipts.acceptance(tx, self.issuer, at)
        env = envelope.transport_envelope(tx, data, self.issuer, at)
        outputs = [NewItem("deliver", self.issuer.service_address, (tx.sender,), data=acc,
                           meta={"mode": "plain", "msgid": acc_id})]
        outputs += self.router.items(tx.sender, item.rcpts, env, local_kind="inbound",
                                     meta={"msgid": tx.identifier, "what": "envelope"})
        tracked = [(r.address, r.kind) for r in tx.recipients]

        def track(conn: Connection) -> None:
            tracking.open_rows(conn, tx.identifier, tx.sender, tx.subject, tx.ref_msgid,
                               tracked, at.timestamp())

        return Outcome(
            outputs=outputs,
            events=[replace(base, related=(acc_id,),
                            detail={"queue_id": item.id, "receipt_kind": tx.receipt_kind,
                                    "recipient_kinds": dict(tracked)})],
            effects=[track],
        )

    def _infected(self, item: Item, data: bytes, found: str) -> Outcome:
        """Non-acceptance for virus (§3.1.3), never with the original; the message is kept."""
        at = self.clock.now()
        tx = transaction_for(data, item.mail_from, item.rcpts, self.router, self.issuer, at)
        kept = self.quarantine.store(item.name, data)
        reason = f"virus {found}"
        notice_id, notice = receipts.non_acceptance(tx, self.issuer, at, reason, virus=True)
        return Outcome(
            outputs=[NewItem("deliver", self.issuer.service_address, (tx.sender,), data=notice,
                             meta={"mode": "plain", "msgid": notice_id, "what": "non-acceptance"})],
            events=[LedgerEvent(event="refused", msgid=tx.identifier, ref_msgid=tx.ref_msgid,
                                sender=tx.sender, recipients=item.rcpts, subject=tx.subject,
                                provider=self.issuer.name, related=(notice_id,),
                                detail={"reason": reason, "error": "virus", "virus": found,
                                        "quarantine": kept.name, "queue_id": item.id})],
        )
