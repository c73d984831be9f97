"""Path traversal through attachment names: a name that is a path ("../../.ssh/authorized_keys",
"/etc/cron.d/x", "..\\..\\boot.ini", a hidden dot-file, a drive letter) would let the recipient's
mail client save the file outside the folder its user chose. Refused with 400, nothing queued.
And an id in the tracking URL is looked up, never read as a path."""

from __future__ import annotations

import asyncio

import aiohttp
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


def test_attack_http_path_traversal_in_multipart_filename_refused(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    """The same names as a form's file parts (as ``curl -F file=@...;filename=...`` sends them),
    and once in RFC 2231 form (``filename*=UTF-8''..%2F..``), which the server decodes first."""
    a, _b = two_providers
    token = token_for(a, "alice@a.test")
    auth = {"Authorization": f"Bearer {token}"}

    async def scenario() -> None:
        async with api(a) as client:
            for filename in NAMES:
                form = aiohttp.FormData()
                form.add_field("to", "bob@b.test")
                form.add_field("attachments", b"hi", filename=filename,
                               content_type="application/octet-stream")
                async with client.session.post(client.base + "/api/v1/messages", data=form,
                                               headers=auth) as resp:
                    body = await resp.json(content_type=None)
                    assert (resp.status, body.get("check")) == (400, "attachment-filename"), (
                        filename, body)
            raw = (b"--B\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\nbob@b.test\r\n"
                   b"--B\r\nContent-Disposition: form-data; name=\"attachments\"; "
                   b"filename*=UTF-8''..%2F..%2F.ssh%2Fauthorized_keys\r\n\r\nssh-ed25519 AAAA\r\n"
                   b"--B--\r\n")
            async with client.session.post(
                    client.base + "/api/v1/messages", data=raw,
                    headers={**auth, "Content-Type": "multipart/form-data; boundary=B"}) as resp:
                body = await resp.json(content_type=None)
                assert (resp.status, body["check"]) == (400, "attachment-filename"), body

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
