"""Judge a signed PEC message as anyone holding it would: no provider, only the roots they trust.

Receives a whole message (an envelope, a receipt, a notice) from anywhere and the trust roots the
caller chose; returns a :class:`pecd.trust.verdict.Verdict`, never raises for bad input. The signature's
integrity is judged before trust, so "altered after signing" and "intact but not trusted" stay
apart, and an untrusted verdict still says who signed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509

from pecd.format import pec
from pecd.trust import cms, smime
from pecd.trust.paths import DEFAULT_POLICY, AlgorithmPolicy
from pecd.trust.verdict import SignatureInvalid, Verdict, kind_of


def judge(data: bytes, roots: Sequence[x509.Certificate], *, at: datetime | None = None,
          policy: AlgorithmPolicy = DEFAULT_POLICY, require_timestamp: bool = False,
          tsa_roots: Sequence[x509.Certificate] | None = None) -> Verdict:
    """The verdict on one message. ``at``: judge the certificates at this time instead of the
    timestamp's (or, without one, the signer's claimed signing time)."""
    try:
        signed = smime.split_signed(data)
    except smime.NotSigned as exc:
        return Verdict("malformed", f"not an S/MIME signed message: {exc}", judged_at=at)
    try:
        checked = cms.check_signed_data(signed.signature, signed.inner_view, policy=policy)
    except SignatureInvalid as exc:
        return Verdict(kind_of(exc), str(exc), judged_at=at)
    verdict = Verdict("valid", judged_at=at, signer=checked.signer, signing_time=checked.signing_time,
                      digest=checked.digest, weak_digest=policy.is_weak(checked.digest))
    try:
        info = cms.verify_detached(signed.signature, signed.inner_view, roots, tsa_roots,
                                   require_timestamp, at=at, policy=policy)
    except SignatureInvalid as exc:
        verdict.kind, verdict.reason = kind_of(exc), str(exc)
    else:
        verdict.chain = info.certificates
        verdict.timestamp_time = info.timestamp_time
        verdict.judged_at = info.judged_at
    verdict.pec = _pec_summary(data)
    return verdict


def _pec_summary(data: bytes) -> dict[str, object]:
    try:
        parsed = pec.parse(data)
    except pec.NotPec as exc:
        return {"structure": f"not a PEC message: {exc}"}
    summary: dict[str, object] = {"category": parsed.category}
    cd = parsed.certdata
    if cd is not None:
        summary.update({
            "type": cd.type, "error": cd.error, "identifier": cd.identifier, "sender": cd.sender,
            "recipients": [{"address": r.address, "kind": r.kind} for r in cd.recipients],
            "issuer": cd.issuer, "time": cd.time.isoformat(),
        })
    return summary


SYSTEM_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's ca-certificates bundle


def load_roots(paths: Sequence[Path]) -> list[x509.Certificate]:
    """Certificates from PEM files, or from every PEM/CRT file of a directory (an OpenSSL-style
    CA directory such as /etc/ssl/certs, whose links are followed)."""
    roots: list[x509.Certificate] = []
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".crt") and p.is_file()) \
            if path.is_dir() else [path]
        for file in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old roots with negative serials still load
                try:
                    roots.extend(x509.load_pem_x509_certificates(file.read_bytes()))
                except ValueError as exc:
                    if not path.is_dir():
                        raise ValueError(f"{file}: no PEM certificate ({exc})") from None
    return list(dict.fromkeys(roots))
