"""Attacks on the recipient's HTTP mailbox (``/api/v1/mailbox/{id}``): another mailbox's token
asking for bob's message, an id that is a path (``..``, an absolute path, the Maildir file's own
name, the database), an unknown id. Each gets 404 like an unknown id, serves no bytes, and
above all evidences no read: a read that bob did not make would tell alice he opened it."""

from __future__ import annotations

import asyncio

from . import test_reading as reading_tests
from .conftest import ProviderDir, submit, wait_for
from .http_support import api, token_for
from .interop_support import ledger_rows
from .test_reading import evidence, message, reading_rows

providers = reading_tests.providers  # A and B issue reading evidence


def _deliver(a: ProviderDir, port: int) -> None:
    code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                         message("Riservata"), port)
    assert code == 250, reply


def test_attack_http_mailbox_another_mailboxs_token_gets_404_and_no_read(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, _c = providers
    b.add_user("mallory@b.test", "mallory-secret")
    mallory = token_for(b, "mallory@b.test")
    bob = token_for(b, "bob@b.test")

    async def scenario() -> None:
        async with api(b, a) as client:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _deliver, a, client.services[1].ports.submission)
            await wait_for(lambda: len(reading_rows(b)) == 1)
            pec_id = str(reading_rows(b)[0]["pec_id"])
            status, body, _ = await client.call("GET", f"/api/v1/mailbox/{pec_id}",
                                                token=mallory)
            assert status == 404, body
            assert "Riservata" not in str(body) and body["check"] == "not-found"
            status, body, _ = await client.call("GET", f"/api/v1/mailbox/{pec_id}",
                                                basic=("mallory@b.test", "mallory-secret"))
            assert status == 404, body
            status, listing, _ = await client.call("GET", "/api/v1/mailbox", token=mallory)
            assert status == 200 and listing["messages"] == [], listing
            # the same id and bob's own token: it is there (so the 404s above were the scope)
            status, listing, _ = await client.call("GET", "/api/v1/mailbox", token=bob)
            assert [m["id"] for m in listing["messages"]] == [pec_id]
            status, _body, _ = await client.call("GET", "/api/v1/mailbox/x", token=None)
            assert status == 401

    asyncio.run(scenario())
    assert reading_rows(b)[0]["read"] is None
    assert ledger_rows(b, "read") == []
    assert evidence(a, "alice@a.test", "presa-visione") == []


def test_attack_http_mailbox_path_traversal_and_unknown_ids_get_404(
        providers: tuple[ProviderDir, ProviderDir, ProviderDir]) -> None:
    a, b, _c = providers
    token = token_for(b, "bob@b.test")

    async def scenario() -> None:
        async with api(b, a) as client:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _deliver, a, client.services[1].ports.submission)
            await wait_for(lambda: len(reading_rows(b)) == 1)
            row = reading_rows(b)[0]
            pec_id, file = str(row["pec_id"]), str(row["file"])
            for path in ("/api/v1/mailbox/..%2F..%2F..%2Fpecd.toml",
                         "/api/v1/mailbox/..%2F..%2Fpecd.sqlite",
                         "/api/v1/mailbox/%2Fetc%2Fpasswd",
                         f"/api/v1/mailbox/..%2Fnew%2F{file}",
                         f"/api/v1/mailbox/{file}",  # the Maildir file's own name
                         f"/api/v1/mailbox/{pec_id}%00",
                         f"/api/v1/mailbox/{pec_id}x",
                         "/api/v1/mailbox/unknown@b.test",
                         "/api/v1/mailbox/%27%20OR%201%3D1%20--",
                         "/api/v1/mailbox/../../pecd.toml"):
                status, body, _ = await client.call("GET", path, token=token)
                assert status == 404, (path, body)
                assert "Il documento" not in str(body) and "[provider]" not in str(body)
            status, listing, _ = await client.call("GET", "/api/v1/mailbox", token=token)
            assert [m["id"] for m in listing["messages"]] == [pec_id]  # it is bob's to fetch

    asyncio.run(scenario())
    assert reading_rows(b)[0]["read"] is None
    assert ledger_rows(b, "read") == []
    assert evidence(a, "alice@a.test", "presa-visione") == []
