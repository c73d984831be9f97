"""Guessing tokens or passwords over HTTP: the same throttle as SMTP AUTH (per account and per
client address, one window), shared with the SMTP listeners, so switching protocol buys no
fresh guesses; while throttled even the right secret is refused (429)."""

from __future__ import annotations

import asyncio
import smtplib

from .conftest import ProviderDir, client_tls
from .http_support import api, message, token_for
from .pechelpers import configure, ledger


def test_attack_http_bruteforce_token_guessing_throttled(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    configure(a, "limits", auth_failures_per_address=5)
    token = token_for(a, "alice@a.test")
    token_id = token.split("_")[1]
    guesses = [f"pecd_{token_id}_{'A' * 43}", "pecd_0123456789abcdef_" + "B" * 43, "garbage",
               token[:-1] + ("A" if token[-1] != "A" else "B"), ""]

    async def scenario() -> None:
        async with api(a) as client:
            for guess in guesses:
                status, body, _ = await client.call("POST", "/api/v1/messages", token=guess,
                                                     json_body=message())
                assert status == 401, body
            status, body, hdrs = await client.call("POST", "/api/v1/messages", token=token,
                                                   json_body=message())
            assert status == 429 and body["check"] == "auth-throttled", body
            assert int(hdrs["Retry-After"]) > 0

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []
    assert len(ledger(a, "auth-failed")) == len(guesses)
    assert len(ledger(a, "auth-throttled")) == 1  # one row per episode


def test_attack_http_bruteforce_password_shares_the_smtp_throttle(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    configure(a, "limits", auth_failures_per_source=3)  # per (account, client address)

    def smtp_login(port: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.starttls(context=client_tls(a.ca))
            try:
                s.login("alice@a.test", "alice-secret")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
            return 235

    async def scenario() -> None:
        async with api(a) as client:
            for _ in range(3):
                status, _, _ = await client.call("GET", "/api/v1/messages",
                                                 basic=("alice@a.test", "guess"))
                assert status == 401
            status, body, _ = await client.call("GET", "/api/v1/messages",
                                                basic=("alice@a.test", "alice-secret"))
            assert status == 429 and body["check"] == "auth-throttled"
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, smtp_login, client.services[0].ports.submission)
            assert code == 454  # the guesses over HTTP count for SMTP AUTH too

    asyncio.run(scenario())
