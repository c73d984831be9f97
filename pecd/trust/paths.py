"""Certificate paths: whether a certificate led to a trusted root at a given time, and under which
algorithms.

Receives certificates from anyone (a peer's message carries its own chain) and trusts only the
roots the caller passes. Path building and validation (RFC 5280: signatures, names, basic
constraints, key usage of CAs, validity at the time judged, CRL and OCSP content) are
pyhanko-certvalidator's, a maintained fork of wbond's certvalidator: it validates at a chosen
moment ("point in time", as ``openssl -attime`` does), lets the weak-digest list be configured
(the real PEC network still signs, and its 2014 intermediates were signed, with SHA-1), and
judges CRLs and OCSP responses handed to it. Fetching those is ``pecd.trust.revocation``'s job; here
nothing touches the network.

A provider sees the same few chains in every message, so a path validated without revocation is
remembered with the interval in which all its certificates are valid: inside it, the answer for
another time is the same.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors
from pyhanko_certvalidator.policy_decl import DisallowWeakAlgorithmsPolicy

from pecd.trust.verdict import (
    AlgorithmRefused,
    CertificateExpired,
    CertificateRevoked,
    CertificateUntrusted,
    RevocationUnknown,
    describe,
)

Purpose = Literal["smime", "timestamping", "any"]

KNOWN_DIGESTS = ("sha1", "sha224", "sha256", "sha384", "sha512")
_NEVER = frozenset({"md2", "md5"})  # refused whatever the configuration says


@dataclass(frozen=True)
class AlgorithmPolicy:
    """Which digests a signature we verify may use, in a message and in the certificates of its
    path. ``weak`` ones are accepted but marked in the verdict and the ledger: SHA-1 is what the
    Italian network signs with (every public sample, 2014 to 2024), and refusing it would refuse
    the network. pecd itself signs with SHA-256 only."""

    digests: frozenset[str] = frozenset(KNOWN_DIGESTS)
    weak: frozenset[str] = frozenset({"sha1"})

    @classmethod
    def from_names(cls, names: Iterable[str]) -> AlgorithmPolicy:
        chosen = frozenset(n.strip().lower().replace("-", "") for n in names)
        unknown = chosen - set(KNOWN_DIGESTS)
        if unknown:
            raise ValueError(f"unknown digest algorithm(s) {sorted(unknown)}; known: {KNOWN_DIGESTS}")
        if not chosen:
            raise ValueError("the digest allow-list is empty")
        return cls(digests=chosen)

    def check_digest(self, name: str) -> None:
        if name not in self.digests:
            raise AlgorithmRefused(
                f"digest algorithm {name} not accepted (allowed: {', '.join(sorted(self.digests))})")

    def is_weak(self, name: str) -> bool:
        return name in self.weak


DEFAULT_POLICY = AlgorithmPolicy()


@dataclass(frozen=True)
class RevocationInfo:
    """CRLs and OCSP responses (DER) gathered for a path; ``required``: a certificate of the path
    for which none of them gives a status is a failure (RevocationUnknown), not a pass."""

    crls: Sequence[bytes] = ()
    ocsps: Sequence[bytes] = ()
    required: bool = False


_PARSED = threading.local()


def _asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    """The asn1crypto form, parsed once per certificate *and thread*: asn1crypto parses lazily
    and is not thread-safe, and the reception point validates on several worker threads (a
    shared object once failed with "No field numbered 2")."""
    cache: dict[x509.Certificate, asn1_x509.Certificate] | None = getattr(_PARSED, "certs", None)
    if cache is None:
        cache = _PARSED.certs = {}
    found = cache.get(cert)
    if found is None:
        if len(cache) >= 1024:
            cache.clear()
        found = cache[cert] = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    return found


@functools.lru_cache(maxsize=64)
def _algorithm_policy(digests: frozenset[str]) -> DisallowWeakAlgorithmsPolicy:
    # certvalidator takes a deny-list: everything it might meet that we do not allow
    return DisallowWeakAlgorithmsPolicy(  # type: ignore[no-untyped-call]
        weak_hash_algos=_NEVER | (frozenset(KNOWN_DIGESTS) - digests),
        rsa_key_size_threshold=1024,  # 2014 chains still hold; pecd makes 2048-bit keys
    )


T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that, with fetching off, never waits on I/O: step it here (no event
    loop to build per certificate); if it ever does suspend, finish it on a private loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("path validation suspended: it was not meant to do I/O")


def _validate(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
              roots: Sequence[x509.Certificate], at: datetime, policy: AlgorithmPolicy,
              revocation: RevocationInfo | None) -> list[x509.Certificate]:
    by_der = {_asn1(c).dump(): c for c in (leaf, *intermediates, *roots)}
    if revocation is None:
        mode, crls, ocsps = "soft-fail", None, None
    else:
        mode = "require" if revocation.required else "soft-fail"
        crls, ocsps = list(revocation.crls), list(revocation.ocsps)
    context = ValidationContext(
        trust_roots=[_asn1(r) for r in roots],
        other_certs=[_asn1(c) for c in intermediates],
        moment=at,
        allow_fetching=False,
        crls=crls,
        ocsps=ocsps,
        revocation_mode=mode,
        # a CRL or OCSP answer issued after ``at`` still tells what held at ``at`` (the date of
        # revocation is compared with ``at``); without this, mail judged at its arrival is
        # "unknown" as soon as the cache was refreshed after it arrived (pecd.trust.revocation)
        retroactive_revinfo=revocation is not None,
        algorithm_usage_policy=_algorithm_policy(policy.digests),
    )
    validator = CertificateValidator(_asn1(leaf), [_asn1(c) for c in intermediates], context)
    try:
        path = _run(validator.async_validate_path())
    except cv_errors.RevokedError as exc:
        raise CertificateRevoked(f"{_who(exc, leaf)}: {exc.failure_msg}") from None
    except cv_errors.InsufficientRevinfoError as exc:
        raise RevocationUnknown(f"{_who(exc, leaf)}: {exc.failure_msg}") from None
    except (cv_errors.ExpiredError, cv_errors.NotYetValidError) as exc:
        raise CertificateExpired(f"{_who(exc, leaf)}: {exc.failure_msg} (judged at {at:%Y-%m-%d %H:%M:%S}Z)"
                                 ) from None
    except cv_errors.DisallowedAlgorithmError as exc:
        raise AlgorithmRefused(f"{_who(exc, leaf)}: {exc.failure_msg}") from None
    except cv_errors.PathBuildingError as exc:
        raise CertificateUntrusted(f"no path from {describe(leaf)} to a trusted root: {exc}") from None
    except cv_errors.PathValidationError as exc:
        raise CertificateUntrusted(f"{_who(exc, leaf)}: {exc.failure_msg}") from None
    except (cv_errors.ValidationError, ValueError) as exc:
        raise CertificateUntrusted(f"certificate {describe(leaf)}: {exc}") from None
    ordered = [by_der[c.dump()] for c in reversed(list(path.iter_certs(include_root=True)))
               if c.dump() in by_der]
    return ordered


_LINK = re.compile(r"(?:the )?(intermediate certificate (\d+)|end-entity certificate)")


def _who(exc: cv_errors.PathValidationError, leaf: x509.Certificate) -> str:
    """Name the link that failed: certvalidator says 'intermediate certificate 1' (counted from
    the root); a person wants the subject."""
    found = _LINK.search(exc.failure_msg)
    if found is None or found.group(2) is None:
        return f"certificate {describe(leaf)}"
    try:
        certs = list(exc.current_path.iter_certs(include_root=True))
        return f"certificate {describe(x509.load_der_x509_certificate(certs[int(found.group(2))].dump()))}"
    except (AttributeError, IndexError, ValueError, TypeError):
        return f"a certificate above {describe(leaf)}"


class _PathCache:
    """Paths validated without revocation, with the interval where every certificate is valid."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[list[x509.Certificate], datetime, datetime]] = (
            OrderedDict())
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], at: datetime) -> list[x509.Certificate] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        path, start, end = entry
        return list(path) if start <= at <= end else None

    def put(self, key: tuple[Any, ...], path: list[x509.Certificate]) -> None:
        start = max(c.not_valid_before_utc for c in path)
        end = min(c.not_valid_after_utc for c in path)
        with self._lock:
            self._entries[key] = (list(path), start, end)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


