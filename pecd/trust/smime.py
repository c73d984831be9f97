"""S/MIME multipart/signed (RFC 5751, RFC 1847), built and split at the byte level.

``wrap_signed`` receives a MIME entity pecd composed; ``split_signed`` and ``verify_message``
receive whole messages from the network and trust nothing in them until ``cms.verify_detached``
has checked the signature against the caller's roots. Bytes are never re-encoded by an e-mail
library: the signed part must reach the verifier exactly as it was signed.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.parser import BytesHeaderParser

from cryptography import x509

from pecd.format.blob import Blob
from pecd.format.compose import entity_bounds, has_bare_eol, part_spans, unused_boundary
from pecd.trust.cms import SignatureInfo, Signer, verify_detached

# header blocks only: a full parser compiles a regex for every new multipart boundary
_HEADERS = BytesHeaderParser(policy=email.policy.compat32)

SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_HEADER_NAME = re.compile(rb"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_RESERVED = {"mime-version", "content-type", "content-transfer-encoding"}
_LWSP = b" \t"


class NotSigned(Exception):
    """The message is not an S/MIME multipart/signed message, or its structure is broken."""


@dataclass(frozen=True)
class SignedMessage:
    """The outer headers (unsigned, as received), the signed entity and the DER signature.

    The signed entity is kept as a place in the message it came from: ``inner_view`` passes it
    on (to the digest, to the parser) without copying what may be 30 MB."""

    headers: Message
    source: bytes
    inner_start: int
    inner_end: int
    signature: bytes

    @property
    def inner(self) -> bytes:
        return self.source[self.inner_start:self.inner_end]

    @property
    def inner_view(self) -> memoryview:
        return memoryview(self.source)[self.inner_start:self.inner_end]


def _check_canonical(inner: Blob) -> None:
    if any(has_bare_eol(piece) for piece in inner):  # pieces hold whole line endings
        raise ValueError("inner entity has a bare LF or bare CR; S/MIME signs canonical CRLF text")
    head = inner.head(1 << 16)  # the headers of an entity pecd composed
    if b"\r\n\r\n" not in head and not head.startswith(b"\r\n"):
        raise ValueError("inner entity has no header/body separator (blank line)")


def _header_line(name: str, value: str) -> bytes:
    """``Name: value`` CRLF; ``value`` is already RFC 2047-encoded and may be folded."""
    raw_name = name.encode("ascii")
    if not _HEADER_NAME.match(raw_name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in _RESERVED:
        raise ValueError(f"{name} is written by wrap_signed itself")
    try:
        raw = value.encode("ascii").replace(b"\r\n", b"\n")
    except UnicodeEncodeError:
        raise ValueError(f"header {name} is not ASCII: encode it (RFC 2047) first") from None
    lines = raw.split(b"\n")
    for line in lines[1:]:
        # Only folding may break a header: a continuation starts with white space. Anything else
        # would let a value inject headers.
        if not line or line[:1] not in (b" ", b"\t"):
            raise ValueError(f"header {name} contains a line break that is not folding")
    if b"\r" in raw:
        raise ValueError(f"header {name} contains a bare CR")
    return raw_name + b": " + b"\r\n".join(lines) + b"\r\n"


def wrap_signed(outer_headers: Sequence[tuple[str, str]], inner: bytes | Blob,
                signer: Signer) -> Blob:
    """A complete multipart/signed message whose first part is ``inner``, byte for byte.

    ``inner`` must be a whole MIME entity with CRLF line endings; the signature covers exactly
    those bytes (RFC 1847 §2.1), so nothing here may change them. Nothing is joined: the result
    is written to the spool piece by piece.
    """
    inner = Blob(inner)
    _check_canonical(inner)
    boundary = unused_boundary([inner])
    delim = b"--" + boundary.encode("ascii")
    signature = base64.encodebytes(signer.sign_detached(inner)).replace(b"\n", b"\r\n")
    out: list[bytes | Blob] = [_header_line(name, value) for name, value in outer_headers]
    out += [
        b"MIME-Version: 1.0\r\n",
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n',
        b'\tmicalg="sha-256"; boundary="' + boundary.encode("ascii") + b'"\r\n',
        b"\r\n",
        b"This is an S/MIME signed message\r\n",
        b"\r\n",
        delim + b"\r\n",
        inner,
        b"\r\n" + delim + b"\r\n",
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n',
        b"Content-Transfer-Encoding: base64\r\n",
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n',
        b"\r\n",
        signature,  # encodebytes: 76-character lines, each ending in a line break
        b"\r\n" + delim + b"--\r\n",
    ]
    return Blob(*out)


def _to_crlf(message: bytes) -> bytes:
    """Bare-LF files (as saved by many tools) become canonical CRLF; lone CRs are left alone."""
    if message.count(b"\n") == message.count(b"\r\n"):
        return message  # already canonical: no 25 MB copies for nothing
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _parse_part(part: bytes) -> tuple[Message, bytes]:
    sep = part.find(b"\r\n\r\n")
    if part.startswith(b"\r\n"):
        head, body = b"", part[2:]
    elif sep < 0:
        raise NotSigned("signature part has no header/body separator")
    else:
        head, body = part[: sep + 2], part[sep + 4 :]
    headers = _HEADERS.parsebytes(head + b"\r\n")
    return headers, body


def split_signed(message: bytes) -> SignedMessage:
    """The outer headers, the signed entity exactly as signed, and the DER signature.

    Raises NotSigned for anything but a well-formed S/MIME multipart/signed message.
    """
    message = _to_crlf(message)
    head_end, body_start = entity_bounds(message)
    if head_end == body_start:
        raise NotSigned("no header/body separator")
    headers = _HEADERS.parsebytes(message[:head_end] + b"\r\n")
    if headers.get_content_type() != "multipart/signed":
        raise NotSigned(f"Content-Type is {headers.get_content_type()}, not multipart/signed")
    protocol = str(headers.get_param("protocol", "") or "").lower()
    if protocol not in SIGNATURE_TYPES:
        raise NotSigned(f"multipart/signed with protocol {protocol!r}, not S/MIME")
    boundary = headers.get_boundary()
    if not boundary:
        raise NotSigned("multipart/signed without a boundary")
    try:
        raw_boundary = boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # RFC 2046 boundaries are ASCII; 8-bit garbage is no signature
        raise NotSigned("multipart/signed boundary is not ASCII") from None

    spans, closed = part_spans(message, raw_boundary, body_start)
    if not closed:
        raise NotSigned("multipart/signed close delimiter missing")
    if not spans:
        raise NotSigned("multipart/signed has no parts")
    if len(spans) == 1:
        raise NotSigned("multipart/signed has no signature part")
    if len(spans) > 2:
        raise NotSigned("multipart/signed has more than two parts")
    (inner_start, inner_end), (sig_start, sig_end) = spans
    sig_headers, sig_body = _parse_part(message[sig_start:sig_end])
    if sig_headers.get_content_type() not in SIGNATURE_TYPES:
        raise NotSigned(f"second part is {sig_headers.get_content_type()}, not a signature")
    cte = str(sig_headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "base64":
        try:
            signature = base64.b64decode(b"".join(sig_body.split()), validate=True)
        except ValueError as exc:
            raise NotSigned(f"signature part is not valid base64: {exc}") from exc
    elif cte == "binary":
        signature = sig_body
    else:
        raise NotSigned(f"signature part has transfer encoding {cte!r}")
    return SignedMessage(headers=headers, source=message, inner_start=inner_start,
                         inner_end=inner_end, signature=signature)


def verify_message(
    message: bytes,
    trust_roots: Sequence[x509.Certificate],
    tsa_roots: Sequence[x509.Certificate] | None = None,
    require_timestamp: bool = False,
    *,
    at: datetime | None = None,
) -> tuple[SignedMessage, SignatureInfo]:
    """Split, then verify the signature over the signed entity; cms.SignatureInvalid on failure."""
    signed = split_signed(message)
    info = verify_detached(signed.signature, signed.inner_view, trust_roots, tsa_roots,
                           require_timestamp, at=at)
    return signed, info
