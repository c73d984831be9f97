"""The incoming point (punto di ricezione, RFC 6109 §3.2): mail from other providers and from the
Internet. A transport envelope whose signature holds, whose signer is in the provider index and
whose sender domain belongs to that signer is taken in charge (one take-charge receipt per
transaction) for the recipients it certifies, each (PEC id, recipient) once ever, and handed to
the delivery point; a valid receipt goes to its addressee and updates the tracking of our own
transactions; certified mail from the network counts only if it came over TLS; anything else
reaches the recipient only inside an anomaly envelope, never as certified mail.

Trusts: the provider index and the configured CA certificates, nothing in the message itself;
the signer's CRL / OCSP status only as far as its issuer signed it (:mod:`pecd.trust.revocation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from pecd.clock import Clock
from pecd.config import Config
from pecd.format import daticert, envelope, headers, pec, receipts
from pecd.format.pec import Issuer, Transaction
from pecd.points import virus
from pecd.points.relay import Router
from pecd.store import Connection, readings, tracking
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import Item, NewItem, Outcome
from pecd.trust import revocation as revocation_mod
from pecd.trust.cms import SignatureInfo, SignatureInvalid, verify_detached
from pecd.trust.index import Provider, ProviderIndex
from pecd.trust.paths import DEFAULT_POLICY, AlgorithmPolicy
from pecd.trust.verdict import kind_of


class NotCertified(Exception):
    """Why a message cannot be treated as certified; becomes the anomaly envelope's reason.
    ``kind`` is the verdict class (pecd.trust.verdict) the anomaly's ledger row records."""

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Verified:
    parsed: pec.Parsed
    provider: Provider
    signature: SignatureInfo

    def evidence(self) -> dict[str, object]:
        """What the ledger keeps of the signature: its digest, marked when only accepted for
        interoperability (SHA-1)."""
        detail: dict[str, object] = {"digest": self.signature.digest}
        if self.signature.weak_digest:
            detail["weak_digest"] = True
        return detail


def verify(data: bytes, mail_from: str, index: ProviderIndex,
           trust_roots: Sequence[x509.Certificate], at: datetime | None = None,
           policy: AlgorithmPolicy = DEFAULT_POLICY) -> Verified:
    """Signature, signer in the index, sender domain managed by that signer: all or nothing.

    ``at`` is when the message reached us: the signer's certificate must be valid then (without
    it, at the time the signature itself claims, which a stolen expired key can choose). The
    signer must manage the domain of the SMTP sender and, for an envelope, of the certified
    sender in daticert.xml; a receipt saying it delivered to, or took charge for, an address
    must come from the provider of that address's domain.
    """
    try:
        parsed = pec.parse(data)
    except pec.NotPec as exc:
        raise NotCertified(str(exc)) from None
    if parsed.category not in ("envelope", "receipt"):
        raise NotCertified("not a certified message")
    assert parsed.signed is not None  # envelopes and receipts are split by pec.parse
    try:
        info = verify_detached(parsed.signed.signature, parsed.signed.inner_view, trust_roots, at=at,
                               policy=policy)
    except SignatureInvalid as exc:
        raise NotCertified(f"signature not valid: {exc}", kind_of(exc)) from None
    provider = index.for_certificate(info.signer)
    if provider is None:
        raise NotCertified("the signer is not a provider in the index", "untrusted")
    domain = mail_from.rpartition("@")[2].lower()
    if domain not in provider.domains:
        raise NotCertified(f"sender domain {domain} is not managed by {provider.name}", "untrusted")
    cd = parsed.certdata
    vouched: tuple[str, ...] = ()
    if cd is not None and parsed.category == "envelope":
        vouched = (cd.sender,)
    elif cd is not None and cd.type in _PER_RECIPIENT and cd.delivered_to:
        vouched = (cd.delivered_to,)
    elif cd is not None and cd.type == "presa-in-carico":
        vouched = cd.taken_in_charge
    for address in vouched:
        other = address.rpartition("@")[2].lower()
        if other not in provider.domains:
            raise NotCertified(f"{address} is not in a domain managed by {provider.name}", "untrusted")
    return Verified(parsed, provider, info)


