"""Plain notices to a mailbox holder, never signed and never carrying content.

The arrival notice: a short, plain, unsigned message to an ordinary address the recipient
chose (``pecd user set ADDR --notify ADDR2``) saying that certified mail arrived: from whom, its
subject, when. Never the content, never an attachment: the notice travels as ordinary mail.

The quota warning: the holder's Maildir has crossed 80% or 95% of its quota (once per crossing).

Pure: the time and the facts are arguments; the delivery point queues each notice as its own
item, so a notice that cannot be sent never delays or undoes the delivery.
"""

from __future__ import annotations

from datetime import datetime

from pecd.format import compose, daticert


def notice(*, service_address: str, provider_name: str, domain: str, to: str, mailbox: str,
           sender: str, subject: str, pec_id: str, at: datetime) -> tuple[str, bytes]:
    """The notice's Message-ID and bytes (text/plain, UTF-8, quoted-printable)."""
    msgid = compose.message_id(domain, at)
    when = daticert.format_human_time(at)
    text = (
        f"Nuova posta certificata per {mailbox}\n\n"
        f"Mittente: {sender}\n"
        f"Oggetto: {subject}\n"
        f"Ricevuta il: {when}\n"
        f"Identificativo: {pec_id}\n\n"
        f"New certified mail for {mailbox} from {sender}, subject \"{subject}\", received at "
        f"{when}. Read it in your certified mailbox; this notice has no content and no "
        "attachment.\n"
    )
    fields = [
        compose.date_header(at),
        compose.address_header("From", [(provider_name, service_address)]),
        compose.address_header("To", [("", to)]),
        compose.header("Subject", f"Nuova posta certificata da {sender}: {subject}"),
        ("Message-ID", f"<{msgid}>"),
        ("Auto-Submitted", "auto-generated"),
        ("MIME-Version", "1.0"),
    ]
    head = compose.render_headers(fields)
    return msgid, head + compose.text_part(text)


def quota_warning(*, service_address: str, provider_name: str, domain: str, mailbox: str,
                  level: int, used: int, quota: int, at: datetime) -> tuple[str, bytes]:
    """To the holder's own mailbox: it is ``level`` % full; certified mail beyond the quota is
    refused with a non-delivery notice to its sender."""
    msgid = compose.message_id(domain, at)
    text = (
        f"La casella {mailbox} ha superato il {level}% dello spazio disponibile "
        f"({used} di {quota} byte).\n"
        "Quando è piena, i messaggi di posta certificata in arrivo sono rifiutati e il mittente\n"
        "riceve un avviso di mancata consegna. Liberare spazio cancellando dei messaggi.\n\n"
        f"Your certified mailbox {mailbox} is over {level}% of its quota ({used} of {quota} "
        "bytes). When it is full, incoming certified mail is refused and its sender gets a "
        "non-delivery notice.\n"
    )
    fields = [
        compose.date_header(at),
        compose.address_header("From", [(provider_name, service_address)]),
        compose.address_header("To", [("", mailbox)]),
        compose.header("Subject", f"AVVISO: casella piena al {level}% / mailbox {level}% full"),
        ("Message-ID", f"<{msgid}>"),
        ("Auto-Submitted", "auto-generated"),
        ("MIME-Version", "1.0"),
    ]
    return msgid, compose.render_headers(fields) + compose.text_part(text)
