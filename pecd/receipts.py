"""Receipts and notices (RFC 6109 §3.1–§3.3): acceptance, non-acceptance, take-charge, delivery
(complete, brief, synthetic), non-delivery and the timeout notices. Pure builders over a
:class:`~pecd.pec.Transaction`; every one is signed by the issuing provider.
"""

from __future__ import annotations

from datetime import datetime

from pecd import compose, daticert
from pecd.pec import Issuer, ReceiptKind, SystemMessage, Transaction, build


def _from(issuer: Issuer) -> tuple[str, str]:
    return ("", issuer.service_address)


def _dest_lines(tx: Transaction) -> str:
    labels = {"certificato": "posta certificata", "esterno": "posta ordinaria"}
    return "\n".join(f'{r.address} ("{labels[r.kind]}")' for r in tx.recipients)


def acceptance(tx: Transaction, issuer: Issuer, at: datetime) -> tuple[str, bytes]:
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
                   virus: bool = False) -> tuple[str, bytes]:
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
    kind_headers: tuple[tuple[str, str], ...] = (("X-Ricevuta", "non-accettazione"),)
    if virus:
        kind_headers += (("X-VerificaSicurezza", "errore"),)
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"{title}: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),), kind_headers=kind_headers, text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("non-accettazione", issuer.name, at,
                             error="virus" if virus else "altro", extended_error=reason),
    ), issuer.signer)


def take_charge(tx: Transaction, recipients: tuple[str, ...], issuer: Issuer, to: str,
                at: datetime) -> tuple[str, bytes]:
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


def delivery(tx: Transaction, recipient: str, form: ReceiptKind, envelope_original: bytes | None,
             issuer: Issuer, at: datetime, brief_parts: tuple[bytes, ...] = ()) -> tuple[str, bytes]:
    """The sender's proof of delivery into ``recipient``'s mailbox; one per recipient."""
    msgid = compose.message_id(issuer.domain, at)
    text = (
        "Ricevuta di avvenuta consegna\n\n"
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
        original=envelope_original if form == "completa" else None,
        extra_parts=brief_parts if form == "breve" else (),
    ), issuer.signer)


def non_delivery(tx: Transaction, recipient: str, error: daticert.ErrorKind, reason: str,
                 issuer: Issuer, at: datetime, title: str = "AVVISO DI MANCATA CONSEGNA",
                 virus: bool = False) -> tuple[str, bytes]:
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
    kind_headers: tuple[tuple[str, str], ...] = (("X-Ricevuta", "errore-consegna"),)
    if virus:
        kind_headers += (("X-VerificaSicurezza", "errore"),)
    return msgid, build(SystemMessage(
        message_id=msgid, subject=f"{title}: {tx.subject}", from_=_from(issuer),
        to=(("", tx.sender),), kind_headers=kind_headers, text=text, at=at,
        ref_msgid=tx.ref_msgid,
        certdata=tx.certdata("errore-consegna", issuer.name, at, error=error,
                             delivered_to=recipient, extended_error=reason),
    ), issuer.signer)


def timeout_notice(tx: Transaction, recipients: tuple[str, ...], issuer: Issuer, at: datetime,
                   final: bool) -> tuple[str, bytes]:
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
