"""The composition root: one provider's listeners, stage runners and stores in one process.

``Service.start`` first recovers the queue (dead leases back, unacknowledged files away), then
starts the runners and only then the listeners, so nothing is accepted before the queue is sane.
``Service.stop`` closes listeners first, lets in-flight items finish (bounded), then closes
stores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pecd import index as index_mod
from pecd import pki, users
from pecd.clock import Clock, SystemClock
from pecd.cms import Signer
from pecd.config import Config
from pecd.db import Database
from pecd.delivery import DeliveryPoint, Maildir
from pecd.index import ProviderIndex
from pecd.ledger import LedgerEvent
from pecd.pec import Issuer
from pecd.queue import Item, Kind, Outcome, Queue, Recovery
from pecd.reception import ReceptionPoint
from pecd.relay import Connections, RelayStage, Router
from pecd.smtp import InboundHandler, SubmissionHandler, listen, server_tls
from pecd.spool import Spool
from pecd.submission import AccessPoint
from pecd.tsa import LocalTSA, RemoteTSA, Timestamper

log = logging.getLogger("pecd")

Handler = Callable[[Item], Awaitable[Outcome]]


class Runner:
    """Leases items of one kind and runs a stage on them, at most ``concurrency`` at a time."""

    def __init__(self, queue: Queue, kind: Kind, handler: Handler, concurrency: int) -> None:
        self.queue = queue
        self.kind = kind
        self.handler = handler
        self.concurrency = concurrency
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def _process(self, item: Item) -> None:
        try:
            outcome = await self.handler(item)
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

    async def run(self) -> None:
        while not self._stopping:
            free = self.concurrency - len(self._inflight)
            items = await self.queue.lease(self.kind, free) if free > 0 else []
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
        self.queue._event(self.kind).set()

    async def drain(self, timeout: float) -> None:
        self._stopping = True
        self.queue._event(self.kind).set()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)


@dataclass
class Ports:
    submission: int = 0
    smtps: int = 0
    inbound: int = 0


def make_timestamper(config: Config, clock: Clock) -> Timestamper:
    if config.tsa_url:
        cert = pki.load_cert(config.paths.tsa_cert) if config.paths.tsa_cert.exists() else None
        return RemoteTSA(config.tsa_url, cert)
    return LocalTSA(pki.load_key(config.paths.tsa_key), pki.load_cert(config.paths.tsa_cert),
                    clock)


def make_issuer(config: Config, clock: Clock) -> Issuer:
    signer = Signer(pki.load_key(config.paths.signing_key), pki.load_cert(config.paths.signing_cert),
                    clock, timestamper=make_timestamper(config, clock))
    return Issuer(config.name, config.domain, config.service_address, signer)


class Service:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.db = Database(config.paths.database)
        self.spool = Spool(config.paths.spool)
        self.queue = Queue(self.db, self.spool, self.clock)
        self.index = ProviderIndex(self.db.transact_sync(index_mod.load_all))
        self.trust_roots = pki.load_certs(config.paths.ca_certs)
        self.issuer = make_issuer(config, self.clock)
        self.cpu = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                      thread_name_prefix="pecd-cpu")
        self.router = Router(config, self.index)
        self.connections = Connections(config)
        read = self.queue.read
        self.access = AccessPoint(config, self.issuer, self.router, self.clock, read, self.cpu)
        self.reception = ReceptionPoint(config, self.issuer, self.router, self.index,
                                        self.trust_roots, self.clock, read, self.cpu)
        self.delivery = DeliveryPoint(config, self.issuer, self.router, self.db,
                                      Maildir(config.paths.mail, config.hostname), self.clock,
                                      read, self.cpu)
        self.relay = RelayStage(config, self.index, self.connections, read)
        n = config.workers
        self.runners = {
            "submission": Runner(self.queue, "submission", self.access.handle, n),
            "inbound": Runner(self.queue, "inbound", self.reception.handle, n),
            "deliver": Runner(self.queue, "deliver", self.delivery.handle, n),
            "relay": Runner(self.queue, "relay", self.relay.handle, n * 4),
        }
        self.ports = Ports()
        self.recovery: Recovery | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def check_password(self, user: str, password: str) -> bool:
        stored = await self.db.transact(lambda conn: users.password_hash(conn, user))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu, users.check, stored, password)

    def reload_index(self) -> None:
        self.index.replace(self.db.transact_sync(index_mod.load_all))

    async def start(self, listeners: bool = True, runners: bool = True) -> None:
        self.recovery = self.queue.recover()
        if runners:
            self._tasks = [asyncio.create_task(r.run()) for r in self.runners.values()]
        if listeners:
            await self._listen()

    async def _listen(self) -> None:
        cfg, tls = self.config, server_tls(self.config)
        sub = SubmissionHandler(cfg, self.queue, self.check_password)
        inbound = InboundHandler(cfg, self.queue)
        specs = [
            ("submission", sub, cfg.listen.submission_port, False, True),
            ("smtps", sub, cfg.listen.smtps_port, True, True),
            ("inbound", inbound, cfg.listen.inbound_port, False, False),
        ]
        for name, handler, port, implicit, auth in specs:
            server = await listen(handler, cfg.listen.host, port, cfg, tls,
                                  implicit_tls=implicit, auth=auth)
            self._servers.append(server)
            setattr(self.ports, name, server.sockets[0].getsockname()[1])
            log.info("%s listening on %s:%s", name, cfg.listen.host, getattr(self.ports, name))

    async def run_once(self) -> int:
        """One pass of every stage; tests use it to step the pipeline without background tasks."""
        total = 0
        for runner in self.runners.values():
            total += await runner.run_once()
        return total

    async def stop(self, timeout: float = 10.0) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        for runner in self.runners.values():
            await runner.drain(timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.connections.close()
        self.cpu.shutdown(wait=True)
        self.db.close()


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("pecd serving %s (submission %s, smtps %s, inbound %s)", config.domain,
             service.ports.submission, service.ports.smtps, service.ports.inbound)
    await stop.wait()
    log.info("stopping")
    await service.stop()
