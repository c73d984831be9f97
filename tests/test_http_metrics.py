"""``/metrics`` after a real certified cycle between two providers, parsed with
``prometheus_client``'s own parser: the acceptance and delivery latency histograms count the
message once each (and keep counting it once over later scrapes), their buckets add up, and an
external TSA that cannot be reached is counted as a TSA error next to the fallback it caused."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import ProviderDir, free_port, wait_for
from .http_support import Api, api, message, token_for
from .pechelpers import configure


async def _scrape(client: Api) -> tuple[dict[str, Any], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    status, text, _ = await client.call("GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    return families, samples


def _histogram(families: dict[str, Any], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) per bucket, the count and the sum of one histogram."""
    family = families[name]
    assert family.type == "histogram"
    buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples
                     if s.name == f"{name}_bucket")
    count = next(s.value for s in family.samples if s.name == f"{name}_count")
    total = next(s.value for s in family.samples if s.name == f"{name}_sum")
    return buckets, count, total


def test_metrics_after_a_certified_cycle_have_latency_histograms_and_tsa_errors(
        two_providers: tuple[ProviderDir, ProviderDir]) -> None:
    a, b = two_providers
    # an external TSA nobody answers at: the built-in one stands in, and both are counted
    configure(a, "tsa", url=f"http://127.0.0.1:{free_port()}/tsr")
    token = token_for(a, "alice@a.test")

    async def scenario() -> None:
        async with api(a, b) as client:
            families, _ = await _scrape(client)
            assert _histogram(families, "pecd_acceptance_latency_seconds")[1] == 0
            assert _histogram(families, "pecd_delivery_latency_seconds")[1] == 0
            status, body, _ = await client.call("POST", "/api/v1/messages", token=token,
                                                json_body=message())
            assert status == 202, body
            await wait_for(lambda: any(b"avvenuta-consegna" in m
                                       for m in a.messages("alice@a.test")))

            async def delivered() -> dict[str, Any]:
                for _ in range(500):
                    families, _ = await _scrape(client)
                    if _histogram(families, "pecd_delivery_latency_seconds")[1] >= 1:
                        return families
                    await asyncio.sleep(0.02)
                raise AssertionError("the delivery receipt was never counted")

            families = await delivered()
            for _ in range(2):  # counted once, however often it is scraped
                for name in ("pecd_acceptance_latency_seconds", "pecd_delivery_latency_seconds"):
                    buckets, count, total = _histogram(families, name)
                    assert count == 1, name
                    assert buckets[-1] == (float("inf"), 1)
                    counts = [n for _, n in buckets]
                    assert counts == sorted(counts)  # cumulative
                    assert total >= 0
                families, samples = await _scrape(client)
            assert samples[("pecd_tsa_errors_total", (("kind", "unavailable"),))] >= 1
            assert samples[("pecd_tsa_errors_total", (("kind", "invalid"),))] == 0
            assert samples[("pecd_tsa_fallbacks_total", ())] >= 1
            assert families["pecd_tsa_errors"].type == "counter"
            for source in ("crl", "ocsp"):
                assert ("pecd_revocation_fetch_errors_total", (("source", source),)) in samples

    asyncio.run(scenario())
