"""The typed boundary over aiosmtpd: hooks only translate one SMTP step into one call and map a
:class:`~pecd.replies.Refusal` to its reply. Listeners write nothing themselves: a message goes
through :meth:`~pecd.store.queue.Queue.enqueue` and ``250`` is sent only after it returned.

Trusts: TLS and AUTH for the submission listeners (the authenticated login is the only identity
a client has); nothing on the inbound listener, where the reception point judges each message.
Every client, authenticated or not, is bounded by ``[limits]``: connections per address,
commands per session, idle time, message size, header count and size, recipients, and
(submission) failed logins per account and per address (:mod:`pecd.throttle`). aiosmtpd's own
log lines that echo client input are redacted, so AUTH exchanges and message content never
reach the log.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
import ssl
from asyncio import sslproto
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException, syntax

from pecd import replies
from pecd.clock import Clock, SystemClock
from pecd.config import Config, Limits
from pecd.format import headers
from pecd.replies import Refusal
from pecd.store.ledger import LedgerEvent
from pecd.store.queue import NewItem, Queue
from pecd.store.throttle_store import SharedAuthThrottle
from pecd.store.users import Login
from pecd.throttle import AuthThrottle, ConnectionLimiter, SlidingWindow
from pecd.trust.index import ProviderIndex
from pecd.trust.revocation import Checker

log = logging.getLogger("pecd.smtp")

PasswordCheck = Callable[[str, str], Awaitable[Login]]

CRLF = b"\r\n"


class _RedactClientData(logging.Filter):
    """aiosmtpd logs command lines, AUTH continuation lines it cannot decode, DATA lines and the
    replies that echo unknown commands; any of them can hold a password or private mail. Its
    records keep their message and the peer, and lose every text argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                f"<{len(a)} redacted>" if isinstance(a, str | bytes | bytearray) else a
                for a in record.args
            )
        elif isinstance(record.args, dict):  # logging's one-mapping form; aiosmtpd never uses it
            record.args = {k: "<redacted>" for k in record.args}
        return True


_REDACT = _RedactClientData()
logging.getLogger("mail.log").addFilter(_REDACT)


def address_acceptable(address: str) -> bool:
    """An envelope address pecd can carry into headers, daticert.xml and the ledger: printable
    (no control, format or unpaired surrogate characters), not absurdly long."""
    return 0 < len(address) <= 320 and address.isprintable()


# C0 controls and DEL other than HT, CR, LF: RFC 5322 keeps them only as obsolete syntax that
# a sender "MUST NOT generate" (obs-NO-WS-CTL), and no header value pecd copies needs them
_HEADER_CONTROLS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def content_refusal(data: bytes, limits: Limits, *, strict_headers: bool = False
                    ) -> Refusal | None:
    """Why the bytes of a DATA transaction are refused before anything reads them, or None.

    A bare CR or LF is refused outright (SMTP smuggling: a next hop that ends DATA on
    ``<LF>.<LF>`` or ``<CR>.<CR>`` would see a second message where pecd saw one), and so is a
    NUL anywhere (RFC 5321 §4.5.2 / RFC 5322 §2.3 and RFC 6152 forbid it in any message: a
    next hop written in C may end a line, or the data, at ``<CRLF><NUL>.<CRLF>``), and so are
    header sections over the configured size or field count. ``strict_headers`` (the
    submission listeners: clients write new mail) also refuses the other control characters
    in the header section.
    """
    crlf = data.count(CRLF)
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        return replies.BareLineEnding("bare CR or LF")
    nul = data.find(b"\0")
    if nul >= 0:
        return replies.ForbiddenBytes(f"NUL byte at offset {nul}", replies.NUL_IN_MESSAGE)
    block = headers.header_block(data)
    if strict_headers:
        control = _HEADER_CONTROLS.search(block)
        if control is not None:
            return replies.ForbiddenBytes(
                f"control byte 0x{control[0][0]:02x} in the header section at offset"
                f" {control.start()}", replies.CONTROL_IN_HEADERS)
    if len(block) > limits.max_header_bytes:
        return replies.TooManyHeaders(f"header section of {len(block)} bytes",
                                      replies.HEADERS_TOO_BIG.format(limits.max_header_bytes))
    fields = sum(1 for line in block.split(CRLF) if line and line[:1] not in b" \t")
    if fields > limits.max_header_fields:
        return replies.TooManyHeaders(f"{fields} header fields",
                                      replies.TOO_MANY_HEADERS.format(limits.max_header_fields))
    return None


