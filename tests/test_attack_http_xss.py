"""XSS through any field shown on a page: a subject, a display name, a recipient, or text a
verdict repeats from an uploaded file could carry markup; every page escapes it, and the pages
forbid scripts by Content-Security-Policy besides. (A display name never reaches a page:
the pages show addresses, which the API accepts only without markup.)"""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import ProviderDir
from .http_support import api, message, sign_in, token_for

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'


def test_attack_http_xss_in_subject_and_names_escaped(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, sent, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message(subject=SCRIPT + IMG))
            assert status == 202, sent
            assert await sign_in(client, "alice@a.test", "alice-secret") == 303
            for path in ("/my", f"/my/{sent['id']}"):
                async with client.session.get(client.base + path) as resp:
                    page = await resp.text()
                    assert resp.status == 200
                    assert "script-src" not in resp.headers["Content-Security-Policy"]
                    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
                assert "<script>" not in page and "<img" not in page
            assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img" in page  # shown, inert

    asyncio.run(scenario())


def test_attack_http_xss_in_an_uploaded_file_escaped(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    hostile = (f"From: {SCRIPT}\r\nContent-Type: multipart/signed; protocol=\"{IMG}\"; "
               f"boundary=\"{SCRIPT}\"\r\n\r\n--{SCRIPT}\r\n{IMG}\r\n").encode()

    async def scenario() -> None:
        async with api(a) as client:
            form = aiohttp.FormData()
            form.add_field("message", hostile, filename=f"{SCRIPT}.eml")
            async with client.session.post(client.base + "/verify", data=form) as resp:
                page = await resp.text()
                assert resp.status == 200
            assert "NOT VALID: not a signed PEC message, or malformed" in page
            assert "&lt;script&gt;" in page  # the reason repeats the hostile header, escaped
            assert "<script>" not in page and "<img" not in page

    asyncio.run(scenario())
