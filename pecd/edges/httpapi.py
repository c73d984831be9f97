"""The HTTP edge: send, track and verify certified mail, and the operator's ``/metrics``,
``/healthz`` and ``/readyz``, on aiohttp's web server inside the ``pecd serve`` process.

Like the SMTP listeners it writes nothing itself: a message goes through
:meth:`~pecd.store.queue.Queue.enqueue` exactly as the submission listener's DATA does (a ``submission``
queue item and its ``submitted`` ledger row), the access point judges it as it judges any other,
and the answer waits for that judgement: ``202`` with the PEC identifier once the acceptance is
committed, or ``422`` naming the failed check (the sender also gets the non-acceptance notice, as
by SMTP). Requests that cannot become a message (bad JSON, wrong type, header injection, a path as
an attachment name) get a ``4xx`` problem+json and touch nothing.

The recipient's side (``/api/v1/mailbox``) lists the certified messages the delivery point
recorded for the caller's mailbox and serves the envelope from the Maildir file that row names;
the first download is a read, handed to the reading point (:mod:`pecd.points.reading`), which evidences
it as it evidences an IMAP read.

Trusts: a token (``Authorization: Bearer``) or the mailbox password (HTTP Basic), checked with
the same throttle as SMTP AUTH; a caller acts only for its own mailbox. ``/api/v1/verify``,
``/metrics`` and the health endpoints need no login. SQLite, hashing and signature checks run in
the writer thread or the executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
import uuid
from base64 import b64decode, urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from aiohttp import BodyPartReader, ClientPayloadError, web, web_runner
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pecd import replies
from pecd.clock import Clock
from pecd.config import Config
from pecd.edges import evidence, openapi, pages
from pecd.format import apimessage, headers
from pecd.format.apimessage import Invalid
from pecd.points.delivery import MailboxError, Maildir
from pecd.points.reading import ReadingWorker
from pecd.store import Conflict, Connection, StoreError, apistore, readings, users
from pecd.store import db as db_mod
from pecd.store import queue as queue_mod
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent, format_at
from pecd.store.queue import NewItem, Queue
from pecd.store.throttle_store import SharedAuthThrottle
from pecd.throttle import ConnectionLimiter

log = logging.getLogger("pecd.http")

Authenticate = Callable[[str, str, object], Awaitable[bool]]
JSON = "application/json"
PROBLEM = "application/problem+json"
MAX_BULK = 500
MAX_PAGE = 500
MAX_FORM_PARTS = 1000  # fields and attachments of one multipart/form-data message

# ledger event -> (stage, outcome) for pecd_messages_total
STAGES: dict[str, tuple[str, str]] = {
    "submitted": ("access", "submitted"), "accepted": ("access", "accepted"),
    "refused": ("access", "refused"), "submission-refused": ("access", "refused-at-edge"),
    "smtp-refused": ("edge", "refused"), "relayed": ("relay", "relayed"),
    "relay-failed": ("relay", "failed"), "received": ("reception", "received"),
    "taken-in-charge": ("reception", "taken-in-charge"), "anomaly": ("reception", "anomaly"),
    "receipt-received": ("reception", "receipt"), "duplicate": ("reception", "duplicate"),
    "virus-detected": ("reception", "virus"), "delivered": ("delivery", "delivered"),
    "non-delivery": ("delivery", "non-delivery"), "stored": ("delivery", "stored"),
    "undeliverable": ("delivery", "undeliverable"), "timeout": ("timeouts", "timeout"),
    "timeout-warning": ("timeouts", "warning"), "deferred": ("queue", "deferred"),
    "held": ("queue", "held"), "corrupt": ("queue", "corrupt"),
}


class Problem(Exception):
    """An RFC 9457 problem answer; ``check`` names what failed, for programs."""

    def __init__(self, status: int, title: str, detail: str = "", check: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.check = check
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": f"urn:pecd:problem:{self.check or self.status}",
                               "title": self.title, "status": self.status}
        if self.detail:
            out["detail"] = self.detail
        if self.check:
            out["check"] = self.check
        return out


def _answer(status: int, body: Any, extra: dict[str, str] | None = None) -> web.Response:
    ctype = PROBLEM if status >= 400 and isinstance(body, dict) and "title" in body else JSON
    return web.Response(status=status, text=json.dumps(body, sort_keys=True), content_type=ctype,
                        headers=extra)


def _iso(t: float | None) -> str | None:
    """A POSIX time written as the ledger writes times (UTC, microseconds, ``Z``)."""
    return None if t is None else format_at(datetime.fromtimestamp(t, UTC))


# seconds: from well under a second (the access point) to the 24 h a delivery may take
ACCEPTANCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DELIVERY_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 3 * 3600.0,
                    12 * 3600.0, 24 * 3600.0)


class _Buckets:
    """A histogram fed from ledger rows, kept across scrapes (the rows are read once each)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: over every bound (+Inf only)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b),
                         len(self.bounds))] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