def peer_address(peer: object) -> str:
    """The client's IP address (the key for per-address limits), from aiosmtpd's peername."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


class _DataBuffer:
    """DATA's lines, dot-unstuffed, into one buffer; what makes them refused is noted, and from
    then on nothing more is kept (an oversize message costs nothing)."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.size = 0
        self.refusal: str | None = None
        self._buffer = io.BytesIO()

    def take(self, lines: bytes) -> None:
        """Whole lines (each ends in CRLF), as they came: a dot that starts one is dropped."""
        if not lines:
            return
        self.size += len(lines)
        if self.refusal is None and self.size_limit and self.size > self.size_limit:
            self._refuse("552 Error: Too much mail data")
        if self.refusal is None and max(map(len, lines.split(CRLF))) > self.line_limit:
            self._refuse(_LINE_TOO_LONG)
        if self.refusal is not None:
            return
        unstuffed = lines.replace(b"\r\n.", CRLF)
        self._buffer.write(memoryview(unstuffed)[1:] if unstuffed[:1] == b"." else unstuffed)

    def carry(self, partial: bytes) -> bytes:
        """The unfinished line to join to the next block. One already too long is refused and
        only its last byte is carried: enough to tell whether the line ends where the next
        block starts (a dot there then does not start a line, and does not end the data)."""
        if len(partial) > self.line_limit:
            self.size += len(partial) - 1
            if self.refusal is None:
                self._refuse(_LINE_TOO_LONG)
            return partial[-1:]
        return partial

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()

    def _refuse(self, reply: str) -> None:
        self.refusal = reply
        self._buffer = io.BytesIO()


