"""The provider index (RFC 6109 §4.5): which provider manages a domain, where it listens, and the
certificate its signatures must carry.

The index is the trust anchor of the reception point: an envelope is certified only if its signer's
certificate is listed here and the sender's domain belongs to that same provider. Entries travel
between operators as *cards* (JSON), made by ``pecd index export`` and trusted by ``pecd index
import``; nothing enters the index from the network.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pecd import readings


class IndexError_(Exception):
    """A card that cannot be imported."""


@dataclass(frozen=True)
class Provider:
    name: str
    domains: tuple[str, ...]
    host: str
    port: int
    service_address: str
    cert_pem: str
    read_evidence: bool = False  # issues and accepts reading evidence (pecd.reading)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        """Parsed once per card: every envelope and receipt checks its signer against it."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def card(self) -> str:
        return json.dumps({
            "pecd-provider-card": 1, "name": self.name, "domains": list(self.domains),
            "host": self.host, "port": self.port, "service_address": self.service_address,
            "certificate": self.cert_pem,
            **({"read_evidence": True} if self.read_evidence else {}),
        }, indent=2) + "\n"


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def parse_card(text: str) -> Provider:
    try:
        raw = json.loads(text)
        provider = Provider(
            name=str(raw["name"]),
            domains=tuple(str(d).lower() for d in raw["domains"]),
            host=str(raw["host"]),
            port=int(raw["port"]),
            service_address=str(raw["service_address"]),
            cert_pem=str(raw["certificate"]),
            read_evidence=raw.get("read_evidence", False) is True,
        )
        provider.certificate  # noqa: B018 - parse now so a bad card fails at import
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexError_(f"not a provider card: {exc}") from None
    if not provider.domains:
        raise IndexError_("a provider card must list at least one domain")
    return provider


def store(conn: sqlite3.Connection, provider: Provider) -> None:
    """Insert or replace the entry for this certificate (several certificates may coexist)."""
    fp = provider.fingerprint
    conn.execute("DELETE FROM providers WHERE fingerprint=?", (fp,))
    conn.execute(
        "INSERT INTO providers (fingerprint, name, host, port, service_address, cert_pem, imported)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (fp, provider.name, provider.host, provider.port, provider.service_address,
         provider.cert_pem, datetime.now(UTC).isoformat()),
    )
    conn.executemany("INSERT INTO provider_domains (domain, fingerprint) VALUES (?, ?)",
                     [(d, fp) for d in provider.domains])
    if provider.read_evidence:
        readings.set_provider_flag(conn, fp, True)


def remove(conn: sqlite3.Connection, fp: str) -> int:
    return conn.execute("DELETE FROM providers WHERE fingerprint=?", (fp,)).rowcount


def load_all(conn: sqlite3.Connection) -> list[Provider]:
    domains: dict[str, list[str]] = {}
    for d, fp in conn.execute("SELECT domain, fingerprint FROM provider_domains ORDER BY domain"):
        domains.setdefault(fp, []).append(d)
    flags = readings.provider_flags(conn)
    return [
        Provider(name=r["name"], domains=tuple(domains.get(r["fingerprint"], ())), host=r["host"],
                 port=r["port"], service_address=r["service_address"], cert_pem=r["cert_pem"],
                 read_evidence=flags.get(r["fingerprint"], False))
        for r in conn.execute("SELECT * FROM providers ORDER BY name, imported")
    ]


class ProviderIndex:
    """An in-memory view for the hot path; :meth:`reload` picks up operator changes."""

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        self._by_domain: dict[str, Provider] = {}
        self._by_fp: dict[str, Provider] = {}
        self.replace(providers)

    def replace(self, providers: Iterable[Provider]) -> None:
        by_domain: dict[str, Provider] = {}
        by_fp: dict[str, Provider] = {}
        for p in providers:
            by_fp[p.fingerprint] = p
            for d in p.domains:
                by_domain[d] = p  # the newest import wins for routing
        self._by_domain, self._by_fp = by_domain, by_fp

    def for_domain(self, domain: str) -> Provider | None:
        return self._by_domain.get(domain.lower())

    def for_address(self, address: str) -> Provider | None:
        return self.for_domain(address.rpartition("@")[2])

    def for_certificate(self, cert: x509.Certificate) -> Provider | None:
        return self._by_fp.get(fingerprint(cert))

    def certificates(self) -> list[x509.Certificate]:
        return [p.certificate for p in self._by_fp.values()]


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
