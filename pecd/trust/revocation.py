"""Revocation of peers' signing certificates at the reception point (RFC 6109 §2.2.2, §7).

Gets the material: the CRLs of a certificate's CRL distribution points and OCSP responses from
the responder its AIA names, fetched over HTTP with aiohttp (never on the event loop's time:
each fetch has a timeout and a size limit). A download is checked before it is kept (parses,
names the issuer, is signed by the issuer's key or, for OCSP, by a responder that key
certified, nextUpdate still ahead, not older than the copy in force), so a bad one never
replaces a good one. Copies are cached until nextUpdate (refreshed from three quarters of
their life on, while the old copy still holds), in memory and in the database (kept across
restarts). Then has pecd.trust.paths (pyhanko-certvalidator) judge whether a certificate of the
signer's path was revoked at the arrival time, and applies ``[reception] revocation``: while
the status is unknown a peer is deferred (``451``, it retries) until the grace runs out, then
the message becomes an anomaly envelope. Never a silent accept.

Receives: certificates from messages not yet judged. Fetches only for a signer certificate
that is in the provider index (the operator imported it), so a stranger's certificate cannot
make pecd fetch from addresses of its choosing. Trusts: the issuer's key for what it signs;
nothing the HTTP servers say beyond that.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import aiohttp
from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from pecd.clock import Clock
from pecd.config import Reception
from pecd.store import revocation_store as store
from pecd.store.db import Database
from pecd.trust import cms, smime
from pecd.trust.index import ProviderIndex
from pecd.trust.paths import DEFAULT_POLICY, AlgorithmPolicy, RevocationInfo, validate_path
from pecd.trust.pki import cert_fingerprint
from pecd.trust.verdict import CertificateRevoked, CertificateUntrusted, RevocationUnknown

log = logging.getLogger("pecd.revocation")

OCSP_DEFAULT_VALIDITY = 1800.0  # a response without nextUpdate (certvalidator's default too)
_CLOCK_SKEW = 300.0  # thisUpdate may be this far ahead of our clock
_REFRESH_AT = 0.75  # of a copy's life: fetch a newer one while it still holds
_MAX_SOURCES = 4  # of each kind per certificate: a certificate is not a crawler's seed list


class RevocationError(Exception):
    """A CRL or OCSP download that cannot be used; the message says why."""


@dataclass(frozen=True)
class Material:
    """The revocation information in force for one certificate, and what could not be had."""

    info: RevocationInfo
    sources: int  # CRL distribution points + OCSP responders the certificate names (http)
    problems: tuple[str, ...] = ()
    copies: tuple[str, ...] = ()  # which copies (source, thisUpdate, fetched): judgements' key

    @property
    def known(self) -> bool:
        """Something usable is in force (a certificate naming no source needs nothing)."""
        return self.sources == 0 or bool(self.info.crls or self.info.ocsps)


@dataclass(frozen=True)
class Status:
    """The judgement: ``good`` (not revoked at that time), ``revoked``, ``unknown`` (no usable
    material), ``unchecked`` (the certificate names no revocation source), ``invalid`` (the
    validator refused the certificate for another reason, named)."""

    state: Literal["good", "revoked", "unknown", "unchecked", "invalid"]
    reason: str = ""
    kind: str = ""  # the verdict class (pecd.trust.verdict) for the anomaly's ledger row

    @property
    def refused(self) -> bool:
        return self.state in ("revoked", "invalid")


@dataclass(frozen=True)
class Signed:
    """The signer of a CMS signature and the other certificates it carries, not yet judged."""

    signer: x509.Certificate
    others: tuple[x509.Certificate, ...]


# --------------------------------------------------------------------------- pure: certificates


def crl_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """HTTP URLs of the CRL distribution points (LDAP ones are not fetched)."""
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    urls = [n.value for dp in dps for n in (dp.full_name or ())
            if isinstance(n, x509.UniformResourceIdentifier)
            and n.value.lower().startswith(("http://", "https://"))]
    return tuple(dict.fromkeys(urls))[:_MAX_SOURCES]


def ocsp_urls(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return ()
    urls = [d.access_location.value for d in aia
            if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)
            and d.access_location.value.lower().startswith(("http://", "https://"))]
    return tuple(dict.fromkeys(urls))[:_MAX_SOURCES]


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def signed_by(signature_der: bytes) -> Signed | None:
    """The signer certificate of a SignedData and the certificates it carries, without
    verifying anything: a cheap look before the real judgement. The usual shape is read
    without an object tree (cms.included_signer), any other through asn1crypto."""
    try:
        signer, included = cms.included_signer(signature_der)
        return Signed(signer, tuple(c for c in included if c != signer))
    except Exception:  # any surprise: the generic reading below decides
        pass
    try:
        ci = asn1_cms.ContentInfo.load(signature_der)
        sd = ci["content"]
        included = [] if isinstance(sd["certificates"], asn1_core.Void) else [
            x509.load_der_x509_certificate(c.chosen.dump())
            for c in sd["certificates"] if c.name == "certificate"][:32]
        sid = sd["signer_infos"][0]["sid"]
        if sid.name == "issuer_and_serial_number":
            serial = sid.chosen["serial_number"].native
            issuer_der = sid.chosen["issuer"].dump()
            signer = next(c for c in included if c.serial_number == serial
                          and c.issuer.public_bytes() == issuer_der)
        else:
            ski = sid.chosen.native
            signer = next(c for c in included
                          if _ski(c) == ski)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return None
    return Signed(signer, tuple(c for c in included if c != signer))


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


class _Memo:
    """Recent messages' answers, by the SHA-256 of the bytes: the SMTP pre-check and the
    reception point ask about the same message one after the other, and splitting the MIME
    and reading the CMS cost more than the signature check itself. Thread-safe."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, Signed | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bool, Signed | None]:
        with self._lock:
            if key not in self._entries:
                return False, None
            self._entries.move_to_end(key)
            return True, self._entries[key]

    def put(self, key: bytes, value: Signed | None) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


