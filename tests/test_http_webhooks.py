"""Webhooks to a real HTTP server on loopback: every ledger event of the subscribed mailbox's
messages arrives, HMAC-signed, in ledger order per message; a receiver that fails is retried
from the durable outbox with backoff, and the message's later events wait for the failed one."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

from aiohttp import web

from .conftest import ProviderDir, wait_for
from .http_support import api, message, token_for
from .pechelpers import configure


class Receiver:
    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.calls = 0
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls <= self.fail_first:
            return web.Response(status=503)
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)


async def _serve(receiver: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


def test_webhook_events_arrive_signed_in_order_and_failures_are_retried(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    configure(a, "http", webhook_retry_base=0.05, webhook_retry_max=0.2)
    token = token_for(a, "alice@a.test")
    receiver = Receiver(fail_first=2)

    async def scenario() -> None:
        server, url = await _serve(receiver)
        try:
            secret = a.cli("webhook", "add", "alice@a.test", url).strip().splitlines()[-1]
            listed = a.cli("webhook", "list")
            assert url in listed and "active" in listed and secret not in listed
            async with api(a, b) as client:
                status, sent, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                    json_body=message())
                assert status == 202
                pec_id = sent["id"]

                def events() -> list[dict[str, Any]]:
                    return [json.loads(body) for _, body in receiver.got]

                await wait_for(lambda: "avvenuta-consegna" in [e["type"] for e in events()])
                await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            got = events()
            assert {e["id"] for e in got} == {pec_id}
            assert got[0]["event"] == "accepted"  # the failed first delivery held the rest back
            assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
            assert len({e["seq"] for e in got}) == len(got)
            assert receiver.calls == len(got) + 2
            for hdrs, body in receiver.got:
                mac = hmac.new(secret.encode(), hdrs["X-Pecd-Timestamp"].encode() + b"." + body,
                               hashlib.sha256).hexdigest()
                assert hdrs["X-Pecd-Signature"] == f"sha256={mac}"
                assert hdrs["X-Pecd-Event"] == json.loads(body)["event"]
        finally:
            await server.cleanup()

    asyncio.run(scenario())


def test_webhook_of_another_mailbox_gets_nothing(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    a.add_user("carol@a.test", "carol-secret")
    token = token_for(a, "alice@a.test")
    receiver = Receiver(fail_first=0)

    async def scenario() -> None:
        server, url = await _serve(receiver)
        try:
            a.cli("webhook", "add", "carol@a.test", url)
            async with api(a, b) as client:
                status, _, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                 json_body=message())
                assert status == 202
                await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
                await client.services[0].webhooks.run_once(client.session)
        finally:
            await server.cleanup()
        assert receiver.calls == 0

    asyncio.run(scenario())
