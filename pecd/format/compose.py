"""MIME building blocks shared by every message pecd writes (envelopes, receipts, notices).

Pure: bytes in, bytes out, CRLF line endings, 7-bit safe except an embedded original that is
itself 8-bit. Header values that come from users are stripped of CR/LF and RFC 2047-encoded when
not ASCII, so no input can add a header line.
"""

from __future__ import annotations

import base64
import email.utils
import quopri
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from email.header import Header
from email.message import Message

from pecd.format import headers
from pecd.format.blob import Blob, as_blob

CRLF = b"\r\n"
_CTL = re.compile(r"[\r\n\x00]+")
_WINDOW = 1 << 18  # two alive at once at most: 0.5 MiB, whatever the view


def _windows(data: bytes | memoryview) -> Iterator[bytes]:
    """``data`` as bytes, so that ``count`` and ``isascii`` run in C (a regular expression over
    each byte was most of a small message's building cost); a view is copied 256 KiB at a time,
    never whole."""
    if isinstance(data, bytes):
        yield data
        return
    for start in range(0, len(data), _WINDOW):
        yield bytes(data[start:start + _WINDOW])


def has_bare_eol(data: bytes | memoryview) -> bool:
    """Whether ``data`` holds a CR or an LF that is not part of a CRLF."""
    cr = lf = crlf = 0
    after_cr = False  # a CRLF cut between two windows
    for window in _windows(data):
        cr += window.count(b"\r")
        lf += window.count(b"\n")
        crlf += window.count(CRLF) + (after_cr and window[:1] == b"\n")
        after_cr = window[-1:] == b"\r"
    return cr != crlf or lf != crlf


def is_ascii(data: bytes | memoryview) -> bool:
    return all(window.isascii() for window in _windows(data))


def clean(value: str) -> str:
    """A header value with no line breaks (they would start a new header line)."""
    return _CTL.sub(" ", value)


HeaderField = tuple[str, str]  # name, value already encoded for the wire (may hold folds)


def header(name: str, value: str) -> HeaderField:
    """One encoded, folded header field."""
    value = clean(value)
    charset = "us-ascii" if value.isascii() else "utf-8"
    encoded = Header(value, charset, header_name=name, maxlinelen=78).encode(linesep="\r\n")
    return name, encoded


def address_header(name: str, addresses: Iterable[tuple[str, str]]) -> HeaderField:
    """An address-list header; display names are quoted/encoded, addresses are kept as given."""
    parts = []
    for display, addr in addresses:
        addr = clean(addr)
        display = clean(display)
        if not addr.isascii():
            # an internationalised address (RFC 6532) has no ASCII form; the outer headers of a
            # signed message are ASCII, so it travels as readable encoded text
            parts.append(Header(f"{display} <{addr}>" if display else addr, "utf-8",
                                maxlinelen=78).encode(linesep="\r\n"))
        else:
            parts.append(email.utils.formataddr((display, addr), charset="utf-8") if display
                         else addr)
    return name, ",\r\n ".join(parts)


_ADDRESS_FIELDS = {"from", "sender", "to", "cc", "bcc", "reply-to", "return-path"}


def raw_header(name: str, value: str) -> HeaderField:
    """A header copied from an input message: its folds kept, any bare CR/LF made a fold.

    A value with raw UTF-8 (RFC 6532) cannot go into the ASCII outer headers as it is: it is
    unfolded and re-encoded, address lists address by address (display names as RFC 2047
    encoded words), anything else as one encoded text.
    """
    if not value.isascii():
        value = clean(value.replace("\r\n", "").replace("\r", "").replace("\n", ""))
        if name.lower() in _ADDRESS_FIELDS:
            return address_header(name, email.utils.getaddresses([value]))
        return header(name, value)
    lines = [line for line in re.split(r"\r\n|\r|\n", value)]
    folded = "\r\n".join(
        line if i == 0 or line[:1] in (" ", "\t") else " " + line
        for i, line in enumerate(lines)
    )
    return name, folded.replace("\x00", "")


def date_header(at: datetime) -> HeaderField:
    return "Date", email.utils.format_datetime(at)


def render_headers(fields: Iterable[HeaderField]) -> bytes:
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)


_OUR_BOUNDARY = re.compile(rb"----=_pecd_[0-9a-f]{32}")


def unused_boundary(parts: Iterable[bytes | Blob]) -> str:
    """A random boundary that occurs in none of ``parts`` (RFC 2046 §5.1.1).

    ``=_`` never occurs in base64 or quoted-printable text, so only a boundary of ours (in a
    message we built, now quoted in a receipt or an envelope) can hold one: a single scan
    collects those, however many, and a fresh random one is drawn until it is not among them.
    """
    present = {m for part in parts for piece in as_blob(part)
               for m in _OUR_BOUNDARY.findall(piece)}
    while True:
        boundary = f"----=_pecd_{secrets.token_hex(16)}"
        if boundary.encode() not in present:
            return boundary


def entity(headers: Sequence[bytes], body: bytes) -> bytes:
    return b"".join(headers) + CRLF + body


def text_part(text: str) -> bytes:
    body = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    body = body.replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    if not body.endswith(CRLF):
        body += CRLF
    return entity([
        b'Content-Type: text/plain; charset="utf-8"\r\n',
        b"Content-Transfer-Encoding: quoted-printable\r\n",
    ], body)


