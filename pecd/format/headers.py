"""Reading the headers of messages pecd receives. Lenient on input, exact in what it returns.

Only the header block is parsed (bodies can be 30 MB and are never needed here); malformed
headers yield empty values, never exceptions, because every input must end in a clear answer.
Raw 8-bit header bytes are read as UTF-8 (RFC 6532), and the values returned hold only
characters XML 1.0 (daticert.xml) and SQLite text can carry: anything else becomes U+FFFD.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from email import policy
from email.header import decode_header
from email.message import Message
from email.parser import HeaderParser

from pecd.format.daticert import xml_safe

_parser = HeaderParser(policy=policy.compat32)


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded, the rest kept; an unknown charset decodes lossily."""
    out = []
    for chunk, charset in decode_header(value):
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None:  # decode_header's own spelling of the text between encoded words
            out.append(chunk.decode("raw-unicode-escape"))
        else:
            try:
                out.append(chunk.decode(charset, "replace"))
            except LookupError:
                out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 2]


def parse(data: bytes) -> Message:
    """The header block as text: 8-bit bytes read as UTF-8 (RFC 6532), invalid ones as U+FFFD,
    so values are plain ``str`` (a bytes parser would hand them back as lossy ``Header``s)."""
    text = header_block(data).decode("utf-8", "replace")
    return _parse_plain(text) or _parser.parsestr(text)


# a header field as email.feedparser reads one: a name of printable characters but the colon, the
# colon, then its first line (white space before it dropped) and any continuation lines (each
# starting with SP or HT), each line ended by CRLF, CR or LF, the last line end apart. Possessive
# and atomic: a block that is not all fields fails in linear time, without backtracking
_FIELD = (r"([\041-\071\073-\176]+):[ \t]*+"
          r"([^\r\n]*(?:(?:\r\n|\r|\n)[ \t][^\r\n]*)*)(?:\r\n|\r|\n)")
_FIELDS = re.compile(_FIELD)
_ONLY_FIELDS = re.compile(f"(?>{_FIELD})++(?:\\r\\n|\\r|\\n)?")  # then maybe the blank line


def _parse_plain(text: str) -> Message | None:
    """The Message ``HeaderParser(policy=compat32)`` makes of ``text``, built directly, when
    ``text`` is only well-formed fields each ended by a line end, perhaps then the empty line
    (every message pecd builds and nearly every one it receives); None for anything else (a
    line that is no field, a first line that is a continuation, a Unix ``From `` line, no
    line end at the end), which goes to the standard parser and its defects. The feed parser
    costs about twice as much per header block, and a certified cycle parses a few dozen of
    them. tests/test_headers_plain.py holds the two to identical results."""
    if _ONLY_FIELDS.fullmatch(text) is None:
        return None
    msg = Message(policy.compat32)
    msg._headers = _FIELDS.findall(text)  # type: ignore[attr-defined]  # as set_raw appends
    msg.set_payload("")
    return msg


def addresses(msg: Message, name: str) -> list[str]:
    values = [str(v) for v in msg.get_all(name, [])]
    return [xml_safe(addr) for _display, addr in email.utils.getaddresses(values) if addr]


def text(msg: Message, name: str) -> str | None:
    raw = msg.get(name)
    if raw is None:
        return None
    value = str(raw)
    try:
        decoded = _decode_words(value)
    except (ValueError, LookupError, UnicodeError):
        decoded = value
    return xml_safe(decoded.replace("\r", "").replace("\n", ""))


def message_id(msg: Message) -> str | None:
    raw = msg.get("Message-ID")
    if raw is None:
        return None
    value = xml_safe(str(raw)).strip()
    return value or None


def bare_id(value: str | None) -> str | None:
    """A Message-ID without its angle brackets, as daticert's identificativo holds it."""
    if value is None:
        return None
    return value.strip().removeprefix("<").removesuffix(">")


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def canonical(address: str) -> str:
    """One spelling per mailbox: domain lower-cased, needless quotes around the local part
    dropped (``"a.b"@x`` is ``a.b@x``, as the SMTP layer already reports it)."""
    local, _, domain = address.strip().rpartition("@")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if _DOT_ATOM.fullmatch(inner):
            local = inner
    return f"{local}@{domain.lower()}"


def same_address(a: str, b: str) -> bool:
    """Local parts compare exactly, domains case-insensitively (RFC 5321 §2.4)."""
    return canonical(a) == canonical(b)


# RFC 5322 §3.6.8: field-name = 1*ftext (printable US-ASCII but the colon), then the colon
# itself; the obsolete form with white space before the colon ("From :") is not allowed here
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def malformed_line(block: bytes) -> int | None:
    """The number (from 1) of the first line of a header section that is neither a field
    (``name:``) nor the folded continuation of one (it starts with SP or HT and is not blank),
    or None when every line is one of those.

    Parsers disagree about such lines: Python's ends the header section at the first, a
    lenient one skips it and reads the fields after it (a second ``From :``, say). A message
    whose header section has one means different things to different readers."""
    lines = re.split(rb"\r?\n", block)
    if lines and lines[-1] == b"":
        lines.pop()  # the line end of the last field
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if number == 1 or not line.strip(b" \t"):
                return number  # folding with nothing to fold, or a blank-looking line
        elif not _FIELD_START.match(line):
            return number
    return None


# address-like text: something@something, without the delimiters of address syntax
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\]\"',;:\\@]+@[^\s<>()\[\]\"',;:\\@]+")


def foreign_addresses(msg: Message, name: str, owner: str) -> list[str]:
    """Addresses other than ``owner`` written anywhere in the ``name`` fields: display names,
    comments, quoted strings, encoded words (decoded), compatibility forms such as a
    full-width at sign (NFKC). A mail reader shows those to the recipient as the author."""
    found: list[str] = []
    for raw in msg.get_all(name, []):
        value = str(raw)
        try:
            decoded = _decode_words(value)
        except (ValueError, LookupError, UnicodeError):
            decoded = value
        for text in (value, decoded):
            for token in _ADDRESS_LIKE.findall(unicodedata.normalize("NFKC", text)):
                token = token.strip(".")
                if not same_address(token, owner) and xml_safe(token) not in found:
                    found.append(xml_safe(token))
    return found