Claimed = Callable[[str, Sequence[str]], Awaitable[Mapping[str, list[NewItem]]]]


@dataclass(frozen=True)
class Judged:
    """A message read and verified: ``verified`` when it may be treated as certified, else
    ``reason`` says why not (the anomaly envelope's text) and ``kind`` in one word (the anomaly
    row's ``verdict``: pecd.trust.verdict's classes, or ``plaintext``, ``misaddressed``)."""

    data: bytes
    verified: Verified | None
    reason: str = ""
    kind: str = "malformed"


class ReceptionPoint:
    """Takes in charge what :func:`verify` accepts, for the envelope's certified recipients
    only, each (PEC id, recipient) at most once ever.

    An SMTP recipient that is not among the recipients certified in the envelope's daticert.xml
    (a signed envelope taken from a mailbox and replayed to someone else) gets the envelope only
    inside an anomaly envelope, like any message that fails the checks (RFC 6109 §3.2.2): no
    take-charge names it, no delivery receipt goes to the sender for it. The anomaly rather than
    a refusal, because the verdict comes after the SMTP transaction (the listener judges
    nothing, and one DATA reply cannot refuse some recipients and take others), and because the
    replayer gains nothing over sending the same bytes as ordinary mail, which ends the same
    way. A certified recipient already taken in charge for that PEC id (the durable ``seen``
    keys, :func:`recipient_key`) gets nothing again, however recipients are grouped across
    transactions; a transaction that is all repeats (a peer that lost our 250) gets the
    take-charge receipt sent again. A receipt goes only to the mailbox it is for: the sender it
    names, or, for a take-charge or virus-detection notice, our service mailbox.

    Certified mail from the network must have come over TLS (``[inbound] require_tls``,
    :class:`~pecd.config.Inbound`); the listener says so in the item's meta.
    """

    def __init__(self, config: Config, issuer: Issuer, router: Router, index: ProviderIndex,
                 trust_roots: Sequence[x509.Certificate], clock: Clock,
                 read: Callable[[Item], bytes], cpu: Executor,
                 scanner: virus.Scanner | None = None,
                 revocation: revocation_mod.Checker | None = None,
                 claimed: Claimed | None = None) -> None:
        self.config = config
        self.issuer = issuer
        self.router = router
        self.index = index
        self.trust_roots = list(trust_roots)
        self.clock = clock
        self.read = read
        self.cpu = cpu
        self.scanner = scanner
        self.claimed = claimed  # None: nothing is looked up (tests of the pure path)
        self.quarantine = virus.Quarantine.for_config(config)
        self.revocation = revocation

    async def handle(self, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        found = None
        if self.scanner is not None:  # I/O first, then the CPU part in the executor
            data = await self._data(item)
            if pec.classify(data) == "envelope":
                try:
                    found = await self.scanner.scan(data)
                except virus.ScanError as exc:
                    return virus.unavailable(item, exc)
        decision = await self._revocation(item)
        judged = await loop.run_in_executor(self.cpu, self._judge, item)
        taken: Mapping[str, list[NewItem]] = {}
        v = judged.verified
        if v is not None and v.parsed.category == "envelope" and self.claimed is not None:
            assert v.parsed.certdata is not None
            keys = [recipient_key(v.parsed.certdata.identifier, r) for r in item.rcpts]
            taken = await self.claimed(v.provider.fingerprint, keys)
        return await loop.run_in_executor(self.cpu, self._decide, item, judged, found, taken,
                                          decision)

    async def _revocation(self, item: Item) -> revocation_mod.Decision | None:
        """The signer's revocation status at the arrival time, with ``[reception] revocation``
        applied (material fetched here, on the event loop's terms, not in ``_handle``)."""
        if self.revocation is None:
            return None
        data = await self._data(item)
        return await self.revocation.check(data, datetime.fromtimestamp(item.created, UTC))

    async def _data(self, item: Item) -> bytes:
        """The item's bytes: read in the executor from a spool file, taken as they are from
        the queue row (no worker-thread hop for what is already in memory)."""
        if item.body is not None:
            return self.read(item)
        return await asyncio.get_running_loop().run_in_executor(self.cpu, self.read, item)

    def _handle(self, item: Item, found: str | None = None,
                decision: revocation_mod.Decision | None = None,
                taken: Mapping[str, list[NewItem]] | None = None) -> Outcome:
        """Judge and decide in one call, with ``taken`` as the keys already seen."""
        return self._decide(item, self._judge(item), found, taken or {}, decision)

    def _judge(self, item: Item) -> Judged:
        data = self.read(item)
        try:
            verified = verify(data, item.mail_from, self.index, self.trust_roots,
                              at=datetime.fromtimestamp(item.created, UTC),
                              policy=self.config.trust.policy)
        except NotCertified as exc:
            return Judged(data, None, str(exc), exc.kind)
        in_clear = item.meta.get("via") == "smtp" and not item.meta.get("tls")
        if in_clear and self.config.inbound.require_tls != "off":
            return Judged(data, None, f"certified message from {verified.provider.name} received"
                                      " over plaintext SMTP (TLS required)", "plaintext")
        return Judged(data, verified)

    def _decide(self, item: Item, judged: Judged, found: str | None,
                taken: Mapping[str, list[NewItem]],
                decision: revocation_mod.Decision | None = None) -> Outcome:
        verified, data = judged.verified, judged.data
        if verified is None:
            return self._anomaly(item, data, judged.reason, judged.kind)
        held = self._revocation_outcome(item, data, decision)
        if held is not None:
            return held
        if verified.parsed.category == "envelope":
            if found is not None:
                return self._infected(item, data, verified, found, taken)
            return self._envelope(item, data, verified, taken)
        if verified.parsed.certdata and verified.parsed.certdata.type == "rilevazione-virus":
            return self._virus_notice(item, data, verified)
        return self._receipt(item, data, verified)

    def _revocation_outcome(self, item: Item, data: bytes,
                            decision: revocation_mod.Decision | None) -> Outcome | None:
        """A verified message whose signer was revoked at the arrival time, or whose status
        stayed unknown past the grace, becomes an anomaly envelope; one still in its grace
        (the cache expired after the SMTP pre-check said it was known) waits in the queue."""
        if decision is None or decision.status.state in ("good", "unchecked"):
            return None
        status = decision.status
        if decision.action == "defer":
            retry = max(self.config.reception.revocation_retry, 5.0)
            events = [] if item.attempts else [LedgerEvent(
                event="revocation-deferred", sender=item.mail_from, recipients=item.rcpts,
                detail={"reason": status.reason[:2000], "queue_id": item.id})]
            return Outcome(state="deferred", delay=retry, error=status.reason[:500], events=events)
        if status.state == "unknown":
            return self._anomaly(item, data, f"{status.reason} (unknown for"
                                             f" {decision.unknown_for:.0f} s)", "revocation-unknown")
        return self._anomaly(item, data, status.reason, status.kind)

    def _anomaly(self, item: Item, data: bytes, reason: str, kind: str = "malformed",
                 rcpts: tuple[str, ...] | None = None) -> Outcome:
        rcpts = item.rcpts if rcpts is None else rcpts
        at = self.clock.now()
        wrapped = envelope.anomaly_envelope(data, rcpts, self.issuer, at, reason)
        return Outcome(
            outputs=[NewItem("deliver", item.mail_from, rcpts, data=wrapped,
                             meta={"mode": "plain", "what": "anomaly"})],
            events=[LedgerEvent(event="anomaly", sender=item.mail_from, recipients=rcpts,
                                detail={"reason": reason, "verdict": kind, "queue_id": item.id})],
        )

    def _strangers(self, item: Item, data: bytes, strangers: tuple[str, ...], what: str,
                   into: Outcome) -> Outcome:
        """Recipients a certified message was not for get it only as an anomaly envelope."""
        if strangers:
            extra = self._anomaly(item, data, f"not a recipient of this {what}", "misaddressed",
                                  strangers)
            into.outputs += extra.outputs
            into.events += extra.events
        return into

    def _envelope(self, item: Item, data: bytes, v: Verified,
                  taken: Mapping[str, list[NewItem]]) -> Outcome:
        assert v.parsed.certdata is not None
        at = self.clock.now()
        tx = Transaction.from_certdata(v.parsed.certdata)
        strangers, keys, fresh, again = _split(item.rcpts, tx, taken)
        outcome = self._strangers(item, data, strangers, "certified envelope", Outcome())
        if again:
            outcome.events.append(LedgerEvent(
                event="duplicate", msgid=tx.identifier, ref_msgid=tx.ref_msgid, sender=tx.sender,
                recipients=again, provider=v.provider.name, detail={"queue_id": item.id}))
        if not fresh:  # all repeats: the peer may have lost our 250, it gets our answer again
            outcome.outputs += _distinct(reply for r in again for reply in taken[keys[r]])
            return outcome
        # §3.2.1: one take-charge for the recipients in our jurisdiction; one in a domain we do
        # not manage gets only the delivery point's no-dominio notice
        ours = tuple(r for r in fresh if self.config.is_local(r))
        replay: list[NewItem] = []
        tc_id = ""
        if ours:
            tc_id, tc = receipts.take_charge(tx, ours, self.issuer, v.provider.service_address, at)
            replay = self.router.items(self.issuer.service_address,
                                       [v.provider.service_address], tc, local_kind="inbound",
                                       meta={"msgid": tc_id, "what": "take-charge"})
        outcome.outputs += replay
        for rcpt in fresh:
            outcome.outputs.append(NewItem("deliver", item.mail_from, (rcpt,), same_as=item,
                                           meta={"mode": "certified", "msgid": tx.identifier}))
        outcome.events.append(LedgerEvent(
            event="taken-in-charge", msgid=tx.identifier, ref_msgid=tx.ref_msgid,
            sender=tx.sender, recipients=fresh, subject=tx.subject, provider=v.provider.name,
            related=(tc_id,) if tc_id else (), detail={"queue_id": item.id, **v.evidence()}))
        outcome.claims = (v.provider.fingerprint, tuple(keys[r] for r in fresh))
        outcome.replay = list(replay)
        return outcome

    def _receipt(self, item: Item, data: bytes, v: Verified) -> Outcome:
        cd = v.parsed.certdata
        assert cd is not None
        if not self.config.is_local(cd.sender):  # a receipt is for our own transactions only
            return self._anomaly(item, data, f"{cd.type} receipt for a transaction of {cd.sender},"
                                             " not of this provider", "misaddressed")
        addressed, strangers = _addressed(item.rcpts, [_addressee(cd, self.config)])
        if not addressed:  # nothing for anyone here: no tracking, and the real one still counts
            return self._anomaly(item, data, f"not a recipient of this {cd.type} receipt",
                                 "misaddressed")
        message_id = (v.parsed.headers.get("Message-ID") or "").strip().strip("<>")
        now = self.clock.now().timestamp()
        effects: list[Callable[[Connection], None]] = []
        if cd.type == "avvenuta-consegna" and cd.delivered_to:
            effects.append(_track("delivered", cd.identifier, (cd.delivered_to,), now, "delivered"))
        elif cd.type == "presa-in-carico":
            effects.append(_track("taken", cd.identifier, cd.taken_in_charge, now))
        elif cd.type == "errore-consegna" and cd.delivered_to:
            effects.append(_track("closed", cd.identifier, (cd.delivered_to,), now, "errore"))
        elif cd.type in _READING and cd.delivered_to:  # reading evidence (pecd.points.reading)
            effects.append(_reading(cd.type, cd.identifier, cd.delivered_to, now))
        outcome = Outcome(
            outputs=[NewItem("deliver", item.mail_from, addressed, same_as=item,
                             meta={"mode": "plain", "msgid": message_id})],
            seen=(v.provider.fingerprint, message_id) if message_id else None,
            events=[LedgerEvent(event="receipt-received", msgid=cd.identifier,
                                ref_msgid=cd.msgid, sender=cd.sender, recipients=addressed,
                                subject=cd.subject, provider=v.provider.name,
                                related=(message_id,),
                                detail={"type": cd.type, "error": cd.error,
                                        "queue_id": item.id, **v.evidence()})],
            effects=effects,
        )
        return self._strangers(item, data, strangers, f"{cd.type} receipt", outcome)

    def _infected(self, item: Item, data: bytes, v: Verified, found: str,
                  taken: Mapping[str, list[NewItem]]) -> Outcome:
        """A valid envelope carrying a virus (§3.2.3): not delivered, not taken in charge; one
        virus-detection notice per certified recipient to the sending provider's service
        mailbox. Recipients it was not for get nothing (not even an anomaly: it is infected)."""
        assert v.parsed.certdata is not None
        at = self.clock.now()
        tx = Transaction.from_certdata(v.parsed.certdata)
        strangers, keys, fresh, again = _split(item.rcpts, tx, taken)
        kept = self.quarantine.store(item.name, data)
        outcome = Outcome()
        if strangers:
            outcome.events.append(LedgerEvent(
                event="undeliverable", msgid=tx.identifier, sender=tx.sender, recipients=strangers,
                detail={"reason": "not a recipient of this infected envelope", "virus": found,
                        "quarantine": kept.name, "queue_id": item.id}))
        if again:
            outcome.events.append(LedgerEvent(
                event="duplicate", msgid=tx.identifier, ref_msgid=tx.ref_msgid, sender=tx.sender,
                recipients=again, provider=v.provider.name, detail={"queue_id": item.id}))
        if not fresh:
            outcome.outputs += _distinct(reply for r in again for reply in taken[keys[r]])
            return outcome
        related = []
        for rcpt in fresh:
            notice_id, notice = receipts.virus_detection(tx, rcpt, found, self.issuer,
                                                         v.provider.service_address, at)
            outcome.replay += self.router.items(
                self.issuer.service_address, [v.provider.service_address], notice,
                local_kind="inbound", meta={"msgid": notice_id, "what": "virus-detection"})
            related.append(notice_id)
        outcome.outputs += outcome.replay
        outcome.claims = (v.provider.fingerprint, tuple(keys[r] for r in fresh))
        outcome.events.append(LedgerEvent(
            event="virus-detected", msgid=tx.identifier, ref_msgid=tx.ref_msgid, sender=tx.sender,
            recipients=fresh, subject=tx.subject, provider=v.provider.name,
            related=tuple(related),
            detail={"virus": found, "quarantine": kept.name, "queue_id": item.id}))
        return outcome

    def _virus_notice(self, item: Item, data: bytes, v: Verified) -> Outcome:
        """A peer found a virus in our user's envelope (§3.2.4): the notice goes to our service
        mailbox like any receipt, and the sender gets the non-delivery notice for virus."""
        outcome = self._receipt(item, data, v)
        cd = v.parsed.certdata
        assert cd is not None
        if (not cd.delivered_to or not self.config.is_local(cd.sender)
                or not any(e.event == "receipt-received" for e in outcome.events)):
            return outcome
        at = self.clock.now()
        tx = Transaction.from_certdata(cd)
        reason = f"virus {cd.extended_error or ''}".strip()
        notice_id, notice = receipts.non_delivery(
            tx, cd.delivered_to, "virus", reason, self.issuer, at,
            title="AVVISO DI MANCATA CONSEGNA PER VIRUS", virus=True)
        outcome.outputs.append(NewItem("deliver", self.issuer.service_address, (tx.sender,),
                                       data=notice, meta={"mode": "plain", "msgid": notice_id,
                                                          "what": "non-delivery"}))
        outcome.effects.append(_track("closed", cd.identifier, (cd.delivered_to,),
                                      at.timestamp(), "virus"))
        outcome.events.append(LedgerEvent(
            event="non-delivery", msgid=cd.identifier, ref_msgid=cd.msgid, sender=cd.sender,
            recipients=(cd.delivered_to,), subject=cd.subject, provider=self.issuer.name,
            related=(notice_id,), detail={"error": "virus", "virus": cd.extended_error or "",
                                          "queue_id": item.id}))
        return outcome


def _addressee(cd: daticert.CertData, config: Config) -> str:
    """Whom a receipt about one of our transactions is for: our service mailbox for the notices
    between providers (take-charge, virus detection, RFC 6109 §3.2.1, §3.2.3), the certified
    sender otherwise (delivery, non-delivery, §3.3)."""
    if cd.type in ("presa-in-carico", "rilevazione-virus"):
        return config.service_address
    return cd.sender


def _split(rcpts: Sequence[str], tx: Transaction, taken: Mapping[str, list[NewItem]]
           ) -> tuple[tuple[str, ...], dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """An envelope's SMTP recipients as (strangers, each addressed one's dedup key, those not
    seen before, those already taken)."""
    addressed, strangers = _addressed(rcpts, [r.address for r in tx.recipients])
    keys = {r: recipient_key(tx.identifier, r) for r in addressed}
    fresh = tuple(r for r in addressed if keys[r] not in taken)
    again = tuple(r for r in addressed if keys[r] in taken)
    return strangers, keys, fresh, again


def _addressed(rcpts: Sequence[str], certified: Sequence[str]
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The SMTP recipients split into those the certified message is for and the others; each
    mailbox once (local part exact, domain in any case, as :func:`headers.same_address`)."""
    wanted = {headers.canonical(c) for c in certified}
    addressed: dict[str, str] = {}
    strangers: dict[str, str] = {}
    for rcpt in rcpts:
        key = headers.canonical(rcpt)
        (addressed if key in wanted else strangers).setdefault(key, rcpt)
    return tuple(addressed.values()), tuple(strangers.values())


def _distinct(items: Iterable[NewItem]) -> list[NewItem]:
    out: dict[tuple[str, tuple[str, ...], bytes], NewItem] = {}
    for i in items:
        out.setdefault((i.kind, i.rcpts, bytes(i.data or b"")), i)
    return list(out.values())


def _track(column: str, pec_id: str, recipients: Sequence[str], at: float,
           outcome: str | None = None) -> Callable[[Connection], None]:
    assert column in ("delivered", "taken", "closed")

    def effect(conn: Connection) -> None:
        tracking.note(conn, column, pec_id, recipients, at, outcome)  # type: ignore[arg-type]

    return effect


def recipient_key(identifier: str, rcpt: str) -> str:
    """What may happen once per envelope: its arrival for one recipient (``seen``'s key). A
    retry after a lost reply repeats its keys, a later attempt for recipients refused the first
    time has new ones, and a replay regrouping the recipients finds each of its keys taken."""
    return f"{identifier} {headers.canonical(rcpt).lower()}"


_READING = ("presa-visione", "mancata-presa-visione")
# receipts about one recipient: only that recipient's provider may sign them
_PER_RECIPIENT = ("avvenuta-consegna", *_READING)


def _reading(tipo: str, pec_id: str, recipient: str,
             at: float) -> Callable[[Connection], None]:
    event: readings.Event = "read" if tipo == "presa-visione" else "not_read"
    return lambda conn: readings.track(conn, pec_id, recipient, event, at)
