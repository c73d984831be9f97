"""RFC 3161 time-stamping: the built-in TSA, a client for an external one, and token verification.

LocalTSA receives requests (or bare data) from pecd itself or, through ``respond``, from anyone;
it trusts only its clock. RemoteTSA trusts the TSA certificate it is configured with (or, without
one, the roots it is given). FallbackTimestamper stands the built-in TSA in for an unavailable
external one and reports every token it made that way.
``verify_token`` trusts nothing but the roots passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import rfc3161ng
from asn1crypto import algos, cms, core, tsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pecd.clock import Clock
from pecd.trust import der as _d
from pecd.trust.cms import (
    ID_CONTENT_TYPE,
    ID_CT_TST_INFO,
    ID_MESSAGE_DIGEST,
    SignatureInvalid,
    _der_tlv,
    _oid,
    _SignerCore,
    check_signed_data,
    der_attribute,
    der_generalized_time,
    der_integer,
)
from pecd.trust.paths import check_purpose, validate_path
from pecd.trust.pki import PrivateKey

DEFAULT_POLICY = "1.3.6.1.4.1.99999.1.1"
# Imprint digests a requester may choose; SHA-1 only because RFC 3161 clients still ask for it.
REQUEST_HASHES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# Imprint digests accepted when pecd verifies a token over its own data.
VERIFY_HASHES = ("sha256", "sha384", "sha512")


class TimestampInvalid(Exception):
    """A token that does not prove what it should; the message says why."""


class TimestampUnavailable(Exception):
    """No token could be obtained (network, HTTP, or the TSA refused)."""


class Timestamper(Protocol):
    def timestamp(self, data: bytes) -> bytes:
        """DER TimeStampToken (a CMS ContentInfo) whose imprint is sha256(data)."""
        ...


class _TimeStampResp(core.Sequence):  # type: ignore[misc]
    """asn1crypto 1.5.1 declares timeStampToken mandatory, so it cannot read or write refusals."""

    _fields = [  # noqa: RUF012 - asn1crypto's declaration style
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def _rejection(fail_info: str, text: str) -> bytes:
    status = tsp.PKIStatusInfo(
        {
            "status": "rejection",
            "status_string": [text],
            "fail_info": tsp.PKIFailureInfo({fail_info}),
        }
    )
    return _der_tlv(0x30, status.dump())


_GRANTED = bytes(tsp.PKIStatusInfo({"status": "granted"}).dump())
_NULL = b"\x05\x00"
_HASH_OID_DER = {
    name: bytes(core.ObjectIdentifier(algos.DigestAlgorithmId.unmap(name)).dump()) for name in REQUEST_HASHES
}


def _imprint(hash_name: str, digest: bytes, null_params: bool = False) -> bytes:
    """MessageImprint ::= SEQUENCE { hashAlgorithm AlgorithmIdentifier, hashedMessage OCTETS }"""
    alg = _der_tlv(0x30, _HASH_OID_DER[hash_name] + (_NULL if null_params else b""))
    return _der_tlv(0x30, alg + _der_tlv(0x04, digest))


class LocalTSA:
    """The built-in TSA. Runs for every receipt, so all per-certificate work is done once here.

    The token is joined from pre-encoded DER pieces: only the imprint, serial, time and nonce
    change from one token to the next.
    """

    def __init__(
        self,
        key: PrivateKey,
        cert: x509.Certificate,
        clock: Clock,
        policy_oid: str = DEFAULT_POLICY,
        *,
        chain: Sequence[x509.Certificate] = (),
        accuracy_seconds: int | None = 1,
    ) -> None:
        try:
            check_purpose(cert, "timestamping")
        except SignatureInvalid as exc:
            raise ValueError(str(exc)) from exc
        self._core = _SignerCore(key, cert, chain)
        self._clock = clock
        policy = core.ObjectIdentifier(policy_oid)
        self.policy_oid: str = policy.dotted
        self._policy_der = bytes(policy.dump())
        self._accuracy_der = (
            bytes(tsp.Accuracy({"seconds": accuracy_seconds}).dump()) if accuracy_seconds is not None else b""
        )
        self._content_type_attr = der_attribute(ID_CONTENT_TYPE, _oid(ID_CT_TST_INFO))
        # 127-bit serials: random per instance, then a counter, so never reused within a process
        self._serial_base = secrets.randbits(63) << 64
        self._counter = itertools.count(1)

    @property
    def certificate(self) -> x509.Certificate:
        return self._core.cert

    def _token(self, imprint_der: bytes, nonce: int | None, with_certs: bool) -> bytes:
        now = self._clock.now().astimezone(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        tst = (
            b"\x02\x01\x01"  # version v1
            + self._policy_der
            + imprint_der
            + der_integer(self._serial_base | next(self._counter))
            + der_generalized_time(now)
            + self._accuracy_der
            + (der_integer(nonce) if nonce is not None else b"")
        )
        tst_der = _der_tlv(0x30, tst)
        signed_attrs, signature = self._core.sign_attrs(
            [
                self._content_type_attr,
                der_attribute(ID_MESSAGE_DIGEST, _der_tlv(0x04, hashlib.sha256(tst_der).digest())),
                self._core.ess_attr_der,
            ]
        )
        return self._core.content_info(
            ID_CT_TST_INFO, tst_der, signed_attrs, signature, include_certs=with_certs
        )

    def timestamp(self, data: bytes) -> bytes:
        """A token over sha256(data), TSA certificate included so it verifies on its own."""
        return self._token(_imprint("sha256", hashlib.sha256(data).digest()), None, True)

    def respond(self, request_der: bytes) -> bytes:
        """A full TimeStampResp (RFC 3161 §2.4.2) for a DER TimeStampReq, e.g. an HTTP POST body.

        Bad requests get a rejection response, not an exception. The imprint is echoed as asked
        (including a NULL hash parameter); a nonce is copied; certReq decides whether the TSA
        certificate goes in.
        """
        try:
            req = tsp.TimeStampReq.load(request_der, strict=True)
            version = req["version"].native
            imprint = req["message_imprint"]
            hash_name = imprint["hash_algorithm"]["algorithm"].native
            params = imprint["hash_algorithm"]["parameters"]
            digest = imprint["hashed_message"].native
            policy = req["req_policy"]
            nonce = req["nonce"].native
            cert_req = bool(req["cert_req"].native)
            extensions = req["extensions"]
        except (ValueError, TypeError, KeyError) as exc:
            return _rejection("bad_data_format", f"malformed request: {exc}")
        if version != "v1":
            return _rejection("bad_data_format", f"unsupported request version {version}")
        if hash_name not in REQUEST_HASHES:
            return _rejection("bad_alg", f"unsupported hash algorithm {hash_name}")
        if not isinstance(params, core.Void | core.Null):
            return _rejection("bad_alg", f"unexpected parameters for {hash_name}")
        if not isinstance(digest, bytes) or len(digest) != REQUEST_HASHES[hash_name]:
            return _rejection("bad_data_format", f"imprint length does not fit {hash_name}")
        if not isinstance(policy, core.Void) and policy.dotted != self.policy_oid:
            return _rejection("unaccepted_policy", f"policy {policy.dotted} not offered")
        if not isinstance(extensions, core.Void) and len(extensions) > 0:
            return _rejection("unaccepted_extensions", "no extensions are supported")
        imprint_der = _imprint(hash_name, digest, null_params=isinstance(params, core.Null))
        token = self._token(imprint_der, nonce, cert_req)
        return _der_tlv(0x30, _GRANTED + token)


def _check_token(
    token_der: bytes,
    data: bytes,
    trust_roots: Sequence[x509.Certificate],
    nonce: int | None = None,
) -> tuple[datetime, x509.Certificate]:
    try:
        checked = check_signed_data(token_der, None, extra_certs=trust_roots, require_ess=True)
    except SignatureInvalid as exc:
        raise TimestampInvalid(str(exc)) from exc
    if checked.econtent_type != ID_CT_TST_INFO or checked.econtent is None:
        raise TimestampInvalid(f"content is {checked.econtent_type}, not TSTInfo")
    try:
        hash_name, hashed, gen_time, token_nonce = _tst_info_fast(checked.econtent)
    except (_d.NotDer, ValueError, KeyError, IndexError):
        hash_name, hashed, gen_time, token_nonce = _tst_info(checked.econtent)
    if hash_name not in VERIFY_HASHES:
        raise TimestampInvalid(f"imprint digest {hash_name} not accepted")
    if not hmac.compare_digest(hashed, hashlib.new(hash_name, data).digest()):
        raise TimestampInvalid("message imprint does not match the data")
    if nonce is not None and token_nonce != nonce:
        raise TimestampInvalid("nonce differs from the request's")
    if not isinstance(gen_time, datetime):
        raise TimestampInvalid("genTime missing")
    try:
        validate_path(checked.signer, checked.certificates, trust_roots, gen_time, purpose="timestamping")
    except SignatureInvalid as exc:
        raise TimestampInvalid(str(exc)) from exc
    return gen_time, checked.signer


def _tst_info(econtent: bytes) -> tuple[str, bytes, Any, int | None]:
    """(imprint digest name, imprint, genTime, nonce) of a TSTInfo, through asn1crypto."""
    try:
        tst = tsp.TSTInfo.load(econtent, strict=True)
        if tst["version"].native != "v1":
            raise TimestampInvalid(f"TSTInfo version {tst['version'].native}")
        return (tst["message_imprint"]["hash_algorithm"]["algorithm"].native,
                tst["message_imprint"]["hashed_message"].native,
                tst["gen_time"].native, tst["nonce"].native)
    except (ValueError, TypeError, KeyError) as exc:
        raise TimestampInvalid(f"malformed TSTInfo: {exc}") from exc


_IMPRINT_OIDS = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
# RFC 3161 §2.4.2: GeneralizedTime in UTC, fraction without trailing zeros
_GEN_TIME = re.compile(rb"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.(\d{0,5}[1-9]))?Z")


def _tst_info_fast(econtent: bytes) -> tuple[str, bytes, datetime, int | None]:
    """_tst_info for the usual shape, without an object tree: v1, a known imprint digest with
    absent or NULL parameters, a genTime of whole seconds or up to six decimals, nothing but
    optional fields after it. Anything else raises NotDer and goes the generic way."""
    start, end = _d.whole(econtent, 0x30)
    kids = list(_d.children(econtent, start, end))
    tags = [k[0] for k in kids]
    if tags[:5] != [0x02, 0x06, 0x30, 0x02, 0x18] or econtent[kids[0][2]:kids[0][3]] != b"\x01":
        raise _d.NotDer("TSTInfo head")
    optional = [(t, k) for t, k in zip(tags[5:], kids[5:], strict=True)]
    order = [0x30, 0x01, 0x02, 0xA0, 0xA1]  # accuracy, ordering, nonce, tsa, extensions
    at = 0
    nonce: int | None = None
    for tag, k in optional:
        if tag not in order[at:]:
            raise _d.NotDer("TSTInfo optional fields")
        at = order.index(tag) + 1
        if tag == 0x02:
            nonce = _d.integer(econtent, k[2], k[3])
    imprint = list(_d.children(econtent, kids[2][2], kids[2][3]))
    if len(imprint) != 2 or imprint[0][0] != 0x30 or imprint[1][0] != 0x04:
        raise _d.NotDer("MessageImprint")
    alg = list(_d.children(econtent, imprint[0][2], imprint[0][3]))
    if not alg or alg[0][0] != 0x06 or len(alg) > 2 or (
            len(alg) == 2 and econtent[alg[1][1]:alg[1][3]] != b"\x05\x00"):
        raise _d.NotDer("imprint AlgorithmIdentifier")
    hash_name = _IMPRINT_OIDS[_d.oid_dotted(econtent[alg[0][2]:alg[0][3]])]
    m = _GEN_TIME.fullmatch(econtent[kids[4][2]:kids[4][3]])
    if m is None:
        raise _d.NotDer("genTime")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction = m.group(7) or b""
    gen_time = datetime(year, month, day, hour, minute, second,
                        int(fraction.ljust(6, b"0")) if fraction else 0, tzinfo=UTC)
    return hash_name, econtent[imprint[1][2]:imprint[1][3]], gen_time, nonce


def verify_token(token_der: bytes, data: bytes, trust_roots: Sequence[x509.Certificate]) -> datetime:
    """genTime of a token whose imprint is hash(data), signed by a TSA that chains to trust_roots.

    The TSA certificate must be valid at genTime and carry the critical EKU timeStamping; the
    signer must be bound by an ESS signingCertificate(V2) attribute, as RFC 3161 §2.4.2 requires.
    """
    return _check_token(token_der, data, trust_roots)[0]


class _Client(rfc3161ng.RemoteTimestamper):  # type: ignore[misc]
    """rfc3161ng reads the token of a refusal as if it were there; look at the status first."""

    def check_response(self, response: Any, digest: bytes, nonce: int | None = None) -> Any:
        status = int(response["status"]["status"])
        if status not in (0, 1):  # granted, grantedWithMods
            text = ""
            if response["status"]["statusString"].isValue:
                text = "; ".join(str(s) for s in response["status"]["statusString"])
            raise TimestampUnavailable(f"{self.url}: TSA refused (status {status}) {text}".strip())
        return super().check_response(response, digest, nonce=nonce)


class RemoteTSA:
    """An external RFC 3161 TSA over HTTP (rfc3161ng client).

    Always SHA-256, a fresh nonce, and certReq so the token carries the TSA certificate. With
    ``cert`` the token must be signed by exactly that certificate; without it but with ``roots``
    the TSA certificate must chain to one of them (and carry the timeStamping EKU); with neither
    the token is only checked for imprint and nonce and is trusted later by ``verify_token``'s roots.
    """

    def __init__(self, url: str, cert: x509.Certificate | None, timeout: float = 10.0, *,
                 roots: Sequence[x509.Certificate] = ()) -> None:
        self.url = url
        self._cert = cert
        self._roots = list(roots)
        self.errors = {"unavailable": 0, "invalid": 0}  # failed calls, see timestamp()
        self._errors_lock = threading.Lock()
        # rfc3161ng's own check only knows RSA; for an EC TSA the check below is the one that counts
        rsa_cert = (
            cert.public_bytes(serialization.Encoding.PEM)
            if cert is not None and isinstance(cert.public_key(), rsa.RSAPublicKey)
            else None
        )
        self._client = _Client(
            url,
            certificate=rsa_cert,
            hashname="sha256",
            include_tsa_certificate=True,
            timeout=timeout,
        )

    def timestamp(self, data: bytes) -> bytes:
        """A token for ``data``; a failure is counted in :attr:`errors` (by ``unavailable`` or
        ``invalid``, for ``/metrics``) and raised."""
        try:
            return self._timestamp(data)
        except TimestampUnavailable:
            self._count("unavailable")
            raise
        except TimestampInvalid:
            self._count("invalid")
            raise

    def _count(self, kind: str) -> None:
        with self._errors_lock:
            self.errors[kind] += 1

    def _timestamp(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        nonce = secrets.randbits(63)
        try:
            raw = self._client(digest=digest, nonce=nonce)
        except TimestampUnavailable:
            raise
        except rfc3161ng.TimestampingError as exc:
            detail = ": ".join(str(arg) for arg in exc.args)
            raise TimestampUnavailable(f"{self.url}: {detail}") from exc
        except Exception as exc:  # rfc3161ng / pyasn1 report bad answers with many types
            raise TimestampInvalid(f"{self.url}: unusable response: {exc!r}") from exc
        token = bytes(raw)
        if self._cert is not None:
            _, signer = _check_token(token, data, [self._cert], nonce=nonce)
            if signer != self._cert:
                raise TimestampInvalid(f"{self.url}: token signed by another certificate")
        elif self._roots:
            try:
                _check_token(token, data, self._roots, nonce=nonce)
            except TimestampInvalid as exc:
                raise TimestampInvalid(f"{self.url}: {exc}") from exc
        else:
            _check_token_unpinned(token, data, nonce)
        return token


def _check_token_unpinned(token: bytes, data: bytes, nonce: int) -> None:
    """Imprint, nonce and signature against the token's own certificate; trust comes later."""
    try:
        checked = check_signed_data(token, None, require_ess=True)
    except SignatureInvalid as exc:
        raise TimestampInvalid(str(exc)) from exc
    _check_token(token, data, [checked.signer], nonce=nonce)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``cert`` certifies ``key`` (same public key): tells the built-in TSA's own pair
    apart from a pinned external TSA certificate configured in its place."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