_SIGNERS = _Memo()  # a few hundred kB: the queue may hold thousands in between


def signer_of_message(data: bytes) -> Signed | None:
    """:func:`signed_by` for an S/MIME message; None when it is not one."""
    key = hashlib.sha256(data).digest()
    known, answer = _SIGNERS.get(key)
    if known:
        return answer
    # pec.parse remembers its answer, and the reception point parses the same bytes next
    from pecd.format import pec  # pec builds on pecd.trust

    try:
        signed = pec.parse(data).signed
    except pec.NotPec:
        signed = None
    if signed is None:  # not PEC: any S/MIME signer still counts, as before
        try:
            signed = smime.split_signed(data)
        except smime.NotSigned:
            signed = None
    answer = None if signed is None else signed_by(signed.signature)
    _SIGNERS.put(key, answer)
    return answer


def path_of(signed: Signed, roots: Sequence[x509.Certificate], at: datetime,
            policy: AlgorithmPolicy = DEFAULT_POLICY) -> list[x509.Certificate] | None:
    """The signer's validated path (leaf first, root last) without revocation, or None when it
    has none: the reception point refuses such a message whatever its revocation status."""
    try:
        return validate_path(signed.signer, signed.others, roots, at, purpose="smime",
                             policy=policy)
    except CertificateUntrusted:
        return None


# --------------------------------------------------------------------------- pure: checking downloads


def _ts(when: datetime) -> float:
    return when.timestamp()


def crl_key(url: str) -> str:
    return f"crl {url}"


def ocsp_key(url: str, cert: x509.Certificate, issuer: x509.Certificate) -> str:
    return f"ocsp {url} {cert_fingerprint(issuer)} {cert.serial_number:x}"


def check_crl(der: bytes, issuer: x509.Certificate, now: datetime, key: str,
              previous: store.Copy | None) -> store.Copy:
    """A downloaded CRL fit to replace ``previous``; RevocationError says why not."""
    try:
        if der.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(der)
            der = crl.public_bytes(serialization.Encoding.DER)
        else:
            crl = x509.load_der_x509_crl(der)
        if crl.issuer != issuer.subject:
            raise RevocationError(f"CRL issued by {crl.issuer.rfc4514_string()},"
                                  f" not by {issuer.subject.rfc4514_string()}")
        if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            raise RevocationError("CRL not signed by the certificate's issuer")
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        len(crl)  # parses every entry now: a malformed one is refused here, not in the judge
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise RevocationError(f"malformed CRL: {exc}") from None
    return _fresh(key, der, this_update, next_update, now, previous, "CRL")