_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# ``<local@domain>`` then the parameters: a dot-atom local part and a host name; the parameters
# as the stdlib parser leaves them (the white space after ``>`` taken), no comment or quote
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*([^()\"\r\n]*)\Z")


class PecdSMTP(SMTP):
    """aiosmtpd 1.4.6's protocol with pecd's defences:

    - the password check is awaited (upstream calls it synchronously, which would stall every
      session for the length of an argon2 hash), and a throttled login gets ``454``;
    - AUTH needs an encrypted transport, judged from the socket itself: after STARTTLS, or from
      the start on the implicit-TLS port (upstream only knows about STARTTLS and would refuse
      AUTH there, so that listener used to turn the TLS requirement off);
    - concurrent connections per client address, commands per session and idle time are bounded,
      each refusal answered with ``421`` before the connection closes;
    - envelope addresses must be printable, and DATA content is refused when it holds a bare CR
      or LF (SMTP smuggling) or too many header fields, before any handler sees it.
    """

    def __init__(self, handler: _Base, *, limits: Limits, implicit_tls: ssl.SSLContext | None = None,
                 handshake_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self._implicit_tls = implicit_tls
        self._handshake_timeout = handshake_timeout
        self._counted_address: str | None = None
        self._over_connection_limit = False
        self._commands = 0
        self._busy = False  # a command is under way (DATA being read, a handler awaited)
        self._shutting_down = False
        self._smtp_methods = {name: self._counting(method)
                              for name, method in self._smtp_methods.items()}

    # --- transport and session bounds ------------------------------------------------------

    def _encrypted(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._implicit_tls is not None and self._original_transport is None:
            self._start_implicit_tls(transport)  # back here with the TLS transport once done
            return
        first = self.transport is None  # STARTTLS calls this again with the TLS transport
        if first and transport.get_extra_info("ssl_object") is not None:
            self._auth_require_tls = False  # implicit TLS: encrypted before the greeting
        super().connection_made(transport)
        if first:
            assert self.session is not None and self._handler_coroutine is not None
            # known until its handler task ends, not until the connection is lost: shutdown
            # waits for a task that is still unwinding after the peer went away
            sessions = self.event_handler.sessions
            sessions.add(self)
            self._handler_coroutine.add_done_callback(lambda _: sessions.discard(self))
            address = peer_address(self.session.peer)
            if self.event_handler.connections.acquire(address):
                self._counted_address = address
            else:
                self._over_connection_limit = True

    def _start_implicit_tls(self, transport: asyncio.BaseTransport) -> None:
        """The implicit-TLS port's handshake, done here as aiosmtpd does STARTTLS rather than by
        the event loop's server: the loop drops a failed handshake without a word, so a scan
        would leave no trace and no count. Here each failure is one INFO line and counts
        against the client address; an address over its count is closed before any TLS."""
        address = peer_address(transport.get_extra_info("peername"))
        handler = self.event_handler
        if not handler.tls_failures_allow(address):
            transport.close()  # nothing can be said in clear on a TLS port
            return
        assert self._implicit_tls is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self._implicit_tls, waiter, server_side=True,
            ssl_handshake_timeout=self._handshake_timeout)  # type: ignore[arg-type]  # float ok
        self._original_transport = transport
        transport.set_protocol(self._tls_protocol)
        self._tls_protocol.connection_made(transport)

        def done(w: asyncio.Future[None]) -> None:
            if not w.cancelled() and w.exception() is not None:
                handler.tls_failed(address, w.exception())

        waiter.add_done_callback(done)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted_address is not None:
            self.event_handler.connections.release(self._counted_address)
            self._counted_address = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.event_handler.closing:
            self._close_with(replies.SHUTTING_DOWN)
            return
        if self._over_connection_limit:
            assert self.session is not None and self.transport is not None
            log.warning("%s: connection refused, over the per-address limit",
                        peer_address(self.session.peer))
            self._close_with(replies.TOO_MANY_CONNECTIONS)
            return
        assert self.session is not None
        if not self.event_handler.tls_failures_allow(peer_address(self.session.peer)):
            self._close_with(replies.TOO_MANY_TLS_FAILURES)
            return
        await super()._handle_client()

    def shut_down(self) -> None:
        """Service stop: an idle session gets ``421`` and closes now; one in the middle of a
        command closes right after answering it (see ``_counting``)."""
        self._shutting_down = True
        if not self._busy:
            self._close_with(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        """The grace period is over: drop the connection, whatever it was doing. (uvloop's
        transports are not subclasses of asyncio's, hence the cast rather than a check.)"""
        if self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    def _close_with(self, reply: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._writer.write(reply.encode() + CRLF)  # flushed by close()
            transport.close()

    def _timeout_cb(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._writer.write(replies.IDLE_TIMEOUT.encode() + CRLF)  # flushed by close()
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def push(self, status: AnyStr) -> None:
        # upstream echoes an unknown command back: when a client pipelines AUTH LOGIN and it is
        # refused, that "command" is the base64 of a password, so it is never repeated
        if isinstance(status, str) and status.startswith('500 Error: command "'):
            await super().push(replies.UNKNOWN_COMMAND)
            return
        await super().push(status)

    def _counting(self, method: Callable[[str | None], Awaitable[None]]
                  ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)
        async def counted(arg: str | None) -> None:
            self._commands += 1
            if self._commands > self.limits.max_commands_per_session:
                self._close_with(replies.TOO_MANY_COMMANDS)
                return
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
            if self._shutting_down:
                self._close_with(replies.SHUTTING_DOWN)

        return counted

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS; a failed handshake (scanners make thousands) is one INFO line
        naming the peer and the TLS reason, counted per client address, not an incident with
        a traceback. aiosmtpd then closes the connection (see ``handle_exception``)."""
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as exc:
            assert self.session is not None
            self.event_handler.tls_failed(peer_address(self.session.peer), exc.__cause__)
            raise

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser, minus its crashes: the stdlib header parser it borrows raises
        IndexError (and possibly others) on input such as ``<``, which would reach the incident
        path (451 and a traceback) instead of a syntax error. Any such failure reads as an
        empty path, which aiosmtpd answers with ``501 Syntax``.

        The usual path, ``<dot-atom@hostname>``, is read by one regular expression: the same
        answer as the stdlib parser's (tests/test_smtp_paths.py compares them), at a twentieth
        of its cost, which was most of a MAIL or RCPT command's."""
        plain = _PLAIN_PATH.match(arg)
        if plain is not None:
            local = plain.group(1).rpartition("@")[0]
            if self.local_part_limit and len(local) > self.local_part_limit:
                return None, None
            return plain.group(1), plain.group(2)
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError, TypeError, AttributeError):
            return "", ""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, same replies, read in blocks into one buffer: upstream reads a line
        per await into a bytearray per line and joins them, ~4× a big message's size at the
        peak and most of a small one's CPU.

        Blocks end where ``.<CRLF>`` does (the end of the data when the dot starts a line) or
        where the reader's limit cuts them; only whole lines are taken, the rest is carried to
        the next block. Lines end only on CRLF, as upstream; a bare CR or LF inside one is
        refused later by :func:`content_refusal`. ``BytesIO.getvalue`` hands its buffer over
        without a copy, so the message costs about its own size while it arrives."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = _DataBuffer(self.data_size_limit, self.line_length_limit)
        carry = b""  # the start of a line whose end has not arrived yet
        while True:
            try:
                block = carry + await self._reader.readuntil(b".\r\n")
            except asyncio.CancelledError:  # the client went away during DATA
                self._writer.close()
                raise
            except asyncio.IncompleteReadError:  # likewise, seen before the cancellation
                self._writer.close()
                return
            except asyncio.LimitOverrunError as exc:
                block = carry + await self._reader.read(exc.consumed)
                cut = block.rfind(CRLF) + 2 if CRLF in block else 0
                data.take(block[:cut])
                carry = data.carry(block[cut:])
                continue
            head = block[:-3]
            if not head or head.endswith(CRLF):  # the dot starts a line: the end of the data
                data.take(head)
                break
            data.take(block)  # a line that ends in a dot, not the end
            carry = b""
        if data.refusal is not None:
            await self.push(data.refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = data.getvalue()
        del data
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command in ("MAIL", "RCPT") and not address_acceptable(str(args[0])):
            return replies.BAD_SENDER_SYNTAX if command == "MAIL" else replies.BAD_RCPT_SYNTAX
        if command == "DATA":
            assert self.envelope is not None and self.session is not None
            refusal = content_refusal(self.envelope.original_content or b"", self.limits,
                                      strict_headers=self.event_handler.strict_headers)
            if refusal is not None:
                return await self.event_handler.refused(self.session, self.envelope, refusal)
        return await super()._call_handler_hook(command, *args)

    # --- AUTH ------------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self._encrypted():  # whatever aiosmtpd's own flag says
            await self.push(replies.AUTH_TLS_REQUIRED)
            return
        await super().smtp_AUTH(arg)

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
        if not user or not address_acceptable(user):
            return refused
        handler = self.event_handler
        peer = self.session.peer if self.session else None
        try:
            ok = await handler.authenticate(user, secret, peer)
        except Refusal as exc:
            return AuthResult(success=False, handled=False, message=exc.reply)
        if ok:
            return AuthResult(success=True, auth_data=user)
        return refused


def server_tls(config: Config) -> ssl.SSLContext:
    """The one TLS context of every listener: TLS 1.2 or newer, and with TLS 1.2 only the
    suites ``[tls] tls12_ciphers`` names (AEAD by default; TLS 1.3's are AEAD anyway)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(config.tls.tls12_ciphers)  # checked when the configuration was loaded
    ctx.load_cert_chain(str(config.paths.tls_cert), str(config.paths.tls_key))
    return ctx


def tls_failures_window(config: Config) -> SlidingWindow:
    """Failed TLS handshakes per client address, within ``[limits] auth_window``."""
    return SlidingWindow(config.limits.tls_failures_per_address, config.limits.auth_window,
                         100_000)


class _Base:
    strict_headers = False  # see content_refusal

    def __init__(self, config: Config, queue: Queue, clock: Clock | None = None) -> None:
        self.config = config
        self.queue = queue
        self.clock = clock or SystemClock()
        # shared by every listener this handler serves (submission + smtps share one)
        self.connections = ConnectionLimiter(config.limits.max_connections_per_address)
        # the service hands every handler the same one: a scanner's count spans all listeners
        self.tls_failures = tls_failures_window(config)
        self.sessions: set[PecdSMTP] = set()
        self.closing = False

    async def close_sessions(self, grace: float) -> None:
        """Shutdown: every session ends with ``421``; one that is in the middle of a command
        (a DATA being committed, say) gets up to ``grace`` seconds to answer it first.

        A connection the listener accepted just before it closed may only become a session
        now (Python 3.11's ``wait_closed`` does not wait for it): it is greeted with ``421``,
        and the loop runs until no session is left, so nothing commits after the stop."""
        self.closing = True
        while self.sessions:
            sessions = list(self.sessions)
            for session in sessions:
                session.shut_down()
            tasks = {t for t in (s.handler_task for s in sessions) if t is not None}
            if tasks:
                await asyncio.wait(tasks, timeout=grace)
            for session in sessions:
                session.abort()
            await asyncio.gather(*tasks, return_exceptions=True)

    def tls_failed(self, address: str, cause: BaseException | None) -> None:
        """One line per failed handshake, and one more when the address is throttled."""
        reason = getattr(cause, "reason", None) or type(cause).__name__
        log.info("%s: TLS handshake failed (%s)", address, reason)
        now = self.clock.now().timestamp()
        self.tls_failures.hit(address, now)
        if self.tls_failures.retry_after(address, now) > 0:
            log.warning("%s: %d failed TLS handshakes within %d s, refusing its connections",
                        address, self.tls_failures.count(address, now),
                        round(self.tls_failures.window))

    def tls_failures_allow(self, address: str) -> bool:
        """Whether ``address`` may start a session (it has not failed too many handshakes)."""
        return self.tls_failures.retry_after(address, self.clock.now().timestamp()) == 0

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # logged by smtp_STARTTLS; aiosmtpd closes
            return replies.TLS_FAILED
        return replies.reply_for(error)

    async def _refuse(self, refusal: Refusal, event: LedgerEvent) -> str:
        await self.queue.record([event])
        return refusal.reply

    async def refused(self, session: Session, envelope: Envelope, refusal: Refusal) -> str:
        """DATA content refused by the protocol layer (:func:`content_refusal`): logged, and the
        client gets a clear code; nothing is queued."""
        return await self._refuse(refusal, LedgerEvent(
            event="smtp-refused", sender=str(envelope.mail_from or "")[:320],
            recipients=tuple(r[:320] for r in envelope.rcpt_tos),
            detail={"reason": refusal.detail, "reply": refusal.reply,
                    "peer": peer_address(session.peer),
                    "size": len(envelope.original_content or b"")}))


class SubmissionHandler(_Base):
    """Access point listener: authenticated users submit here."""

    strict_headers = True

    def __init__(self, config: Config, queue: Queue, check_password: PasswordCheck,
                 clock: Clock | None = None) -> None:
        super().__init__(config, queue, clock)
        self.check_password = check_password
        limits = config.limits
        # the counts are shared with every node on the database (pecd.store.throttle_store)
        self.throttle = SharedAuthThrottle(AuthThrottle(
            self.clock, per_source=limits.auth_failures_per_source,
            per_address=limits.auth_failures_per_address,
            per_account=limits.auth_failures_per_account, window=limits.auth_window,
            slow_interval=limits.auth_slow_interval, slow_max_wait=limits.auth_slow_max_wait),
            queue.db)

    async def authenticate(self, user: str, password: str, peer: object) -> bool:
        """True for a good login; False for a bad one; :class:`~pecd.replies.AuthThrottled`
        when this address failed too often lately, for this account or for any (no password
        is checked). An account that failed too often from everywhere is slowed, not refused:
        the attempt waits its turn (see :class:`~pecd.throttle.AuthThrottle`)."""
        address = peer_address(peer)
        account = user.strip().lower()
        verdict = await self.throttle.check(account, address)
        if verdict.first:  # one ledger row per episode, not one per attempt
            what = address if verdict.scope == "address" else account[:320]
            event = "auth-throttled" if not verdict.allowed else "auth-slowed"
            log.warning("AUTH %s for %s %s (peer %s)", event.removeprefix("auth-"),
                        verdict.scope, what, address)
            await self.queue.record([LedgerEvent(
                event=event, sender=user[:320],
                detail={"peer": address, "scope": verdict.scope,
                        "retry_after": round(verdict.retry_after),
                        "delay": round(verdict.delay, 1)})])
        if not verdict.allowed:
            raise replies.AuthThrottled(f"{verdict.scope} throttled")
        if verdict.delay > 0:  # a slowed account: this attempt's turn comes later
            await asyncio.sleep(verdict.delay)
        login = await self.check_password(user, password)
        if login.ok:
            await self.throttle.success(account, address)
            return True
        await self.throttle.failure(account, address)
        events = [LedgerEvent(event="auth-failed", sender=user[:320],
                              detail={"peer": address, "locked": login.locked})]
        if login.just_locked:
            log.warning("account %s locked after %d failed logins", user[:320], login.failures)
            events.append(LedgerEvent(event="account-locked", sender=user[:320],
                                      detail={"peer": address, "failures": login.failures}))
        await self.queue.record(events)
        return False

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
        line = headers.malformed_line(headers.header_block(data))
        if line is not None:  # readers would disagree about which fields the message has
            return await self._refuse(replies.MalformedHeader(), LedgerEvent(
                event="submission-refused", sender=user,
                detail={"reason": "header line is not a field", "line": line}))
        msg = headers.parse(data)
        for name in ("From", "Sender"):
            for addr in headers.addresses(msg, name):
                if not headers.same_address(addr, user):
                    return await self._refuse(replies.FromNotOwned(), LedgerEvent(
                        event="submission-refused", sender=user,
                        detail={"reason": f"{name} header not owned", "header": addr[:320]}))
            # the address is the user's, but a display name or comment may show another one
            for addr in headers.foreign_addresses(msg, name, user)[:1]:
                return await self._refuse(replies.FromNotOwned(), LedgerEvent(
                    event="submission-refused", sender=user,
                    detail={"reason": f"{name} header names another address",
                            "header": addr[:320]}))
        ids = await self.queue.enqueue(
            [NewItem("submission", str(envelope.mail_from), tuple(envelope.rcpt_tos), data=data)],
            [LedgerEvent(event="submitted", ref_msgid=headers.message_id(msg), sender=user,
                         recipients=tuple(envelope.rcpt_tos), subject=headers.text(msg, "Subject"),
                         detail={"size": len(data), "peer": str(session.peer)})],
        )
        return replies.OK_QUEUED.format(ids[0])


class InboundHandler(_Base):
    """Incoming point listener: other providers and the Internet deliver here.

    A recipient in a domain we do not manage is refused, except from a PEC peer (over TLS, with a
    reverse path in a domain another provider manages per our index): a peer whose index still
    routes that domain to us sent a certified envelope, and its sender must get a signed
    ``no-dominio`` notice (RFC 6109 §3.3.3), not an SMTP error that no PEC receipt reports.
    Nothing received here is ever relayed onwards: the reception point only answers such
    envelopes, and anything else for such a recipient ends as a ledger row.
    """

    def __init__(self, config: Config, queue: Queue, index: ProviderIndex | None = None,
                 revocation: Checker | None = None, clock: Clock | None = None) -> None:
        super().__init__(config, queue)
        self.index = index
        self.revocation = revocation
        self.clock = clock or SystemClock()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        """``[inbound] require_tls = "all"``: nothing is taken in clear (``530``). Under the
        other policies a plaintext transaction goes on, and the reception point, told how the
        message came (``meta["tls"]``), judges it (see :class:`~pecd.config.Inbound`)."""
        if self.config.inbound.require_tls == "all" and session.ssl is None:
            return await self._refuse(replies.TlsRequired(), LedgerEvent(
                event="smtp-refused", sender=address[:320],
                detail={"reason": "plaintext transaction", "reply": replies.TLS_REQUIRED,
                        "peer": peer_address(session.peer)}))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.OK

    def _from_pec_peer(self, session: Session, envelope: Envelope) -> bool:
        sender = str(envelope.mail_from or "")
        return (self.index is not None and session.ssl is not None
                and not self.config.is_local(sender)
                and self.index.for_address(sender) is not None)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        local, at, domain = address.rpartition("@")
        if not (local and at and domain):
            return replies.BAD_ADDRESS
        if not self.config.is_local(address) and not self._from_pec_peer(session, envelope):
            return replies.RELAY_DENIED.format(domain[:255])
        if len(envelope.rcpt_tos) >= max(self.config.limits.max_recipients, 1000):
            return replies.TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        return replies.OK_RCPT

    async def revocation_refusal(self, session: Session, envelope: Envelope,
                                 data: bytes) -> str | None:
        """``[reception] revocation = "defer"``: the reply that defers a message whose signer's
        revocation status is unknown (CRL and OCSP unreachable, grace not over), or None.

        Decided before ``250``, from the signer certificate in the message and the revocation
        cache (a fetch when nothing is in force, bounded by ``revocation_timeout``); parsing
        and judging run in a worker thread. Whether the signature holds, and whether the
        certificate is revoked, the reception point judges after ``250``."""
        if self.revocation is None:
            return None
        decision = await self.revocation.check(data, self.clock.now(), full=False)
        if decision is None or decision.action != "defer":
            return None
        refusal = replies.RevocationUnknown(decision.status.reason)
        return await self._refuse(refusal, LedgerEvent(
            event="revocation-deferred", sender=str(envelope.mail_from or "")[:320],
            recipients=tuple(r[:320] for r in envelope.rcpt_tos),
            detail={"reason": decision.status.reason[:2000], "peer": peer_address(session.peer),
                    "unknown_for": round(decision.unknown_for)}))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        deferred = await self.revocation_refusal(session, envelope, data)
        if deferred is not None:
            return deferred
        msg = headers.parse(data)
        ids = await self.queue.enqueue(
            # how it came: the reception point takes certified mail from the network only
            # over TLS (``[inbound] require_tls``); items without "via" are our own stages'
            [NewItem("inbound", str(envelope.mail_from or ""), tuple(envelope.rcpt_tos),
                     data=data, meta={"via": "smtp", "tls": session.ssl is not None})],
            [LedgerEvent(event="received", ref_msgid=headers.message_id(msg),
                         sender=str(envelope.mail_from or ""),
                         recipients=tuple(envelope.rcpt_tos),
                         subject=headers.text(msg, "Subject"),
                         detail={"size": len(data), "peer": str(session.peer),
                                 "tls": session.ssl is not None})],
        )
        return replies.OK_QUEUED.format(ids[0])


async def listen(handler: _Base, host: str, port: int, config: Config,
                 tls: ssl.SSLContext, *, implicit_tls: bool, auth: bool,
                 reuse_port: bool = False) -> asyncio.Server:
    """``reuse_port``: share the port with other pecd processes (``SO_REUSEPORT``; the kernel
    spreads connections across them)."""
    loop = asyncio.get_running_loop()
    # a client that never finishes the implicit-TLS handshake is dropped like an idle one
    handshake = min(60.0, config.limits.session_timeout) if implicit_tls else None

    def factory() -> SMTP:
        return PecdSMTP(
            handler,
            limits=config.limits,
            hostname=config.hostname,
            ident="pecd",
            data_size_limit=config.limits.max_message_size,
            tls_context=None if implicit_tls else tls,
            implicit_tls=tls if implicit_tls else None,
            handshake_timeout=handshake,
            auth_require_tls=True,  # PecdSMTP knows an implicit-TLS socket is encrypted
            auth_required=auth,
            auth_exclude_mechanism=[] if auth else ["LOGIN", "PLAIN"],
            timeout=config.limits.session_timeout,
            loop=loop,
        )

    # implicit TLS: PecdSMTP does it
    return await loop.create_server(factory, host, port, reuse_port=reuse_port or None)