@dataclass(frozen=True)
class FallbackUse:
    """One token made by the fallback TSA: over which bytes (``imprint_sha256``, the hex SHA-256
    the token's messageImprint carries) and why the primary was not used."""

    primary: str
    reason: str
    imprint_sha256: str


class FallbackTimestamper:
    """The primary (external) TSA first; the fallback (built-in) TSA when the primary cannot give a
    usable token, so signing never stops because a remote TSA is down.

    Nothing is hidden: every fallback token is reported to ``on_fallback`` before it is returned
    (the service writes a ``tsa-fallback`` ledger row; if that fails, so does the signature), and
    the token itself names the TSA that signed it. After a failure the primary is left alone for
    ``retry_after`` seconds, so an outage costs one timeout, not one per signature. Thread-safe.
    """

    def __init__(self, primary: Timestamper, fallback: Timestamper, *, name: str,
                 retry_after: float = 60.0,
                 on_fallback: Callable[[FallbackUse], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = name
        self.retry_after = retry_after
        self.on_fallback = on_fallback
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._skip_until = float("-inf")
        self._last_reason = ""

    def timestamp(self, data: bytes) -> bytes:
        with self._lock:
            resting = self._monotonic() < self._skip_until
            reason = self._last_reason
        if resting:
            reason = f"{reason} (primary not retried for {self.retry_after:g} s)"
        else:
            try:
                return self.primary.timestamp(data)
            except (TimestampUnavailable, TimestampInvalid) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._skip_until = self._monotonic() + self.retry_after
                    self._last_reason = reason
        token = self.fallback.timestamp(data)
        if self.on_fallback is not None:
            self.on_fallback(FallbackUse(self.name, reason[:500], hashlib.sha256(data).hexdigest()))
        return token


def errors_of(timestamper: Timestamper) -> dict[str, int]:
    """The external TSA's failed calls by kind (none for the built-in TSA alone)."""
    if isinstance(timestamper, FallbackTimestamper):
        return errors_of(timestamper.primary)
    if isinstance(timestamper, RemoteTSA):
        return dict(timestamper.errors)
    return {"unavailable": 0, "invalid": 0}
