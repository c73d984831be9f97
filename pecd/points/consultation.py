"""Reading evidence messages (presa visione / mancata presa visione): pure builders.

Beyond RFC 6109, in the spirit of the ETSI REM evidence set: when the recipient first opens a
certified message, the recipient's provider signs and timestamps a receipt to the sender
(``X-Ricevuta: presa-visione``, event ``ContentHandover``); when the message is not opened within
the deadline, ``X-Ricevuta: mancata-presa-visione`` (event ``ContentHandoverFailure``). Each has
the usual ``daticert.xml`` (tipo ``presa-visione`` / ``mancata-presa-visione``, ``consegna``
naming the recipient) so peers route and verify it like a delivery receipt, plus
``evidenza.xml``: the event, the PEC identifier, the recipient, the time and how it was read.

Pure: times and the signer are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal
from xml.parsers import expat

from pecd.format import compose, daticert
from pecd.format.blob import Blob
from pecd.format.pec import Issuer, SystemMessage, Transaction, build

Event = Literal["ContentHandover", "ContentHandoverFailure"]

#: ``X-Presa-Visione`` on a submitted message (the sender's choice) and on the transport
#: envelope (the sender's provider passing that choice on).
REQUEST_HEADER: Final = "X-Presa-Visione"
EVIDENCE_FILE: Final = "evidenza.xml"

_KINDS: Final[dict[Event, tuple[str, str, daticert.MessageType]]] = {
    "ContentHandover": ("presa-visione", "PRESA VISIONE", "presa-visione"),
    "ContentHandoverFailure": ("mancata-presa-visione", "MANCATA PRESA VISIONE",
                               "mancata-presa-visione"),
}


def requested(value: str | None) -> bool | None:
    """The ``X-Presa-Visione`` header: ``si``/``yes`` → True, ``no`` → False, else None."""
    word = (value or "").strip().lower()
    if word in ("si", "sì", "yes", "true", "1"):
        return True
    if word in ("no", "false", "0"):
        return False
    return None


@dataclass(frozen=True)
class Evidence:
    """What ``evidenza.xml`` states."""

    event: Event
    identifier: str
    recipient: str
    time: datetime
    via: str | None = None  # how it was read ("imap"); None for ContentHandoverFailure
    delivered: datetime | None = None
    deadline: datetime | None = None


def render(ev: Evidence) -> bytes:
    """Deterministic UTF-8 XML; times in UTC, ISO 8601."""
    def leaf(tag: str, text: str) -> str:
        return f"  <{tag}>{_escape(text)}</{tag}>"

    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<evidenza evento="{ev.event}">',
             leaf("identificativo", ev.identifier),
             leaf("destinatario", ev.recipient),
             leaf("data", _iso(ev.time))]
    if ev.via is not None:
        lines.append(leaf("modalita", ev.via))
    if ev.delivered is not None:
        lines.append(leaf("consegna", _iso(ev.delivered)))
    if ev.deadline is not None:
        lines.append(leaf("scadenza", _iso(ev.deadline)))
    lines += ["</evidenza>", ""]
    return "\n".join(lines).encode("utf-8")


class EvidenceInvalid(ValueError):
    """The bytes are not an ``evidenza.xml`` pecd writes."""


def parse(xml: bytes) -> Evidence:
    """Read ``evidenza.xml`` from a peer; no DOCTYPE, known elements only."""
    if len(xml) > 64 * 1024:
        raise EvidenceInvalid("too large")
    fields: dict[str, str] = {}
    attrs: dict[str, str] = {}
    stack: list[str] = []
    text: list[str] = []
    parser = expat.ParserCreate("UTF-8")

    def refuse(*_args: object) -> None:
        raise EvidenceInvalid("DOCTYPE and entities are not allowed")

    def start(tag: str, a: dict[str, str]) -> None:
        if not stack and tag != "evidenza":
            raise EvidenceInvalid(f"root element {tag!r}")
        if stack and (len(stack) > 1 or tag not in _ELEMENTS):
            raise EvidenceInvalid(f"unexpected element {tag!r}")
        if not stack:
            attrs.update(a)
        stack.append(tag)
        text.clear()

    def end(tag: str) -> None:
        stack.pop()
        if stack:
            fields[tag] = "".join(text)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(xml, True)
    except expat.ExpatError as exc:
        raise EvidenceInvalid(str(exc)) from None
    event = attrs.get("evento")
    if event not in _KINDS:
        raise EvidenceInvalid(f"unknown event {event!r}")
    try:
        return Evidence(
            event=event,
            identifier=fields["identificativo"], recipient=fields["destinatario"],
            time=datetime.fromisoformat(fields["data"]), via=fields.get("modalita"),
            delivered=_opt_time(fields.get("consegna")),
            deadline=_opt_time(fields.get("scadenza")))
    except (KeyError, ValueError) as exc:
        raise EvidenceInvalid(f"missing or bad field: {exc}") from None


_ELEMENTS: Final = {"identificativo", "destinatario", "data", "modalita", "consegna", "scadenza"}


def build_evidence(tx: Transaction, ev: Evidence, issuer: Issuer) -> tuple[str, Blob]:
    """The signed (and, through the signer, timestamped) evidence message to the sender."""
    ricevuta, title, tipo = _KINDS[ev.event]
    at = ev.time
    msgid = compose.message_id(issuer.domain, at)
    when = daticert.format_human_time(at)
    if ev.event == "ContentHandover":
        text = (
            "Ricevuta di presa visione\n\n"
            f"Il giorno {when} il messaggio\n"
            f'"{tx.subject}" proveniente da "{tx.sender}"\n'
            f'è stato aperto dal destinatario "{ev.recipient}" (modalità: {ev.via}).\n'
            f"Identificativo messaggio: {tx.identifier}\n\n"
            f"Proof of reading: the recipient opened your message ({ev.via}).\n"
        )
    else:
        deadline = daticert.format_human_time(ev.deadline) if ev.deadline else when
        text = (
            "Avviso di mancata presa visione\n\n"
            f"Il messaggio\n"
            f'"{tx.subject}" proveniente da "{tx.sender}"\n'
            f'e consegnato a "{ev.recipient}" non è stato aperto entro il {deadline}.\n'
            f"Identificativo messaggio: {tx.identifier}\n\n"
            "Proof of not reading: the recipient did not open your message in time.\n"
        )
    certdata = tx.certdata(tipo, issuer.name, at, delivered_to=ev.recipient)
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"{title}: {tx.subject}", from_=("", issuer.service_address),
        to=(("", tx.sender),), kind_headers=(("X-Ricevuta", ricevuta),), text=text, at=at,
        ref_msgid=tx.ref_msgid, certdata=certdata,
        extra_parts=(compose.xml_part(render(ev), EVIDENCE_FILE),),
    ), issuer.signer)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).isoformat()


def _opt_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _escape(text: str) -> str:
    return (daticert.xml_safe(text).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;"))
