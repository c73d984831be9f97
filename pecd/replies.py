"""Every SMTP reply pecd sends, named, and the one mapping from typed refusals to replies.

Stages raise the exceptions below; only the SMTP adapter turns them into reply lines, so a reply
code is decided in exactly one place and no exception text from deep inside ever reaches a peer.
"""

from __future__ import annotations

import logging
import uuid

from pecd.store import Unavailable

log = logging.getLogger("pecd.smtp")

OK_QUEUED = "250 2.0.0 Ok: queued as {}"
OK = "250 2.1.0 Ok"
OK_RCPT = "250 2.1.5 Ok"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_TLS_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"  # RFC 3207 §4
SENDER_NOT_OWNED = "553 5.7.1 Sender address rejected: not owned by the authenticated user"
FROM_NOT_OWNED = "550 5.7.1 From header does not match the authenticated user"
RELAY_DENIED = "554 5.7.1 Relay access denied: {} is not a domain of this provider"
BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
NO_HEADERS = "554 5.6.0 Message has no header section"
TEMPORARY = "451 4.3.0 Temporary failure, please retry (incident {})"
AUTH_THROTTLED = "454 4.7.0 Too many failed authentication attempts, try again later"
BAD_SENDER_SYNTAX = "553 5.1.7 Bad sender address syntax"
BAD_RCPT_SYNTAX = "553 5.1.3 Bad recipient address syntax"
BARE_LINE_ENDING = "554 5.6.11 Bare CR or LF in message: lines must end in CRLF (RFC 5321 2.3.8)"
NUL_IN_MESSAGE = "554 5.6.0 NUL character in message: not allowed in Internet mail (RFC 5322 2.3)"
CONTROL_IN_HEADERS = ("554 5.6.0 Control character in header section: not allowed"
                      " (RFC 5322 2.2)")
MALFORMED_HEADER = ("554 5.6.0 Malformed header section: every line must be a header field"
                    " or its continuation (RFC 5322 2.2)")
TOO_MANY_HEADERS = "554 5.6.0 Too many header fields (limit {})"
HEADERS_TOO_BIG = "554 5.6.0 Header section too large (limit {} bytes)"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands in this session, closing"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
TLS_FAILED = "454 4.7.0 TLS handshake failed"
TOO_MANY_TLS_FAILURES = "421 4.7.0 Too many failed TLS handshakes from your address, try again later"
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognized"
STORE_UNAVAILABLE = "451 4.3.0 Storage temporarily unavailable, nothing was accepted: please retry"
REVOCATION_UNKNOWN = ("451 4.7.5 Revocation status of the signing certificate unknown"
                      " (CRL/OCSP unreachable), try again later")


class Refusal(Exception):
    """A stage's typed refusal; ``reply`` is one of the constants above."""

    reply = "554 5.0.0 Refused"

    def __init__(self, detail: str = "", reply: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reply is not None:
            self.reply = reply


class SenderNotOwned(Refusal):
    reply = SENDER_NOT_OWNED


class FromNotOwned(Refusal):
    reply = FROM_NOT_OWNED


class RelayDenied(Refusal):
    reply = RELAY_DENIED


class TooManyRecipients(Refusal):
    reply = TOO_MANY_RCPTS


class MessageTooBig(Refusal):
    reply = TOO_BIG


class BadMessage(Refusal):
    reply = NO_HEADERS


class AuthThrottled(Refusal):
    reply = AUTH_THROTTLED


class TlsRequired(Refusal):
    """``[inbound] require_tls = "all"``: a plaintext transaction on the inbound listener."""

    reply = TLS_REQUIRED


class BareLineEnding(Refusal):
    """SMTP smuggling needs a bare CR or LF to make two readers see different message ends."""

    reply = BARE_LINE_ENDING


class ForbiddenBytes(Refusal):
    """A byte no message may hold (NUL), or no new message's header section (other controls)."""

    reply = NUL_IN_MESSAGE


class MalformedHeader(Refusal):
    """A header line that is no field: parsers would disagree on the fields (and the author)."""

    reply = MALFORMED_HEADER


class TooManyHeaders(Refusal):
    reply = TOO_MANY_HEADERS


class RevocationUnknown(Refusal):
    """[reception] revocation = "defer": the peer retries until the status is known or the
    grace is over (then the reception point makes an anomaly envelope)."""

    reply = REVOCATION_UNKNOWN


def reply_for(exc: BaseException) -> str:
    """The reply for any exception: refusals say what they are, anything else gets an incident id."""
    if isinstance(exc, Refusal):
        return exc.reply
    if isinstance(exc, Unavailable):  # the database is away: nothing committed, the client retries
        log.warning("storage unavailable: %s", exc)
        return STORE_UNAVAILABLE
    incident = uuid.uuid4().hex[:12]
    log.error("incident %s: unexpected error", incident, exc_info=exc)
    return TEMPORARY.format(incident)
