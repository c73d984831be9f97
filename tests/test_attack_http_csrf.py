"""CSRF on the pages: a form posted from another site carries the victim's cookies but not the
token in the page. Sign-in needs the token that matches its own cookie (no login CSRF), sign-out
the session's token; without it the request is refused (403) and nothing changes. The session
cookie is HttpOnly and SameSite=Strict."""

from __future__ import annotations

import asyncio

from .conftest import ProviderDir
from .http_support import api, sign_in


def test_attack_http_csrf_login_without_the_form_token_refused(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers

    async def scenario() -> None:
        async with api(a) as client:
            for data in ({"address": "alice@a.test", "password": "alice-secret"},
                         {"address": "alice@a.test", "password": "alice-secret", "csrf": "forged"}):
                async with client.session.post(client.base + "/login", data=data,
                                               allow_redirects=False) as resp:
                    assert resp.status == 403
                    assert "pecd_session" not in resp.cookies

    asyncio.run(scenario())


def test_attack_http_csrf_cross_site_logout_refused(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers

    async def scenario() -> None:
        async with api(a) as client:
            assert await sign_in(client, "alice@a.test", "alice-secret") == 303
            cookie = next(c for c in client.session.cookie_jar if c.key == "pecd_session")
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            async with client.session.post(client.base + "/logout", data={"csrf": "guess"},
                                           allow_redirects=False) as resp:
                assert resp.status == 403
            status, _, _ = await client.call("GET", "/my")
            assert status == 200  # still signed in

    asyncio.run(scenario())
