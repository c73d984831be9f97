"""The provider index (RFC 6109 §4.5): which provider manages a domain, where it listens, and the
certificate its signatures must carry.

The index is the trust anchor of the reception point: an envelope is certified only if its signer's
certificate is listed here and the sender's domain belongs to that same provider. It has two kinds
of entries:

- *cards* (JSON), made by ``pecd index export`` and trusted one by one by ``pecd index import``:
  pecd-to-pecd setups, with the peer's host and port;
- the *index copy*: the index authority's directory, as a signed LDIF file or read from its LDAP
  server (``pecd.trust.index_ldif``, ``pecd.trust.index_sync``). It is replaced only as a whole and only by a
  copy that passed every check; a refused copy leaves the last good one in force. Its entries
  name a provider's certificates and/or their SHA-1 hashes (several during a renewal), no host:
  mail for them goes to the recipient's domain on port 25.

All SQL for both lives here.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pecd.store import Connection, providers, readings


class IndexError_(Exception):
    """A card or an index copy that cannot be imported."""


DEFAULT_PORT = 25  # index-copy entries carry no port: SMTP's


@dataclass(frozen=True)
class Provider:
    """One provider. A card has exactly one certificate in ``cert_pem`` and a host and port; an
    entry of the index copy has ``dn`` set, any number of certificates (``cert_pem`` the first,
    ``more_certs_pem`` the rest) and SHA-1 hashes of certificates, and no host (``""``)."""

    name: str
    domains: tuple[str, ...]
    host: str
    port: int
    service_address: str
    cert_pem: str
    more_certs_pem: tuple[str, ...] = ()
    cert_hashes: tuple[str, ...] = ()  # SHA-1 of the DER certificate, 40 lower-case hex digits
    unit: str = ""
    ldif_url: str = ""
    dn: str = ""  # set: from the index copy
    read_evidence: bool = False  # issues and accepts reading evidence (pecd.points.reading)

    @property
    def from_index_copy(self) -> bool:
        return bool(self.dn)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        """Parsed once per card: every envelope and receipt checks its signer against it."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @functools.cached_property
    def all_certificates(self) -> tuple[x509.Certificate, ...]:
        pems = ((self.cert_pem,) if self.cert_pem else ()) + self.more_certs_pem
        return tuple(x509.load_pem_x509_certificate(p.encode()) for p in pems)

    @functools.cached_property
    def all_sha1(self) -> frozenset[str]:
        """Every SHA-1 that identifies this provider's signer: listed hashes and listed certs."""
        return frozenset(self.cert_hashes) | {sha1_hex(c) for c in self.all_certificates}

    @functools.cached_property
    def fingerprint(self) -> str:
        """The provider's identity in queue destinations and duplicate detection: a card's
        certificate SHA-256; for an index-copy entry, a SHA-256 of its DN (stable across a
        certificate renewal)."""
        if self.dn:
            return hashlib.sha256(b"ldif:" + self.dn.lower().encode()).hexdigest()
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


def sha1_hex(cert: x509.Certificate) -> str:
    """providerCertificateHash: SHA-1 of the DER certificate (RFC 6109 §4.5), an identifier here,
    never a signature digest."""
    return cert.fingerprint(hashes.SHA1()).hex()


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


def store(conn: Connection, provider: Provider) -> None:
    """Insert or replace the entry for this certificate (several certificates may coexist)."""
    fp = provider.fingerprint
    providers.replace_card(conn, fp, provider.name, provider.host, provider.port,
                           provider.service_address, provider.cert_pem, provider.domains,
                           datetime.now(UTC).isoformat())
    if provider.read_evidence:
        readings.set_provider_flag(conn, fp, True)


def remove(conn: Connection, fp: str) -> int:
    return providers.remove_card(conn, fp)


def load_all(conn: Connection) -> list[Provider]:
    """The index copy's entries first, then the cards: for routing, a card the operator imported
    wins over the authority's entry for the same domain (the card knows host and port)."""
    return [*load_copy_entries(conn), *load_cards(conn)]


def load_cards(conn: Connection) -> list[Provider]:
    rows, domains = providers.cards(conn)
    flags = readings.provider_flags(conn)
    return [
        Provider(name=r["name"], domains=tuple(domains.get(r["fingerprint"], ())), host=r["host"],
                 port=r["port"], service_address=r["service_address"], cert_pem=r["cert_pem"],
                 read_evidence=flags.get(r["fingerprint"], False))
        for r in rows
    ]


class ProviderIndex:
    """An in-memory view for the hot path; :meth:`reload` picks up operator changes."""

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        self._by_domain: dict[str, Provider] = {}
        self._by_fp: dict[str, Provider] = {}
        self._by_sha1: dict[str, Provider] = {}
        self._providers: list[Provider] = []
        self.replace(providers)

    def replace(self, providers: Iterable[Provider]) -> None:
        """Swap in a new view at once (one assignment each): readers never see half of one."""
        providers = list(providers)
        by_domain: dict[str, Provider] = {}
        by_fp: dict[str, Provider] = {}
        by_sha1: dict[str, Provider] = {}
        for p in providers:
            for cert in p.all_certificates:
                by_fp[fingerprint(cert)] = p
            for h in p.all_sha1:
                by_sha1[h] = p
            for d in p.domains:
                by_domain[d] = p  # the newest import wins for routing
        self._by_domain, self._by_fp, self._by_sha1 = by_domain, by_fp, by_sha1
        self._providers = providers

    def for_domain(self, domain: str) -> Provider | None:
        return self._by_domain.get(domain.lower())

    def for_address(self, address: str) -> Provider | None:
        return self.for_domain(address.rpartition("@")[2])

    def for_certificate(self, cert: x509.Certificate) -> Provider | None:
        """The provider listing this certificate, or its SHA-1 hash (an index entry may list
        only the hash). Every listed certificate or hash holds, so both the old and the new
        certificate of a renewal do while the index lists both."""
        return self._by_fp.get(fingerprint(cert)) or self._by_sha1.get(sha1_hex(cert))

    def certificates(self) -> list[x509.Certificate]:
        return [c for p in self._providers for c in p.all_certificates]

    def providers(self) -> list[Provider]:
        return list(self._providers)


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# --------------------------------------------------------------------------- the index copy