Errors = Callable[[], dict[str, dict[str, int]]]


class Metrics(Collector):
    """Prometheus figures read from the database at scrape time (own connection, in a thread):
    messages by stage and outcome from the ledger, counted incrementally past the last row seen,
    the certified cycle's latencies from the same rows, queue depth by kind and state; and the
    process's own TSA and revocation fetch errors, from ``errors``."""

    def __init__(self, path: Any, errors: Errors | None = None) -> None:
        self.path = path
        self.errors = errors
        self._lock = threading.Lock()
        self._seen = 0
        self._events: dict[str, int] = {}
        self._acceptance = _Buckets(ACCEPTANCE_BUCKETS)
        self._delivery = _Buckets(DELIVERY_BUCKETS)

    def collect(self) -> Iterator[Any]:
        with self._lock:
            conn = db_mod.connect(self.path)
            try:
                counts, head = apistore.ledger_counts(conn, self._seen)
                acceptance, delivery = apistore.latencies(conn, self._seen, head)
                figures = queue_mod.figures(conn)
            finally:
                conn.close()
            self._seen = head
            for event, n in counts.items():
                self._events[event] = self._events.get(event, 0) + n
            events = dict(self._events)
            for value in acceptance:
                self._acceptance.observe(value)
            for value in delivery:
                self._delivery.observe(value)
            accepted = self._acceptance.family(
                "pecd_acceptance_latency_seconds", "Seconds from a message's submission to its "
                "acceptance by the access point (ledger times)")
            delivered = self._delivery.family(
                "pecd_delivery_latency_seconds", "Seconds from a message's acceptance to each "
                "delivery receipt taken in for it (ledger times)")
        yield accepted
        yield delivered
        errors = self.errors() if self.errors is not None else {}
        tsa = CounterMetricFamily("pecd_tsa_errors", "Calls to the external TSA that failed, by "
                                  "kind (the built-in TSA stands in when it may: see "
                                  "pecd_tsa_fallbacks_total)", labels=["kind"])
        for kind, n in sorted(errors.get("tsa", {"unavailable": 0, "invalid": 0}).items()):
            tsa.add_metric([kind], n)
        yield tsa
        fetch = CounterMetricFamily("pecd_revocation_fetch_errors", "CRL and OCSP fetches that "
                                    "failed or were refused, by source kind", labels=["source"])
        for source, n in sorted(errors.get("revocation", {"crl": 0, "ocsp": 0}).items()):
            fetch.add_metric([source], n)
        yield fetch
        stages = CounterMetricFamily("pecd_messages", "Messages by pipeline stage and outcome "
                                     "(ledger rows)", labels=["stage", "outcome"])
        by_stage: dict[tuple[str, str], int] = {}
        for event, n in events.items():
            if event in STAGES:
                by_stage[STAGES[event]] = by_stage.get(STAGES[event], 0) + n
        for (stage, outcome), n in sorted(by_stage.items()):
            stages.add_metric([stage, outcome], n)
        yield stages
        ledger = CounterMetricFamily("pecd_ledger_events", "Ledger rows by event", labels=["event"])
        anomalies = CounterMetricFamily("pecd_anomalies", "Messages received that did not "
                                        "verify, by verdict class", labels=["verdict"])
        for event, n in sorted(events.items()):
            if event.startswith("anomaly:"):
                anomalies.add_metric([event.partition(":")[2]], n)
            else:
                ledger.add_metric([event], n)
        yield ledger
        yield anomalies
        yield CounterMetricFamily(
            "pecd_revocation_errors", "Peer signatures whose revocation status could not be "
            "learnt, or that were revoked", value=sum(
                events.get(f"anomaly:{v}", 0) for v in ("revocation-unknown", "revoked")))
        yield CounterMetricFamily("pecd_tsa_fallbacks", "Timestamps made by the built-in TSA "
                                  "because the external one was unavailable",
                                  value=events.get("tsa-fallback", 0))
        depth = GaugeMetricFamily("pecd_queue_items", "Queue items by kind and state",
                                  labels=["kind", "state"])
        for key, n in sorted(figures.items()):
            kind, state = key.split("/")
            depth.add_metric([kind, state], n)
        yield depth
        yield GaugeMetricFamily("pecd_ledger_head_seq", "Sequence number of the ledger head",
                                value=head)


