"""The composition root: one provider's listeners, stage runners and stores in one process.

``Service.start`` first recovers the queue (dead leases back, unacknowledged files away), then
starts the runners and only then the listeners, so nothing is accepted before the queue is sane.
``Service.stop`` closes listeners first, ends sessions with ``421`` (a command under way may
answer first), lets in-flight items finish (bounded, the rest cancelled: their leases return at the
next start), waits for commits already handed to the writer, then closes stores.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from pecd import keyring
from pecd.clock import Clock, SystemClock
from pecd.config import Config
from pecd.edges import httpapi
from pecd.edges.lmtp import LmtpMailbox
from pecd.edges.smtp import InboundHandler, SubmissionHandler, listen, server_tls
from pecd.edges.webhooks import WebhookWorker
from pecd.format.pec import Issuer
from pecd.points import printjob, virus
from pecd.points.delivery import DeliveryPoint, Mailbox, Maildir
from pecd.points.fallback import FallbackStage
from pecd.points.reading import ReadingWorker
from pecd.points.reception import ReceptionPoint
from pecd.points.relay import Connections, RelayStage, Router
from pecd.points.submission import AccessPoint
from pecd.points.timeouts import TimeoutWorker
from pecd.store import Connection, Unavailable, ledger, users
from pecd.store import db as db_mod
from pecd.store.db import Database
from pecd.store.ledger import LedgerEvent
from pecd.store.nodes import Node
from pecd.store.queue import Item, Kind, Outcome, Queue, Recovery
from pecd.store.spool import open_bodies
from pecd.trust import index as index_mod
from pecd.trust import pki, revocation
from pecd.trust.index import ProviderIndex
from pecd.trust.index_sync import IndexRefresher
from pecd.trust.keys import SigningUnavailable
from pecd.trust.tsa import (
    FallbackTimestamper,
    FallbackUse,
    LocalTSA,
    RemoteTSA,
    Timestamper,
    errors_of,
    key_matches,
)

log = logging.getLogger("pecd")

Handler = Callable[[Item], Awaitable[Outcome]]
SIGNING_RETRY = 30.0  # seconds before an item deferred for an unavailable signing key is retried
TAKE_BACK_EVERY = 5.0  # seconds between looks for dead sibling processes' leases


def _index_version(conn: Connection) -> tuple[int, str, str]:
    return index_mod.version(conn)


def _rows_since_checkpoint(conn: Connection) -> int:
    return ledger.rows_since_checkpoint(conn)


class Runner:
    """Leases items of one kind and runs a stage on them, at most ``concurrency`` at a time."""

    def __init__(self, queue: Queue, kind: Kind, handler: Handler, concurrency: int) -> None:
        self.queue = queue
        self.kind = kind
        self.handler = handler
        self.concurrency = concurrency
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False

    async def _process(self, item: Item) -> None:
        try:
            outcome = await self.handler(item)
        except SigningUnavailable as exc:  # the token went away: retry later, never drop
            log.warning("signing key unavailable, %s item %s deferred: %s", self.kind, item.id, exc)
            outcome = Outcome(state="deferred", delay=SIGNING_RETRY, error=str(exc)[:500],
                              events=[LedgerEvent(event="deferred", detail={
                                  "queue_id": item.id, "stage": self.kind,
                                  "reason": "signing key unavailable"})])
        except Unavailable as exc:  # the database is away: the lease comes back once it answers
            log.warning("%s stage: storage unavailable on queue item %s: %s", self.kind,
                        item.id, exc)
            self.queue.abandon(item)
            return
        except Exception as exc:  # a stage bug parks the item; it is never dropped
            incident = uuid.uuid4().hex[:12]
            log.error("incident %s: %s stage failed on queue item %s", incident, self.kind,
                      item.id, exc_info=exc)
            outcome = Outcome(state="hold", error=f"incident {incident}: {type(exc).__name__}",
                              events=[LedgerEvent(event="held", detail={
                                  "queue_id": item.id, "stage": self.kind,
                                  "incident": incident})])
        await self.queue.finish(item, outcome)

    async def run_once(self) -> int:
        """Process everything due now; for tests and the crash test's deterministic steps."""
        items = await self.queue.lease(self.kind, 1000)
        await asyncio.gather(*(self._process(i) for i in items))
        return len(items)

    def start(self) -> None:
        self._loop = asyncio.create_task(self.run())

    async def run(self) -> None:
        while not self._stopping:
            free = self.concurrency - len(self._inflight)
            try:
                items = await self.queue.lease(self.kind, free) if free > 0 else []
            except Unavailable as exc:  # PostgreSQL away: the writer reconnects; look again soon
                log.warning("%s runner: storage unavailable: %s", self.kind, exc)
                items = []
            for item in items:
                task = asyncio.create_task(self._process(item))
                self._inflight.add(task)
                task.add_done_callback(self._done)
            if not items:
                await self.queue.wait(self.kind, 1.0)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("queue commit failed", exc_info=task.exception())
        self.queue.wake(self.kind)

    async def drain(self, timeout: float) -> None:
        """Lease nothing more, give items under way ``timeout`` to finish, cancel the rest.

        The leasing loop stops first, so no item can start after the wait. A cancelled item
        keeps its lease until recovery returns it; its commit, if already handed to the writer,
        still lands (see ``Queue.settle``)."""
        self._stopping = True
        self.queue.wake(self.kind)
        if self._loop is not None:
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)
        left = list(self._inflight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


@dataclass
class Ports:
    submission: int = 0
    smtps: int = 0
    inbound: int = 0
    http: int = 0  # 0: no [http] port configured


def make_timestamper(config: Config, clock: Clock, db: Database | None = None) -> Timestamper:
    """The built-in TSA; or, with ``[tsa] url``, the external one.

    If ``tsa_key``/``tsa_cert`` are still the built-in TSA's own pair, external tokens must chain
    to ``ca_certs`` and the built-in TSA stands in while the external one is unavailable; each
    such token becomes a ``tsa-fallback`` ledger row (when ``db`` is given). If ``tsa_cert`` is
    another certificate (the external TSA's), it pins the external TSA and there is no fallback.
    """
    paths = config.paths
    if not config.tsa_url:
        key, cert = keyring.tsa_pair(config)
        assert key is not None and cert is not None
        return LocalTSA(key, cert, clock)
    key, cert = keyring.tsa_pair(config, required=False)
    if cert is None or key is None or not key_matches(key, cert):
        return RemoteTSA(config.tsa_url, cert)

    def record(use: FallbackUse) -> None:
        event = LedgerEvent(event="tsa-fallback", detail={
            "tsa": "built-in", "external": use.primary, "reason": use.reason,
            "imprint_sha256": use.imprint_sha256})
        if db is not None:
            db.transact_sync(lambda conn: ledger.append(conn, event, clock.now()))
        log.warning("external TSA unavailable, built-in TSA used: %s", use.reason)

    remote = RemoteTSA(config.tsa_url, None, roots=pki.load_certs(paths.ca_certs))
    return FallbackTimestamper(remote, LocalTSA(key, cert, clock), name=config.tsa_url,
                               on_fallback=record)


def make_mailbox(config: Config) -> Mailbox:
    """``[delivery] method``: Maildirs under the data directory, or an LMTP server (Dovecot)."""
    if config.delivery.method == "lmtp":
        return LmtpMailbox(config.delivery.lmtp_host, config.delivery.lmtp_port,
                           journal=config.paths.data_dir / "lmtp-journal",
                           local_hostname=config.hostname)
    return Maildir(config.paths.mail, config.hostname)


def make_issuer(config: Config, clock: Clock, timestamper: Timestamper) -> Issuer:
    # signing.pem (or the token): the certificate, then any intermediates sent with each signature;
    # a file key or a token key ([keys]); during a renewal, the signer switches at [keys] switch_at
    signer = keyring.make_signer(config, clock, timestamper)
    return Issuer(config.name, config.domain, config.service_address, signer)


class Service:
    def __init__(self, config: Config, clock: Clock | None = None, reuse_port: bool = False) -> None:
        """``reuse_port``: listen with ``SO_REUSEPORT`` (several processes serve one provider)."""
        self.config = config
        self.reuse_port = reuse_port
        self.clock = clock or SystemClock()
        self.db = Database(config.paths.database)
        self.spool = open_bodies(config.paths.database, config.paths.spool)
        self.queue = Queue(self.db, self.spool, self.clock)
        self.index = ProviderIndex(self.db.transact_sync(index_mod.load_all))
        self.trust_roots = pki.load_certs(config.paths.ca_certs)
        self.timestamper = make_timestamper(config, self.clock, self.db)
        self.issuer = make_issuer(config, self.clock, self.timestamper)
        self.cpu = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                      thread_name_prefix="pecd-cpu")
        self.authenticator = users.Authenticator(self.db, self.cpu,
                                                 config.limits.lock_after_failures)
        self.router = Router(config, self.index)
        self.connections = Connections(config)
        read = self.queue.read
        self.scanner = virus.scanner_for(config)  # None: [antivirus] unset, scanning off
        self.access = AccessPoint(config, self.issuer, self.router, self.clock, read, self.cpu,
                                  self.scanner, db=self.db)
        self.revocation_sources = revocation.Sources(config.reception, self.clock, self.db, self.cpu)
        self.revocation_sources.load()  # the copies in force survive a restart
        self.revocation: revocation.Checker | None = revocation.Checker(
            config.reception, self.revocation_sources, self.index, self.trust_roots, self.clock,
            self.cpu, config.trust.policy)
        if config.reception.revocation == "off":
            log.warning("[reception] revocation = \"off\": peers' certificates are not checked"
                        " for revocation")
            self.revocation = None
        self.reception = ReceptionPoint(config, self.issuer, self.router, self.index,
                                        self.trust_roots, self.clock, read, self.cpu,
                                        self.scanner, self.revocation, claimed=self.queue.claimed)
        self.timeouts = TimeoutWorker(config, self.issuer, self.queue, self.clock, self.cpu)
        self.delivery = DeliveryPoint(config, self.issuer, self.router, self.db,
                                      make_mailbox(config), self.clock,
                                      read, self.cpu)
        self.reading = ReadingWorker(config, self.issuer, self.queue, self.router, self.clock,
                                     self.cpu)
        self.fallback = FallbackStage(config, read, self.cpu, printer=printjob.write_job)
        self.relay = RelayStage(config, self.index, self.connections, self.queue.open, self.clock)
        self.index_refresher = IndexRefresher(config, self.db, self.clock, self.index)
        n = config.workers
        self.runners = {
            "submission": Runner(self.queue, "submission", self.access.handle, n),
            "inbound": Runner(self.queue, "inbound", self.reception.handle, n),
            "deliver": Runner(self.queue, "deliver", self.delivery.handle, n),
            "relay": Runner(self.queue, "relay", self.relay.handle, n * 4),
            "fallback": Runner(self.queue, "fallback", self.fallback.handle, n),
        }
        self.webhooks = WebhookWorker(config, self.db, self.clock)
        self.ports = Ports()
        self.recovery: Recovery | None = None
        self.node: Node | None = None
        self._servers: list[asyncio.Server] = []
        self._handlers: list[SubmissionHandler | InboundHandler] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._http: web.AppRunner | None = None
        self._ready = False

    async def check_password(self, user: str, password: str) -> bool:
        """A login as the listeners do it (counts failures, honours the account lock)."""
        return (await self.authenticator.login(user, password)).ok

    def reload_index(self) -> None:
        self.index.replace(self.db.transact_sync(index_mod.load_all))

    async def start(self, listeners: bool = True, runners: bool = True) -> None:
        # registered before recovery, so that a process starting beside this one keeps its leases
        self.node = Node(self.config.paths.data_dir / "run", self.queue.owner)
        self.recovery = self.queue.recover(self.node)
        self.node.started()
        if runners:
            for runner in self.runners.values():
                runner.start()
            self._tasks = [asyncio.create_task(self._housekeeping()),
                           asyncio.create_task(self.timeouts.run()),
                           asyncio.create_task(self.webhooks.run())]
            if self.config.index.url:
                self._tasks.append(asyncio.create_task(self.index_refresher.run()))
            if self.config.consultation.enabled and self.config.delivery.method == "maildir":
                self._tasks.append(asyncio.create_task(self.reading.run()))
        if listeners:
            await self._listen()
        self._ready = True

    async def _listen(self) -> None:
        cfg, tls = self.config, server_tls(self.config)
        sub = SubmissionHandler(cfg, self.queue, self.authenticator.login, self.clock)
        inbound = InboundHandler(cfg, self.queue, self.index, self.revocation, self.clock)
        inbound.tls_failures = sub.tls_failures  # one count per address across the listeners
        self._handlers = [sub, inbound]
        specs = [
            ("submission", sub, cfg.listen.submission_port, False, True),
            ("smtps", sub, cfg.listen.smtps_port, True, True),
            ("inbound", inbound, cfg.listen.inbound_port, False, False),
        ]
        for name, handler, port, implicit, auth in specs:
            server = await listen(handler, cfg.listen.host, port, cfg, tls,
                                  implicit_tls=implicit, auth=auth, reuse_port=self.reuse_port)
            self._servers.append(server)
            setattr(self.ports, name, server.sockets[0].getsockname()[1])
            log.info("%s listening on %s:%s", name, cfg.listen.host, getattr(self.ports, name))
        if cfg.http.port is not None:
            api = httpapi.Api(cfg, self.db, self.queue, self.clock, self.cpu, sub.authenticate,
                              sub.throttle, self.trust_roots, lambda: self._ready,
                              self.reading,
                              errors=lambda: {"tsa": errors_of(self.timestamper),
                                              "revocation": dict(self.revocation_sources.errors)})
            self._http, self.ports.http = await httpapi.start(api, cfg, self.reuse_port)

    async def _housekeeping(self) -> None:
        """Pick up operator changes to the index; checkpoint the ledger on schedule; take back
        the leases of a process of this host that died (several processes serve one provider)."""
        loop = asyncio.get_running_loop()
        index_version = await self.db.transact(_index_version)
        last_checkpoint = last_take_back = self.clock.now().timestamp()
        policy = self.config.ledger
        while True:
            await asyncio.sleep(1.0)
            try:
                version = await self.db.transact(_index_version)
                if version != index_version:
                    index_version = version
                    self.index.replace(await self.db.transact(index_mod.load_all))
                    log.info("provider index reloaded")
                now = self.clock.now().timestamp()
                if self.node is not None and now - last_take_back >= TAKE_BACK_EVERY:
                    last_take_back = now
                    if await self.queue.take_back(self.node):
                        log.info("took back the leases of a process that died")
                pending = await self.db.transact(_rows_since_checkpoint)
                if pending and (pending >= policy.checkpoint_rows
                                or now - last_checkpoint >= policy.checkpoint_interval):
                    await loop.run_in_executor(None, self.checkpoint)
                    last_checkpoint = now
            except Exception:  # housekeeping must outlive a bad moment (TSA down, disk full)
                log.exception("housekeeping failed; retrying")

    def checkpoint(self) -> int | None:
        """Timestamp the ledger head now (own connection: a slow TSA never blocks the writer)."""
        conn = db_mod.connect(self.config.paths.database)
        try:
            return ledger.checkpoint(conn, self.clock.now(), self.timestamper.timestamp)
        finally:
            conn.close()

    async def run_once(self) -> int:
        """One pass of every stage; tests use it to step the pipeline without background tasks."""
        total = 0
        for runner in self.runners.values():
            total += await runner.run_once()
        return total

    async def stop(self, timeout: float = 10.0) -> None:
        """Idempotent: a second SIGTERM, or a test's cleanup after an explicit stop, is a no-op."""
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        if self._http is not None:  # requests under way get their answers (bounded)
            await self._http.cleanup()
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        for handler in self._handlers:
            await handler.close_sessions(timeout)
        # one grace period for all, not one each
        await asyncio.gather(*(r.drain(timeout) for r in self.runners.values()),
                             self.timeouts.drain(timeout), self.reading.drain(timeout))
        self.webhooks.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.settle()
        await self.connections.close()
        self.cpu.shutdown(wait=True)
        self.db.close()
        if self.node is not None:
            self.node.close()


