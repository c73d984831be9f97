"""Events out: each ledger row about a subscribed mailbox's messages is POSTed as JSON to the
subscription's URL, signed with HMAC-SHA256, from a durable outbox, retried with backoff, in ledger
order per message.

Receives subscriptions made by the operator (``pecd webhook add``), so it trusts their URLs; trusts
nothing in the receiver's answers beyond the status code (2xx: delivered). The outbox and the
ledger position live in the database (:mod:`pecd.store.apistore`): after a crash, rows not yet turned
into deliveries are turned once, and deliveries not yet acknowledged are sent again (a receiver
dedups on ``X-Pecd-Delivery``).

Signature: ``X-Pecd-Signature: sha256=<hex HMAC-SHA256(secret, X-Pecd-Timestamp + "." + body)>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random

import aiohttp

from pecd.clock import Clock
from pecd.config import Config
from pecd.store import apistore
from pecd.store.db import Database
from pecd.store.queue import backoff

log = logging.getLogger("pecd.webhooks")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookWorker:
    def __init__(self, config: Config, db: Database, clock: Clock) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self._stopping = False
        self._wake = asyncio.Event()

    async def run_once(self, session: aiohttp.ClientSession) -> int:
        """Turn new ledger rows into deliveries, then send what is due; how many were sent."""
        now = self.clock.now().timestamp()
        while await self.db.transact(lambda c: apistore.fan_out(c, now)) > 0:
            pass
        due = await self.db.transact(lambda c: apistore.due_deliveries(c, now, 100),
                                     durable=False)
        await asyncio.gather(*(self._send(session, d) for d in due))
        return len(due)

    async def _send(self, session: aiohttp.ClientSession, d: apistore.Delivery) -> None:
        body = d.payload.encode()
        stamp = str(int(self.clock.now().timestamp()))
        headers = {"Content-Type": "application/json", "User-Agent": "pecd-webhooks",
                   "X-Pecd-Event": d.event, "X-Pecd-Delivery": str(d.id),
                   "X-Pecd-Timestamp": stamp, "X-Pecd-Signature": signature(d.secret, stamp, body)}
        error = ""
        try:
            async with session.post(d.url, data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=30),
                                    allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    await self.db.transact(lambda c: apistore.delivered(c, d.id))
                    return
                error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        http = self.config.http
        give_up = d.attempts + 1 >= http.webhook_max_attempts
        delay = backoff(d.attempts, http.webhook_retry_base, http.webhook_retry_max, random.random())
        at = self.clock.now()
        await self.db.transact(lambda c: apistore.delivery_failed(
            c, d, error, at.timestamp() + delay, give_up, at))
        log.info("webhook %s delivery %s failed (%s)%s", d.hook_id, d.id, error,
                 "; giving up" if give_up else "")

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stopping:
                try:
                    await self.run_once(session)
                except Exception:  # a bad moment (disk, DNS) must not end the worker
                    log.exception("webhook worker failed; retrying")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