class Api:
    """The routes and what they share; :func:`start` puts them on a listener."""

    def __init__(self, config: Config, db: Database, queue: Queue, clock: Clock, cpu: Executor,
                 authenticate: Authenticate, throttle: SharedAuthThrottle,
                 roots: list[x509.Certificate], ready: Callable[[], bool],
                 reading: ReadingWorker | None = None, errors: Errors | None = None) -> None:
        self.config = config
        self.reading = reading
        self.db = db
        self.queue = queue
        self.clock = clock
        self.cpu = cpu
        self.authenticate = authenticate
        self.throttle = throttle
        self.roots = roots
        self.ready = ready
        self.limits = config.limits
        self.registry = CollectorRegistry()
        self.registry.register(Metrics(config.paths.database, errors))
        self.requests = Counter("pecd_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("pecd_http_request_duration_seconds", "HTTP answer time by route",
                                 ["route"], registry=self.registry)
        self.refused_connections = Counter(
            "pecd_http_connections_refused", "HTTP connections refused: too many from one "
            "client address at once", registry=self.registry)
        self._refused_logged: dict[str, float] = {}

    def connection_refused(self, address: str) -> None:
        """A connection over the per-address cap: counted, and logged once a minute per address."""
        self.refused_connections.inc()
        now = time.monotonic()
        if now - self._refused_logged.get(address, -60.0) >= 60.0:
            if len(self._refused_logged) > 10_000:
                self._refused_logged.clear()
            self._refused_logged[address] = now
            log.warning("%s: too many HTTP connections at once, refusing with 429", address)

    def app(self) -> web.Application:
        # JSON carries attachments in base64 (4/3 of their size) plus some text
        app = web.Application(client_max_size=self.limits.max_message_size * 4 // 3 + (1 << 20),
                              middlewares=[self._errors])
        app.router.add_post("/api/v1/messages", self.post_messages)
        app.router.add_get("/api/v1/messages", self.list_messages)
        app.router.add_get("/api/v1/messages/{id}", self.get_message)
        app.router.add_get("/api/v1/messages/{id}/evidence", self.get_evidence)
        app.router.add_get("/api/v1/mailbox", self.list_mailbox)
        app.router.add_get("/api/v1/mailbox/{id}", self.download)
        app.router.add_post("/api/v1/verify", self.verify)
        app.router.add_get("/api/v1/openapi.json", self.openapi)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        pages.Pages(self).add_routes(app)
        return app

    # --- plumbing --------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        started = time.monotonic()
        try:
            response = await handler(request)
        except Problem as exc:
            response = _answer(exc.status, exc.body(), exc.headers)
        except Invalid as exc:
            response = _answer(exc.status, _invalid(exc).body())
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 ...
            if exc.status < 400:  # a page's redirect
                self.requests.labels(name, str(exc.status)).inc()
                raise
            check = {413: "size", 404: "not-found", 405: "method"}.get(exc.status)
            response = _answer(exc.status, Problem(exc.status, exc.reason, check=check).body(),
                               {k: v for k, v in exc.headers.items() if k == "Allow"})
        except Exception as exc:
            incident = uuid.uuid4().hex[:12]
            log.error("incident %s: %s %s failed", incident, request.method, name, exc_info=exc)
            response = _answer(500, Problem(500, "Internal error",
                                            f"incident {incident}").body())
        self.requests.labels(name, str(response.status)).inc()
        self.latency.labels(name).observe(time.monotonic() - started)
        return response

    async def _read(self, fn: Callable[[Connection], Any]) -> Any:
        return await self.db.transact(fn, durable=False)

    async def _body(self, request: web.Request, limit: int) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise Problem(413, "Payload too large", f"the limit is {limit} bytes", "size")
        data = await request.read()
        if len(data) > limit:
            raise Problem(413, "Payload too large", f"the limit is {limit} bytes", "size")
        return data

    async def _login(self, request: web.Request) -> str:
        """The mailbox the request acts for, from a token or the mailbox password."""
        auth = request.headers.get("Authorization", "")
        scheme, _, credentials = auth.partition(" ")
        peer = request.remote or ""
        challenge = {"WWW-Authenticate": 'Bearer realm="pecd", Basic realm="pecd", charset="UTF-8"'}
        unauthorized = Problem(401, "Unauthorized", "a valid token or mailbox login is needed",
                               "auth", challenge)
        if scheme.lower() == "bearer":
            return await self._token_login(credentials.strip(), peer, unauthorized)
        if scheme.lower() == "basic":
            try:
                user, sep, password = b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (binascii.Error, ValueError):
                raise unauthorized from None
            if not sep or not user:
                raise unauthorized
            try:
                ok = await self.authenticate(user, password, (peer, 0))
            except replies.AuthThrottled:
                raise Problem(429, "Too many failed logins", "try again later", "auth-throttled") from None
            if not ok:
                raise unauthorized
            return users.normalise(user)
        raise unauthorized

    async def _token_login(self, token: str, peer: str, unauthorized: Problem) -> str:
        match = apistore.TOKEN_RE.fullmatch(token)
        token_id = match[1] if match else ""
        owner = await self._read(lambda c: apistore.token_mailbox(c, token_id)) if match else None
        account = (owner or f"token:{token_id}").lower()
        verdict = await self.throttle.check(account, peer)
        if not verdict.allowed:
            if verdict.first:
                await self.queue.record([LedgerEvent(event="auth-throttled", sender=account[:320],
                                                     detail={"peer": peer, "via": "http",
                                                             "scope": verdict.scope})])
            raise Problem(429, "Too many failed logins", "try again later", "auth-throttled",
                          {"Retry-After": str(max(1, round(verdict.retry_after)))})
        mailbox = await self._read(lambda c: apistore.check_token(c, token))
        if mailbox is None:
            await self.throttle.failure(account, peer)
            await self.queue.record([LedgerEvent(event="auth-failed", sender=account[:320],
                                                 detail={"peer": peer, "via": "http",
                                                         "token_id": token_id})])
            raise unauthorized
        await self.throttle.success(account, peer)
        return str(mailbox)

    # --- send ------------------------------------------------------------------------------------

    async def post_messages(self, request: web.Request) -> web.StreamResponse:
        mailbox = await self._login(request)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
            raise Problem(400, "Bad Idempotency-Key", "1 to 255 printable characters",
                          "idempotency-key")
        ctype = request.content_type
        if ctype == "message/rfc822":
            data = await self._body(request, self.limits.max_message_size)
            built = apimessage.raw(data, mailbox, self.limits)
            status, body = await self._submit(mailbox, built, key, _fingerprint(ctype, data),
                                              request.remote or "")
            return self._sent(status, body)
        if ctype == "multipart/form-data":
            spec = apimessage.from_form(await self._form(request))
            built = self._build(spec, mailbox)
            status, body = await self._submit(
                mailbox, built, key, _fingerprint(ctype, json.dumps(spec, sort_keys=True).encode()),
                request.remote or "")
            return self._sent(status, body)
        if ctype != JSON:
            raise Problem(415, "Unsupported media type", "send application/json, "
                          "multipart/form-data or message/rfc822", "content-type")
        data = await self._body(request, self.limits.max_message_size * 4 // 3 + (1 << 20))
        try:
            spec = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise Problem(400, "Malformed JSON", str(exc)[:200], "json") from None
        if isinstance(spec, list):
            return await self._bulk(mailbox, spec, key, request.remote or "")
        built = self._build(spec, mailbox)
        status, body = await self._submit(mailbox, built, key, _fingerprint(ctype, data),
                                          request.remote or "")
        return self._sent(status, body)

    async def _form(self, request: web.Request) -> list[apimessage.FormPart]:
        """The parts of a ``multipart/form-data`` body, read as they come: their bytes together
        within the message size limit (plus room for the form's own lines), a bounded number
        of flat parts, no transfer or content encoding (nothing to inflate)."""
        limit = self.limits.max_message_size + (1 << 20)
        if request.content_length is not None and request.content_length > limit:
            raise Problem(413, "Payload too large", f"the limit is {limit} bytes", "size")
        malformed = Problem(400, "Malformed form", "not a readable multipart/form-data body",
                            "multipart")
        parts: list[apimessage.FormPart] = []
        total = 0
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise Problem(400, "Malformed form", "nested multipart parts are not "
                                  "taken", "multipart")
                if len(parts) >= MAX_FORM_PARTS:
                    raise Problem(400, "Malformed form", f"more than {MAX_FORM_PARTS} parts",
                                  "multipart")
                encoding = part.headers.get("Content-Transfer-Encoding", "binary").lower()
                if "Content-Encoding" in part.headers or encoding not in ("7bit", "8bit", "binary"):
                    raise Problem(415, "Unsupported part encoding", "send the parts' bytes as "
                                  "they are (no Content-Encoding or base64 transfer encoding)",
                                  "content-encoding")
                chunks: list[bytes] = []
                while chunk := await part.read_chunk(65536):
                    total += len(chunk)
                    if total > limit:
                        raise Problem(413, "Payload too large", f"the limit is {limit} bytes",
                                      "size")
                    chunks.append(chunk)
                parts.append(apimessage.FormPart(
                    part.name, part.filename,
                    part.headers.get("Content-Type", "application/octet-stream"),
                    b"".join(chunks)))
        except (ValueError, AssertionError, LookupError, ClientPayloadError,
                web.HTTPBadRequest):
            raise malformed from None
        if not parts:
            raise malformed
        return parts

    def _build(self, spec: object, mailbox: str) -> apimessage.Built:
        return apimessage.build(spec, mailbox, self.config.domain, self.clock.now(), self.limits)

    def _sent(self, status: int, body: dict[str, Any]) -> web.Response:
        extra = {"Location": f"/api/v1/messages/{body['id']}"} if status == 202 and body.get("id") else None
        return _answer(status, body, extra)

    async def _bulk(self, mailbox: str, specs: list[Any], key: str | None,
                    peer: str) -> web.StreamResponse:
        """Each message of the list answered on its own, in order; one refused does not stop
        the others. Item i's Idempotency-Key is the request's followed by ``#i``."""
        if not specs or len(specs) > MAX_BULK:
            raise Problem(400, "Bad bulk request", f"1 to {MAX_BULK} messages", "bulk")

        async def one(i: int, spec: object) -> dict[str, Any]:
            try:
                built = self._build(spec, mailbox)
            except Invalid as exc:
                return {"status": exc.status, "body": _invalid(exc).body()}
            fp = _fingerprint(JSON, json.dumps(spec, sort_keys=True).encode())
            status, body = await self._submit(mailbox, built, None if key is None else f"{key}#{i}",
                                              fp, peer)
            return {"status": status, "body": body}

        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
        return _answer(200, {"results": list(results)})

    async def _submit(self, mailbox: str, built: apimessage.Built, key: str | None,
                      fingerprint: str, peer: str) -> tuple[int, dict[str, Any]]:
        """Enqueue as the submission listener does, once per Idempotency-Key, then wait for the
        access point's verdict."""
        if key is not None:
            prior = await self._read(lambda c: apistore.submission_by_key(c, mailbox, key))
            if prior is not None:
                return await self._outcome(prior, fingerprint)
        msg = headers.parse(built.data)
        request_id = uuid.uuid4().hex
        now = self.clock.now().timestamp()
        try:
            await self.queue.enqueue(
                [NewItem("submission", mailbox, built.rcpts, data=built.data)],
                [LedgerEvent(event="submitted", ref_msgid=headers.message_id(msg), sender=mailbox,
                             recipients=built.rcpts, subject=headers.text(msg, "Subject"),
                             detail={"size": len(built.data), "peer": peer, "via": "http"})],
                effects=[lambda c: apistore.record_submission(c, request_id, mailbox, key,
                                                              fingerprint, now)])
        except Conflict:
            if key is None:
                raise
            # the same key raced us and won: its message is the only one
            prior = await self._read(lambda c: apistore.submission_by_key(c, mailbox, key))
            assert prior is not None
            return await self._outcome(prior, fingerprint)
        sub = await self._read(lambda c: apistore.submission(c, request_id))
        return await self._outcome(sub, fingerprint)

    async def _outcome(self, sub: apistore.Submission, fingerprint: str) -> tuple[int, dict[str, Any]]:
        if sub.request_sha256 != fingerprint:
            problem = Problem(422, "Idempotency-Key reused",
                              "this key was used for a different request", "idempotency-key")
            return problem.status, problem.body()
        if sub.response is not None and sub.status is not None:
            return sub.status, sub.response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.http.answer_wait
        pause = 0.01
        while True:
            row = await self._read(lambda c: apistore.access_outcome(c, sub.queue_id, sub.ledger_seq))
            if row is not None:
                break
            if loop.time() >= deadline:  # durable, not judged yet: the same key asks again
                return 202, {"id": None, "status": "queued", "queue_id": sub.queue_id}
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        status, body = _verdict_answer(row, sub.queue_id)
        await self.db.transact(lambda c: apistore.store_answer(c, sub.request_id, status, body))
        return status, body

    # --- track -----------------------------------------------------------------------------------

    async def _sent_message(self, request: web.Request) -> tuple[str, str, Any, Any]:
        """(mailbox, PEC id, ledger rows, tracking) of a message the logged-in mailbox sent, or
        404."""
        mailbox = await self._login(request)
        pec_id = request.match_info["id"]
        found = await self._read(lambda c: apistore.message_events(c, pec_id, mailbox))
        if found is None:
            raise Problem(404, "Not found", "no message with that id was sent by this mailbox",
                          "not-found")
        return mailbox, pec_id, found[0], found[1]

    async def get_message(self, request: web.Request) -> web.StreamResponse:
        _mailbox, pec_id, rows, tracked = await self._sent_message(request)
        return _answer(200, _timeline(pec_id, rows, tracked))

    async def get_evidence(self, request: web.Request) -> web.StreamResponse:
        """The zip of :mod:`pecd.edges.evidence`: receipts, ledger rows, checkpoint, report."""
        mailbox, pec_id, rows, _tracked = await self._sent_message(request)
        seqs = [int(r["seq"]) for r in rows]
        checkpoint, links = await self._read(
            lambda c: apistore.evidence_ledger(c, max(seqs), min(seqs)))
        wanted = list(dict.fromkeys(str(x).strip("<>") for r in rows for x in r["related"]))
        loop = asyncio.get_running_loop()

        def make() -> bytes:
            receipts = self._receipts(mailbox, wanted)
            return evidence.build(pec_id, rows, links, checkpoint, receipts, self.roots,
                                  self.config.trust.policy,
                                  self.config.paths.ca_certs.read_bytes())

        data = await loop.run_in_executor(self.cpu, make)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", pec_id)[:100]
        return web.Response(body=data, content_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="pec-evidence-{name}.zip"'})

    def _receipts(self, mailbox: str, wanted: list[str]) -> list[evidence.Receipt]:
        """The sender's copies of the message's receipts, found in its Maildir by Message-ID
        (blocking). With LMTP delivery the mail is elsewhere and none are found."""
        if self.config.delivery.method != "maildir" or not wanted:
            return []
        try:
            box = Maildir(self.config.paths.mail, self.config.hostname).path(mailbox)
        except MailboxError:
            return []
        found: dict[str, evidence.Receipt] = {}
        for sub in ("cur", "new"):
            folder = box / sub
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                with path.open("rb") as f:
                    head = f.read(256 * 1024)
                msgid = headers.bare_id(headers.parse(head).get("Message-ID")) or ""
                if msgid in wanted and msgid not in found:
                    found[msgid] = evidence.Receipt(msgid, path.read_bytes())
        return [found[m] for m in wanted if m in found]  # in ledger order

    async def list_messages(self, request: web.Request) -> web.StreamResponse:
        mailbox = await self._login(request)
        query = request.query
        try:
            since = _parse_time(query.get("since"))
            limit = int(query.get("limit", "50"))
            after = _cursor_in(query["after"]) if "after" in query else None
        except ValueError as exc:
            raise Problem(400, "Bad query", str(exc)[:200], "query") from None
        if not 1 <= limit <= MAX_PAGE:
            raise Problem(400, "Bad query", f"limit must be 1 to {MAX_PAGE}", "query")
        rows = await self._read(lambda c: apistore.messages_of(c, mailbox, since, after, limit))
        items = [{k: v for k, v in r.items() if k != "at"} | {r["status"]: _iso(r["at"])}
                 for r in rows]
        body: dict[str, Any] = {"messages": items, "next": None}
        if len(rows) == limit:
            last = rows[-1]
            cursor = _cursor_out(last["at"], last["id"])
            body["next"] = str(request.rel_url.update_query({"after": cursor}))
        return _answer(200, body)

    # --- the recipient's side --------------------------------------------------------------------

    async def list_mailbox(self, request: web.Request) -> web.StreamResponse:
        """The certified messages delivered to the caller's mailbox, oldest first, paginated."""
        mailbox = await self._login(request)
        query = request.query
        try:
            limit = int(query.get("limit", "50"))
            after = _cursor_in(query["after"]) if "after" in query else None
        except ValueError as exc:
            raise Problem(400, "Bad query", str(exc)[:200], "query") from None
        if not 1 <= limit <= MAX_PAGE:
            raise Problem(400, "Bad query", f"limit must be 1 to {MAX_PAGE}", "query")
        rows: list[readings.Stored] = await self._read(
            lambda c: readings.stored_for(c, mailbox, after, limit))
        items = [{"id": r.pec_id, "sender": r.sender, "subject": r.subject,
                  "delivered": _iso(r.delivered), "read": _iso(r.read), "read_via": r.read_via}
                 for r in rows]
        body: dict[str, Any] = {"messages": items, "next": None}
        if len(rows) == limit:
            cursor = _cursor_out(rows[-1].delivered, rows[-1].pec_id)
            body["next"] = str(request.rel_url.update_query({"after": cursor}))
        return _answer(200, body)

    async def download(self, request: web.Request) -> web.StreamResponse:
        """The delivered transport envelope, as stored in the caller's Maildir. The first
        download of a message whose sender asked for reading evidence is a read, evidenced by
        the reading point as an IMAP read is (``modalita`` ``http``); the bytes are sent only
        after that evidence is committed, so content never leaves without its evidence."""
        mailbox = await self._login(request)
        pec_id = request.match_info["id"]
        found: readings.Stored | None = await self._read(
            lambda c: readings.stored_one(c, pec_id, mailbox))
        if found is None:
            raise Problem(404, "Not found", "no certified message with that id was delivered "
                          "to this mailbox", "not-found")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.cpu, _stored_bytes, found.mailbox, found.file)
        if data is None:  # deleted by the holder's mail client, or moved to another folder
            raise Problem(404, "Not found", "the message is no longer in the mailbox's inbox",
                          "not-found")
        row = await self._read(lambda c: readings.of_recipient(c, pec_id, mailbox))
        if row is not None and row.read is None:
            if self.reading is None:
                raise Problem(503, "Not ready", "reading evidence is not available now",
                              "not-ready")
            await self.reading.record_read(row, "http")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", pec_id)[:100]
        return web.Response(body=data, content_type="message/rfc822", headers={
            "Content-Disposition": f'attachment; filename="{name}.eml"'})

    # --- verify, operations ----------------------------------------------------------------------

    async def verify(self, request: web.Request) -> web.StreamResponse:
        from pecd.trust.judge import judge

        data = await self._body(request, self.limits.max_message_size)
        if not data:
            raise Problem(400, "Empty body", "send the message's bytes", "empty")
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(
            self.cpu, lambda: judge(data, self.roots, policy=self.config.trust.policy))
        return _answer(200, verdict.as_json())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self.cpu, generate_latest, self.registry)
        return web.Response(body=text, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _answer(200, openapi.document(self.config))

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _answer(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        if not self.ready():
            raise Problem(503, "Not ready", "starting or stopping", "not-ready")
        try:
            await asyncio.wait_for(self._read(db_mod.ping), 5.0)
        except (TimeoutError, StoreError) as exc:
            raise Problem(503, "Not ready", f"database: {type(exc).__name__}", "database") from None
        return _answer(200, {"status": "ready"})


def _invalid(exc: Invalid) -> Problem:
    return Problem(exc.status, "Request refused", exc.detail, exc.check)


def _fingerprint(ctype: str, data: bytes) -> str:
    return hashlib.sha256(ctype.encode() + b"\0" + data).hexdigest()


def _verdict_answer(row: dict[str, Any], queue_id: int) -> tuple[int, dict[str, Any]]:
    detail = row["detail"]
    if row["event"] == "accepted":
        kinds = detail.get("recipient_kinds", {})
        return 202, {"id": row["msgid"], "status": "accepted", "accepted_at": row["at"],
                     "queue_id": queue_id, "receipt_type": detail.get("receipt_kind"),
                     "acceptance_receipt": (row["related"] or [None])[0],
                     "recipients": [{"address": a, "kind": k} for a, k in kinds.items()]}
    problem = Problem(422, "Not accepted", str(detail.get("reason", "")),
                      "virus" if detail.get("error") == "virus" else "formal-checks")
    return 422, {**problem.body(), "id": row["msgid"], "queue_id": queue_id,
                 "non_acceptance_notice": (row["related"] or [None])[0]}


def _timeline(pec_id: str, rows: list[dict[str, Any]], tracked: list[Any]) -> dict[str, Any]:
    """Every ledger row of the message, and per recipient its own rows and receipt times."""
    events = [{"seq": r["seq"], "at": r["at"], "event": r["event"], "recipients": r["recipients"],
               "related": r["related"], "type": r["detail"].get("type"),
               "error": r["detail"].get("error")} for r in rows]
    first = next(r for r in rows if r["msgid"] == pec_id and r["event"] in ("accepted", "refused"))
    recipients = []
    for t in tracked:
        address = str(t[0])
        own = [{"event": e["event"], "at": e["at"]} for e in events
               if address.lower() in (x.lower() for x in e["recipients"])]
        milestones = [("taken-in-charge", t[3]), ("delivered", t[4]), ("timeout-warning", t[5]),
                      (f"closed:{t[7]}" if t[7] else "closed", t[6])]
        own += [{"event": name, "at": _iso(at), "source": "receipt"}
                for name, at in milestones if at is not None]
        recipients.append({"address": address, "kind": t[1], "accepted": _iso(t[2]),
                           "taken_in_charge": _iso(t[3]), "delivered": _iso(t[4]),
                           "warned": _iso(t[5]), "closed": _iso(t[6]), "outcome": t[7],
                           "events": sorted(own, key=lambda e: str(e["at"]))})
    return {"id": pec_id, "status": first["event"], "sender": first["sender"],
            "subject": first["subject"], "ref_msgid": first["ref_msgid"], "at": first["at"],
            "recipients": recipients, "events": events}


def _parse_time(value: str | None) -> float:
    if value is None:
        return 0.0
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _cursor_out(accepted: float, pec_id: str) -> str:
    return urlsafe_b64encode(json.dumps([accepted, pec_id]).encode()).decode()


def _cursor_in(value: str) -> tuple[float, str]:
    try:
        accepted, pec_id = json.loads(urlsafe_b64decode(value.encode()))
        return float(accepted), str(pec_id)
    except (binascii.Error, TypeError, ValueError, UnicodeDecodeError):
        raise ValueError("after is not a cursor this API gave") from None


def _stored_bytes(mailbox: str, file: str) -> bytes | None:
    """The bytes of a Maildir file by its base name, wherever the reader left it: ``new/``
    untouched, ``cur/`` without flags, or ``cur/<name>:2,<flags>`` (blocking). ``file`` comes
    from the database, never from a request."""
    box = Path(mailbox)
    for _attempt in range(2):  # a reader's rename between our listing and our open: look again
        candidates = [box / "new" / file, box / "cur" / file]
        with contextlib.suppress(OSError), os.scandir(box / "cur") as entries:
            candidates += [box / "cur" / e.name for e in entries
                           if e.name.startswith(file + ":2,")]
        for path in candidates:
            try:  # a plain file only: a link left in the Maildir is not followed
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # renamed meanwhile (or a link): the next shape
                continue
            with os.fdopen(fd, "rb") as f:
                return f.read()
    return None


def server_tls(config: Config) -> ssl.SSLContext | None:
    http = config.http
    if http.tls_cert is None or http.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(http.tls_cert), str(http.tls_key))
    return ctx


RETRY_AFTER_CONNECTIONS = 2  # seconds, in the Retry-After of a connection over the cap
_REFUSED_IDLE = 5.0  # a refused connection that sends no request is closed after this long


def _too_many_connections() -> bytes:
    body = json.dumps(Problem(429, "Too many connections",
                              "too many connections from your address, try again later",
                              "too-many-connections").body(), sort_keys=True).encode()
    return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: " + PROBLEM.encode()
            + b"\r\nRetry-After: " + str(RETRY_AFTER_CONNECTIONS).encode()
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)


