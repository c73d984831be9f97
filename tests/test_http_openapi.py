"""The API's OpenAPI 3.1 document: an independent validator accepts it, and a schema-driven
fuzzer (schemathesis) run against the live API finds no 5xx and no answer the document does
not describe."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from openapi_spec_validator import validate

from .conftest import ProviderDir, submit, wait_for
from .http_support import api, token_for


def test_openapi_document_is_valid_openapi_3_1(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers

    async def scenario() -> dict[str, object]:
        async with api(a) as client:
            status, doc, _ = await client.call("GET", "/api/v1/openapi.json")
            assert status == 200
            return dict(doc)

    doc = asyncio.run(scenario())
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"
    assert {"/api/v1/messages", "/api/v1/mailbox", "/api/v1/mailbox/{id}", "/api/v1/verify",
            "/metrics"} <= set(doc["paths"])  # type: ignore[arg-type]


def test_schemathesis_fuzzing_the_live_api_finds_no_server_error(
        two_providers: tuple[ProviderDir, ProviderDir], tmp_path: Path) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")
    st = Path(sys.executable).parent / "st"

    async def scenario() -> tuple[int, str]:
        async with api(a, b) as client:
            # a certified message in alice's mailbox, so the download has something to serve
            loop = asyncio.get_running_loop()
            code, reply = await loop.run_in_executor(None, lambda: submit(
                b, "bob@b.test", "bob-secret", "bob@b.test", ["alice@a.test"],
                b"From: bob@b.test\r\nTo: alice@a.test\r\nSubject: Per il fuzzer\r\n"
                b"Message-ID: <fuzz-1@client.b.test>\r\n\r\nCiao.\r\n",
                client.services[1].ports.submission))
            assert code == 250, reply
            await wait_for(lambda: len(a.messages("alice@a.test")) == 1)
            proc = await asyncio.create_subprocess_exec(
                str(st), "run", f"{client.base}/api/v1/openapi.json",
                "--checks", "not_a_server_error,status_code_conformance,"
                            "content_type_conformance,response_schema_conformance",
                "-H", f"Authorization: Bearer {token}", "--max-examples", "15", "--seed", "1",
                "--no-shrink", "--workers", "1", "--request-timeout", "60",
                cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode(errors="replace")

    code, output = asyncio.run(scenario())
    assert code == 0, output[-6000:]
    assert "No issues found" in output and "Tested: 10" in output, output[-3000:]