_CACHE = _PathCache()


def validate_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: datetime,
    *,
    purpose: Purpose = "any",
    policy: AlgorithmPolicy = DEFAULT_POLICY,
    revocation: RevocationInfo | None = None,
) -> list[x509.Certificate]:
    """The validated path leaf → … → one of ``roots`` at time ``at``, or a CertificateUntrusted
    (or one of its kinds) that names the link that failed. ``purpose`` checks the leaf's key
    usage for what it just signed."""
    if at.tzinfo is None:
        raise ValueError("validate_path needs an aware datetime")
    check_purpose(leaf, purpose)
    if leaf in roots:  # a pinned certificate: trusted as itself, still only while valid
        if not leaf.not_valid_before_utc <= at <= leaf.not_valid_after_utc:
            raise CertificateExpired(
                f"certificate {describe(leaf)} is not valid at {at:%Y-%m-%d %H:%M:%S}Z "
                f"(valid {leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d})")
        return [leaf]
    key = (leaf, tuple(intermediates), tuple(roots), policy.digests)
    if revocation is None:
        cached = _CACHE.get(key, at)
        if cached is not None:
            return cached
    path = _validate(leaf, intermediates, roots, at, policy, revocation)
    _check_anchor(path[-1])
    if revocation is None:
        _CACHE.put(key, path)
    return path


