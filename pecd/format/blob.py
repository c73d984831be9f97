"""Message bytes held as a list of pieces and joined only where they are written.

An envelope or a complete delivery receipt is a few small built parts around an original that can
be 30 MB. Joining them would copy the original two or three times over (part, multipart, signed
message). A ``Blob`` keeps the original as a view into the bytes it was read from: it is hashed
for the signature and written to the spool piece by piece, and never copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

Piece = bytes | memoryview


class Blob:
    """An immutable sequence of byte pieces; ``bytes(blob)`` joins them (tests, small messages).

    The builders cut pieces only between lines, so a CRLF, a line or a boundary never straddles
    two pieces and can be checked piece by piece."""

    __slots__ = ("_pieces", "_size")
    _pieces: tuple[Piece, ...]
    _size: int

    def __init__(self, *pieces: Piece | Blob) -> None:
        flat: list[Piece] = []
        for piece in pieces:
            if isinstance(piece, Blob):
                flat.extend(piece._pieces)
            elif len(piece):
                flat.append(piece)
        self._pieces = tuple(flat)
        self._size = sum(len(p) for p in flat)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Piece]:
        return iter(self._pieces)

    def __bytes__(self) -> bytes:
        return b"".join(self._pieces)

    def head(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer if the blob is shorter), joined."""
        out = bytearray()
        for piece in self._pieces:
            out += piece[: size - len(out)]
            if len(out) >= size:
                break
        return bytes(out)

    def sha256(self) -> bytes:
        digest = hashlib.sha256()
        for piece in self._pieces:
            digest.update(piece)
        return digest.digest()



def as_blob(data: bytes | Blob) -> Blob:
    return data if isinstance(data, Blob) else Blob(data)
