"""Receipts and notices (RFC 6109 §3.1–§3.3): acceptance, non-acceptance, take-charge, delivery
(complete, brief, synthetic), non-delivery and the timeout notices. Pure builders over a
:class:`~pecd.format.pec.Transaction`; every one is signed by the issuing provider.

The brief delivery receipt (§3.3.2.2) carries the original with its MIME structure kept and every
attachment replaced by a ``<filename>.hash`` text file: :func:`brief_original` builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
from collections.abc import Iterator
from datetime import datetime
from email.header import decode_header, make_header
from email.message import Message
from email.utils import encode_rfc2231

from pecd.format import compose, daticert, headers
from pecd.format.blob import Blob
from pecd.format.pec import Issuer, ReceiptKind, SystemMessage, Transaction, build


def _from(issuer: Issuer) -> tuple[str, str]:
    return ("", issuer.service_address)


def _kind_headers(ricevuta: str, virus: bool) -> tuple[tuple[str, str], ...]:
    """``X-Ricevuta``, plus ``X-VerificaSicurezza: errore`` when a virus is the reason."""
    if virus:
        return (("X-Ricevuta", ricevuta), ("X-VerificaSicurezza", "errore"))
    return (("X-Ricevuta", ricevuta),)


def _dest_lines(tx: Transaction) -> str:
    labels = {"certificato": "posta certificata", "esterno": "posta ordinaria"}
    return "\n".join(f'{r.address} ("{labels[r.kind]}")' for r in tx.recipients)


def acceptance(tx: Transaction, issuer: Issuer, at: datetime) -> tuple[str, Blob]:
    """The sender's proof of sending; its time is the legal sending time."""
    msgid = compose.message_id(issuer.domain, at)
    text = (
        "Ricevuta di accettazione\n\n"
        f"Il giorno {daticert.format_human_time(at)} il messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f"ed indirizzato a:\n{_dest_lines(tx)}\n"
        "è stato accettato dal sistema ed inoltrato.\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        "Acceptance receipt: your message was accepted and sent.\n"
    )
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"ACCETTAZIONE: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),), kind_headers=(("X-Ricevuta", "accettazione"),), text=text, at=at,
        ref_msgid=tx.ref_msgid, certdata=tx.certdata("accettazione", issuer.name, at),
    ), issuer.signer)


def non_acceptance(tx: Transaction, issuer: Issuer, at: datetime, reason: str,
                   virus: bool = False) -> tuple[str, Blob]:
    """Why a submission was refused; never carries the original (§3.1.2)."""
    msgid = compose.message_id(issuer.domain, at)
    title = "AVVISO DI NON ACCETTAZIONE PER VIRUS" if virus else "AVVISO DI NON ACCETTAZIONE"
    text = (
        "Avviso di non accettazione\n\n"
        f"Il giorno {daticert.format_human_time(at)} nel messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f"ed indirizzato a:\n{_dest_lines(tx)}\n"
        f"è stato rilevato un problema che ne impedisce l'accettazione a causa di:\n{reason}\n"
        "Il messaggio non è stato accettato.\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        f"Non-acceptance notice: your message was not accepted: {reason}\n"
    )
    kind_headers = _kind_headers("non-accettazione", virus)
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"{title}: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),), kind_headers=kind_headers, text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("non-accettazione", issuer.name, at,
                             error="virus" if virus else "altro", extended_error=reason),
    ), issuer.signer)


def take_charge(tx: Transaction, recipients: tuple[str, ...], issuer: Issuer, to: str,
                at: datetime) -> tuple[str, Blob]:
    """To the sending provider's service mailbox: these recipients are now our responsibility."""
    msgid = compose.message_id(issuer.domain, at)
    text = (
        "Ricevuta di presa in carico\n\n"
        f"Il giorno {daticert.format_human_time(at)} il messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f"ed indirizzato a:\n{chr(10).join(recipients)}\n"
        "è stato accettato dal sistema.\n"
        f"Identificativo messaggio: {tx.identifier}\n"
    )
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"PRESA IN CARICO: {tx.subject}", from_=_from(issuer),
        to=(("", to),), kind_headers=(("X-Ricevuta", "presa-in-carico"),), text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("presa-in-carico", issuer.name, at, taken_in_charge=recipients),
    ), issuer.signer)


def delivery_form(tx: Transaction, recipient: str, cc: bool) -> ReceiptKind:
    """Cc recipients get the synthetic form whatever the sender asked (design §3)."""
    if tx.receipt_kind == "sintetica" or cc:
        return "sintetica"
    return tx.receipt_kind


