"""What an API client sends, turned into the RFC 5322 message the access point receives, or refused
with the name of the check it failed. Pure: no sockets, no storage, time given by the caller.

Trusts nothing in the request. Every value that becomes a header (addresses, names, subject,
attachment file names and types) must be printable on one line: a CR or LF there would let a
client add header fields of its choosing (header injection). Attachment names are file names, not
paths: a separator, a ``..`` or a leading dot would let a mail client save the file somewhere else
(path traversal). A raw message gets the same size, line and header bounds as SMTP's DATA.
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import json
import re
from base64 import b64decode, b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote

from pecd.config import Limits
from pecd.format import headers

RECEIPT_TYPES = ("completa", "breve", "sintetica")
MAX_LINE = 998  # RFC 5322 2.1.1, what SMTP's DATA takes
_FIELDS = {"from", "to", "cc", "subject", "text", "html", "receipt_type", "attachments"}
_ATTACHMENT_FIELDS = {"filename", "content_type", "content_base64"}
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_POLICY = email.policy.SMTP.clone(cte_type="7bit")  # CRLF, folded, non-ASCII parts 7-bit encoded


class Invalid(Exception):
    """The request fails ``check``; ``detail`` says how, for the client (never echoes secrets)."""

    def __init__(self, check: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.check = check
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class Built:
    data: bytes
    rcpts: tuple[str, ...]


def _one_line(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise Invalid("schema", f"{what} must be a string")
    if any(c in "\r\n" for c in value):
        raise Invalid("header-injection", f"{what} holds a line break")
    if not value.isprintable():
        raise Invalid("header-injection", f"{what} holds a control character")
    return value


def _address(value: object, what: str) -> tuple[str, str]:
    """(display name, address) from "addr" or "Name <addr>"."""
    text = _one_line(value, what)
    parsed = email.utils.getaddresses([text])
    if len(parsed) != 1 or not parsed[0][1]:
        raise Invalid("address", f"{what} is not one mail address")
    name, addr = parsed[0]
    local, at, domain = addr.rpartition("@")
    if not (local and at and domain) or len(addr) > 320 or any(c.isspace() or c in "<>,;\"" for c in addr):
        raise Invalid("address", f"{what} is not a valid mail address")
    return name, addr


def attachment_name(value: object) -> str:
    name = _one_line(value, "attachment filename")
    if (not name or len(name) > 255 or "/" in name or "\\" in name or name.startswith(".")
            or ".." in name or ":" in name):
        raise Invalid("attachment-filename",
                      "attachment filename must be a plain file name (no path, no leading dot)")
    return name


def _list(spec: Mapping[str, Any], key: str) -> list[Any]:
    value = spec.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid("schema", f"{key} must be a list")
    return value


def build(spec: object, mailbox: str, domain: str, at: datetime, limits: Limits) -> Built:
    """The message for the JSON form ``{"from", "to", "cc", "subject", "text", "html",
    "receipt_type", "attachments"}``, sent by ``mailbox``."""
    if not isinstance(spec, dict):
        raise Invalid("schema", "a message must be a JSON object")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise Invalid("schema", f"unknown fields: {', '.join(sorted(unknown))}")
    name, sender = _address(spec.get("from", mailbox), "from")
    if not headers.same_address(sender, mailbox):
        raise Invalid("from-not-owned", "from is not the authenticated mailbox", 403)
    to = [_address(v, "to") for v in _list(spec, "to")]
    cc = [_address(v, "cc") for v in _list(spec, "cc")]
    if not to:
        raise Invalid("to", "to must hold at least one address")
    rcpts = tuple(dict.fromkeys(a for _, a in to + cc))
    if len(rcpts) > limits.max_recipients:
        raise Invalid("too-many-recipients",
                      f"{len(rcpts)} recipients, the limit is {limits.max_recipients}")
    subject = _one_line(spec.get("subject", ""), "subject")
    text = spec.get("text", "")
    html = spec.get("html")
    if not isinstance(text, str) or not (html is None or isinstance(html, str)):
        raise Invalid("schema", "text and html must be strings")
    receipt = spec.get("receipt_type", "completa")
    if receipt not in RECEIPT_TYPES:
        raise Invalid("receipt-type", f"receipt_type must be one of {', '.join(RECEIPT_TYPES)}")

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = email.utils.formataddr((name, sender))
    msg["To"] = ", ".join(email.utils.formataddr(a) for a in to)
    if cc:
        msg["Cc"] = ", ".join(email.utils.formataddr(a) for a in cc)
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(at)
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    if receipt != "completa":
        msg["X-TipoRicevuta"] = receipt
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for i, raw in enumerate(_list(spec, "attachments")):
        _attach(msg, raw, i)
    data = msg.as_bytes(policy=_POLICY)
    if len(data) > limits.max_message_size:
        raise Invalid("size", f"message of {len(data)} bytes, the limit is "
                      f"{limits.max_message_size}", 413)
    return Built(data, rcpts)


@dataclass(frozen=True)
class FormPart:
    """One part of a ``multipart/form-data`` request, as read off the wire."""

    name: str | None
    filename: str | None  # None: a form field; a string (even empty): a file, an attachment
    content_type: str
    data: bytes


_FORM_SINGLE = ("from", "subject", "text", "html", "receipt_type")
_FORM_LIST = ("to", "cc")


def from_form(parts: list[FormPart]) -> dict[str, Any]:
    """The JSON form of a message sent as ``multipart/form-data``: a ``message`` part holding
    the JSON object, or its fields one per part (``to`` and ``cc`` repeated, one address
    each), and a file part per attachment (any part with a filename). It then goes through
    :func:`build` like any JSON message, so the same checks apply to names and types, after
    the file names are percent-decoded (a ``%2F`` is refused as a ``/`` is)."""
    spec: dict[str, Any] = {}
    attachments: list[dict[str, str]] = []
    fields: dict[str, Any] = {}
    for part in parts:
        if part.filename is not None or part.name == "attachments":
            ctype = part.content_type.split(";", 1)[0].strip() or "application/octet-stream"
            # HTML forms escape '"', CR and LF in file names as %22, %0D, %0A, and some
            # clients (aiohttp, for one) escape every byte so: the checks see the decoded name
            try:
                name = unquote(part.filename or "", errors="strict")
            except UnicodeDecodeError:
                raise Invalid("attachment-filename", "attachment filename is not UTF-8") from None
            attachments.append({"filename": name, "content_type": ctype,
                                "content_base64": b64encode(part.data).decode()})
            continue
        try:
            value = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("schema", f"form field {part.name!r} is not UTF-8 text") from None
        if part.name == "message":
            if spec:
                raise Invalid("schema", "more than one message part")
            try:
                spec = json.loads(value)
            except (ValueError, RecursionError):
                raise Invalid("json", "the message part is not JSON") from None
            if not isinstance(spec, dict) or not spec:
                raise Invalid("schema", "the message part must be a JSON object")
        elif part.name in _FORM_LIST:
            fields.setdefault(part.name, []).append(value)
        elif part.name in _FORM_SINGLE:
            if part.name in fields:
                raise Invalid("schema", f"form field {part.name} given twice")
            fields[part.name] = value
        else:
            raise Invalid("schema", f"unknown form field: {str(part.name)[:100]!r}")
    both = set(spec) & set(fields)
    if both:
        raise Invalid("schema", f"given in the message part and as fields: {', '.join(sorted(both))}")
    spec = {**spec, **fields}
    if attachments:
        listed = spec.get("attachments", [])
        if not isinstance(listed, list):
            raise Invalid("schema", "attachments must be a list")
        spec["attachments"] = [*listed, *attachments]
    return spec


def _attach(msg: EmailMessage, raw: object, i: int) -> None:
    if not isinstance(raw, dict) or set(raw) - _ATTACHMENT_FIELDS:
        raise Invalid("schema", f"attachments[{i}] must be an object with "
                      f"{', '.join(sorted(_ATTACHMENT_FIELDS))}")
    filename = attachment_name(raw.get("filename"))
    ctype = _one_line(raw.get("content_type", "application/octet-stream"), "content_type")
    if not _CONTENT_TYPE.fullmatch(ctype):
        raise Invalid("content-type", f"attachments[{i}].content_type is not type/subtype")
    encoded = raw.get("content_base64")
    if not isinstance(encoded, str):
        raise Invalid("schema", f"attachments[{i}].content_base64 must be a string")
    try:
        content = b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("base64", f"attachments[{i}].content_base64 is not base64") from None
    maintype, subtype = ctype.lower().split("/")
    msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)


def raw(data: bytes, mailbox: str, limits: Limits) -> Built:
    """A raw RFC 5322 message sent by ``mailbox``: line endings made CRLF when it uses bare LF
    only, then the bounds SMTP's DATA applies; recipients are its To and Cc."""
    if b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    if len(data) > limits.max_message_size:
        raise Invalid("size", f"message of {len(data)} bytes, the limit is "
                      f"{limits.max_message_size}", 413)
    if any(len(line) > MAX_LINE for line in data.split(b"\r\n")):
        raise Invalid("line-length", f"a line is longer than {MAX_LINE} bytes")
    if not headers.header_block(data).strip():
        raise Invalid("headers", "the message has no header section")
    msg = headers.parse(data)
    for name in ("From", "Sender"):
        for addr in headers.addresses(msg, name):
            if not headers.same_address(addr, mailbox):
                raise Invalid("from-not-owned", f"{name} is not the authenticated mailbox", 403)
    rcpts = tuple(dict.fromkeys(headers.addresses(msg, "To") + headers.addresses(msg, "Cc")))
    if not rcpts:
        raise Invalid("to", "the message names no recipient in To or Cc")
    if len(rcpts) > limits.max_recipients:
        raise Invalid("too-many-recipients",
                      f"{len(rcpts)} recipients, the limit is {limits.max_recipients}")
    return Built(data, rcpts)
