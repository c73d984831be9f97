"""A strict DER reader for the few CMS and RFC 3161 structures pecd checks on every message.

asn1crypto builds a generic object tree, and on a provider's hot path (three signatures and
three timestamp tokens checked per certified cycle) building and walking that tree cost most of
a verification. This module only cuts definite-length DER into (tag, contents) pieces; the
callers (pecd.trust.cms, pecd.trust.tsa) take what they check and nothing else. Anything that is
not plain DER (indefinite lengths, long-form tags, non-minimal lengths, trailing bytes) raises
:class:`NotDer`, and the caller then hands the input to asn1crypto's generic path, which judges
it as before: this reader never decides that input is bad, only that it is the usual shape.
"""

from __future__ import annotations

from collections.abc import Iterator


class NotDer(Exception):
    """Not the plain DER shape the fast path reads: use the generic parser instead."""


def read(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The element at ``pos``: (tag byte, start of contents, end of contents), within ``end``."""
    if pos + 2 > end:
        raise NotDer("truncated")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise NotDer("long-form tag")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise NotDer("indefinite or oversized length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        if length < 0x80 or buf[pos] == 0:
            raise NotDer("non-minimal length")
        pos += n
    if pos + length > end:
        raise NotDer("truncated")
    return tag, pos, pos + length


def expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """(start, end) of the contents of the element at ``pos``, which must have ``tag``."""
    got, start, stop = read(buf, pos, end)
    if got != tag:
        raise NotDer(f"tag {got:#x} where {tag:#x} was expected")
    return start, stop


def whole(buf: bytes, tag: int) -> tuple[int, int]:
    """The contents of ``buf``, one element with ``tag`` and nothing after it."""
    start, stop = expect(buf, 0, len(buf), tag)
    if stop != len(buf):
        raise NotDer("bytes after the value")
    return start, stop


def children(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each element between ``start`` and ``end``: (tag, element start, contents start, end)."""
    pos = start
    while pos < end:
        tag, cstart, cend = read(buf, pos, end)
        yield tag, pos, cstart, cend
        pos = cend


def integer(buf: bytes, start: int, end: int) -> int:
    """An INTEGER's contents (two's complement, minimal)."""
    if start == end:
        raise NotDer("empty INTEGER")
    if end - start > 1 and (
        (buf[start] == 0 and buf[start + 1] < 0x80) or (buf[start] == 0xFF and buf[start + 1] >= 0x80)
    ):
        raise NotDer("non-minimal INTEGER")
    return int.from_bytes(buf[start:end], "big", signed=True)


def oid_dotted(contents: bytes) -> str:
    """An OBJECT IDENTIFIER's contents as dotted text."""
    if not contents or contents[-1] & 0x80:
        raise NotDer("bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for i, byte in enumerate(contents):
        if value == 0 and byte == 0x80 and (i == 0 or not contents[i - 1] & 0x80):
            raise NotDer("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])
