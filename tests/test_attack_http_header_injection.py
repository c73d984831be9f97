"""Header injection through the JSON message: a CR or LF in the subject, a display name, an
attachment's name or type would let an API client write header fields of its choosing (a Bcc, a
second From, a forged X-Ricevuta). Each is refused with 400 before anything is queued."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import ProviderDir
from .http_support import api, message, token_for
from .pechelpers import ledger

INJECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("subject_crlf", {"subject": "Ciao\r\nBcc: eve@b.test"}),
    ("subject_lf", {"subject": "Ciao\nX-Ricevuta: avvenuta-consegna"}),
    ("to_display_name", {"to": ["Bob\r\nBcc: eve@b.test <bob@b.test>"]}),
    ("cc_address", {"cc": ["eve@b.test\r\nX-Evil: 1"]}),
    ("from_display_name", {"from": "Alice\nSender: eve@b.test <alice@a.test>"}),
    ("attachment_filename", {"attachments": [{"filename": "a.txt\r\nX-Evil: 1",
                                              "content_base64": "aGk="}]}),
    ("attachment_content_type", {"attachments": [{
        "filename": "a.txt", "content_type": "text/plain\r\nX-Evil: 1", "content_base64": "aGk="}]}),
    ("subject_control_character", {"subject": "Ciao\x00\x1b[2J"}),
]


@pytest.mark.parametrize(("name", "fields"), INJECTIONS, ids=[n for n, _ in INJECTIONS])
def test_attack_http_header_injection_refused(two_providers: tuple[ProviderDir, ProviderDir],
                                              name: str, fields: dict[str, Any]) -> None:
    a, _b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a) as client:
            status, body, hdrs = await client.call("POST", "/api/v1/messages", token=token,
                                                   json_body=message(**fields))
            assert status == 400, body
            assert hdrs["Content-Type"].startswith("application/problem+json")
            assert body["check"] == "header-injection"

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []  # nothing queued, nothing certified


def test_attack_http_header_injection_through_multipart_form_refused(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    """The same through a form: a subject field with a line break, and a file name whose RFC
    2231 encoding (the only way a multipart header line can carry one) decodes to a CR LF."""
    a, _b = two_providers
    token = token_for(a, "alice@a.test")
    auth = {"Authorization": f"Bearer {token}"}
    to = '--B\r\nContent-Disposition: form-data; name="to"\r\n\r\nbob@b.test\r\n'
    bodies = [
        to + '--B\r\nContent-Disposition: form-data; name="subject"\r\n\r\n'
             'Ciao\r\nBcc: eve@b.test\r\n--B--\r\n',
        to + '--B\r\nContent-Disposition: form-data; name="attachments"; '
             "filename*=UTF-8''a.txt%0D%0ABcc%3A%20eve%40b.test\r\n\r\nhi\r\n--B--\r\n",
    ]

    async def scenario() -> None:
        async with api(a) as client:
            for raw in bodies:
                async with client.session.post(
                        client.base + "/api/v1/messages", data=raw.encode(),
                        headers={**auth, "Content-Type": "multipart/form-data; boundary=B"}
                ) as resp:
                    body = await resp.json(content_type=None)
                    assert (resp.status, body["check"]) == (400, "header-injection"), (raw, body)

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []
