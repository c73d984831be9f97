"""The HTTP API on loopback with a real client: a message sent through it is certified and
arrives at the second provider with its receipts; tracking, idempotency, token scope, verify,
metrics and health."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pecd import config
from pecd.format import pec
from pecd.store import ledger

from .conftest import (
    ProviderDir,
    client_tls,
    openssl,
    openssl_verifies,
    pecd,
    running,
    wait_for,
)
from .http_support import api, message, token_for
from .pechelpers import configure, send_inbound


def _kind(msg: bytes) -> str:
    parsed = pec.parse(msg)
    assert parsed.certdata is not None
    return parsed.certdata.type


def test_json_message_through_the_api_arrives_with_its_receipts(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers_db
    token = token_for(a, "alice@a.test")
    pdf = b"%PDF-1.4 contratto firmato\n"

    async def scenario() -> None:
        async with api(a, b) as client:
            status, body, hdrs = await client.call("POST", "/api/v1/messages", token=token,
                                                   json_body=message(
                cc=[], html="<p>Buongiorno <b>Bob</b></p>", receipt_type="breve",
                attachments=[{"filename": "contratto.pdf", "content_type": "application/pdf",
                              "content_base64": base64.b64encode(pdf).decode()}]))
            assert status == 202, body
            pec_id = body["id"]
            assert pec_id.endswith("@a.test") and body["status"] == "accepted"
            assert body["recipients"] == [{"address": "bob@b.test", "kind": "certificato"}]
            assert hdrs["Location"] == f"/api/v1/messages/{pec_id}"

            def done() -> bool:
                return (len(a.messages("alice@a.test")) == 2
                        and len(b.messages("bob@b.test")) == 1)

            await wait_for(done)
            envelope = pec.parse(b.messages("bob@b.test")[0])
            assert envelope.certdata is not None and envelope.certdata.identifier == pec_id
            assert envelope.headers["Subject"] == "POSTA CERTIFICATA: Contratto"
            assert envelope.original is not None and pdf in base64.b64decode(
                envelope.original.split(b"contratto.pdf")[-1].split(b"\r\n\r\n", 1)[1]
                .split(b"\r\n--")[0])
            kinds = sorted(_kind(m) for m in a.messages("alice@a.test"))
            assert kinds == ["accettazione", "avvenuta-consegna"]

            async def delivered() -> dict[str, object]:
                for _ in range(500):
                    status, track, _ = await client.call("GET", f"/api/v1/messages/{pec_id}",
                                                         token=token)
                    assert status == 200, track
                    if track["recipients"][0]["delivered"]:
                        return dict(track)
                    await asyncio.sleep(0.02)
                raise AssertionError("never delivered")

            track = await delivered()
            assert track["status"] == "accepted" and track["subject"] == "Contratto"
            bob = track["recipients"][0]
            assert bob["address"] == "bob@b.test" and bob["kind"] == "certificato"
            names = [e["event"] for e in bob["events"]]
            assert names[0] == "accepted" and "delivered" in names
            assert all(e["at"] for e in bob["events"])
            assert "receipt-received" in [e["event"] for e in track["events"]]

    asyncio.run(scenario())


RAW = (b"From: Alice <alice@a.test>\n"
       b"To: bob@b.test\n"
       b"Subject: Raw\n"
       b"Message-ID: <raw-1@client.a.test>\n"
       b"\n"
       b"Corpo.\n")


def test_raw_message_is_accepted_and_a_bcc_names_the_failed_check(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                data=RAW, content_type="message/rfc822")
            assert status == 202, body
            bcc = RAW.replace(b"To: bob@b.test\n", b"To: bob@b.test\nBcc: eve@b.test\n")
            status, body, hdrs = await client.call("POST", "/api/v1/messages", token=token,
                                                   data=bcc, content_type="message/rfc822")
            assert status == 422, body
            assert hdrs["Content-Type"].startswith("application/problem+json")
            assert body["check"] == "formal-checks" and "Bcc" in body["detail"]
            assert body["id"].endswith("@a.test")  # the non-accepted transaction's id
            refused_id = body["id"]
            # "my messages" lists everything the mailbox sent, the refused one too
            status, page, _ = await client.call("GET", "/api/v1/messages", token=token)
            assert status == 200, page
            outcome = {m["id"]: m["status"] for m in page["messages"]}
            assert outcome[refused_id] == "refused" and list(outcome.values()).count("accepted") == 1
            refused = next(m for m in page["messages"] if m["id"] == refused_id)
            assert refused["refused"] and "accepted" not in refused
            # same path as SMTP: the sender also gets the signed non-acceptance notice
            await wait_for(lambda: "non-accettazione" in
                           [_kind(m) for m in a.messages("alice@a.test")])

    asyncio.run(scenario())


def _count(provider: ProviderDir, sql: str) -> int:
    return int(provider.query(sql)[0][0])


def test_idempotency_key_retry_gets_the_first_answer_and_makes_no_second_message(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers_db
    token = token_for(a, "alice@a.test")
    key = {"Idempotency-Key": "order-4711"}

    async def scenario() -> None:
        async with api(a, b) as client:
            answers = await asyncio.gather(*(
                client.call("POST", "/api/v1/messages", token=token, json_body=message(),
                            headers=key) for _ in range(3)))
            assert {s for s, _, _ in answers} == {202}
            assert len({b["id"] for _, b, _ in answers}) == 1
            status, again, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                 json_body=message(), headers=key)
            assert status == 202 and again == answers[0][1]
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message(subject="Altro"), headers=key)
            assert status == 422 and body["check"] == "idempotency-key"
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1)
            await client.services[0].run_once()
        assert len(b.messages("bob@b.test")) == 1
        assert _count(a, "SELECT count(*) FROM ledger WHERE event='submitted'") == 1

    asyncio.run(scenario())


def test_token_acts_only_for_its_own_mailbox(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    a.add_user("carol@a.test", "carol-secret")
    alice = token_for(a, "alice@a.test")
    carol = token_for(a, "carol@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, sent, _ = await client.call("POST", "/api/v1/messages", token=alice,
                                                json_body=message())
            assert status == 202
            status, body, _ = await client.call("GET", f"/api/v1/messages/{sent['id']}",
                                                token=carol)
            assert status == 404, body
            status, body, _ = await client.call("POST", "/api/v1/messages", token=carol,
                                                json_body=message())
            assert status == 403 and body["check"] == "from-not-owned"
            status, listed, _ = await client.call("GET", "/api/v1/messages", token=carol)
            assert status == 200 and listed["messages"] == []
            status, listed, _ = await client.call("GET", "/api/v1/messages", token=alice)
            assert [m["id"] for m in listed["messages"]] == [sent["id"]]
            token_id = alice.split("_")[1]
            a.cli("token", "revoke", token_id)
            status, body, hdrs = await client.call("GET", "/api/v1/messages", token=alice)
            assert status == 401 and "Bearer" in hdrs["WWW-Authenticate"]

    asyncio.run(scenario())


def test_basic_auth_with_the_mailbox_password(two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers

    async def scenario() -> None:
        async with api(a, b) as client:
            good = ("alice@a.test", "alice-secret")
            status, body, _ = await client.call("POST", "/api/v1/messages", basic=good,
                                                json_body=message())
            assert status == 202, body
            status, _, _ = await client.call("GET", "/api/v1/messages",
                                             basic=("alice@a.test", "wrong"))
            assert status == 401

    asyncio.run(scenario())


def test_messages_list_is_paginated(two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers_db
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            ids = []
            for i in range(5):
                status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                    json_body=message(subject=f"n{i}"))
                assert status == 202
                ids.append(body["id"])
            seen: list[str] = []
            path: str | None = "/api/v1/messages?since=2000-01-01T00:00:00&limit=2"
            while path:
                status, page, _ = await client.call("GET", path, token=token)
                assert status == 200 and len(page["messages"]) <= 2
                seen += [m["id"] for m in page["messages"]]
                path = page["next"]
            assert seen == ids
            status, page, _ = await client.call("GET", "/api/v1/messages?since=2999-01-01",
                                                token=token)
            assert status == 200 and page["messages"] == []
            status, page, _ = await client.call("GET", "/api/v1/messages?since=yesterday",
                                                token=token)
            assert status == 400 and page["check"] == "query"

    asyncio.run(scenario())


def test_verify_judges_a_receipt_without_login(two_providers: tuple[ProviderDir, ProviderDir],
                                               tmp_path: Path) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, _, _ = await client.call("POST", "/api/v1/messages", token=token,
                                             json_body=message())
            assert status == 202
            await wait_for(lambda: len(a.messages("alice@a.test")) >= 1)
            receipt = a.messages("alice@a.test")[0]
            status, verdict, _ = await client.call("POST", "/api/v1/verify", data=receipt,
                                                   content_type="message/rfc822")
            assert status == 200 and verdict["valid"] is True and verdict["verdict"] == "valid"
            assert verdict["pec"]["type"] == "accettazione"
            altered = receipt.replace(b"alice@a.test", b"mallory@a.test")
            status, verdict, _ = await client.call("POST", "/api/v1/verify", data=altered,
                                                   content_type="message/rfc822")
            assert status == 200 and verdict["valid"] is False
            assert verdict["verdict"] in ("altered", "malformed")
            status, verdict, _ = await client.call("POST", "/api/v1/verify", data=b"hello")
            assert status == 200 and verdict["verdict"] == "malformed"

    asyncio.run(scenario())


def test_metrics_parse_and_count_messages_by_stage_and_queue_by_state(
        two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers_db
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            status, _, _ = await client.call("POST", "/api/v1/messages", token=token,
                                             json_body=message())
            assert status == 202
            status, text, hdrs = await client.call("GET", "/metrics")
            assert status == 200 and hdrs["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(text)}
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in families.values() for s in f.samples}
            accepted = samples[("pecd_messages_total", (("outcome", "accepted"), ("stage", "access")))]
            assert accepted == 1
            assert ("pecd_queue_items", (("kind", "relay"), ("state", "incoming"))) in samples
            assert families["pecd_queue_items"].type == "gauge"
            assert families["pecd_messages"].type == "counter"
            assert samples[("pecd_tsa_fallbacks_total", ())] == 0
            assert samples[("pecd_revocation_errors_total", ())] == 0
            assert families["pecd_http_request_duration_seconds"].type == "histogram"
            sent = samples[("pecd_http_requests_total",
                            (("route", "/api/v1/messages"), ("status", "202")))]
            assert sent == 1
            for path in ("/healthz", "/readyz"):
                status, body, _ = await client.call("GET", path)
                assert status == 200, body

    asyncio.run(scenario())


def test_token_cli_shows_the_token_once_and_stores_only_its_hash(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    out = a.cli("token", "create", "alice@a.test", "--name", "erp")
    token = out.strip().splitlines()[-1]
    assert token.startswith("pecd_") and " " not in token
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    listed = a.cli("token", "list")
    assert token_id in listed and "erp" in listed and "active" in listed
    assert secret not in listed
    assert _count(a, f"SELECT count(*) FROM api_tokens WHERE secret_sha256 LIKE '%{secret}%'") == 0
    db = (a.root / "data" / "pecd.sqlite").read_bytes()
    assert secret.encode() not in db
    a.cli("token", "create", "nobody@a.test", ok=False)
    a.cli("token", "revoke", "0000000000000000", ok=False)
    a.cli("token", "revoke", token_id)
    assert "revoked" in a.cli("token", "list", "alice@a.test")


def test_http_over_tls_when_the_section_names_certificates(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, _b = two_providers
    configure(a, "http", tls_cert="keys/tls.pem", tls_key="keys/tls.key")
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with running(a) as (svc,), aiohttp.ClientSession() as session:
            url = f"https://localhost:{svc.ports.http}/api/v1/messages"
            async with session.get(url, headers={"Authorization": f"Bearer {token}"},
                                   ssl=client_tls(a.ca)) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url.replace("https:", "http:")) as resp:
                    await resp.read()

    asyncio.run(scenario())


def test_http_config_refuses_plain_http_beyond_loopback(tmp_path: Path) -> None:
    pecd("init", str(tmp_path / "p"), "--domain", "p.test", "--ca", str(tmp_path / "ca"),
         "--http-port", "18080")
    conf = tmp_path / "p" / "pecd.toml"
    assert config.load(conf).http.port == 18080
    assert config.load(conf).http.host == "127.0.0.1"
    conf.write_text(conf.read_text().replace('[http]\nhost = "127.0.0.1"', '[http]\nhost = "0.0.0.0"'))
    with pytest.raises(config.ConfigError, match="TLS"):
        config.load(conf)


def test_evidence_archive_is_checkable_offline(two_providers: tuple[ProviderDir, ProviderDir],
                                               tmp_path: Path) -> None:
    a, b = two_providers
    a.add_user("carol@a.test", "carol-secret")
    token = token_for(a, "alice@a.test")
    carol = token_for(a, "carol@a.test")
    out = tmp_path / "evidence"

    async def scenario() -> None:
        async with api(a, b) as client:
            status, sent, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message())
            assert status == 202
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            await wait_for(lambda: len(a.messages("posta-certificata@a.test")) == 1)
            await wait_for(lambda: _count(a, "SELECT count(*) FROM ledger WHERE event="
                                             "'receipt-received'") == 2)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, client.services[0].checkpoint) is not None
            path = f"/api/v1/messages/{sent['id']}/evidence"
            status, _, _ = await client.call("GET", path, token=carol)
            assert status == 404
            async with client.session.get(client.base + path,
                                          headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200 and resp.content_type == "application/zip"
                assert "attachment" in resp.headers["Content-Disposition"]
                data = await resp.read()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.extractall(out)

    asyncio.run(scenario())
    receipts = sorted((out / "receipts").iterdir())
    assert [p.name.split("-")[1] for p in receipts] == ["accettazione", "avvenuta"]
    for eml in receipts:
        assert openssl_verifies(eml, a.ca)
        # exit 0 only when intact and trusted (pecd() fails the test on any other exit)
        assert "signature: valid" in pecd("verify", "--ca", str(out / "provider-ca.pem"), str(eml))
    report = (out / "REPORT.txt").read_text()
    assert "recomputed from its content: OK" in report
    assert "to checkpoint 1" in report and "): OK" in report
    assert "checkpoint token: valid RFC 3161 timestamp" in report
    evidence = json.loads((out / "ledger.json").read_text())
    assert {r["event"] for r in evidence["rows"]} >= {"accepted", "receipt-received"}
    for row in evidence["rows"]:  # anyone with SHA-256 and JSON can recheck a row
        assert ledger.row_hash(row["prev_hash"], row) == row["hash"]
    openssl("ts", "-verify", "-in", str(out / "checkpoint.tsr"), "-token_in", "-data",
            str(out / "checkpoint-head.bin"), "-CAfile", str(out / "provider-ca.pem"),
            "-untrusted", str(a.tsa_cert))


def test_bulk_list_each_message_answered_on_its_own(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    token = token_for(a, "alice@a.test")
    batch = [message(subject="uno"), message(subject="due\r\nBcc: eve@b.test"),
             message(subject="tre", to=["bob@b.test"], cc=["bob2@b.test"])]
    key = {"Idempotency-Key": "batch-1"}

    async def scenario() -> None:
        async with api(a, b) as client:
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=batch, headers=key)
            assert status == 200, body
            results = body["results"]
            assert [r["status"] for r in results] == [202, 400, 202]
            assert results[1]["body"]["check"] == "header-injection"
            assert results[0]["body"]["id"] != results[2]["body"]["id"]
            status, again, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                 json_body=batch, headers=key)
            assert status == 200 and again == body
        assert _count(a, "SELECT count(*) FROM ledger WHERE event='accepted'") == 2

    asyncio.run(scenario())


def test_metrics_count_anomalies_by_verdict(two_providers_db: tuple[ProviderDir, ProviderDir]) -> None:
    _a, b = two_providers_db
    plain = b"From: someone@else.example\r\nTo: bob@b.test\r\nSubject: plain\r\n\r\nhi\r\n"

    async def scenario() -> None:
        async with api(b) as client:
            loop = asyncio.get_running_loop()
            code, _ = await loop.run_in_executor(None, send_inbound, b,
                                                 client.services[0].ports.inbound,
                                                 "someone@else.example", ["bob@b.test"], plain,
                                                 False)
            assert code == 250
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1)
            status, text, _ = await client.call("GET", "/metrics")
            assert status == 200
            anomalies = {s.labels["verdict"]: s.value
                         for f in text_string_to_metric_families(text) if f.name == "pecd_anomalies"
                         for s in f.samples}
            assert sum(anomalies.values()) == 1, anomalies

    asyncio.run(scenario())