class _Gate(asyncio.Protocol):
    """Stands before aiohttp's handler on one connection, as the SMTP listeners' per-address
    connection cap does: under ``[limits] max_connections_per_address`` the connection is
    aiohttp's; over it the client gets ``429`` with ``Retry-After`` to its first request (or
    nothing, if it sends none within a few seconds) and the connection is closed. One HTTP/1.1
    connection carries one request at a time, so this also caps concurrent requests."""

    def __init__(self, make: Callable[[], asyncio.Protocol], limiter: ConnectionLimiter,
                 refused: Callable[[str], None]) -> None:
        self._make = make
        self._limiter = limiter
        self._refused = refused
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._limiter.acquire(self._address):
            self._inner = self._make()
            self._inner.connection_made(transport)
            return
        self._transport = transport
        self._refused(self._address)
        self._timer = asyncio.get_running_loop().call_later(_REFUSED_IDLE, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        elif self._transport is not None and not self._transport.is_closing():
            transport = cast(asyncio.WriteTransport, self._transport)  # uvloop's: no subclass
            transport.write(_too_many_connections())
            transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            self._limiter.release(self._address)
            self._inner.connection_lost(exc)


class _GatedSite(web_runner.BaseSite):
    """aiohttp's TCP site with :class:`_Gate` before each connection."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 limiter: ConnectionLimiter, refused: Callable[[str], None],
                 reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.limiter = limiter
        self.refused = refused

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        make: Callable[[], asyncio.Protocol] = server
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(make, self.limiter, self.refused), self.host, self.port,
            ssl=self._ssl_context, reuse_port=self.reuse_port or None)


async def start(api: Api, config: Config, reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """The listener on ``[http]`` host and port; returns the runner (to clean up) and the port.
    ``reuse_port``: shared with other pecd processes (``SO_REUSEPORT``)."""
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=10.0)
    await runner.setup()
    site = _GatedSite(runner, config.http.host, config.http.port or 0, server_tls(config),
                      ConnectionLimiter(config.limits.max_connections_per_address),
                      api.connection_refused, reuse_port)
    await site.start()
    port = int(runner.addresses[0][1])
    log.info("http listening on %s:%s%s", config.http.host, port,
             " (TLS)" if config.http.tls else "")
    return runner, port
