"""Pages for people, server-rendered, usable without JavaScript: verify a receipt, sign in and see
one's messages with their timelines and evidence, and (operators) the state of the provider.

Every value shown is escaped (:func:`html.escape`), whatever its source: subjects, addresses and
reasons come from senders and peers. Sign-in is a form (mailbox address and password, through the
same throttle and account lock as SMTP AUTH); the session is a random id in an HttpOnly,
SameSite=Strict cookie (Secure under TLS), held in memory (a restart signs everyone out). Every
form that changes state carries a CSRF token: the session's own, or before sign-in a random one
that must match its cookie (double submit).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pecd import replies
from pecd.store import apistore, users
from pecd.trust import pki
from pecd.trust.verdict import Verdict, describe

if TYPE_CHECKING:
    from pecd.edges.httpapi import Api

SESSION = "pecd_session"
PRE_CSRF = "pecd_csrf"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000


@dataclass
class Session:
    mailbox: str
    csrf: str
    expires: float
    operator: bool


def _page(title: str, body: str, who: Session | None = None) -> web.Response:
    nav = ('<nav aria-label="Main"><ul><li><a href="/">Home</a></li>'
           '<li><a href="/verify">Verify a receipt</a></li>'
           '<li><a href="/my">My messages</a></li><li><a href="/operator">Operator</a></li>')
    if who is not None:
        nav += (f'<li><form method="post" action="/logout"><input type="hidden" name="csrf" '
                f'value="{escape(who.csrf)}"><button type="submit">Sign out '
                f'{escape(who.mailbox)}</button></form></li>')
    nav += "</ul></nav>"
    text = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} - pecd</title>"
            '<style>body{font-family:sans-serif;max-width:60rem;margin:auto;padding:1rem}'
            "table{border-collapse:collapse}td,th{border:1px solid #888;padding:.3rem;"
            "text-align:left}nav ul{list-style:none;display:flex;gap:1rem;padding:0}"
            ".bad{color:#a00}.good{color:#060}</style></head>"
            f"<body><header>{nav}</header><main><h1>{escape(title)}</h1>{body}</main></body></html>")
    return web.Response(text=text, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "form-action 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are escaped here; pass plain text."""
    ths = "".join(f'<th scope="col">{escape(h)}</th>' for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>"


def verdict_html(v: Verdict) -> str:
    """The verdict in words, as ``pecd verify`` prints it."""
    cls = "good" if v.kind == "valid" else "bad"
    lines = [f'<p class="{cls}" role="status"><strong>{escape(v.headline)}</strong></p>', "<dl>"]

    def item(name: str, value: object) -> None:
        lines.append(f"<dt>{escape(name)}</dt><dd>{escape(str(value))}</dd>")

    if v.reason:
        item("Reason", v.reason)
    if v.signer is not None:
        item("Signer", describe(v.signer))
    for cert in v.chain[1:]:
        item("Issued by", describe(cert))
    if v.digest:
        item("Digest", v.digest + (" (weak: accepted for interoperability)" if v.weak_digest else ""))
    if v.signing_time:
        item("Signing time (the signer's claim)", v.signing_time.isoformat())
    if v.timestamp_time:
        item("Timestamp (RFC 3161, verified)", v.timestamp_time.isoformat())
    for key in ("type", "identifier", "sender", "issuer", "time", "structure"):
        if key in v.pec:
            item(key.capitalize(), v.pec[key])
    for r in v.pec.get("recipients", []):
        item("Recipient", f"{r['address']} ({r['kind']})")
    lines.append("</dl>")
    return "".join(lines)


class Pages:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.sessions: dict[str, Session] = {}

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/verify", self.verify_form)
        r.add_post("/verify", self.verify)
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/my", self.my)
        r.add_get("/my/{id}", self.my_message)
        r.add_get("/operator", self.operator)

    # --- sessions ----------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(SESSION, "")
        s = self.sessions.get(sid)
        if s is None or s.expires < time.monotonic():
            self.sessions.pop(sid, None)
            return None
        return s

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="Strict",
                            secure=self.api.config.http.tls, path="/")

    async def _form(self, request: web.Request) -> dict[str, str]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise web.HTTPUnsupportedMediaType(text="send the form")
        data = await request.post()
        return {k: v for k, v in data.items() if isinstance(v, str)}

    def _require(self, request: web.Request, operator: bool = False) -> Session:
        s = self._session(request)
        if s is None:
            raise web.HTTPSeeOther("/login")
        if operator and not s.operator:
            raise web.HTTPForbidden(text="the operator page needs an operator account")
        return s

    # --- pages -------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        body = ("<ul><li><a href=\"/verify\">Verify a receipt or envelope</a></li>"
                "<li><a href=\"/login\">Sign in</a></li>"
                "<li><a href=\"/my\">My messages</a></li>"
                "<li><a href=\"/operator\">Operator</a></li>"
                "<li><a href=\"/api/v1/openapi.json\">HTTP API (OpenAPI)</a></li>"
                "<li><a href=\"/metrics\">Metrics</a></li></ul>")
        return _page("pecd", body, self._session(request))

    async def verify_form(self, request: web.Request) -> web.StreamResponse:
        body = ('<form method="post" action="/verify" enctype="multipart/form-data">'
                '<p><label for="message">Receipt or envelope (.eml)</label> '
                '<input type="file" id="message" name="message" required></p>'
                '<p><button type="submit">Verify</button></p></form>')
        return _page("Verify a receipt", body, self._session(request))

    async def verify(self, request: web.Request) -> web.StreamResponse:
        from pecd.trust.judge import judge

        if not request.content_type.startswith("multipart/form-data"):
            raise web.HTTPUnsupportedMediaType(text="upload the file with the form")
        reader = await request.multipart()
        data = b""
        limit = self.api.limits.max_message_size
        async for part in reader:
            if getattr(part, "name", None) == "message":
                chunks = []
                size = 0
                while chunk := await part.read_chunk():  # type: ignore[union-attr]
                    size += len(chunk)
                    if size > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                    chunks.append(chunk)
                data = b"".join(chunks)
        if not data:
            return _page("Verify a receipt", "<p class=\"bad\">No file was sent.</p>",
                         self._session(request))
        api = self.api
        loop = asyncio.get_running_loop()
        v = await loop.run_in_executor(
            api.cpu, lambda: judge(data, api.roots, policy=api.config.trust.policy))
        return _page("Verdict", verdict_html(v) + '<p><a href="/verify">Verify another</a></p>',
                     self._session(request))

    async def login_form(self, request: web.Request, error: str = "") -> web.StreamResponse:
        token = secrets.token_urlsafe(24)
        msg = f'<p class="bad" role="alert">{escape(error)}</p>' if error else ""
        body = (f'{msg}<form method="post" action="/login">'
                f'<input type="hidden" name="csrf" value="{token}">'
                '<p><label for="address">Mailbox address</label> '
                '<input type="email" id="address" name="address" autocomplete="username" required></p>'
                '<p><label for="password">Password</label> '
                '<input type="password" id="password" name="password" '
                'autocomplete="current-password" required></p>'
                '<p><button type="submit">Sign in</button></p></form>')
        response = _page("Sign in", body)
        self._cookie(response, PRE_CSRF, token, 3600)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        expected = request.cookies.get(PRE_CSRF, "")
        if not expected or not secrets.compare_digest(expected, form.get("csrf", "")):
            raise web.HTTPForbidden(text="CSRF check failed: reload the sign-in page")
        address, password = form.get("address", "").strip(), form.get("password", "")
        try:
            ok = bool(address) and await self.api.authenticate(address, password,
                                                                (request.remote or "", 0))
        except replies.AuthThrottled:
            return await self.login_form(request, "Too many failed sign-ins; try again later.")
        if not ok:
            return await self.login_form(request, "Wrong address or password.")
        mailbox = users.normalise(address)
        operator = bool(await self.api.db.transact(
            lambda c: apistore.is_operator(c, mailbox), durable=False))
        if len(self.sessions) >= MAX_SESSIONS:
            now = time.monotonic()
            self.sessions = {k: s for k, s in self.sessions.items() if s.expires > now}
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(mailbox, secrets.token_urlsafe(24),
                                     time.monotonic() + SESSION_SECONDS, operator)
        response = web.HTTPSeeOther("/my")
        self._cookie(response, SESSION, sid, SESSION_SECONDS)
        response.del_cookie(PRE_CSRF, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        s = self._require(request)
        form = await self._form(request)
        if not secrets.compare_digest(s.csrf, form.get("csrf", "")):
            raise web.HTTPForbidden(text="CSRF check failed")
        self.sessions.pop(request.cookies.get(SESSION, ""), None)
        response = web.HTTPSeeOther("/")
        response.del_cookie(SESSION, path="/")
        raise response

    async def my(self, request: web.Request) -> web.StreamResponse:
        s = self._require(request)
        rows = await self.api.db.transact(
            lambda c: apistore.messages_of(c, s.mailbox, 0.0, None, 500), durable=False)
        rows.reverse()  # newest first
        if not rows:
            body = "<p>No certified message sent from this mailbox yet.</p>"
        else:
            items = "".join(
                f'<tr><td>{escape(_when(r["at"]))}</td><td>{escape(r["status"])}</td>'
                f'<td><a href="/my/{escape(r["id"])}">{escape(r["subject"] or "(no subject)")}</a></td>'
                f'<td>{escape(", ".join(r["recipients"]))}</td></tr>' for r in rows)
            body = ('<table><caption>Sent by SMTP or by the API, newest first</caption><thead><tr>'
                    '<th scope="col">Time</th><th scope="col">Outcome</th><th scope="col">Subject</th>'
                    f'<th scope="col">Recipients</th></tr></thead><tbody>{items}</tbody></table>')
        return _page(f"Messages of {s.mailbox}", body, s)

    async def my_message(self, request: web.Request) -> web.StreamResponse:
        s = self._require(request)
        pec_id = request.match_info["id"]
        found = await self.api.db.transact(
            lambda c: apistore.message_events(c, pec_id, s.mailbox), durable=False)
        if found is None:
            raise web.HTTPNotFound(text="no such message of this mailbox")
        from pecd.edges.httpapi import _timeline

        t = _timeline(pec_id, *found)
        parts = [f"<p>Identifier: <code>{escape(pec_id)}</code>; subject: "
                 f"{escape(str(t['subject'] or ''))}; status: {escape(str(t['status']))}</p>"]
        for r in t["recipients"]:
            parts.append(f"<h2>{escape(r['address'])} ({escape(r['kind'])})</h2>")
            parts.append(_table(["Time", "Event"], [[str(e["at"]), str(e["event"])]
                                                    for e in r["events"]]))
        parts.append(f'<p><a href="/api/v1/messages/{escape(pec_id)}/evidence">Download the '
                     "evidence (receipts, ledger rows, timestamped checkpoint, report)</a> "
                     "(the API asks for your mailbox login)</p>")
        return _page("Message", "".join(parts), s)

    async def operator(self, request: web.Request) -> web.StreamResponse:
        s = self._require(request, operator=True)
        view = await self.api.db.transact(apistore.operator_view, durable=False)
        paths = self.api.config.paths
        loop = asyncio.get_running_loop()

        def certs() -> list[list[str]]:
            out = []
            for name, path in (("signing", paths.signing_cert), ("TLS", paths.tls_cert),
                               ("TSA", paths.tsa_cert)):
                try:
                    cert = pki.load_cert(path)
                except (OSError, ValueError, pki.PKIError) as exc:
                    out.append([name, str(path.name), f"unreadable: {exc}"])
                    continue
                left = cert.not_valid_after_utc - datetime.now(UTC)
                out.append([name, describe(cert), f"{cert.not_valid_after_utc.isoformat()}"
                            f" ({left.days} days left)"])
            return out

        parts = ["<h2>Queue</h2>",
                 _table(["Kind/state", "Items"], [[k, str(n)] for k, n in view["queue"].items()]),
                 "<h2>Recent refusals and incidents</h2>",
                 _table(["Seq", "Time", "Event", "Sender", "Reason"],
                        [[str(r["seq"]), str(r["at"]), str(r["event"]), str(r["sender"] or ""),
                          str(r["reason"] or "")] for r in view["refusals"]]),
                 "<h2>Ledger</h2>",
                 _table(["Head seq", "Head time", "Head hash", "Last checkpoint"],
                        [[str((view["head"] or {}).get("seq", "")),
                          str((view["head"] or {}).get("at", "")),
                          str((view["head"] or {}).get("hash", "")),
                          _checkpoint(view["checkpoint"])]]),
                 "<h2>Certificates</h2>",
                 _table(["Use", "Subject", "Expires"], await loop.run_in_executor(None, certs))]
        return _page("Operator", "".join(parts), s)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _checkpoint(cp: dict[str, Any] | None) -> str:
    if cp is None:
        return "none yet"
    return f"#{cp['id']} up to seq {cp['seq_to']} at {cp['at']}"