def base64_body(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def xml_part(xml: bytes, filename: str = "daticert.xml") -> bytes:
    return entity([
        f'Content-Type: application/xml; name="{filename}"\r\n'.encode(),
        b"Content-Transfer-Encoding: base64\r\n",
        f'Content-Disposition: inline; filename="{filename}"\r\n'.encode(),
    ], base64_body(xml))


def rfc822_part(original: bytes | memoryview, filename: str = "postacert.eml") -> Blob:
    """The original message, byte for byte (RFC 2046 forbids encoding message/rfc822); only a
    bare CR or LF, which a signed entity cannot hold (and pecd's listeners refuse), becomes CRLF.
    The original stays a view, not a copy: it can be most of a 30 MB envelope."""
    if has_bare_eol(original):
        original = re.sub(rb"\r\n|\r|\n", CRLF, bytes(original))
    cte = b"7bit" if is_ascii(original) else b"8bit"
    return Blob(entity([
        f'Content-Type: message/rfc822; name="{filename}"\r\n'.encode(),
        b"Content-Transfer-Encoding: " + cte + CRLF,
        f'Content-Disposition: inline; filename="{filename}"\r\n'.encode(),
    ], b""), original)


def plain_attachment(filename: str, text: bytes) -> bytes:
    return entity([
        f'Content-Type: text/plain; charset="us-ascii"; name="{filename}"\r\n'.encode(),
        b"Content-Transfer-Encoding: 7bit\r\n",
        f'Content-Disposition: attachment; filename="{filename}"\r\n'.encode(),
    ], text + CRLF)


def multipart(subtype: str, parts: Sequence[bytes | Blob],
              extra_headers: Sequence[bytes] = ()) -> Blob:
    boundary = unused_boundary(parts)
    b = boundary.encode()
    out: list[bytes | Blob] = [
        *extra_headers,
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n'.encode(),
        CRLF,
        b"This is a multi-part message in MIME format.\r\n",
    ]
    for part in parts:
        # the CRLF before each delimiter belongs to the delimiter: parts come back byte-exact
        out += [b"--" + b + CRLF, part, CRLF]
    out.append(b"--" + b + b"--" + CRLF)
    return Blob(*out)


def message_id(domain: str, at: datetime) -> str:
    """A fresh PEC identifier (no angle brackets), unique and opaque, in the provider's domain."""
    return f"opec-{at.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex}@{domain}"


def entity_bounds(buf: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Where the header block of the entity ``buf[start:end]`` ends (after its final CRLF) and
    where its body starts; offsets, so a big body is never sliced."""
    end = len(buf) if end is None else end
    if buf.startswith(CRLF, start, end):
        return start, start + 2
    sep = buf.find(b"\r\n\r\n", start, end)
    if sep < 0:
        return end, end
    return sep + 2, sep + 4


def split_entity(entity: bytes) -> tuple[bytes, bytes]:
    """Header block (with its final CRLF) and body of a MIME entity."""
    head_end, body_start = entity_bounds(entity)
    return entity[:head_end], entity[body_start:]


def part_spans(buf: bytes, boundary: bytes, start: int = 0,
               end: int | None = None) -> tuple[list[tuple[int, int]], bool]:
    """(start, end) of each body part of the multipart body ``buf[start:end]``, and whether the
    close delimiter was found (RFC 2046 §5.1.1).

    A delimiter line is CRLF "--" boundary, an optional "--" (close), optional white space, CRLF;
    its leading CRLF belongs to it, not to the part before (the first may open the body). Only
    offsets are returned: parts are found in a 30 MB message without copying it.
    """
    end = len(buf) if end is None else end
    marker = b"\r\n--" + boundary

    def next_marker(pos: int) -> int | None:
        found = buf.find(marker, pos, end)
        return None if found < 0 else found

    spans: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start - 2 if buf.startswith(marker[2:], start, end) else next_marker(start)
    while pos is not None:
        after = pos + len(marker)
        line_end = buf.find(CRLF, after, end)
        stop = end if line_end < 0 else line_end
        closing = buf.startswith(b"--", after, stop)
        if buf[after + (2 if closing else 0):stop].strip(b" \t"):
            pos = next_marker(after)  # boundary text inside a longer line: not a delimiter
            continue
        if part_start is not None:
            spans.append((part_start, max(part_start, pos)))
        if closing:
            return spans, True
        if line_end < 0:
            break
        part_start = line_end + 2
        pos = next_marker(line_end)  # an empty part: this line's CRLF opens the next delimiter
    return spans, False


def multipart_spans(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each body part of the multipart entity ``buf[start:end]``; none without
    a boundary."""
    head_end, body_start = entity_bounds(buf, start, end)
    boundary = headers.parse(buf[start:head_end]).get_boundary()
    if not boundary:
        return []
    return part_spans(buf, boundary.encode("ascii", "replace"), body_start, end)[0]


def split_multipart(entity: bytes) -> list[bytes]:
    """The exact bytes of each body part of a multipart entity (RFC 2046 §5.1.1)."""
    return [entity[a:b] for a, b in multipart_spans(entity)]


def decode_body(info: Message, body: bytes) -> bytes:
    """The body without its transfer encoding. Lenient, as mail readers are, and never raises:
    broken base64 (a peer's or an attacker's) decodes to what it holds, and the caller's own
    checks (XML, signature) judge the result."""
    cte = str(info.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "base64":
        data = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        if len(data) % 4 == 1:  # a lone trailing character carries no whole byte
            data = data[:-1]
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body
