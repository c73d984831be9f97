"""The typed boundary over aiosmtpd: hooks only translate one SMTP step into one call and map a
:class:`~pecd.replies.Refusal` to its reply. Listeners write nothing themselves: a message goes
through :meth:`~pecd.queue.Queue.enqueue` and ``250`` is sent only after it returned.

Trusts: TLS and AUTH for the submission listeners (the authenticated login is the only identity
a client has); nothing on the inbound listener, where the reception point judges each message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from pecd import headers, replies
from pecd.config import Config
from pecd.ledger import LedgerEvent
from pecd.queue import NewItem, Queue
from pecd.replies import Refusal

log = logging.getLogger("pecd.smtp")

PasswordCheck = Callable[[str, str], Awaitable[bool]]


class PecdSMTP(SMTP):
    """aiosmtpd's protocol with the password check awaited (upstream calls it synchronously,
    which would stall every session for the length of an argon2 hash)."""

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _authz, login, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._check(login, password)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        refused = AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        try:
            user, secret = login.decode(), password.decode()
        except UnicodeDecodeError:
            return refused
        handler = self.event_handler
        peer = self.session.peer if self.session else None
        if await handler.authenticate(user, secret, peer):
            return AuthResult(success=True, auth_data=user)
        return refused


def server_tls(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.paths.tls_cert), str(config.paths.tls_key))
    return ctx


class _Base:
    def __init__(self, config: Config, queue: Queue) -> None:
        self.config = config
        self.queue = queue

    async def handle_exception(self, error: Exception) -> str:
        return replies.reply_for(error)

    async def _refuse(self, refusal: Refusal, event: LedgerEvent) -> str:
        await self.queue.record([event])
        return refusal.reply


class SubmissionHandler(_Base):
    """Access point listener: authenticated users submit here."""

    def __init__(self, config: Config, queue: Queue, check_password: PasswordCheck) -> None:
        super().__init__(config, queue)
        self.check_password = check_password

    async def authenticate(self, user: str, password: str, peer: object) -> bool:
        ok = await self.check_password(user, password)
        if not ok:
            await self.queue.record([LedgerEvent(event="auth-failed", sender=user[:320],
                                                 detail={"peer": str(peer)})])
        return ok

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        user = str(session.auth_data)
        if not headers.same_address(address, user):
            return await self._refuse(replies.SenderNotOwned(), LedgerEvent(
                event="submission-refused", sender=user,
                detail={"reason": "MAIL FROM not owned", "mail_from": address[:320]}))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if "@" not in address or address.startswith("@") or address.endswith("@"):
            return replies.BAD_ADDRESS
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            return replies.TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        user = str(session.auth_data)
        msg = headers.parse(data)
        for name in ("From", "Sender"):
            for addr in headers.addresses(msg, name):
                if not headers.same_address(addr, user):
                    return await self._refuse(replies.FromNotOwned(), LedgerEvent(
                        event="submission-refused", sender=user,
                        detail={"reason": f"{name} header not owned", "header": addr[:320]}))
        ids = await self.queue.enqueue(
            [NewItem("submission", str(envelope.mail_from), tuple(envelope.rcpt_tos), data=data)],
            [LedgerEvent(event="submitted", ref_msgid=headers.message_id(msg), sender=user,
                         recipients=tuple(envelope.rcpt_tos), subject=headers.text(msg, "Subject"),
                         detail={"size": len(data), "peer": str(session.peer)})],
        )
        return replies.OK_QUEUED.format(ids[0])


class InboundHandler(_Base):
    """Incoming point listener: other providers and the Internet deliver here."""

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self.config.is_local(address):
            domain = address.rpartition("@")[2][:255]
            return replies.RELAY_DENIED.format(domain)
        if len(envelope.rcpt_tos) >= max(self.config.limits.max_recipients, 1000):
            return replies.TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        return replies.OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        msg = headers.parse(data)
        ids = await self.queue.enqueue(
            [NewItem("inbound", str(envelope.mail_from or ""), tuple(envelope.rcpt_tos),
                     data=data)],
            [LedgerEvent(event="received", ref_msgid=headers.message_id(msg),
                         sender=str(envelope.mail_from or ""),
                         recipients=tuple(envelope.rcpt_tos),
                         subject=headers.text(msg, "Subject"),
                         detail={"size": len(data), "peer": str(session.peer),
                                 "tls": session.ssl is not None})],
        )
        return replies.OK_QUEUED.format(ids[0])


async def listen(handler: object, host: str, port: int, config: Config,
                 tls: ssl.SSLContext, *, implicit_tls: bool, auth: bool) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return PecdSMTP(
            handler,
            hostname=config.hostname,
            ident="pecd",
            data_size_limit=config.limits.max_message_size,
            tls_context=None if implicit_tls else tls,
            # implicit TLS is TLS already; aiosmtpd 1.4.6 would refuse AUTH there otherwise
            auth_require_tls=not implicit_tls,
            auth_required=auth,
            auth_exclude_mechanism=[] if auth else ["LOGIN", "PLAIN"],
            timeout=config.limits.session_timeout,
            loop=loop,
        )

    return await loop.create_server(factory, host, port, ssl=tls if implicit_tls else None)