def delivery(tx: Transaction, recipient: str, form: ReceiptKind,
             envelope_original: bytes | memoryview | None, issuer: Issuer,
             at: datetime) -> tuple[str, Blob]:
    """The sender's proof of delivery into ``recipient``'s mailbox; one per recipient.

    ``completa`` carries the original, ``breve`` the original with its attachments replaced by
    their hashes (:func:`brief_original`), ``sintetica`` no original at all.
    """
    msgid = compose.message_id(issuer.domain, at)
    original: bytes | memoryview | None = None
    if envelope_original is not None and form == "completa":
        original = envelope_original
    elif envelope_original is not None and form == "breve":
        original = brief_original(bytes(envelope_original))
    title = {"completa": "Ricevuta di avvenuta consegna",
             "breve": "Ricevuta breve di avvenuta consegna",
             "sintetica": "Ricevuta sintetica di avvenuta consegna"}[form]
    text = (
        f"{title}\n\n"
        f"Il giorno {daticert.format_human_time(at)} il messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f'ed indirizzato a "{recipient}"\n'
        "è stato consegnato nella casella di destinazione.\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        f"Delivery receipt: the message was delivered to {recipient}.\n"
    )
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"CONSEGNA: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),),
        kind_headers=(("X-Ricevuta", "avvenuta-consegna"), ("X-TipoRicevuta", form)),
        text=text, at=at, ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("avvenuta-consegna", issuer.name, at, receipt_kind=form,
                             delivered_to=recipient),
        original=original,
    ), issuer.signer)


def non_delivery(tx: Transaction, recipient: str, error: daticert.ErrorKind, reason: str,
                 issuer: Issuer, at: datetime, title: str = "AVVISO DI MANCATA CONSEGNA",
                 virus: bool = False) -> tuple[str, Blob]:
    """The sender's notice that ``recipient`` will not get the message."""
    msgid = compose.message_id(issuer.domain, at)
    text = (
        "Avviso di mancata consegna\n\n"
        f"Il giorno {daticert.format_human_time(at)} nel messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f'ed indirizzato a "{recipient}"\n'
        f"si è verificato un errore di consegna: {reason}\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        f"Non-delivery notice: the message could not be delivered to {recipient}: {reason}\n"
    )
    kind_headers = _kind_headers("errore-consegna", virus)
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"{title}: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),), kind_headers=kind_headers, text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("errore-consegna", issuer.name, at, error=error,
                             delivered_to=recipient, extended_error=reason),
    ), issuer.signer)


def timeout_notice(tx: Transaction, recipients: tuple[str, ...], issuer: Issuer, at: datetime,
                   final: bool) -> tuple[str, Blob]:
    """12 h warning (``final=False``) or 24 h end (``final=True``) of a transaction (§3.1.6)."""
    msgid = compose.message_id(issuer.domain, at)
    hours = "24" if final else "12"
    text = (
        "Avviso di mancata consegna per superamento tempo massimo\n\n"
        f"Il giorno {daticert.format_human_time(at)} il messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f"ed indirizzato a:\n{chr(10).join(recipients)}\n"
        f"non è risultato consegnato entro {hours} ore dal suo invio.\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        f"No delivery receipt came back within {hours} hours for the recipients above.\n"
    )
    return msgid, build(SystemMessage(
        message_id=msgid,
        subject=f"AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: {tx.subject}",
        from_=_from(issuer), to=(("", tx.sender),),
        kind_headers=(("X-Ricevuta", "preavviso-errore-consegna"),), text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("preavviso-errore-consegna", issuer.name, at,
                             extended_error=f"no delivery within {hours} hours"),
    ), issuer.signer)


def virus_detection(tx: Transaction, recipient: str, virus: str, issuer: Issuer, to: str,
                    at: datetime) -> tuple[str, Blob]:
    """To the sending provider's service mailbox (§3.2.3): a virus was found in the envelope for
    ``recipient``, which was not delivered. One per recipient; never carries the original."""
    msgid = compose.message_id(issuer.domain, at)
    text = (
        "Avviso di rilevazione virus\n\n"
        f"Il giorno {daticert.format_human_time(at)} nel messaggio\n"
        f'"{tx.subject}" proveniente da "{tx.sender}"\n'
        f'ed indirizzato a "{recipient}"\n'
        f"è stato rilevato un problema di sicurezza: {virus}\n"
        "Il messaggio non è stato consegnato.\n"
        f"Identificativo messaggio: {tx.identifier}\n\n"
        f"Virus detection notice: {virus} was found in the message for {recipient};"
        " it was not delivered.\n"
    )
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"PROBLEMA DI SICUREZZA: {tx.subject}", from_=_from(issuer),
        to=(("", to),),
        kind_headers=(("X-Ricevuta", "rilevazione-virus"), compose.header("X-Mittente", tx.sender)),
        text=text, at=at, ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("rilevazione-virus", issuer.name, at, error="virus",
                             delivered_to=recipient, extended_error=virus),
    ), issuer.signer)


