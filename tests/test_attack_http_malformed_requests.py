"""Malformed requests: broken or hostile JSON, the wrong media type, bodies over the limits,
unknown fields. Each gets a 4xx problem+json naming the check, never a 500 or a traceback, and
nothing is queued."""

from __future__ import annotations

import asyncio

from .conftest import ProviderDir
from .http_support import api, message, token_for
from .pechelpers import configure, ledger


def test_attack_http_malformed_json_refused(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    token = token_for(a, "alice@a.test")
    bodies = [b"{", b"\xff\xfe", b'{"to": ["bob@b.test"]', b"[" * 100_000 + b"]" * 100_000,
              b"NaN-ish", b'"just a string"', b"42", b'{"to": "bob@b.test"}',
              b'{"to": ["bob@b.test"], "bcc": ["eve@b.test"]}', b"[]",
              b'{"to": ["bob@b.test"], "attachments": [{"filename": "a", "content_base64": "!!"}]}',
              b'{"to": ["bob@b.test"], "receipt_type": "nessuna"}',
              b'{"to": ["not an address"]}']

    async def scenario() -> None:
        async with api(a) as client:
            for data in bodies:
                status, body, hdrs = await client.call("POST", "/api/v1/messages", token=token,
                                                       data=data, content_type="application/json")
                assert status == 400, (data[:40], body)
                assert hdrs["Content-Type"].startswith("application/problem+json")
                assert body["check"] in ("json", "schema", "to", "bulk", "base64",
                                         "receipt-type", "address"), body

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []


def test_attack_http_wrong_content_type_refused(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a) as client:
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "text/html",
                          "application/octet-stream"):
                status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                    data=b'{"to": ["bob@b.test"]}',
                                                    content_type=ctype)
                assert status == 415, (ctype, body)
                assert body["check"] == "content-type"
            # a form is taken (tests/test_http_multipart.py), but JSON labelled as one is not
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                data=b'{"to": ["bob@b.test"]}',
                                                content_type="multipart/form-data; boundary=x")
            assert (status, body["check"]) == (400, "multipart"), body
            status, body, _ = await client.call("DELETE", "/api/v1/messages", token=token)
            assert status == 405 and body["check"] == "method"

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []


def test_attack_http_huge_body_refused(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    configure(a, "limits", max_message_size=100_000)
    token = token_for(a, "alice@a.test")
    big_raw = b"From: alice@a.test\r\nTo: bob@b.test\r\n\r\n" + b"x" * 900 + (b"\r\n" + b"y" * 900) * 200

    async def scenario() -> None:
        async with api(a) as client:
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                data=big_raw, content_type="message/rfc822")
            assert status == 413 and body["check"] == "size", body
            status, body, _ = await client.call("POST", "/api/v1/verify", data=big_raw)
            assert status == 413 and body["check"] == "size", body
            huge = message(text="z" * 3_000_000)
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=huge)
            assert status == 413 and body["check"] == "size", body
            just_over = message(text="w" * 99_000 + "\n")  # under the body cap, over as a message
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=just_over)
            assert status == 413 and body["check"] == "size", body
            long_line = b"From: alice@a.test\r\nTo: bob@b.test\r\n\r\n" + b"L" * 5000 + b"\r\n"
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                data=long_line, content_type="message/rfc822")
            assert status == 400 and body["check"] == "line-length", body

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []
