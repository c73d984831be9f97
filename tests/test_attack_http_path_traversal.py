"""Path traversal through attachment names: a name that is a path ("../../.ssh/authorized_keys",
"/etc/cron.d/x", "..\\..\\boot.ini", a hidden dot-file, a drive letter) would let the recipient's
mail client save the file outside the folder its user chose. Refused with 400, nothing queued.
And an id in the tracking URL is looked up, never read as a path."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import ProviderDir
from .http_support import api, message, token_for
from .pechelpers import ledger

NAMES = ["../../.ssh/authorized_keys", "/etc/cron.d/evil", "..\\..\\boot.ini", ".bashrc",
         "C:evil.exe", "ok/../../x.pdf", ""]


@pytest.mark.parametrize("filename", NAMES)
def test_attack_http_path_traversal_in_attachment_name_refused(
        two_providers: tuple[ProviderDir, ProviderDir], filename: str) -> None:
    a, _b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a) as client:
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message(attachments=[
                                                    {"filename": filename,
                                                     "content_base64": "aGk="}]))
            assert status == 400, body
            assert body["check"] == "attachment-filename"

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []


def test_attack_http_path_traversal_in_message_id_finds_nothing(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a) as client:
            for path in ("/api/v1/messages/..%2F..%2Fpecd.toml", "/api/v1/messages/%2Fetc%2Fpasswd",
                         "/api/v1/../../pecd.toml"):
                status, body, _ = await client.call("GET", path, token=token)
                assert status == 404, (path, body)
                assert "provider" not in str(body)

    asyncio.run(scenario())
