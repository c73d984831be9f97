"""The delivery point (punto di consegna, RFC 6109 §3.3): stores into the recipient's mailbox and,
for certified mail, sends the sender a delivery receipt or a non-delivery notice: ``no-dest`` for
a mailbox that does not exist, ``no-dominio`` for a domain this provider does not manage (a peer
whose index still lists it sent us the envelope), ``altro`` for a mailbox that exists but cannot
take mail (disabled, over quota, refused by the store).

Mailboxes are Maildirs at ``<data>/mail/<domain>/<local part>/`` (Dovecot's ``%d/%n``). A file
is written in ``tmp/``, fsynced and linked into ``new/`` under a name made only from the queue
item (never from message content), so a retry after a crash finds its own earlier delivery and
does not deliver twice (queue ids are never reused: ``AUTOINCREMENT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from pecd.clock import Clock
from pecd.config import Config
from pecd.format import daticert, headers, pec, receipts
from pecd.format.pec import Issuer, Transaction
from pecd.points import arrival, consultation
from pecd.points.relay import Router
from pecd.store import Connection, durable, readings, users
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Effect, Item, NewItem, Outcome, backoff

MailboxState = Literal["active", "disabled", "unknown", "foreign"]

_SAFE_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~-][A-Za-z0-9.!#$%&'*+=?^_`{|}~-]*$")
_SAFE_DOMAIN = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


class MailboxError(Exception):
    """The mailbox cannot take the message, for good (no such user, unsafe name, over quota)."""


class MailboxUnavailable(Exception):
    """The mail store cannot take the message now (4xx, no connection); the item is retried."""


class Mailbox(Protocol):
    """Where delivered mail is stored. ``store`` is blocking (called from a worker thread) and
    idempotent for the same ``key``: a retry after a crash must not deliver twice."""

    def store(self, address: str, key: str, created: float, data: bytes) -> object: ...


class Maildir:
    def __init__(self, root: Path, hostname: str) -> None:
        self.root = root
        self.hostname = re.sub(r"[^A-Za-z0-9.-]", "_", hostname)

    def path(self, address: str) -> Path:
        """``<root>/<domain>/<local>``: the domain lower-cased (as accounts store it), both parts
        one plain directory name each, never ``.``/``..``/hidden and never a path separator."""
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        if (not _SAFE_LOCAL.fullmatch(local) or ".." in local or len(local) > 255
                or not _SAFE_DOMAIN.fullmatch(domain) or len(domain) > 255):
            raise MailboxError(f"unsafe mailbox name {address!r}")
        return self.root / domain / local

    def store(self, address: str, key: str, created: float, data: bytes) -> Path:
        """Idempotent for the same ``key``: a second call finds the first file."""
        box = self.path(address)
        name = f"{int(created)}.{key}.{self.hostname}"
        for sub in ("tmp", "new", "cur"):
            durable.private_dir(box / sub)
        final = box / "new" / name
        if self._exists(box, name):
            return final
        durable.publish(box / "tmp" / name, data, final)
        return final

    @staticmethod
    def _exists(box: Path, name: str) -> bool:
        return ((box / "new" / name).exists() or any((box / "cur").glob(f"{name}:*"))
                or (box / "cur" / name).exists())

    def stored(self, address: str, key: str, created: float) -> bool:
        """Whether ``store`` with this key already happened (a retry after a crash)."""
        return self._exists(self.path(address), f"{int(created)}.{key}.{self.hostname}")

    def usage(self, address: str) -> int:
        """Bytes of mail in the Maildir now: ``new/`` and ``cur/`` of INBOX and of every
        folder (``.Name/``), as Dovecot leaves them (it may have deleted some); one listing."""
        box = self.path(address)
        total = 0
        for folder in (box, *(p for p in _subdirs(box) if p.name.startswith("."))):
            for sub in ("new", "cur"):
                try:
                    with os.scandir(folder / sub) as entries:
                        for entry in entries:
                            with contextlib.suppress(OSError):  # renamed meanwhile
                                if entry.is_file(follow_symlinks=False):
                                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
        return total


def _subdirs(box: Path) -> list[Path]:
    try:
        return [p for p in box.iterdir() if p.is_dir()]
    except OSError:
        return []


class DeliveryPoint:
    def __init__(self, config: Config, issuer: Issuer, router: Router, db: Database,
                 mailbox: Mailbox, clock: Clock, read: Callable[[Item], bytes],
                 cpu: Executor) -> None:
        self.config = config
        self.issuer = issuer
        self.router = router
        self.db = db
        self.mailbox = mailbox
        self.clock = clock
        self.read = read
        self.cpu = cpu

    async def mailbox_state(self, address: str) -> MailboxState:
        if address.lower() == self.config.service_address.lower():
            return "active"
        if not self.config.is_local(address):
            return "foreign"
        return await self.db.transact(lambda conn: users.mailbox_state(conn, address))

    async def handle(self, item: Item) -> Outcome:
        states = {r: await self.mailbox_state(r) for r in item.rcpts}
        settings = readings.Settings()
        if item.meta.get("mode") == "certified" and states[item.rcpts[0]] == "active":
            rcpt = item.rcpts[0]
            settings = await self.db.transact(lambda conn: readings.settings(conn, rcpt))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.cpu, self._handle, item, states, settings)
        except MailboxUnavailable as exc:  # stores are idempotent per key: retrying is safe
            event = LedgerEvent(event="deferred", msgid=_msgid(item), recipients=item.rcpts,
                                detail={"reason": str(exc), "stage": "delivery"})
            if item.attempts + 1 >= self.config.relay.max_attempts:
                return Outcome(state="hold", error=str(exc), events=[event])
            delay = backoff(item.attempts, self.config.relay.retry_base,
                            self.config.relay.retry_max, random.random())
            return Outcome(state="deferred", delay=delay, error=str(exc), events=[event])

    def _handle(self, item: Item, states: dict[str, MailboxState],
                settings: readings.Settings | None = None) -> Outcome:
        data = self.read(item)
        if item.meta.get("mode") == "certified":
            return self._certified(item, data, states[item.rcpts[0]],
                                   settings or readings.Settings())
        events = []
        for rcpt in item.rcpts:
            if states[rcpt] != "active":  # no notice for what was not certified (§2.2.3)
                events.append(LedgerEvent(event="undeliverable", msgid=_msgid(item),
                                          recipients=(rcpt,),
                                          detail={"reason": _UNDELIVERABLE[states[rcpt]]}))
                continue
            try:
                self.mailbox.store(rcpt, f"{item.id}-{_slot(item, rcpt)}", item.created, data)
            except MailboxError as exc:
                events.append(LedgerEvent(event="undeliverable", msgid=_msgid(item),
                                          recipients=(rcpt,), detail={"reason": str(exc)}))
                continue
            events.append(LedgerEvent(event="stored", msgid=_msgid(item), recipients=(rcpt,),
                                      detail={"what": item.meta.get("what", "receipt")}))
        return Outcome(events=events)

    def _certified(self, item: Item, data: bytes, state: MailboxState,
                   settings: readings.Settings) -> Outcome:
        rcpt = item.rcpts[0]
        parsed = pec.parse(data)  # verified by the reception point before it queued this item
        assert parsed.certdata is not None
        tx = Transaction.from_certdata(parsed.certdata)
        if not any(headers.same_address(rcpt, r.address) for r in tx.recipients):
            # the reception point never queues this (a replay to someone else ends as an
            # anomaly there); were it ever to, nothing certified goes out and an operator looks
            reason = "not a certified recipient of this envelope"
            return Outcome(state="hold", error=reason, events=[LedgerEvent(
                event="held", msgid=tx.identifier, recipients=(rcpt,),
                detail={"reason": reason, "queue_id": item.id, "stage": "deliver"})])
        at = self.clock.now()
        base = LedgerEvent(event="delivered", msgid=tx.identifier, ref_msgid=tx.ref_msgid,
                           sender=tx.sender, recipients=(rcpt,), subject=tx.subject)

        def refuse(error: daticert.ErrorKind, reason: str) -> Outcome:
            notice_id, notice = receipts.non_delivery(tx, rcpt, error, reason, self.issuer, at)
            return Outcome(
                outputs=self.router.items(self.issuer.service_address, [tx.sender], notice,
                                          local_kind="inbound",
                                          meta={"msgid": notice_id, "what": "non-delivery"}),
                events=[replace(base, event="non-delivery", related=(notice_id,),
                                detail={"error": error, "reason": reason})],
            )

        if state != "active":
            error, reason = _NON_DELIVERY[state]
            return refuse(error, reason)
        quota = settings.quota or self.config.delivery.quota
        used: int | None = None
        if quota is not None and isinstance(self.mailbox, Maildir):
            try:
                if not self.mailbox.stored(rcpt, f"{item.id}-0", item.created):
                    used = self.mailbox.usage(rcpt)
            except MailboxError as exc:
                return refuse("altro", f"the mailbox cannot take the message: {exc}")
            if used is not None and used + len(data) > quota:
                return refuse("altro", f"mailbox full: casella piena ({used} of {quota} bytes "
                                       f"used, the message needs {len(data)})")
        try:
            stored = self.mailbox.store(rcpt, f"{item.id}-0", item.created, data)
        except MailboxError as exc:  # over quota, unsafe name, refused by the store
            return refuse("altro", f"the mailbox cannot take the message: {exc}")
        effects: list[Effect] = []
        if isinstance(stored, Path):
            effects.append(self._list_stored(tx, rcpt, stored, at.timestamp()))
            if self._reading_requested(parsed, tx):
                effects.append(self._watch_reading(tx, rcpt, stored, at.timestamp(),
                                                   settings.read_deadline))
                base = replace(base, detail={"read_evidence": True})
        original = parsed.original_headers()
        cc = rcpt.lower() in {a.lower() for a in headers.addresses(original, "Cc")} and \
            rcpt.lower() not in {a.lower() for a in headers.addresses(original, "To")}
        form = receipts.delivery_form(tx, rcpt, cc)
        receipt_id, receipt = receipts.delivery(tx, rcpt, form, parsed.original_view, self.issuer,
                                                  at)
        outputs = self.router.items(self.issuer.service_address, [tx.sender], receipt,
                                    local_kind="inbound",
                                    meta={"msgid": receipt_id, "what": "delivery-receipt"})
        events = [replace(base, related=(receipt_id,), detail={**base.detail, "form": form})]
        if settings.notify:
            notice_items, notice_event = self._arrival_notice(tx, rcpt, settings.notify, at)
            outputs += notice_items
            events.append(notice_event)
        if quota is not None and used is not None:
            self._quota_level(rcpt, used + len(data), quota, settings.quota_warned, at,
                              outputs, events, effects)
        return Outcome(outputs=outputs, events=events, effects=effects)

    def _quota_level(self, rcpt: str, used: int, quota: int, warned: int, at: datetime,
                     outputs: list[NewItem], events: list[LedgerEvent],
                     effects: list[Effect]) -> None:
        """Warn the holder once per crossing of 80% and 95%; a level that dropped (mail
        deleted) is lowered, so the next crossing warns again."""
        level = next((pc for pc in QUOTA_WARNINGS if used * 100 >= quota * pc), 0)
        if level == warned:
            return
        effects.append(lambda conn: readings.set_quota_warned(conn, rcpt, level))
        if level < warned:
            return
        notice_id, notice = arrival.quota_warning(
            service_address=self.issuer.service_address, provider_name=self.issuer.name,
            domain=self.issuer.domain, mailbox=rcpt, level=level, used=used, quota=quota, at=at)
        outputs.append(NewItem("deliver", self.issuer.service_address, (rcpt,), data=notice,
                               meta={"mode": "plain", "msgid": notice_id,
                                     "what": "quota-warning"}))
        events.append(LedgerEvent(event="quota-warning", recipients=(rcpt,),
                                  related=(notice_id,),
                                  detail={"level": level, "used": used, "quota": quota}))

    def _arrival_notice(self, tx: Transaction, rcpt: str, to: str,
                        at: datetime) -> tuple[list[NewItem], LedgerEvent]:
        """A plain notice to the recipient's ordinary address, queued as its own item: the
        relay retries it or gives up on it without touching the delivery."""
        notice_id, notice = arrival.notice(
            service_address=self.issuer.service_address, provider_name=self.issuer.name,
            domain=self.issuer.domain, to=to, mailbox=rcpt, sender=tx.sender,
            subject=tx.subject, pec_id=tx.identifier, at=at)
        items = self.router.items(self.issuer.service_address, [to], notice,
                                  local_kind="deliver",
                                  meta={"mode": "plain", "msgid": notice_id,
                                        "what": "arrival-notice"})
        return items, LedgerEvent(event="arrival-notice", msgid=tx.identifier,
                                  ref_msgid=tx.ref_msgid, sender=tx.sender, recipients=(rcpt,),
                                  subject=tx.subject, related=(notice_id,),
                                  detail={"to": to})

    def _reading_requested(self, parsed: pec.Parsed, tx: Transaction) -> bool:
        """Reading evidence is due when this provider issues it, the envelope asks for it
        (``X-Presa-Visione: si``, set by the sender's provider) and the sender's provider's
        card declares it: a plain PEC provider would take the evidence for an anomaly."""
        if not self.config.consultation.enabled:
            return False
        if consultation.requested(parsed.headers.get(consultation.REQUEST_HEADER)) is not True:
            return False
        if self.config.is_local(tx.sender):
            return True
        provider = self.router.index.for_address(tx.sender)
        return provider is not None and provider.read_evidence

    @staticmethod
    def _list_stored(tx: Transaction, rcpt: str, stored: Path, at: float) -> Effect:
        """The message in the recipient's list (the HTTP API's ``/api/v1/mailbox``)."""
        mailbox, file = str(stored.parent.parent), stored.name

        def effect(conn: Connection) -> None:
            readings.record_stored(conn, pec_id=tx.identifier, recipient=rcpt,
                                   sender=tx.sender, subject=tx.subject, delivered=at,
                                   mailbox=mailbox, file=file)

        return effect

    def _watch_reading(self, tx: Transaction, rcpt: str, stored: Path,
                       at: float, own_deadline: float | None) -> Effect:
        """The row the reading point watches; its deadline is the recipient's own period
        (``pecd user set --read-deadline``) or else the provider's."""
        mailbox, file = str(stored.parent.parent), stored.name
        deadline = at + (own_deadline or self.config.consultation.deadline)

        def effect(conn: Connection) -> None:
            readings.record(conn, pec_id=tx.identifier, recipient=rcpt, sender=tx.sender,
                            subject=tx.subject, ref_msgid=tx.ref_msgid, mailbox=mailbox,
                            file=file, delivered=at, deadline=deadline)

        return effect


QUOTA_WARNINGS = (95, 80)  # per cent, highest first

_NON_DELIVERY: dict[MailboxState, tuple[daticert.ErrorKind, str]] = {
    "unknown": ("no-dest", "mailbox does not exist"),
    "foreign": ("no-dominio", "the domain is not managed by this provider"),
    "disabled": ("altro", "mailbox disabled"),
}
_UNDELIVERABLE: dict[MailboxState, str] = {
    "unknown": "no such mailbox", "foreign": "domain not managed here", "disabled": "mailbox disabled",
    "active": "",
}


def _msgid(item: Item) -> str | None:
    value = item.meta.get("msgid")
    return str(value) if value else None


def _slot(item: Item, rcpt: str) -> int:
    return item.rcpts.index(rcpt)
