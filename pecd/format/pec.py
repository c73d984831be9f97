"""The PEC message model shared by envelopes and receipts: who issues, what transaction, and the
one layout every system message has (RFC 6109 §4.3): a signed ``multipart/signed`` around a
``multipart/mixed`` of human text, optionally the original, and ``daticert.xml``.

Pure: it signs through the :class:`~pecd.trust.cms.Signer` it is given and reads no clock (times are
arguments), so one temporal value serves the notice, the envelope and the ledger (§4.1).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.message import Message
from typing import Literal

from pecd.format import compose, daticert, headers
from pecd.format.blob import Blob
from pecd.format.compose import HeaderField
from pecd.format.daticert import CertData
from pecd.trust import smime
from pecd.trust.cms import Signer

ReceiptKind = Literal["completa", "breve", "sintetica"]


@dataclass(frozen=True)
class Issuer:
    """The provider that writes and signs a system message."""

    name: str
    domain: str
    service_address: str
    signer: Signer


@dataclass(frozen=True)
class Transaction:
    """The certification facts of one submitted message; every later receipt repeats them."""

    identifier: str  # the PEC id given by the access point, no angle brackets
    ref_msgid: str | None  # the client's own Message-ID, with angle brackets
    sender: str
    recipients: tuple[daticert.Recipient, ...]
    reply_to: str
    subject: str
    accepted_at: datetime
    receipt_kind: ReceiptKind = "completa"
    issuer_name: str = ""
    read_evidence: bool = False  # the sender asked for reading evidence (pecd.points.reading)

    def certdata(self, type_: daticert.MessageType, issuer: str, at: datetime,
                 **extra: object) -> CertData:
        return CertData(
            type=type_, sender=self.sender, recipients=self.recipients, reply_to=self.reply_to,
            subject=self.subject, issuer=issuer, time=at, identifier=self.identifier,
            msgid=self.ref_msgid, **extra,  # type: ignore[arg-type]
        )

    @classmethod
    def from_certdata(cls, data: CertData) -> Transaction:
        return cls(
            identifier=data.identifier, ref_msgid=data.msgid, sender=data.sender,
            recipients=data.recipients, reply_to=data.reply_to, subject=data.subject or "",
            accepted_at=data.time, receipt_kind=data.receipt_kind or "completa",
            issuer_name=data.issuer,
        )


@dataclass(frozen=True)
class SystemMessage:
    """Everything needed to write one signed PEC message."""

    message_id: str  # no angle brackets
    subject: str
    from_: tuple[str, str]  # display name, address
    to: tuple[tuple[str, str], ...]
    kind_headers: tuple[HeaderField, ...]  # X-Ricevuta / X-Trasporto family
    text: str
    at: datetime
    ref_msgid: str | None = None
    certdata: CertData | None = None
    original: bytes | memoryview | None = None
    copied_headers: tuple[HeaderField, ...] = field(default=())  # e.g. To/Cc/Reply-To of envelopes
    extra_parts: tuple[bytes, ...] = ()


def build(msg: SystemMessage, signer: Signer) -> Blob:
    parts: list[bytes | Blob] = [compose.text_part(msg.text), *msg.extra_parts]
    if msg.original is not None:
        parts.append(compose.rfc822_part(msg.original))
    if msg.certdata is not None:
        parts.append(compose.xml_part(daticert.render(msg.certdata)))
    inner = compose.multipart("mixed", parts)
    outer: list[HeaderField] = [
        compose.date_header(msg.at),
        compose.header("Subject", msg.subject),
        compose.address_header("From", [msg.from_]),
    ]
    if msg.copied_headers:
        outer += msg.copied_headers
    else:
        outer.append(compose.address_header("To", msg.to))
    outer += [("Message-ID", f"<{msg.message_id}>"), *msg.kind_headers]
    if msg.ref_msgid:
        outer.append(compose.raw_header("X-Riferimento-Message-ID", msg.ref_msgid))
    return smime.wrap_signed(outer, inner, signer)


# --- reading -------------------------------------------------------------------------------

Category = Literal["envelope", "receipt", "anomaly-envelope", "ordinary"]


class NotPec(Exception):
    """The message does not have the structure of a PEC message."""


@dataclass(frozen=True)
class Parsed:
    """A received PEC message split into its parts, before any trust decision. The original
    (postacert.eml) is a place in the signed message, handed on as a view, never copied."""

    category: Category
    headers: Message
    signed: smime.SignedMessage | None
    certdata: CertData | None
    original_span: tuple[int, int] | None
    ricevuta: str | None

    @property
    def original_view(self) -> memoryview | None:
        if self.signed is None or self.original_span is None:
            return None
        start, end = self.original_span
        return memoryview(self.signed.source)[start:end]

    @property
    def original(self) -> bytes | None:
        view = self.original_view
        return None if view is None else bytes(view)

    def original_headers(self) -> Message:
        """The original's header fields, read without copying its body."""
        if self.signed is None or self.original_span is None:
            return headers.parse(b"")
        start, end = self.original_span
        head_end, _ = compose.entity_bounds(self.signed.source, start, end)
        return headers.parse(self.signed.source[start:head_end])


