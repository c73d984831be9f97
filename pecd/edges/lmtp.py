"""Delivery into an external mail store over LMTP (RFC 2033), e.g. Dovecot's ``lmtp`` service.

Receives: one recipient address and the bytes the delivery point decided to store, from a worker
thread (every call blocks). Trusts: the LMTP server at the configured host and port to be the
mail store; there is no TLS and no AUTH, so that socket belongs on loopback or a private network.
Touches: one LMTP connection per call and, when a journal directory is given, one marker file
per delivered key there.

One recipient per transaction, so LMTP's per-recipient replies after DATA (RFC 2033 §4.2) come
down to exactly one reply, the recipient's own. Reply mapping:

- any 5xx (LHLO, MAIL, RCPT, or the recipient's reply after DATA) -> :class:`MailboxError`:
  permanent, e.g. ``550 5.1.1 User doesn't exist`` or ``552 5.2.2 Mailbox is full``;
- any 4xx, a refused, lost or timed-out connection -> :class:`MailboxTemporaryError`: try again
  later, e.g. ``452 4.2.2 Mailbox is full`` (Dovecot's ``quota_full_tempfail``) or ``451 4.3.0``.

Idempotence: LMTP has no way to ask "did you already store this?", so with a journal the key is
recorded (fsynced) after the server's ``250`` and a later call with the same key and creation time
returns without delivering again. The window between the ``250`` and the marker's fsync remains:
a crash exactly there delivers twice on recovery (at least once, never lost).
"""

from __future__ import annotations

import os
import re
import smtplib
import time
from pathlib import Path

from pecd.points.delivery import MailboxError, MailboxUnavailable
from pecd.store import durable

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_ADDRESS = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")
_DAY = 86400


class MailboxTemporaryError(MailboxUnavailable):
    """The mail store cannot take the message now (4xx, no connection, timeout); retry later."""


class LmtpMailbox:
    """A :class:`pecd.points.delivery.Mailbox` that hands each message to an LMTP server."""

    def __init__(self, host: str, port: int, *, journal: Path | None = None,
                 local_hostname: str = "localhost", timeout: float = 60.0,
                 journal_days: int = 30) -> None:
        self.host = host
        self.port = port
        self.journal = journal
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.journal_days = journal_days
        self._pruned_day = -1

    def store(self, address: str, key: str, created: float, data: bytes) -> str:
        """Deliver ``data`` to ``address``; returns the server's reply to the recipient.

        Raises MailboxError (permanent) or MailboxTemporaryError (retry later)."""
        if not _ADDRESS.match(address):
            raise MailboxError(f"unusable mailbox address {address[:320]!r}")
        if not _KEY.match(key):
            raise ValueError(f"delivery key {key!r} is not [A-Za-z0-9_.-]")
        marker = self._marker(key, created)
        if marker is not None and marker.exists():
            return "already delivered"
        reply = self._deliver(address, data)
        if marker is not None:
            self._mark(marker)
        return reply

    # --- the LMTP transaction ------------------------------------------------------------------

    def _deliver(self, address: str, data: bytes) -> str:
        where = f"LMTP {self.host}:{self.port}"
        try:
            conn = smtplib.LMTP(self.host, self.port, local_hostname=self.local_hostname,
                                timeout=self.timeout)
        except smtplib.SMTPResponseException as exc:  # a 4xx/5xx greeting
            raise _refusal(where, "greeting", address, exc.smtp_code, exc.smtp_error) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise MailboxTemporaryError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            code, msg = conn.ehlo()  # smtplib.LMTP sends LHLO here
            _check(where, "LHLO", address, code, msg)
            code, msg = conn.mail("")  # MAIL FROM:<>: the store must never bounce to anyone
            _check(where, "MAIL", address, code, msg)
            code, msg = conn.rcpt(address)
            _check(where, "RCPT", address, code, msg)
            try:
                code, msg = conn.data(data)
            except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
                raise _refusal(where, "DATA", address, exc.smtp_code, exc.smtp_error) from None
            _check(where, "DATA", address, code, msg)
            return msg.decode("utf-8", "replace")
        except smtplib.SMTPResponseException as exc:
            raise _refusal(where, "reply", address, exc.smtp_code, exc.smtp_error) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise MailboxTemporaryError(f"{where}: {type(exc).__name__}: {exc}") from None
        finally:
            # after a 250 the message is stored: a failing QUIT must not turn that into a retry
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()

    # --- the journal of delivered keys -----------------------------------------------------------

    def _marker(self, key: str, created: float) -> Path | None:
        if self.journal is None:
            return None
        day = int(created) // _DAY
        return self.journal / str(day) / f"{int(created)}.{key}"

    def _mark(self, marker: Path) -> None:
        durable.private_dir(marker.parent)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(marker.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._prune()

    def _prune(self) -> None:
        """Drop day directories older than ``journal_days``; at most once a day per process."""
        assert self.journal is not None
        today = int(time.time()) // _DAY
        if self._pruned_day == today:
            return
        self._pruned_day = today
        for day_dir in self.journal.iterdir():
            if day_dir.name.isdigit() and int(day_dir.name) < today - self.journal_days:
                for f in day_dir.iterdir():
                    f.unlink(missing_ok=True)
                day_dir.rmdir()


def _refusal(where: str, step: str, address: str, code: int,
             msg: bytes | str) -> MailboxError | MailboxTemporaryError:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    detail = f"{where}: {step} for {address}: {code} {text[:300]}"
    return MailboxError(detail) if 500 <= code < 600 else MailboxTemporaryError(detail)


def _check(where: str, step: str, address: str, code: int, msg: bytes) -> None:
    if not 200 <= code < 300:
        raise _refusal(where, step, address, code, msg)
