"""The access point's formal checks (RFC 6109 §3.1.1), pure: headers and SMTP envelope in,
a refusal reason out. A failed check does not refuse the SMTP transaction; it turns into a
signed non-acceptance notice, so the sender holds proof of why.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from pecd.format import headers


class FormalCheckFailed(Exception):
    """The submitted message breaks a PEC rule; the text goes into the non-acceptance notice."""


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_recipients: int


def formal_checks(msg: Message, mail_from: str, rcpts: tuple[str, ...], size: int,
                  limits: Limits, block: bytes | None = None) -> None:
    """``block``: the raw header section, when the caller has it (its lines are checked)."""
    if block is not None and (line := headers.malformed_line(block)) is not None:
        raise FormalCheckFailed(f"header line {line} is not a header field")
    froms = headers.addresses(msg, "From")
    if not froms:
        raise FormalCheckFailed("the From header is missing or holds no valid address")
    if len(froms) != 1:
        raise FormalCheckFailed("the From header must hold exactly one address")
    if not headers.same_address(froms[0], mail_from):
        raise FormalCheckFailed("the From address differs from the SMTP sender (MAIL FROM)")
    for name in ("From", "Sender"):
        if headers.foreign_addresses(msg, name, mail_from):
            raise FormalCheckFailed(f"the {name} header names an address other than the sender")
    if any(str(value).strip() for value in msg.get_all("Bcc", [])):
        # an empty "Bcc:" left by a client is allowed: §3.1.1 forbids a Bcc holding a value
        raise FormalCheckFailed("Bcc recipients are not allowed in certified mail")
    to = headers.addresses(msg, "To")
    if not to:
        raise FormalCheckFailed("the To header must hold at least one address")
    visible = {headers.canonical(a).lower() for a in to + headers.addresses(msg, "Cc")}
    for rcpt in rcpts:
        if headers.canonical(rcpt).lower() not in visible:
            raise FormalCheckFailed(f"recipient {rcpt} is in neither To nor Cc")
    if len(rcpts) > limits.max_recipients:
        raise FormalCheckFailed(f"too many recipients ({len(rcpts)} > {limits.max_recipients})")
    if size * len(rcpts) > limits.max_message_size:
        raise FormalCheckFailed(
            f"message size times recipients ({size * len(rcpts)} bytes) exceeds the limit of"
            f" {limits.max_message_size} bytes"
        )