# --- brief receipt content (§3.3.2.2) ----------------------------------------------------------

_CMS_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")


def part_hash(body: bytes) -> str:
    """What a ``.hash`` file holds: the SHA-1, 40 lowercase hex digits, of a part's body exactly
    as it travelled (for the usual base64 attachment: the base64 text, lines joined by CRLF, up
    to the CRLF that belongs to the next boundary)."""
    return hashlib.sha1(body).hexdigest()


def brief_original(original: bytes) -> bytes:
    """The original as the brief delivery receipt carries it (RFC 6109 §3.3.2.2).

    The MIME structure is kept byte for byte (boundaries, preamble, headers, every part without a
    file name); each part with a ``name`` or ``filename`` parameter, and each ``message/rfc822``
    part, becomes ``<filename>.hash``, ``text/plain``, holding :func:`part_hash` of that part's
    body. In a ``multipart/signed`` original only the signed content is rewritten (its signature
    part stays, and will no longer verify, as the RFC says); an ``application/pkcs7-mime``
    original cannot be opened and is kept whole. Pure; an entity it cannot read stays as it is.
    """
    return _brief_entity(original, top=True, counter=itertools.count(1))


def _brief_entity(entity: bytes, top: bool, counter: Iterator[int]) -> bytes:
    if b"\r\n\r\n" not in entity:  # no header section, or no CRLF line ends: leave it alone
        return entity
    head, body = compose.split_entity(entity)
    info = headers.parse(head)
    ctype = info.get_content_type()
    if ctype in _CMS_TYPES:
        return entity
    filename = _filename(info)
    if filename is None and ctype == "message/rfc822" and not top:
        filename = f"messaggio-{next(counter)}.eml"
    multipart = info.get_content_maintype() == "multipart"
    if filename is not None and not multipart:
        digest = part_hash(body)
        if top:  # the message itself is one attachment: keep its other header fields
            return _without_content_fields(head) + _hash_entity(filename, digest, final=True)
        return _hash_entity(filename, digest, final=False)
    if not multipart:
        return entity
    boundary = info.get_boundary()
    if not boundary:
        return entity
    spans, _ = compose.part_spans(body, boundary.encode("ascii", "replace"))
    if ctype == "multipart/signed":
        spans = spans[:1]  # the signed content; the signature part stays untouched
    out: list[bytes] = [head, b"\r\n"]
    pos = 0
    for start, end in spans:
        out += [body[pos:start], _brief_entity(body[start:end], top=False, counter=counter)]
        pos = end
    out.append(body[pos:])
    return b"".join(out)


def _filename(info: Message) -> str | None:
    raw = info.get_filename()
    if raw is None:
        return None
    name = str(raw)
    if "=?" in name:  # an RFC 2047 word inside a quoted parameter: common, if not standard
        with contextlib.suppress(ValueError, LookupError, UnicodeError):
            name = str(make_header(decode_header(name)))
    name = compose.clean(name).strip()
    return name or None


def _hash_entity(filename: str, digest: str, final: bool) -> bytes:
    name = f"{filename}.hash"
    if name.isascii() and not re.search(r'["\\]', name):
        ct_param, cd_param = f'name="{name}"', f'filename="{name}"'
    else:
        encoded = encode_rfc2231(name, "utf-8")
        ct_param, cd_param = f"name*={encoded}", f"filename*={encoded}"
    return compose.entity([
        f'Content-Type: text/plain; charset="us-ascii"; {ct_param}\r\n'.encode(),
        b"Content-Transfer-Encoding: 7bit\r\n",
        f"Content-Disposition: attachment; {cd_param}\r\n".encode(),
    ], digest.encode() + (b"\r\n" if final else b""))


def _without_content_fields(head: bytes) -> bytes:
    """A header block without its Content-* fields (folded lines go with their field)."""
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower().startswith(b"content-")
        if not skipping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept)
