"""Transport envelopes (busta di trasporto, RFC 6109 §3.1.5) and anomaly envelopes (busta di
anomalia, §3.2.2). Pure builders: the original goes inside byte for byte, and the envelope
inherits its Received, To, Cc, Return-Path and Reply-To fields unchanged (§2.1.1.2); an anomaly
envelope also keeps the Message-ID of what arrived (§3.2.2).
"""

from __future__ import annotations

from datetime import datetime
from email.message import Message

from pecd.format import compose, daticert, headers
from pecd.format.blob import Blob
from pecd.format.compose import HeaderField
from pecd.format.pec import Issuer, SystemMessage, Transaction, build


def _recipient_lines(tx: Transaction) -> str:
    labels = {"certificato": "posta certificata", "esterno": "posta ordinaria"}
    return "\n".join(f'{r.address} ("{labels[r.kind]}")' for r in tx.recipients)


_INHERITED = ("Received", "To", "Cc", "Return-Path")


def _inherited(src: Message) -> list[HeaderField]:
    return [compose.raw_header(name, str(value))
            for name in _INHERITED for value in src.get_all(name, [])]


def transport_envelope(tx: Transaction, original: bytes, issuer: Issuer, at: datetime,
                       src: Message | None = None) -> Blob:
    """The signed envelope the access point sends to every recipient. ``src``: the original's
    header fields when the caller has already parsed them (only read here)."""
    src = headers.parse(original) if src is None else src
    copied = _inherited(src)
    copied.append(compose.raw_header("Reply-To", str(src.get("Reply-To") or tx.sender)))
    when = daticert.format_human_time(tx.accepted_at)
    text = (
        "Messaggio di posta certificata\n\n"
        f"Il giorno {when} il messaggio\n"
        f'"{tx.subject}" è stato inviato da "{tx.sender}"\n'
        f"indirizzato a:\n{_recipient_lines(tx)}\n\n"
        "Il messaggio originale è incluso in allegato (postacert.eml).\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        "Certified mail message: the original is attached as postacert.eml; the certification\n"
        "data are in daticert.xml.\n"
    )
    msg = SystemMessage(
        message_id=tx.identifier,
        subject=f"POSTA CERTIFICATA: {tx.subject}",
        from_=(f"Per conto di: {tx.sender}", issuer.service_address),
        to=(),
        copied_headers=tuple(copied),
        kind_headers=(("X-Trasporto", "posta-certificata"),
                      ("X-TipoRicevuta", tx.receipt_kind),
                      *((("X-Presa-Visione", "si"),) if tx.read_evidence else ())),
        text=text,
        at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("posta-certificata", issuer.name, tx.accepted_at,
                             receipt_kind=tx.receipt_kind),
        original=original,
    )
    return build(msg, issuer.signer)


def anomaly_envelope(original: bytes, recipients: tuple[str, ...], issuer: Issuer,
                     at: datetime, reason: str) -> Blob:
    """Wraps mail that could not be certified; it reaches the recipient marked as such."""
    src = headers.parse(original)
    subject = headers.text(src, "Subject") or ""
    sender = (headers.addresses(src, "From") or [""])[0]
    copied = _inherited(src)
    if not src.get_all("To") and not src.get_all("Cc"):
        copied.append(compose.address_header("To", [("", r) for r in recipients]))
    copied.append(compose.raw_header("Reply-To", str(src.get("Reply-To") or sender or
                                                     issuer.service_address)))
    when = daticert.format_human_time(at)
    text = (
        "Anomalia nel messaggio\n\n"
        f"Il giorno {when} è stato ricevuto\n"
        f'il messaggio "{subject}" proveniente da "{sender}"\n'
        f"indirizzato a:\n{chr(10).join(recipients)}\n"
        "Tali dati non sono stati certificati per il seguente errore:\n"
        f"{reason}\n"
        "Il messaggio originale è incluso in allegato.\n\n"
        "This message could not be certified; the original is attached as postacert.eml.\n"
    )
    kept_id = compose.clean(headers.bare_id(headers.message_id(src)) or "").strip()
    if not kept_id.isascii():  # an 8-bit id cannot go into the ASCII outer headers
        kept_id = ""
    msg = SystemMessage(
        message_id=kept_id or compose.message_id(issuer.domain, at),
        subject=f"ANOMALIA MESSAGGIO: {subject}",
        from_=(f"Per conto di: {sender}", issuer.service_address),
        to=(),
        copied_headers=tuple(copied),
        kind_headers=(("X-Trasporto", "errore"),),
        text=text,
        at=at,
        original=original,
    )
    return build(msg, issuer.signer)