def classify(data: bytes) -> Category:
    return _category(headers.parse(data))


def _category(msg: Message) -> Category:
    trasporto = (msg.get("X-Trasporto") or "").strip().lower()
    if trasporto == "posta-certificata":
        return "envelope"
    if trasporto == "errore":
        return "anomaly-envelope"
    if msg.get("X-Ricevuta"):
        return "receipt"
    return "ordinary"


_MEMO_MAX = 256 * 1024  # only small messages are remembered: a Parsed holds its source...
_MEMO_BYTES = 16 * 1024 * 1024  # ...and all of them together at most this much
_memo: OrderedDict[bytes, tuple[Parsed, int]] = OrderedDict()
_memo_size = 0
_memo_lock = threading.Lock()


def parse(data: bytes) -> Parsed:
    """Split a PEC message into daticert and original. Raises NotPec when it has no such shape.

    The reception point parses a message to verify it and the delivery point parses the same
    bytes again, often hundreds of messages later when the queue is deep: recent small
    messages' results are remembered by their SHA-256, up to 16 MiB of messages. A Parsed is
    frozen and its callers only read it."""
    global _memo_size
    if len(data) > _MEMO_MAX:
        return _parse(data)
    key = hashlib.sha256(data).digest()
    with _memo_lock:
        known = _memo.get(key)
        if known is not None:
            _memo.move_to_end(key)
            return known[0]
    parsed = _parse(data)
    with _memo_lock:
        if key not in _memo:
            _memo[key] = (parsed, len(data))
            _memo_size += len(data)
        while _memo_size > _MEMO_BYTES:
            _memo_size -= _memo.popitem(last=False)[1][1]
    return parsed


def _parse(data: bytes) -> Parsed:
    msg = headers.parse(data)
    category = _category(msg)
    if category in ("ordinary", "anomaly-envelope"):
        return Parsed(category, msg, None, None, None, None)
    try:
        signed = smime.split_signed(data)
    except smime.NotSigned as exc:
        raise NotPec(f"not an S/MIME signed message: {exc}") from None
    xml: bytes | None = None
    original: tuple[int, int] | None = None
    source = signed.source
    for start, end in compose.multipart_spans(source, signed.inner_start, signed.inner_end):
        part_head_end, part_body = compose.entity_bounds(source, start, end)
        info = headers.parse(source[start:part_head_end])
        ctype = info.get_content_type()
        filename = (info.get_filename() or "").lower()
        if ctype == "application/xml" and filename in ("daticert.xml", "certdata.xml"):
            xml = compose.decode_body(info, source[part_body:end])
        elif ctype == "message/rfc822" and filename == "postacert.eml" and original is None:
            original = (part_body, end)
    if xml is None:
        raise NotPec("no daticert.xml part")
    try:
        data_ = daticert.parse(xml)
    except daticert.DaticertInvalid as exc:
        raise NotPec(f"daticert.xml: {exc}") from None
    ricevuta = (msg.get("X-Ricevuta") or "").strip().lower() or None
    return Parsed(category, msg, signed, data_, original, ricevuta)


def with_kind(tx: Transaction, kind: ReceiptKind) -> Transaction:
    return replace(tx, receipt_kind=kind)