def return_big_buffers_to_the_os() -> bool:
    """Keep glibc from holding on to the memory of big messages once they are freed.

    glibc serves a freed block of N bytes' size class from its heap afterwards (the mmap
    threshold rises to the largest block freed, up to 32 MiB), and each thread has its own heap:
    after a 25 MB message went through a few executor threads, the process keeps several copies'
    worth of freed memory. A fixed threshold makes every block over 1 MiB its own mapping,
    unmapped on free.

    Not lower: ``ssl.SSLObject.read`` allocates its 256 KiB maximum for every TLS read (then
    shrinks it), and as a mapping each of those costs an mmap, page faults and an munmap, which
    made TLS reads about five times dearer. The trim threshold follows glibc's own rule (twice
    the mmap threshold), so the heap top is not given back and taken again on every read.
    False where there is no glibc (nothing to tune)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_FROM)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _OWN_MAPPING_FROM))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_OWN_MAPPING_FROM = 1 << 20


async def serve(config: Config, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    return_big_buffers_to_the_os()
    service = Service(config, reuse_port=reuse_port)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("pecd serving %s (submission %s, smtps %s, inbound %s, http %s)", config.domain,
             service.ports.submission, service.ports.smtps, service.ports.inbound,
             service.ports.http or "off")
    await stop.wait()
    log.info("stopping")
    await service.stop()
