"""Shared by the HTTP API tests: running providers with a real aiohttp client on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from pecd.service import Service

from .conftest import ProviderDir, running


@dataclass
class Api:
    session: aiohttp.ClientSession
    base: str
    services: list[Service]

    async def call(self, method: str, path: str, *, token: str | None = None,
                   json_body: Any = None, data: bytes | None = None,
                   content_type: str | None = None, headers: dict[str, str] | None = None,
                   basic: tuple[str, str] | None = None) -> tuple[int, Any, Any]:
        """One request; the body as JSON when it is JSON, else as text."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if basic is not None:
            pair = f"{basic[0]}:{basic[1]}".encode()
            hdrs["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        async with self.session.request(method, self.base + path, data=data, headers=hdrs) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            body: Any = json.loads(raw) if "json" in ctype else raw.decode()
            return resp.status, body, resp.headers


@contextlib.asynccontextmanager
async def api(*providers: ProviderDir) -> AsyncIterator[Api]:
    """The providers running; the client talks to the first one's HTTP listener."""
    async with running(*providers) as services, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:  # cookies for 127.0.0.1
        port = services[0].ports.http
        assert port, "the provider has no [http] listener"
        yield Api(session, f"http://127.0.0.1:{port}", services)


def token_for(provider: ProviderDir, address: str, name: str = "test") -> str:
    """``pecd token create``: the token is alone on the last line."""
    return provider.cli("token", "create", address, "--name", name).strip().splitlines()[-1]


def message(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"from": "alice@a.test", "to": ["bob@b.test"],
                            "subject": "Contratto", "text": "Buongiorno Bob.\n"}
    base.update(extra)
    return base


async def sign_in(client: Api, address: str, password: str) -> int:
    """The sign-in form as a browser fills it: its CSRF field and cookie, then the POST."""
    status, page, _ = await client.call("GET", "/login")
    assert status == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    async with client.session.post(client.base + "/login", data={
            "csrf": csrf[1], "address": address, "password": password},
            allow_redirects=False) as resp:
        return resp.status
