"""Reading the headers of messages pecd receives. Lenient on input, exact in what it returns.

Only the header block is parsed (bodies can be 30 MB and are never needed here); malformed
headers yield empty values, never exceptions, because every input must end in a clear answer.
"""

from __future__ import annotations

import email.utils
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser

_parser = BytesHeaderParser(policy=policy.compat32)


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 2]


def parse(data: bytes) -> Message:
    return _parser.parsebytes(header_block(data))


def addresses(msg: Message, name: str) -> list[str]:
    values = [str(v) for v in msg.get_all(name, [])]
    return [addr for _display, addr in email.utils.getaddresses(values) if addr]


def text(msg: Message, name: str) -> str | None:
    raw = msg.get(name)
    if raw is None:
        return None
    try:
        return str(make_header(decode_header(str(raw)))).replace("\r", "").replace("\n", "")
    except (ValueError, LookupError, UnicodeError):
        return str(raw).replace("\r", "").replace("\n", "")


def message_id(msg: Message) -> str | None:
    raw = msg.get("Message-ID")
    if raw is None:
        return None
    value = str(raw).strip()
    return value or None


def bare_id(value: str | None) -> str | None:
    """A Message-ID without its angle brackets, as daticert's identificativo holds it."""
    if value is None:
        return None
    return value.strip().removeprefix("<").removesuffix(">")


def same_address(a: str, b: str) -> bool:
    """Local parts compare exactly, domains case-insensitively (RFC 5321 §2.4)."""
    la, _, da = a.strip().rpartition("@")
    lb, _, db = b.strip().rpartition("@")
    return la == lb and da.lower() == db.lower()