def _fresh(key: str, der: bytes, this_update: datetime, next_update: datetime | None,
           now: datetime, previous: store.Copy | None, what: str) -> store.Copy:
    if next_update is None:
        if what == "CRL":
            raise RevocationError("CRL without nextUpdate: cannot tell how long it holds")
        next_update = this_update + timedelta(seconds=OCSP_DEFAULT_VALIDITY)
    if _ts(this_update) > now.timestamp() + _CLOCK_SKEW:
        raise RevocationError(f"{what} thisUpdate {this_update:%Y-%m-%d %H:%M:%S}Z is in the future")
    if next_update <= now:
        raise RevocationError(f"{what} is stale: nextUpdate {next_update:%Y-%m-%d %H:%M:%S}Z passed")
    if previous is not None and _ts(this_update) < previous.this_update:
        raise RevocationError(f"{what} is older than the copy in force (a replay?)")
    return store.Copy(key, der, _ts(this_update), _ts(next_update), now.timestamp())


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    return req.public_bytes(serialization.Encoding.DER)


def _verify_with(key: Any, signature: bytes, data: bytes,
                 algorithm: hashes.HashAlgorithm | None) -> bool:
    try:
        if algorithm is None:
            return False
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _responder_ok(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
    """Signed by the issuer itself, or by a responder certificate the issuer certified for
    OCSP signing (RFC 6960 §4.2.2.2)."""
    sig, tbs, algo = response.signature, response.tbs_response_bytes, response.signature_hash_algorithm
    if _verify_with(issuer.public_key(), sig, tbs, algo):
        return True
    for cert in response.certificates:
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if (ExtendedKeyUsageOID.OCSP_SIGNING in eku and _issued_by(cert, issuer)
                and _verify_with(cert.public_key(), sig, tbs, algo)):
            return True
    return False


def check_ocsp(der: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: datetime,
               key: str, previous: store.Copy | None) -> store.Copy:
    """An OCSP response about ``cert`` fit to replace ``previous``; RevocationError says why not."""
    try:
        response = ocsp.load_der_ocsp_response(der)
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise RevocationError(f"OCSP responder answered {response.response_status.name}")
        request = ocsp.load_der_ocsp_request(ocsp_request(cert, issuer))
        single = next((r for r in response.responses
                       if r.serial_number == cert.serial_number
                       and r.issuer_key_hash == request.issuer_key_hash), None)
        if single is None:
            raise RevocationError("OCSP response is not about this certificate")
        if not _responder_ok(response, issuer):
            raise RevocationError("OCSP response not signed by the issuer or its responder")
        if single.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
            raise RevocationError("OCSP responder does not know the certificate")
        this_update, next_update = single.this_update_utc, single.next_update_utc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise RevocationError(f"malformed OCSP response: {exc}") from None
    return _fresh(key, der, this_update, next_update, now, previous, "OCSP response")


# --------------------------------------------------------------------------- pure: judgement


def incomplete(materials: Sequence[Material]) -> Status | None:
    """``unchecked`` when no certificate names a source, ``unknown`` when one that does has
    nothing usable in force; None when there is material for the validator to judge."""
    declared = [m for m in materials if m.sources]
    if not declared:
        return Status("unchecked", "no certificate of the path names a CRL or OCSP responder")
    missing = [p for m in declared if not m.known for p in (m.problems or ("nothing usable",))]
    if missing:
        return Status("unknown", "revocation status unknown: " + "; ".join(missing),
                      RevocationUnknown.kind)
    return None


def judge(path: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
          materials: Sequence[Material], at: datetime,
          policy: AlgorithmPolicy = DEFAULT_POLICY) -> Status:
    """Was a certificate of ``path`` (leaf first, root last) revoked at ``at``? ``materials``
    holds what was gathered for each certificate below the root, in path order.

    pecd.trust.paths (pyhanko-certvalidator) reads the material: CRL scope and signature, OCSP
    responder authority, revocation date against ``at``. A certificate that names a source
    but has nothing usable in force makes the status unknown before the validator is asked;
    status is required of every certificate when each names a source (otherwise a
    certificate that names none could never pass). Runs in a worker thread."""
    early = incomplete(materials)
    if early is not None:
        return early
    key = _judgement_key(path, materials, policy)
    until = _GOOD.get(key) if key is not None else None
    if until is not None and at <= until:  # same path, same copies, none lists its certificates
        try:
            validate_path(path[0], path[1:-1], roots, at, purpose="smime", policy=policy)
        except CertificateUntrusted as exc:
            return Status("invalid", str(exc), exc.kind)
        return Status("good")
    declared = [m for m in materials if m.sources]
    info = RevocationInfo(crls=tuple(c for m in materials for c in m.info.crls),
                          ocsps=tuple(o for m in materials for o in m.info.ocsps),
                          required=len(declared) == len(materials))
    try:
        validate_path(path[0], path[1:-1], roots, at, purpose="smime", policy=policy,
                      revocation=info)
    except CertificateRevoked as exc:
        return Status("revoked", str(exc), exc.kind)
    except RevocationUnknown as exc:
        problems = [p for m in materials for p in m.problems]
        return Status("unknown", "; ".join([f"revocation status unknown: {exc}", *problems]),
                      exc.kind)
    except CertificateUntrusted as exc:
        return Status("invalid", str(exc), exc.kind)
    if key is not None:
        until = _unlisted_until(path, materials)
        if until is not None:
            _GOOD.put(key, until)
    return Status("good")


class _Judged:
    """Good judgements that hold whatever the time judged: a CRL that does not list any
    certificate of the path (an OCSP answer "good") says the same for every time it covers.
    The validator reads a big CRL in about 15 µs an entry (20,000 entries: 0.3 s); with this
    a provider's CRL is read once per copy, not once per message."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._keys: OrderedDict[tuple[Any, ...], datetime] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> datetime | None:
        """Until when the good judgement holds (the copies' earliest nextUpdate)."""
        with self._lock:
            return self._keys.get(key)

    def put(self, key: tuple[Any, ...], until: datetime) -> None:
        with self._lock:
            self._keys[key] = until
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)


_GOOD = _Judged()


def _judgement_key(path: Sequence[x509.Certificate], materials: Sequence[Material],
                   policy: AlgorithmPolicy) -> tuple[Any, ...] | None:
    if any(m.sources and not m.copies for m in materials):
        return None  # material not from Sources (no copy names): nothing to key on
    return (tuple(cert_fingerprint(c) for c in path), tuple(m.copies for m in materials),
            policy.digests)


def _unlisted_until(path: Sequence[x509.Certificate],
                    materials: Sequence[Material]) -> datetime | None:
    """The earliest nextUpdate of the material when no CRL lists a certificate of the path and
    every OCSP answer is "good"; None otherwise (then every message is judged afresh)."""
    serials = {(c.issuer.public_bytes(), c.serial_number) for c in path}
    ends: list[datetime] = []
    try:
        for m in materials:
            for der in m.info.crls:
                crl = x509.load_der_x509_crl(der)
                for issuer, serial in serials:
                    if (crl.issuer.public_bytes() == issuer
                            and crl.get_revoked_certificate_by_serial_number(serial) is not None):
                        return None
                if crl.next_update_utc is None:
                    return None
                ends.append(crl.next_update_utc)
            for der in m.info.ocsps:
                for r in ocsp.load_der_ocsp_response(der).responses:
                    if r.certificate_status != ocsp.OCSPCertStatus.GOOD:
                        return None
                    ends.append(r.next_update_utc
                                or r.this_update_utc + timedelta(seconds=OCSP_DEFAULT_VALIDITY))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None  # cannot tell: judge afresh
    return min(ends) if ends else None


# --------------------------------------------------------------------------- edge: fetching


@dataclass
class Sources:
    """The revocation material in force, fetched and refreshed on demand; one per provider.

    ``material`` never raises: what could not be fetched or was refused is in its problems,
    and the copy in force (if any) stays in use while it holds."""

    settings: Reception
    clock: Clock
    db: Database | None = None
    cpu: Executor | None = None
    _copies: dict[str, store.Copy] = field(default_factory=dict)
    _failed: dict[str, tuple[float, str]] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # fetches that failed or were refused, by source kind (for /metrics)
    errors: dict[str, int] = field(default_factory=lambda: {"crl": 0, "ocsp": 0})

    def load(self) -> None:
        """The copies kept in the database (at start: no fetch for what is still in force)."""
        if self.db is not None:
            self._copies = {c.key: c for c in self.db.transact_sync(store.load_copies)}

    async def material(self, cert: x509.Certificate, issuer: x509.Certificate) -> Material:
        """What is in force for ``cert`` (issued by ``issuer``), refreshed when due."""
        crl_sources = [(crl_key(u), u, None) for u in crl_urls(cert)]
        ocsp_sources = [(ocsp_key(u, cert, issuer), u, ocsp_request(cert, issuer))
                        for u in ocsp_urls(cert)]
        sources = len(crl_sources) + len(ocsp_sources)
        if sources == 0:
            return Material(RevocationInfo(), 0)
        problems: list[str] = []
        crls: list[bytes] = []
        ocsps: list[bytes] = []
        used: list[str] = []
        results = await asyncio.gather(*(self._get(key, url, body, cert, issuer)
                                         for key, url, body in [*crl_sources, *ocsp_sources]))
        for (key, url, _body), (copy, problem) in zip([*crl_sources, *ocsp_sources], results,
                                                      strict=True):
            if problem:
                problems.append(f"{url}: {problem}")
            if copy is not None:
                (crls if key.startswith("crl ") else ocsps).append(copy.der)
                used.append(f"{copy.key} {copy.this_update} {copy.fetched}")
        return Material(RevocationInfo(tuple(crls), tuple(ocsps), required=True), sources,
                        tuple(problems), tuple(used))

    def _in_force(self, key: str, now: float) -> store.Copy | None:
        copy = self._copies.get(key)
        return copy if copy is not None and now < copy.next_update else None

    async def _get(self, key: str, url: str, body: bytes | None, cert: x509.Certificate,
                   issuer: x509.Certificate) -> tuple[store.Copy | None, str]:
        """(copy in force after a refresh if one was due, what went wrong)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one fetch per source at a time; the others then see its result
            now = self.clock.now()
            copy = self._copies.get(key)
            if copy is not None and now.timestamp() < copy.this_update + _REFRESH_AT * (
                    copy.next_update - copy.this_update):
                return copy, ""
            failed = self._failed.get(key)
            if failed is not None and now.timestamp() - failed[0] < self.settings.revocation_retry:
                return self._in_force(key, now.timestamp()), failed[1]
            try:
                data = await self._fetch(url, body)
                loop = asyncio.get_running_loop()
                if body is None:
                    new = await loop.run_in_executor(self.cpu, check_crl, data, issuer, now, key,
                                                     copy)
                else:
                    new = await loop.run_in_executor(self.cpu, check_ocsp, data, cert, issuer,
                                                     now, key, copy)
            except RevocationError as exc:
                self._failed[key] = (now.timestamp(), str(exc))
                self.errors["crl" if body is None else "ocsp"] += 1
                log.warning("revocation source %s refused: %s", url, exc)
                return self._in_force(key, now.timestamp()), str(exc)
            self._failed.pop(key, None)
            if self.db is not None:
                await self.db.transact(lambda conn: store.store_copy(conn, new))
            self._copies[key] = new
            return new, ""

    async def _fetch(self, url: str, body: bytes | None) -> bytes:
        """GET a CRL or POST an OCSP request; at most ``max_crl_bytes``, within the timeout."""
        limit = self.settings.max_crl_bytes
        timeout = aiohttp.ClientTimeout(total=self.settings.revocation_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
                if body is None:
                    request = session.get(url, max_redirects=3)
                else:
                    request = session.post(url, data=body, max_redirects=3,
                                           headers={"Content-Type": "application/ocsp-request"})
                async with request as response:
                    if response.status != 200:
                        raise RevocationError(f"HTTP {response.status}")
                    if (response.content_length or 0) > limit:
                        raise RevocationError(f"{response.content_length} bytes, over the"
                                              f" limit of {limit}")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.content.iter_chunked(65536):
                        size += len(chunk)
                        if size > limit:
                            raise RevocationError(f"over the limit of {limit} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except RevocationError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise RevocationError(f"unreachable: {type(exc).__name__} {exc}".strip()) from None


# --------------------------------------------------------------------------- edge: policy


@dataclass(frozen=True)
class Decision:
    """``accept``: judge as usual (good, revoked or unchecked status, or grace over);
    ``defer``: not now, the status is unknown and the grace holds."""

    action: Literal["accept", "defer"]
    status: Status
    unknown_for: float = 0.0


class Checker:
    """Revocation at the reception point: sources, index, roots and the policy together."""

    def __init__(self, settings: Reception, sources: Sources, index: ProviderIndex,
                 roots: Sequence[x509.Certificate], clock: Clock, cpu: Executor | None,
                 policy: AlgorithmPolicy = DEFAULT_POLICY) -> None:
        self.settings = settings
        self.policy = policy
        self.sources = sources
        self.index = index
        self.roots = list(roots)
        self.clock = clock
        self.cpu = cpu
        self._since: dict[str, float] | None = None

    async def check(self, data: bytes, at: datetime, *, full: bool = True) -> Decision | None:
        """The decision for a message's signer at ``at``; None when there is nothing to check
        (not signed, or the signer is not a provider in the index: the reception point then
        refuses it anyway, and nothing is fetched for it).

        ``full=False`` (the SMTP pre-check) only asks whether material is in force for every
        certificate that names a source: the CRL itself is read once, by the reception point."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.cpu, self._signer_and_path, data, at)
        if found is None:
            return None
        signed, path = found
        materials = await asyncio.gather(*(self.sources.material(cert, issuer)
                                           for cert, issuer in itertools.pairwise(path)))
        if not full:
            early = incomplete(materials)
            if early is None or early.state == "unchecked":
                return Decision("accept", early or Status("good", "material in force"))
            return await self.decide(signed.signer, early)
        status = incomplete(materials)  # judge's own first answer, without a thread hop
        if status is None:
            status = await loop.run_in_executor(self.cpu, judge, path, self.roots, materials,
                                                at, self.policy)
        return await self.decide(signed.signer, status)

    def _signer_and_path(self, data: bytes, at: datetime
                         ) -> tuple[Signed, list[x509.Certificate]] | None:
        """The signer of a message in the index and its validated path, in one worker-thread
        call; None when it is not signed, the signer is no provider, or it has no path."""
        signed = signer_of_message(data)
        if signed is None or self.index.for_certificate(signed.signer) is None:
            return None
        path = path_of(signed, self.roots, at, self.policy)
        return None if path is None else (signed, path)

    async def decide(self, signer: x509.Certificate, status: Status) -> Decision:
        """Apply ``[reception] revocation`` to a status; the start of an unknown period is kept
        in the database, so a restart does not give a peer a new grace."""
        fingerprint = cert_fingerprint(signer)
        now = self.clock.now().timestamp()
        db = self.sources.db
        if self._since is None:  # mirrored in memory: a known status costs no write
            self._since = await db.transact(store.load_unknown) if db is not None else {}
        if status.state != "unknown":
            if self._since.pop(fingerprint, None) is not None and db is not None:
                await db.transact(lambda conn: store.status_known(conn, fingerprint),
                                  durable=False)
            return Decision("accept", status)
        since = self._since.get(fingerprint)
        if since is None:
            since = now
            if db is not None:  # not durable: a crash only restarts the grace
                since = await db.transact(
                    lambda conn: store.unknown_since(conn, fingerprint, now), durable=False)
            self._since[fingerprint] = since
        unknown_for = max(0.0, now - since)
        if self.settings.revocation == "defer" and unknown_for < self.settings.revocation_grace:
            return Decision("defer", status, unknown_for)
        return Decision("accept", status, unknown_for)