@dataclass(frozen=True)
class IndexCopy:
    """The index authority's directory as accepted: where it came from, the bytes as received
    (the signed file; ``b""`` for a live LDAP read, which has no signature), what it holds."""

    source: str
    kind: str  # "ldif": a signed LDIF file; "ldap": read from an LDAP server
    raw: bytes
    providers: tuple[Provider, ...]
    signer: str = ""
    signed_at: datetime | None = None  # the signer's signingTime (or its timestamp's time)
    skipped: tuple[str, ...] = ()  # entries left out, and why

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class CopyInfo:
    source: str
    kind: str
    sha256: str
    signer: str
    signed_at: str | None
    fetched: str
    entries: int


def store_copy(conn: Connection, copy: IndexCopy, at: datetime) -> None:
    """Replace the index copy as a whole, inside the caller's transaction: the old entries and
    the old file go only when the new ones are written in the same commit. Refuses (IndexError_)
    a copy signed before the one in force (:func:`rollback_problem`)."""
    problem = rollback_problem(conn, copy)
    if problem:
        raise IndexError_(problem)
    providers.replace_copy(
        conn,
        (copy.source, copy.kind, copy.raw, copy.sha256, copy.signer,
         copy.signed_at.isoformat() if copy.signed_at else None, at.isoformat(),
         len(copy.providers)),
        [(p.dn, p.name, p.unit, p.service_address, json.dumps(list(p.domains)),
          json.dumps(list(p.cert_hashes)),
          json.dumps(([p.cert_pem] if p.cert_pem else []) + list(p.more_certs_pem)), p.ldif_url)
         for p in copy.providers],
    )


def copy_info(conn: Connection) -> CopyInfo | None:
    row = providers.copy_row(conn)
    if row is None:
        return None
    return CopyInfo(source=row["source"], kind=row["kind"], sha256=row["sha256"],
                    signer=row["signer"], signed_at=row["signed_at"], fetched=row["fetched"],
                    entries=row["entries"])


def rollback_problem(conn: Connection, copy: IndexCopy) -> str | None:
    """Why ``copy`` must not replace the one in force: it was signed before it. An older file,
    however well signed, may still list a certificate the authority has since withdrawn; whoever
    sits between us and the URL could serve it again."""
    signed_at = providers.copy_signed_at(conn)
    if signed_at is None or copy.signed_at is None:
        return None
    in_force = datetime.fromisoformat(signed_at)
    if copy.signed_at < in_force:
        return (f"signed {copy.signed_at.isoformat()}, before the copy in force "
                f"(signed {in_force.isoformat()}): an old index replayed")
    return None


def copy_raw(conn: Connection) -> bytes | None:
    """The signed file in force, as received (a re-check or an audit can verify it again)."""
    return providers.copy_raw(conn)


def load_copy_entries(conn: Connection) -> list[Provider]:
    found = []
    for r in providers.copy_entries(conn):
        certs: list[str] = json.loads(r["certs"])
        found.append(Provider(
            name=r["name"], domains=tuple(json.loads(r["domains"])), host="", port=DEFAULT_PORT,
            service_address=r["mail_receipt"], cert_pem=certs[0] if certs else "",
            more_certs_pem=tuple(certs[1:]), cert_hashes=tuple(json.loads(r["cert_hashes"])),
            unit=r["unit"], ldif_url=r["ldif_url"], dn=r["dn"],
        ))
    return found


def version(conn: Connection) -> tuple[int, str, str]:
    """Changes whenever a card or the index copy changes: the service reloads its view then."""
    return providers.version(conn)


def take_copy(conn: Connection, copy: IndexCopy, source: str, at: datetime) -> None:
    """Put ``copy`` in force (:func:`store_copy`, which may refuse it) with its
    ``index-updated`` ledger row, in the caller's transaction. The CLI and the scheduled
    refresh both take copies through here."""
    from pecd.store.ledger import LedgerEvent, append  # ledger imports nothing from here

    store_copy(conn, copy, at)
    append(conn, LedgerEvent(event="index-updated", detail={
        "source": source, "kind": copy.kind, "sha256": copy.sha256, "signer": copy.signer,
        "providers": len(copy.providers), "skipped": list(copy.skipped)}), at)


def refuse_copy(conn: Connection, source: str, at: datetime, reason: str) -> CopyInfo | None:
    """The ``index-refused`` ledger row for a copy not taken, naming the copy that stays in
    force; returns that copy's description (None: there is none)."""
    from pecd.store.ledger import LedgerEvent, append

    info = copy_info(conn)
    kept = [f"{info.source} of {info.fetched}"] if info else []
    append(conn, LedgerEvent(event="index-refused", detail={
        "source": source, "reason": reason, "kept": kept}), at)
    return info