def _check_anchor(root: x509.Certificate) -> None:
    """certvalidator takes any trust root as an anchor; a configured end-entity certificate may
    be pinned as itself (above) but never issue: CA flag (old v1 roots lack it) and keyCertSign."""
    try:
        if not root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateUntrusted(f"root {describe(root)} is not a CA")
    except x509.ExtensionNotFound:
        pass
    try:
        if not root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise CertificateUntrusted(f"root {describe(root)} is not a CA (no keyCertSign)")
    except x509.ExtensionNotFound:
        pass


def check_purpose(cert: x509.Certificate, purpose: Purpose) -> None:
    """Key usage and extended key usage fit for what the certificate just did."""
    if purpose == "any":
        return
    try:
        ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    try:
        eku_ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        eku: x509.ExtendedKeyUsage | None = eku_ext.value
        eku_critical = eku_ext.critical
    except x509.ExtensionNotFound:
        eku, eku_critical = None, False
    if ku is not None and not (ku.digital_signature or ku.content_commitment):
        raise CertificateUntrusted(f"{describe(cert)}: key usage does not allow signatures")
    if purpose == "smime":
        allowed = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if eku is not None and not allowed.intersection(eku):
            raise CertificateUntrusted(f"{describe(cert)}: extended key usage excludes e-mail")
    elif purpose == "timestamping" and (
        # RFC 3161 §2.3: exactly timeStamping, and critical
        eku is None or list(eku) != [ExtendedKeyUsageOID.TIME_STAMPING] or not eku_critical
    ):
        raise CertificateUntrusted(
            f"{describe(cert)}: not a TSA certificate (needs the one critical EKU timeStamping)"
        )


__all__ = [
    "DEFAULT_POLICY",
    "AlgorithmPolicy",
    "Purpose",
    "RevocationInfo",
    "check_purpose",
    "validate_path",
]
