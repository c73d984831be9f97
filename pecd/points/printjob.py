"""The print fallback: a PDF ready for a print-and-post service, written to ``[fallback]
print_dir`` where the print provider collects it.

Page 1, the cover: the recipient's postal address (from ``pecd user set --postal-address``), the
evidence so far (PEC identifier, sender, recipient, subject, delivery time, deadline, the
not-read evidence's id, the SHA-256 of the envelope as stored) and a QR code with the PEC
identifier. Then the message text (the original's text/plain parts) and, page by page, its PDF
attachments. An attachment that is not a readable PDF is left out with a line on the cover and
in the ledger row; a message the holder already deleted leaves only the cover.

Receives the fallback event (pecd.points.fallback) and reads the envelope from the Maildir; writes one
file, ``<event id>.pdf``, whole or not at all (pecd.store.durable), so a repeat overwrites it.
Blocking: run it in the executor.
"""

from __future__ import annotations

import email
import hashlib
import io
from email import policy
from email.message import EmailMessage
from pathlib import Path

import segno
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter
from pypdf.errors import PyPdfError

from pecd.format import pec
from pecd.points.fallback import FallbackFailed
from pecd.store import durable

_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_BROKEN = (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError,
           RecursionError)


def write_job(ev: dict[str, object], print_dir: Path) -> tuple[Path, list[str]]:
    """Write the PDF; returns its path and what was left out (one line each)."""
    postal = ev.get("postal_address")
    if not postal:
        raise FallbackFailed(f"no postal address for {ev['recipient']} "
                             "(pecd user set ADDR --postal-address TEXT)")
    envelope = _envelope(Path(str(ev["mailbox"])), str(ev["file"]))
    skipped: list[str] = []
    text, attachments = "", list[tuple[str, bytes]]()
    if envelope is None:
        skipped.append("the message is no longer in the mailbox: cover page only")
    else:
        text, attachments, skipped = _contents(envelope)
    cover = _cover(ev, str(postal), envelope, skipped, text)
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(cover)))
    for _name, data in attachments:
        writer.append(PdfReader(io.BytesIO(data)))
    out = io.BytesIO()
    writer.write(out)
    print_dir.mkdir(parents=True, exist_ok=True)
    final = print_dir / f"{ev['id']}.pdf"
    try:
        durable.publish(print_dir / f".{ev['id']}.pdf.tmp", out.getvalue(), final)
    except OSError as exc:
        raise FallbackFailed(f"cannot write to print_dir: {exc.strerror}") from None
    return final, skipped


def _envelope(mailbox: Path, file: str) -> bytes | None:
    candidates = [mailbox / "new" / file, *sorted((mailbox / "cur").glob(f"{file}:2,*"))]
    for path in candidates:
        try:
            return path.read_bytes()
        except OSError:
            continue
    return None


def _contents(envelope: bytes) -> tuple[str, list[tuple[str, bytes]], list[str]]:
    """The original's text and its PDF attachments (only those a PDF reader can open)."""
    try:
        original = pec.parse(envelope).original
    except pec.NotPec:
        original = None
    if original is None:
        return "", [], ["no original message in the envelope"]
    msg = email.message_from_bytes(original, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    texts: list[str] = []
    pdfs: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        ctype = part.get_content_type()
        if ctype == "text/plain" and filename is None:
            try:
                texts.append(str(part.get_content()))
            except (LookupError, ValueError):
                skipped.append("a text part in an unknown charset")
        elif ctype == "application/pdf" or (filename or "").lower().endswith(".pdf"):
            data = part.get_payload(decode=True)
            name = filename or "attachment.pdf"
            if not isinstance(data, bytes) or not _readable_pdf(data):
                skipped.append(f"attachment {name}: not a readable PDF, not printed")
                continue
            pdfs.append((name, data))
        elif filename:
            skipped.append(f"attachment {filename} ({ctype}): not printable, not printed")
    return "\n\n".join(texts), pdfs, skipped


def _readable_pdf(data: bytes) -> bool:
    try:
        reader = PdfReader(io.BytesIO(data))
        return len(reader.pages) > 0 and all(p.mediabox is not None for p in reader.pages)
    except _BROKEN:
        return False


def _cover(ev: dict[str, object], postal: str, envelope: bytes | None, skipped: list[str],
           text: str) -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    font = _font(pdf)
    pdf.add_page()
    pdf.set_font(font, size=12)
    # the window of a standard DL envelope: the address block at the top right
    pdf.set_xy(110, 45)
    pdf.multi_cell(85, 6, _fit(font, postal), new_x="LMARGIN", new_y="NEXT")
    pdf.set_xy(15, 95)
    pdf.set_font(font, size=14)
    pdf.cell(0, 8, _fit(font, "Posta certificata non letta / Unread certified mail"),
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, size=10)
    digest = hashlib.sha256(envelope).hexdigest() if envelope is not None else "-"
    lines = [
        f"Identificativo PEC: {ev['pec_id']}",
        f"Mittente: {ev['sender']}",
        f"Destinatario: {ev['recipient']}",
        f"Oggetto: {ev.get('subject') or ''}",
        f"Consegnato il: {ev['delivered']}",
        f"Non letto entro: {ev['deadline']}",
        f"Avviso di mancata presa visione: {ev['not_read_evidence']}",
        f"Gestore: {ev['provider']}",
        f"SHA-256 della busta: {digest}",
        *(f"Nota: {s}" for s in skipped),
    ]
    for line in lines:
        pdf.multi_cell(0, 5, _fit(font, line), new_x="LMARGIN", new_y="NEXT")
    qr = io.BytesIO()
    segno.make(str(ev["pec_id"]), error="m").save(qr, kind="png", scale=4, border=2)
    qr.seek(0)
    pdf.image(qr, x=15, y=pdf.get_y() + 5, w=40)
    if text:
        pdf.add_page()
        pdf.set_font(font, size=11)
        pdf.multi_cell(0, 5.5, _fit(font, text), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _font(pdf: FPDF) -> str:
    """DejaVu Sans when installed (any Unicode text); else the core Helvetica (Latin-1)."""
    regular = _FONT_DIR / "DejaVuSans.ttf"
    if regular.exists():
        pdf.add_font("DejaVu", fname=str(regular))
        return "DejaVu"
    return "Helvetica"


def _fit(font: str, text: str) -> str:
    if font == "Helvetica":
        return text.encode("latin-1", "replace").decode("latin-1")
    return text
