"""What a signature check concluded, in classes a program can branch on and words a person can read.

Every failure of a signed PEC message falls in one class: the content was altered after signing,
the signer's certificate does not lead to a trusted root, it had expired (or was not yet valid)
or was revoked at the signing time, its revocation status could not be learnt, the timestamp is
missing or invalid, the digest algorithm is refused, or the input is not a signed message at all.
The reception point names its anomaly reasons and ledger rows with the same ``kind`` words that
``pecd verify`` prints and turns into its exit status, so a person, a program and the ledger agree.

Pure: no I/O. Receives exceptions and certificates, returns words and numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509


class SignatureInvalid(Exception):
    """The signature does not verify; the message says why. Base class; as such: malformed input."""

    kind = "malformed"


class ContentAltered(SignatureInvalid):
    """The structure is sound but the content, or the signed attributes, changed after signing."""

    kind = "altered"


class AlgorithmRefused(SignatureInvalid):
    """The signature uses a digest or scheme outside the configured allow-list."""

    kind = "algorithm-refused"


class TimestampProblem(SignatureInvalid):
    """The RFC 3161 timestamp is required but missing, or present and not valid."""

    kind = "timestamp"


class CertificateUntrusted(SignatureInvalid):
    """The signature is intact but its certificate does not lead to a trusted root at that time."""

    kind = "untrusted"


class CertificateExpired(CertificateUntrusted):
    """A certificate of the path was expired, or not yet valid, at the time judged."""

    kind = "expired"


class CertificateRevoked(CertificateUntrusted):
    """Revocation information says a certificate of the path was revoked at the time judged."""

    kind = "revoked"


class RevocationUnknown(CertificateUntrusted):
    """Revocation was required but no usable CRL or OCSP answer could be had."""

    kind = "revocation-unknown"


# Documented exit statuses of `pecd verify` (README "Joining a real PEC network"); click itself
# uses 1 (error) and 2 (usage), so ours start at 10.
EXIT_CODES: dict[str, int] = {
    "valid": 0,
    "untrusted": 10,
    "altered": 11,
    "expired": 12,
    "revoked": 13,
    "revocation-unknown": 14,
    "timestamp": 15,
    "algorithm-refused": 16,
    "malformed": 17,
}

HEADLINES: dict[str, str] = {
    "valid": "VALID: intact, signed by a trusted certificate",
    "untrusted": "NOT TRUSTED: intact, but the signer's certificate is not trusted",
    "altered": "NOT VALID: content altered after signing",
    "expired": "NOT VALID: a certificate was expired or not yet valid at the time judged",
    "revoked": "NOT VALID: a certificate was revoked at the time judged",
    "revocation-unknown": "UNDETERMINED: the certificate's revocation status could not be learnt",
    "timestamp": "NOT VALID: timestamp missing or invalid",
    "algorithm-refused": "NOT VALID: algorithm not accepted",
    "malformed": "NOT VALID: not a signed PEC message, or malformed",
}


def kind_of(exc: BaseException) -> str:
    """The verdict class of an exception raised while checking a message."""
    kind = getattr(exc, "kind", None)
    return kind if isinstance(kind, str) and kind in EXIT_CODES else "malformed"


def describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


@dataclass
class Verdict:
    """One message judged: the class, the reason, and what was established on the way."""

    kind: str
    reason: str = ""
    judged_at: datetime | None = None
    signer: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    signing_time: datetime | None = None
    timestamp_time: datetime | None = None
    digest: str | None = None
    weak_digest: bool = False
    pec: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    @property
    def headline(self) -> str:
        return HEADLINES[self.kind]

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.kind,
            "valid": self.kind == "valid",
            "exit_code": self.exit_code,
            "headline": self.headline,
            "reason": self.reason,
            "judged_at": self.judged_at.isoformat() if self.judged_at else None,
            "signer": describe(self.signer) if self.signer is not None else None,
            "chain": [describe(c) for c in self.chain],
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "timestamp_time": self.timestamp_time.isoformat() if self.timestamp_time else None,
            "digest_algorithm": self.digest,
            "weak_digest": self.weak_digest,
            "pec": self.pec,
        }
