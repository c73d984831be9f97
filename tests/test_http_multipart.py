"""Sending with attachments as ``multipart/form-data`` (a browser form or ``curl -F``): a
``message`` part with the JSON fields, or the fields one per part, and a file part per
attachment. It takes the JSON path (same checks, same access point, same receipts), so the
message arrives certified at the second provider; a retried form with the same
Idempotency-Key makes one message; malformed or oversized forms get a 4xx and touch nothing."""

from __future__ import annotations

import asyncio
import json
from email import message_from_bytes
from email.message import Message

import aiohttp

from pecd.format import pec

from .conftest import ProviderDir, wait_for
from .http_support import Api, api, token_for
from .pechelpers import configure, ledger

PDF = b"%PDF-1.4 contratto firmato\n" + bytes(range(256))


async def _post_form(client: Api, form: aiohttp.FormData, token: str,
                     key: str | None = None) -> tuple[int, dict[str, object]]:
    hdrs = {"Authorization": f"Bearer {token}"}
    if key is not None:
        hdrs["Idempotency-Key"] = key
    async with client.session.post(client.base + "/api/v1/messages", data=form,
                                   headers=hdrs) as resp:
        return resp.status, dict(await resp.json(content_type=None))


def _form_with_message_part() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("message", json.dumps({"to": ["bob@b.test"], "subject": "Contratto",
                                          "text": "In allegato.\n", "receipt_type": "breve"}),
                   content_type="application/json")
    form.add_field("attachments", PDF, filename="contratto.pdf", content_type="application/pdf")
    form.add_field("attachments", "nota àè\n".encode(), filename="nota.txt",
                   content_type="text/plain; charset=utf-8")
    form.add_field("attachments", b"%PDF-1.4\n", filename="relazione è 100%.pdf",
                   content_type="application/pdf")  # aiohttp sends it percent-encoded
    return form


def _attachments(original: bytes) -> dict[str, tuple[str, bytes]]:
    msg = message_from_bytes(original)
    out: dict[str, tuple[str, bytes]] = {}
    for part in msg.walk():
        assert isinstance(part, Message)
        name = part.get_filename()
        if name:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out[name] = (part.get_content_type(), payload)
    return out


def test_multipart_message_with_attachments_arrives_certified_with_its_receipts(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, body = await _post_form(client, _form_with_message_part(), token, key="f-1")
            assert status == 202, body
            pec_id = str(body["id"])
            assert body["status"] == "accepted" and body["receipt_type"] == "breve"
            # the same form again under the same key: the first answer, no second message
            again, body2 = await _post_form(client, _form_with_message_part(), token, key="f-1")
            assert (again, body2["id"]) == (202, pec_id)
            # the fields one per part, to and cc repeated
            form = aiohttp.FormData()
            for name, value in (("to", "bob@b.test"), ("cc", "carol@b.test"),
                                ("subject", "Campi"), ("text", "Corpo.\n")):
                form.add_field(name, value)
            form.add_field("attachments", b"hi", filename="a.bin")
            status, fields_body = await _post_form(client, form, token)
            assert status == 202, fields_body
            assert {r["address"] for r in fields_body["recipients"]} == {  # type: ignore[attr-defined]
                "bob@b.test", "carol@b.test"}

            def arrived() -> bool:
                return len(b.messages("bob@b.test")) == 2 and len(
                    [m for m in a.messages("alice@a.test") if b"avvenuta-consegna" in m]) >= 2

            await wait_for(arrived)
            first = next(pec.parse(m) for m in b.messages("bob@b.test")
                         if pec_id.encode() in m)
            assert first.original is not None
            files = _attachments(first.original)
            assert files["contratto.pdf"] == ("application/pdf", PDF)
            assert files["nota.txt"] == ("text/plain", "nota àè\n".encode())
            assert files["relazione è 100%.pdf"] == ("application/pdf", b"%PDF-1.4\n")

    asyncio.run(scenario())
    assert len(ledger(a, "submitted")) == 2  # the retried form made no second message


def test_malformed_and_oversized_forms_are_refused_and_touch_nothing(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    configure(a, "limits", max_message_size=20_000)
    token = token_for(a, "alice@a.test")
    auth = {"Authorization": f"Bearer {token}"}
    boundary = "XyZ"

    def body(*parts: str) -> bytes:
        return ("".join(f"--{boundary}\r\n{p}\r\n" for p in parts)
                + f"--{boundary}--\r\n").encode()

    cases: list[tuple[str, bytes, str, int, str]] = [
        ("no boundary", b"abc", "multipart/form-data", 400, "multipart"),
        ("wrong boundary", body('Content-Disposition: form-data; name="to"\r\n\r\nbob@b.test'),
         "multipart/form-data; boundary=Other", 400, "multipart"),
        ("empty form", f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}",
         400, "multipart"),
        ("unknown field", body('Content-Disposition: form-data; name="bcc"\r\n\r\neve@b.test'),
         f"multipart/form-data; boundary={boundary}", 400, "schema"),
        ("message not json", body('Content-Disposition: form-data; name="message"\r\n\r\n{nope'),
         f"multipart/form-data; boundary={boundary}", 400, "json"),
        ("field twice", body('Content-Disposition: form-data; name="to"\r\n\r\nbob@b.test',
                             'Content-Disposition: form-data; name="message"\r\n\r\n'
                             '{"to": ["bob@b.test"]}'),
         f"multipart/form-data; boundary={boundary}", 400, "schema"),
        ("base64 part", body('Content-Disposition: form-data; name="attachments"; filename="a"'
                             '\r\nContent-Transfer-Encoding: base64\r\n\r\naGk='),
         f"multipart/form-data; boundary={boundary}", 415, "content-encoding"),
        ("too big", body('Content-Disposition: form-data; name="to"\r\n\r\nbob@b.test',
                         'Content-Disposition: form-data; name="attachments"; filename="big.bin"'
                         '\r\n\r\n' + "x" * 30_000),
         f"multipart/form-data; boundary={boundary}", 413, "size"),
    ]

    async def scenario() -> None:
        async with api(a) as client:
            for what, data, ctype, want, check in cases:
                async with client.session.post(client.base + "/api/v1/messages", data=data,
                                               headers={**auth, "Content-Type": ctype}) as resp:
                    answer = await resp.json(content_type=None)
                    assert (resp.status, answer.get("check")) == (want, check), (what, answer)
            # over the limit with the whole form's size announced: refused before reading
            big = aiohttp.FormData()
            big.add_field("to", "bob@b.test")
            big.add_field("attachments", b"y" * 2_000_000, filename="big.bin")
            status, answer = await _post_form(client, big, token)
            assert (status, answer["check"]) == (413, "size"), answer

    asyncio.run(scenario())
    assert ledger(a, "submitted") == []
