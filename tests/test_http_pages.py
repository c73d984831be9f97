"""The pages with a real HTTP client: every page linked from /, verify by upload, sign in with a
form, my messages (sent by SMTP or by the API) with their timelines, the operator page for
operator accounts only."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import ProviderDir, submit, wait_for
from .http_support import Api, api, message, sign_in, token_for

ORIGINAL = (b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: Via SMTP\r\n"
            b"Message-ID: <smtp-1@client.a.test>\r\n\r\nCiao.\r\n")


async def upload(client: Api, data: bytes, filename: str = "receipt.eml") -> tuple[int, str]:
    form = aiohttp.FormData()
    form.add_field("message", data, filename=filename, content_type="message/rfc822")
    async with client.session.post(client.base + "/verify", data=form) as resp:
        return resp.status, await resp.text()


def test_pages_verify_sign_in_my_messages_and_operator(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    a.cli("user", "add", "root@a.test", "--operator", "--password-stdin", input="root-secret\n")
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, home, _ = await client.call("GET", "/")
            assert status == 200
            for link in ("/verify", "/my", "/operator", "/login", "/api/v1/openapi.json"):
                assert f'href="{link}"' in home
            status, sent, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message(subject="Via API"))
            assert status == 202
            loop = asyncio.get_running_loop()
            code, _ = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                ["bob@b.test"], ORIGINAL, client.services[0].ports.submission)
            assert code == 250
            await wait_for(lambda: len(a.messages("alice@a.test")) == 4)

            status, verdict = await upload(client, a.messages("alice@a.test")[0])
            assert status == 200 and "VALID" in verdict and "Signer" in verdict

            async with client.session.get(client.base + "/my", allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/login"
            assert await sign_in(client, "alice@a.test", "wrong") == 200
            assert await sign_in(client, "alice@a.test", "alice-secret") == 303
            status, mine, _ = await client.call("GET", "/my")
            assert status == 200 and "Via API" in mine and "Via SMTP" in mine
            status, one, _ = await client.call("GET", f"/my/{sent['id']}")
            assert status == 200 and "bob@b.test" in one and "accepted" in one
            status, _, _ = await client.call("GET", "/operator")
            assert status == 403  # alice is no operator

            client.session.cookie_jar.clear()
            assert await sign_in(client, "root@a.test", "root-secret") == 303
            status, op, _ = await client.call("GET", "/operator")
            assert status == 200
            assert "submission/incoming" in op and "Last checkpoint" in op and "days left" in op
            status, mine, _ = await client.call("GET", "/my")
            assert "Via API" not in mine  # root sees its own messages only

    asyncio.run(scenario())
