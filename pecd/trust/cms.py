"""CMS SignedData (RFC 5652) with CAdES-T timestamps: how pecd signs, and checks signatures.

Signing receives our own key and certificate. Verification receives bytes from anyone and trusts
only the roots the caller passes: ``trust_roots`` for the signer, ``tsa_roots`` for timestamps.
cryptography has no CMS verification and cannot add unsigned attributes, so the structures are
built and parsed with asn1crypto and only the raw signatures are made and checked by cryptography.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from asn1crypto import cms, core, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pecd.clock import Clock
from pecd.format.blob import Blob
from pecd.trust import der as _d
from pecd.trust.paths import DEFAULT_POLICY, AlgorithmPolicy, RevocationInfo, validate_path
from pecd.trust.pki import PrivateKey
from pecd.trust.verdict import AlgorithmRefused, ContentAltered, TimestampProblem
from pecd.trust.verdict import (
    CertificateUntrusted as CertificateUntrusted,  # re-exported: callers catch them here
)
from pecd.trust.verdict import SignatureInvalid as SignatureInvalid

if TYPE_CHECKING:
    from pecd.trust.tsa import Timestamper

ID_SHA256 = "2.16.840.1.101.3.4.2.1"
ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ID_CT_TST_INFO = "1.2.840.113549.1.9.16.1.4"
ID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ID_SIGNING_TIME = "1.2.840.113549.1.9.5"
ID_AA_SIGNING_CERTIFICATE = "1.2.840.113549.1.9.16.2.12"
ID_AA_SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"
ID_AA_SIGNATURE_TIME_STAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"

# Digests known to the verifier; which of them a signature may use is the AlgorithmPolicy's call
# (pecd.trust.paths). pecd itself signs with SHA-256 only.
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_RSA_SIG_OIDS: dict[str, str | None] = {
    "1.2.840.113549.1.1.1": None,  # rsaEncryption: the hash is the SignerInfo's digestAlgorithm
    "1.2.840.113549.1.1.5": "sha1",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
}
_EC_SIG_OIDS: dict[str, str | None] = {
    "1.2.840.10045.2.1": None,  # id-ecPublicKey, as some producers write it
    "1.2.840.10045.4": None,
    "1.2.840.10045.4.1": "sha1",
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
}
ID_RSASSA_PSS = "1.2.840.113549.1.1.10"
_MAX_CERTIFICATES = 32



@dataclass(frozen=True)
class SignatureInfo:
    """What a verified signature proves.

    ``certificates`` is the validated path, signer first, trusted root last.
    ``signing_time`` is the signer's own claim; ``timestamp_time`` comes from a verified TSA token.
    ``digest`` is the SignerInfo's digest algorithm; ``weak_digest`` marks one the policy accepts
    only for interoperability (SHA-1, as the Italian network signs); ``judged_at`` is the time the
    path was validated at.
    """

    signer: x509.Certificate
    signing_time: datetime | None
    timestamp_time: datetime | None
    certificates: tuple[x509.Certificate, ...]
    digest: str = "sha256"
    weak_digest: bool = False
    judged_at: datetime | None = None


# --------------------------------------------------------------------------- DER helpers


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, contents: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(contents)) + contents


def _oid(dotted: str) -> bytes:
    return bytes(core.ObjectIdentifier(dotted).dump())


_OID_DER = {
    oid: _oid(oid)
    for oid in (
        ID_DATA,
        ID_SIGNED_DATA,
        ID_CT_TST_INFO,
        ID_CONTENT_TYPE,
        ID_MESSAGE_DIGEST,
        ID_SIGNING_TIME,
        ID_AA_SIGNING_CERTIFICATE_V2,
        ID_AA_SIGNATURE_TIME_STAMP_TOKEN,
    )
}
_INT_1 = b"\x02\x01\x01"
_INT_3 = b"\x02\x01\x03"


def der_attribute(oid: str, value_der: bytes) -> bytes:
    """Attribute ::= SEQUENCE { attrType OID, attrValues SET OF ANY } with a single value."""
    oid_der = _OID_DER.get(oid) or _oid(oid)
    return _der_tlv(0x30, oid_der + _der_tlv(0x31, value_der))


def der_time(when: datetime) -> bytes:
    """RFC 5652 §11.3: UTCTime for 1950-2049, GeneralizedTime otherwise; whole seconds."""
    when = when.astimezone(UTC).replace(microsecond=0)
    if 1950 <= when.year < 2050:
        return _der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der_generalized_time(when)


def der_generalized_time(when: datetime) -> bytes:
    """GeneralizedTime in UTC, the fraction without trailing zeros (X.690 §11.7), as
    asn1crypto writes it: joined here, as it is written for every signature and token."""
    when = when.astimezone(UTC)
    text = when.strftime("%Y%m%d%H%M%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return _der_tlv(0x18, (text + "Z").encode("ascii"))


def der_integer(value: int) -> bytes:
    """A DER INTEGER: two's complement, minimal length."""
    length = (value + (value < 0)).bit_length() // 8 + 1
    return _der_tlv(0x02, value.to_bytes(length, "big", signed=True))


# --------------------------------------------------------------------------- signing


class _SignerCore:
    """Everything about one key and certificate that stays the same from one signature to the next.

    Shared by ``Signer`` and the local TSA. The fixed parts are encoded once with asn1crypto;
    each signature then only joins byte strings: building asn1crypto objects per message cost
    ~10 ms, most of it re-serialising the same certificate names.
    """

    def __init__(
        self, key: PrivateKey, cert: x509.Certificate, chain: Sequence[x509.Certificate] = ()
    ) -> None:
        if key.public_key() != cert.public_key():
            raise ValueError("the private key does not belong to the certificate")
        self.key = key
        self.cert = cert
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        tbs = asn1_x509.Certificate.load(self.cert_der)["tbs_certificate"]
        cert_ders = [self.cert_der] + [c.public_bytes(serialization.Encoding.DER) for c in chain if c != cert]
        # certificates [0] IMPLICIT CertificateSet: a DER SET OF, so sorted
        self._certs_der = _der_tlv(0xA0, b"".join(sorted(cert_ders)))
        self._sid_der = bytes(
            cms.SignerIdentifier(
                name="issuer_and_serial_number",
                value=cms.IssuerAndSerialNumber(
                    {"issuer": tbs["issuer"], "serial_number": tbs["serial_number"]}
                ),
            ).dump()
        )
        # RFC 5754 §2: generate SHA-2 AlgorithmIdentifiers with absent parameters
        self._digest_alg_der = _der_tlv(0x30, _oid(ID_SHA256))
        self._digest_algs_der = _der_tlv(0x31, self._digest_alg_der)
        self._rsa = isinstance(key, rsa.RSAPrivateKey)
        if self._rsa:
            sig_alg = cms.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})
        else:
            sig_alg = cms.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
        self._sig_alg_der = bytes(sig_alg.dump())
        # ESS signingCertificateV2 (RFC 5035) binds the signer certificate into the signature;
        # openssl checks it both for CMS and for RFC 3161 tokens.
        ess = tsp.SigningCertificateV2(
            {
                "certs": [
                    {
                        "hash_algorithm": {"algorithm": "sha256"},  # DER: the default is omitted
                        "cert_hash": hashlib.sha256(self.cert_der).digest(),
                        "issuer_serial": {
                            "issuer": [asn1_x509.GeneralName(name="directory_name", value=tbs["issuer"])],
                            "serial_number": tbs["serial_number"],
                        },
                    }
                ]
            }
        )
        self.ess_attr_der = der_attribute(ID_AA_SIGNING_CERTIFICATE_V2, bytes(ess.dump()))
        self.sign_raw = self._make_sign_raw()

    def _make_sign_raw(self) -> Callable[[bytes], bytes]:
        key = self.key
        if isinstance(key, rsa.RSAPrivateKey):
            pad, algo = padding.PKCS1v15(), hashes.SHA256()
            return lambda data: key.sign(data, pad, algo)
        ecdsa = ec.ECDSA(hashes.SHA256())
        return lambda data: key.sign(data, ecdsa)

    def sign_attrs(self, attr_ders: list[bytes]) -> tuple[bytes, bytes]:
        """(SET OF contents, signature). The signature covers the DER SET OF (tag 0x31), not the
        [0] IMPLICIT tag it is stored under (RFC 5652 §5.4)."""
        contents = b"".join(sorted(attr_ders))
        return contents, self.sign_raw(_der_tlv(0x31, contents))

    def content_info(
        self,
        econtent_type: str,
        econtent: bytes | None,
        signed_attrs: bytes,
        signature: bytes,
        unsigned_attrs: Sequence[bytes] = (),
        include_certs: bool = True,
    ) -> bytes:
        """DER ContentInfo(SignedData) with one SignerInfo (issuerAndSerialNumber, so v1)."""
        signer_info = (
            _INT_1
            + self._sid_der
            + self._digest_alg_der
            + _der_tlv(0xA0, signed_attrs)
            + self._sig_alg_der
            + _der_tlv(0x04, signature)
        )
        if unsigned_attrs:
            signer_info += _der_tlv(0xA1, b"".join(sorted(unsigned_attrs)))
        oid_der = _OID_DER.get(econtent_type) or _oid(econtent_type)
        if econtent is not None:
            oid_der += _der_tlv(0xA0, _der_tlv(0x04, econtent))
        signed_data = (
            (_INT_1 if econtent_type == ID_DATA else _INT_3)  # RFC 5652 §5.1
            + self._digest_algs_der
            + _der_tlv(0x30, oid_der)
            + (self._certs_der if include_certs else b"")
            + _der_tlv(0x31, _der_tlv(0x30, signer_info))
        )
        return _der_tlv(0x30, _OID_DER[ID_SIGNED_DATA] + _der_tlv(0xA0, _der_tlv(0x30, signed_data)))


class Signer:
    """Makes pecd's signatures: SHA-256, signer certificate included, CAdES-T with a timestamper.

    Build one per key at start-up and reuse it: the per-certificate work happens here, once.
    When the timestamper fails its exception (tsa.TimestampUnavailable / TimestampInvalid)
    propagates: a signature that should carry a timestamp is never returned without one.
    """

    def __init__(
        self,
        key: PrivateKey,
        cert: x509.Certificate,
        clock: Clock,
        chain: Sequence[x509.Certificate] = (),
        timestamper: Timestamper | None = None,
    ) -> None:
        self._core = _SignerCore(key, cert, chain)
        self._clock = clock
        self._timestamper = timestamper
        self._content_type_attr = der_attribute(ID_CONTENT_TYPE, _OID_DER[ID_DATA])

    @property
    def certificate(self) -> x509.Certificate:
        return self._core.cert

    def sign_detached(self, data: bytes | Blob) -> bytes:
        """DER ContentInfo(SignedData) without the content; what S/MIME multipart/signed carries.
        A Blob is hashed piece by piece: a big envelope is signed without being joined."""
        digest = data.sha256() if isinstance(data, Blob) else hashlib.sha256(data).digest()
        return self._sign(digest, None)

    def sign_attached(self, data: bytes) -> bytes:
        """DER ContentInfo(SignedData) that carries ``data`` itself."""
        return self._sign(hashlib.sha256(data).digest(), data)

    def _sign(self, digest: bytes, econtent: bytes | None) -> bytes:
        core_ = self._core
        signed_attrs, signature = core_.sign_attrs(
            [
                self._content_type_attr,
                der_attribute(ID_SIGNING_TIME, der_time(self._clock.now())),
                der_attribute(ID_MESSAGE_DIGEST, _der_tlv(0x04, digest)),
                core_.ess_attr_der,
            ]
        )
        unsigned: list[bytes] = []
        if self._timestamper is not None:
            # CAdES-T (ETSI EN 319 122-1): the token's imprint is over the signature value octets
            token = self._timestamper.timestamp(signature)
            try:
                cms.ContentInfo.load(token, strict=True)  # one whole DER value, nothing after it
            except ValueError as exc:
                raise SignatureInvalid(f"timestamper returned a malformed token: {exc}") from exc
            unsigned.append(der_attribute(ID_AA_SIGNATURE_TIME_STAMP_TOKEN, token))
        return core_.content_info(ID_DATA, econtent, signed_attrs, signature, unsigned)


# --------------------------------------------------------------------------- verification


@dataclass
class _Checked:
    """A SignedData whose one signature verifies against the certificate it names."""

    signer: x509.Certificate
    certificates: list[x509.Certificate]
    econtent_type: str
    econtent: bytes | None
    signature: bytes
    signing_time: datetime | None
    unsigned: dict[str, list[bytes]]  # attribute type → each value's DER
    digest: str


def _load_der_cert(c: asn1_x509.Certificate) -> x509.Certificate:
    return _cert_from_der(c.dump())


# Certificate-level work depends only on the certificates' bytes, and a provider sees the same
# few certificates (its peers', the TSAs', the CAs') in every message: do it once per certificate.
@functools.lru_cache(maxsize=512)
def _cert_from_der(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


@functools.lru_cache(maxsize=512)
def _cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@functools.lru_cache(maxsize=512)
def _cert_issuer(cert: x509.Certificate) -> asn1_x509.Name:
    """Shared by the worker threads: parsed whole here (``.native``), since asn1crypto parses
    lazily and a lazy parse is not thread-safe."""
    issuer = asn1_x509.Certificate.load(_cert_der(cert))["tbs_certificate"]["issuer"]
    issuer.native  # noqa: B018 - parse every child now
    return issuer


def _find_signer(sid: cms.SignerIdentifier, candidates: Sequence[x509.Certificate]) -> x509.Certificate:
    if sid.name == "issuer_and_serial_number":
        want_issuer = sid.chosen["issuer"]
        want_serial = sid.chosen["serial_number"].native
        for cert in candidates:
            if cert.serial_number != want_serial:
                continue
            if _same_name(_cert_issuer(cert), want_issuer):
                return cert
    elif sid.name == "subject_key_identifier":
        want_ski = sid.chosen.native
        for cert in candidates:
            try:
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            if ski.value.digest == want_ski:
                return cert
    raise SignatureInvalid("the signer's certificate is not included")


def _same_name(a: asn1_x509.Name, b: asn1_x509.Name) -> bool:
    """Same DER is the common case and cheap; otherwise RFC 5280 §7.1 comparison (slow). A name
    inside a GeneralName carries its explicit [4] tag: compared without it."""
    return bool(a.untag().dump() == b.untag().dump() or a == b)


def _hash_name(algo: Any, policy: AlgorithmPolicy) -> str:
    name = str(algo["algorithm"].native)
    if name not in HASHES:
        raise AlgorithmRefused(f"digest algorithm {name} not known")
    policy.check_digest(name)
    return name


def _pss_params(params: Any, hash_name: str) -> padding.PSS:
    """RSASSA-PSS parameters (RFC 4055 §3.1): the hash must be the SignerInfo's, MGF1 with it."""
    hash_alg = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_hash = mgf["parameters"]["algorithm"].native
    if mgf["algorithm"].native != "mgf1":
        raise AlgorithmRefused(f"RSASSA-PSS mask generation {mgf['algorithm'].native} not supported")
    if hash_alg != hash_name or mgf_hash != hash_name:
        raise SignatureInvalid(
            f"RSASSA-PSS parameters ({hash_alg}, MGF1 {mgf_hash}) do not match {hash_name}")
    if params["trailer_field"].native not in (1, "trailer_field_bc"):
        raise SignatureInvalid("RSASSA-PSS trailer field must be 1")
    return padding.PSS(mgf=padding.MGF1(HASHES[hash_name]()), salt_length=int(params["salt_length"].native))


def verify_raw(public_key: Any, signature: bytes, data: bytes, hash_name: str, sig_oid: str,
               sig_params: Any = None) -> None:
    """One raw signature, RSA PKCS#1 v1.5, RSASSA-PSS or ECDSA; ``sig_oid`` (and, for PSS,
    ``sig_params``) are the SignerInfo's signature algorithm."""
    pss: padding.PSS | None = None
    implied: str | None
    if sig_oid == ID_RSASSA_PSS:
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise SignatureInvalid("RSA-PSS signature but the certificate's key is not RSA")
        if sig_params is None or isinstance(sig_params, core.Void):
            raise SignatureInvalid("RSASSA-PSS without parameters")
        pss, implied = _pss_params(sig_params, hash_name), None
    elif sig_oid in _RSA_SIG_OIDS:
        implied = _RSA_SIG_OIDS[sig_oid]
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise SignatureInvalid("RSA signature but the certificate's key is not RSA")
    elif sig_oid in _EC_SIG_OIDS:
        implied = _EC_SIG_OIDS[sig_oid]
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SignatureInvalid("ECDSA signature but the certificate's key is not EC")
    else:
        raise SignatureInvalid(f"signature algorithm {sig_oid} not supported")
    if implied is not None and implied != hash_name:
        raise SignatureInvalid(f"signature algorithm {sig_oid} does not match digest {hash_name}")
    hash_alg = HASHES[hash_name]()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, pss or padding.PKCS1v15(), hash_alg)
        else:
            public_key.verify(signature, data, ec.ECDSA(hash_alg))
    except InvalidSignature:
        raise ContentAltered("the signature value does not match the signed attributes") from None


def _check_ess(values: list[Any], kind: str, signer: x509.Certificate) -> None:
    """RFC 5035: the first ESSCertID names the signer certificate (hash; issuer+serial if set)."""
    if len(values) != 1:
        raise SignatureInvalid(f"{kind} attribute must have exactly one value")
    certs = values[0]["certs"]
    if len(certs) == 0:
        raise SignatureInvalid(f"{kind} attribute names no certificate")
    first = certs[0]
    der = _cert_der(signer)
    if kind == "signingCertificate":
        algo = "sha1"  # ESSCertID is SHA-1 by definition; it only identifies, the signature binds
    else:
        algo = first["hash_algorithm"]["algorithm"].native
        if algo not in HASHES:
            raise SignatureInvalid(f"{kind} uses digest {algo}, not accepted")
    if not hmac.compare_digest(hashlib.new(algo, der).digest(), first["cert_hash"].native):
        raise SignatureInvalid(f"{kind} attribute does not match the signer certificate")
    issuer_serial = first["issuer_serial"]
    if isinstance(issuer_serial, core.Void):
        return
    if issuer_serial["serial_number"].native != signer.serial_number:
        raise SignatureInvalid(f"{kind} attribute names another serial number")
    issuer = _cert_issuer(signer)
    if not any(
        gn.name == "directory_name" and _same_name(gn.chosen, issuer) for gn in issuer_serial["issuer"]
    ):
        raise SignatureInvalid(f"{kind} attribute names another issuer")


def check_signed_data(
    der: bytes,
    detached: bytes | memoryview | None,
    extra_certs: Sequence[x509.Certificate] = (),
    require_ess: bool = False,
    policy: AlgorithmPolicy = DEFAULT_POLICY,
) -> _Checked:
    """Parse a ContentInfo(SignedData) and verify its single SignerInfo, without any trust decision.

    Checks: structure, contentType and messageDigest attributes, ESS signing certificate when
    present (required with ``require_ess``), and the signature with the named certificate's key.

    The usual shape (plain DER, issuerAndSerialNumber, names byte-equal, PKCS#1 v1.5 or ECDSA)
    is read by :func:`_check_fast` without an object tree. It only ever accepts: anything else it
    meets, a failed check included, goes to the generic asn1crypto path, whose answer (and error
    message) is the one given.
    """
    try:
        return _check_fast(der, detached, extra_certs, require_ess, policy)
    except (_d.NotDer, _Unusual, SignatureInvalid, ValueError, TypeError, KeyError, IndexError,
            UnsupportedAlgorithm):
        pass
    return _check_generic(der, detached, extra_certs, require_ess, policy)


def _check_generic(
    der: bytes,
    detached: bytes | memoryview | None,
    extra_certs: Sequence[x509.Certificate],
    require_ess: bool,
    policy: AlgorithmPolicy,
) -> _Checked:
    """check_signed_data through asn1crypto's object tree: any shape CMS allows."""
    try:
        ci = cms.ContentInfo.load(der, strict=True)
        if ci["content_type"].dotted != ID_SIGNED_DATA:
            raise SignatureInvalid(f"not SignedData but {ci['content_type'].dotted}")
        sd = ci["content"]
        encap = sd["encap_content_info"]
        econtent_type = encap["content_type"].dotted
        econtent = None if isinstance(encap["content"], core.Void) else bytes(encap["content"])
        certificates = [
            _load_der_cert(c.chosen)
            for c in (sd["certificates"] if not isinstance(sd["certificates"], core.Void) else [])
            if c.name == "certificate"
        ]
        if len(certificates) > _MAX_CERTIFICATES:  # the path builder is not for certificate soup
            raise SignatureInvalid(f"{len(certificates)} certificates included, {_MAX_CERTIFICATES} at most")
        signer_infos = sd["signer_infos"]
        if len(signer_infos) != 1:
            raise SignatureInvalid(f"expected one SignerInfo, found {len(signer_infos)}")
        si = signer_infos[0]
        hash_name = _hash_name(si["digest_algorithm"], policy)
        signed_attrs = si["signed_attrs"]
        if isinstance(signed_attrs, core.Void):
            raise SignatureInvalid("signed attributes missing")
        # The bytes as received, taken before iterating: once asn1crypto has parsed the children
        # it re-serialises them on access, which is slow and need not give back the same bytes.
        signed_der = _der_tlv(0x31, bytes(signed_attrs.contents))
        if len(signed_attrs) == 0:
            raise SignatureInvalid("signed attributes missing")
        attrs: dict[str, list[Any]] = {}
        for attr in signed_attrs:
            oid = attr["type"].dotted
            if oid in attrs:
                raise SignatureInvalid(f"signed attribute {oid} appears twice")
            attrs[oid] = list(attr["values"])
        unsigned: dict[str, list[bytes]] = {}
        if not isinstance(si["unsigned_attrs"], core.Void):
            for attr in si["unsigned_attrs"]:
                unsigned.setdefault(attr["type"].dotted, []).extend(
                    bytes(v.dump()) for v in attr["values"])
        signature = si["signature"].native
        sig_oid = si["signature_algorithm"]["algorithm"].dotted
        sig_params = si["signature_algorithm"]["parameters"]
        signer = _find_signer(si["sid"], [*certificates, *extra_certs])

        if econtent is not None and detached is not None:
            raise SignatureInvalid("content both encapsulated and given separately")
        content = econtent if econtent is not None else detached
        if content is None:
            raise SignatureInvalid("content missing: detached signature and no data given")

        ct = attrs.get(ID_CONTENT_TYPE)
        if ct is None or len(ct) != 1 or ct[0].dotted != econtent_type:
            raise SignatureInvalid("contentType attribute missing or different from the content")
        md = attrs.get(ID_MESSAGE_DIGEST)
        if md is None or len(md) != 1:
            raise SignatureInvalid("messageDigest attribute missing")
        if not hmac.compare_digest(md[0].native, hashlib.new(hash_name, content).digest()):
            raise ContentAltered("messageDigest does not match the content: altered after signing")
        signing_time = None
        st = attrs.get(ID_SIGNING_TIME)
        if st is not None:
            if len(st) != 1:
                raise SignatureInvalid("signingTime attribute must have one value")
            signing_time = st[0].native
        if ID_AA_SIGNING_CERTIFICATE_V2 in attrs:
            _check_ess(attrs[ID_AA_SIGNING_CERTIFICATE_V2], "signingCertificateV2", signer)
        elif ID_AA_SIGNING_CERTIFICATE in attrs:
            _check_ess(attrs[ID_AA_SIGNING_CERTIFICATE], "signingCertificate", signer)
        elif require_ess:
            raise SignatureInvalid("ESS signingCertificate(V2) attribute missing")

        # Verify over the SET OF as received, re-tagged from [0] IMPLICIT to SET (RFC 5652 §5.4).
        verify_raw(signer.public_key(), signature, signed_der, hash_name, sig_oid, sig_params)
    except SignatureInvalid:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # asn1crypto parses lazily and reports malformed input with any of these
        raise SignatureInvalid(f"malformed CMS structure: {exc}") from exc
    except UnsupportedAlgorithm as exc:
        raise SignatureInvalid(f"unsupported key or algorithm: {exc}") from exc
    return _Checked(
        signer=signer,
        certificates=certificates,
        econtent_type=econtent_type,
        econtent=econtent,
        signature=signature,
        signing_time=signing_time,
        unsigned=unsigned,
        digest=hash_name,
    )


# --------------------------------------------------------------------------- fast path


class _Unusual(Exception):
    """Well-formed perhaps, but not the usual shape: the generic path decides."""


_DIGEST_OIDS = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
_SEQ, _SET, _OCTETS, _OID_TAG, _INT = 0x30, 0x31, 0x04, 0x06, 0x02
_OID_TEXT: dict[bytes, str] = {}
_READ_ATTRS = frozenset({ID_CONTENT_TYPE, ID_MESSAGE_DIGEST, ID_SIGNING_TIME,
                         ID_AA_SIGNING_CERTIFICATE, ID_AA_SIGNING_CERTIFICATE_V2})


def _oid_text(contents: bytes) -> str:
    text = _OID_TEXT.get(contents)
    if text is None:
        text = _d.oid_dotted(contents)
        if len(_OID_TEXT) < 1024:
            _OID_TEXT[contents] = text
    return text


def _algorithm(buf: bytes, start: int, end: int) -> tuple[str, bytes]:
    """AlgorithmIdentifier contents → (OID text, parameters' DER or b"")."""
    tag, ostart, oend = _d.read(buf, start, end)
    if tag != _OID_TAG:
        raise _d.NotDer("AlgorithmIdentifier without an OID")
    return _oid_text(buf[ostart:oend]), buf[oend:end]


@functools.lru_cache(maxsize=512)
def _issuer_der(cert: x509.Certificate) -> bytes:
    """The issuer Name exactly as encoded in the certificate (tag and length included)."""
    der = _cert_der(cert)
    start, end = _d.whole(der, _SEQ)
    tstart, tend = _d.expect(der, start, end, _SEQ)
    pos = tstart
    kids = _d.children(der, tstart, tend)
    tag, pos, _, cend = next(kids)
    if tag == 0xA0:  # [0] version
        tag, pos, _, cend = next(kids)
    # serialNumber, then signature AlgorithmIdentifier, then issuer
    _, pos, _, cend = next(kids)
    tag, pos, _, cend = next(kids)
    if tag != _SEQ:
        raise _d.NotDer("issuer is not a Name")
    return der[pos:cend]


@functools.lru_cache(maxsize=512)
def _public_key(cert: x509.Certificate) -> Any:
    return cert.public_key()


def _attributes(buf: bytes, start: int, end: int, unique: bool) -> dict[str, list[bytes]]:
    """SET OF Attribute contents → type → each value's DER."""
    out: dict[str, list[bytes]] = {}
    for tag, _, astart, aend in _d.children(buf, start, end):
        if tag != _SEQ:
            raise _d.NotDer("Attribute is not a SEQUENCE")
        ttag, _, tstart, tend = next(_d.children(buf, astart, aend))
        if ttag != _OID_TAG:
            raise _d.NotDer("Attribute without a type")
        vstart, vend = _d.expect(buf, tend, aend, _SET)
        if vend != aend:
            raise _d.NotDer("bytes after an Attribute's values")
        oid = _oid_text(buf[tstart:tend])
        if unique and oid in out:
            raise _Unusual("attribute twice")
        out.setdefault(oid, []).extend(buf[p:e] for _, p, _, e in _d.children(buf, vstart, vend))
    return out


def _time_value(value: bytes) -> datetime:
    if value[:1] == b"\x17":
        when = core.UTCTime.load(value, strict=True).native
    elif value[:1] == b"\x18":
        when = core.GeneralizedTime.load(value, strict=True).native
    else:
        raise _d.NotDer("signingTime is neither UTCTime nor GeneralizedTime")
    if not isinstance(when, datetime):
        raise _Unusual("signingTime without a date")
    return when


def _check_ess_fast(value: bytes, v2: bool, signer: x509.Certificate) -> None:
    """The first ESSCertID(v2) names ``signer`` by hash and, when given, by issuer and serial
    (issuer compared byte for byte: other spellings of the same name go the generic way)."""
    start, end = _d.whole(value, _SEQ)
    cstart, cend = _d.expect(value, start, end, _SEQ)  # certs
    if cstart == cend:
        raise _Unusual("no ESSCertID")
    istart, iend = _d.expect(value, cstart, cend, _SEQ)  # the first ESSCertID(v2)
    kids = list(_d.children(value, istart, iend))
    algo = "sha1"
    if v2:
        algo = "sha256"
        if kids and kids[0][0] == _SEQ:
            name = _DIGEST_OIDS.get(_algorithm(value, kids[0][2], kids[0][3])[0])
            if name is None:
                raise _Unusual("ESS digest not known")
            algo = name
            kids = kids[1:]
    if not kids or kids[0][0] != _OCTETS:
        raise _d.NotDer("ESSCertID without certHash")
    cert_hash = value[kids[0][2]:kids[0][3]]
    if not hmac.compare_digest(hashlib.new(algo, _cert_der(signer)).digest(), cert_hash):
        raise _Unusual("ESS hash differs")
    if len(kids) == 1:
        return
    if len(kids) != 2 or kids[1][0] != _SEQ:
        raise _Unusual("ESSCertID with more than issuerSerial")
    sstart, send = kids[1][2], kids[1][3]
    names_start, names_end = _d.expect(value, sstart, send, _SEQ)
    serial_start, serial_end = _d.expect(value, names_end, send, _INT)
    if serial_end != send or _d.integer(value, serial_start, serial_end) != signer.serial_number:
        raise _Unusual("ESS serial differs")
    issuer = _issuer_der(signer)
    for tag, _, gstart, gend in _d.children(value, names_start, names_end):
        if tag == 0xA4 and value[gstart:gend] == issuer:  # directoryName [4] EXPLICIT Name
            return
    raise _Unusual("ESS issuer not byte-equal")


@dataclass
class _Layout:
    """Where the parts of a plain-DER SignedData with one SignerInfo lie (see _layout)."""

    der: bytes
    econtent_type: str
    econtent: bytes | None
    certificates: list[x509.Certificate]
    si: list[tuple[int, int, int, int]]  # the SignerInfo's fields, as _d.children gives them
    want_issuer: bytes  # issuerAndSerialNumber
    want_serial: int


def _layout(der: bytes) -> _Layout:
    """The usual SignedData shape, cut into its parts without an object tree; NotDer or
    _Unusual for anything else (the generic path then reads it)."""
    start, end = _d.whole(der, _SEQ)
    tag, _, ostart, oend = next(_d.children(der, start, end))
    if tag != _OID_TAG or der[ostart:oend] != _OID_DER[ID_SIGNED_DATA][2:]:
        raise _Unusual("not SignedData")
    xstart, xend = _d.expect(der, oend, end, 0xA0)
    if xend != end:
        raise _d.NotDer("bytes after the content")
    sstart, send = _d.expect(der, xstart, xend, _SEQ)
    if send != xend:
        raise _d.NotDer("bytes after SignedData")
    kids = list(_d.children(der, sstart, send))
    # version, digestAlgorithms, encapContentInfo, [0] certificates?, [1] crls?, signerInfos
    if len(kids) < 4 or kids[0][0] != _INT or kids[1][0] != _SET or kids[2][0] != _SEQ:
        raise _d.NotDer("SignedData shape")
    if kids[-1][0] != _SET:
        raise _d.NotDer("signerInfos")
    optional = kids[3:-1]
    if any(k[0] not in (0xA0, 0xA1) for k in optional) or len(optional) > 2:
        raise _d.NotDer("SignedData optional fields")
    # encapContentInfo
    _, _, estart, eend = kids[2]
    etag, _, et_start, et_end = next(_d.children(der, estart, eend))
    if etag != _OID_TAG:
        raise _d.NotDer("eContentType")
    econtent_type = _oid_text(der[et_start:et_end])
    if der[kids[0][2]:kids[0][3]] != (b"\x01" if econtent_type == ID_DATA else b"\x03"):
        raise _Unusual("SignedData version")  # RFC 5652 §5.1; asn1crypto reads others its own way
    econtent: bytes | None = None
    if et_end < eend:
        wstart, wend = _d.expect(der, et_end, eend, 0xA0)
        cstart, cend = _d.expect(der, wstart, wend, _OCTETS)  # constructed (BER) goes generic
        if wend != eend or cend != wend:
            raise _d.NotDer("bytes after eContent")
        econtent = der[cstart:cend]
    certificates: list[x509.Certificate] = []
    for k in optional:
        if k[0] != 0xA0:
            raise _Unusual("CRLs included")
        for ctag, cpos, _, cend in _d.children(der, k[2], k[3]):
            if ctag != _SEQ:
                raise _Unusual("a certificate choice other than a plain certificate")
            certificates.append(_cert_from_der(der[cpos:cend]))
    if len(certificates) > _MAX_CERTIFICATES:
        raise _Unusual("too many certificates")
    signer_infos = list(_d.children(der, kids[-1][2], kids[-1][3]))
    if len(signer_infos) != 1 or signer_infos[0][0] != _SEQ:
        raise _Unusual("not one SignerInfo")
    si = list(_d.children(der, signer_infos[0][2], signer_infos[0][3]))
    # version, sid, digestAlgorithm, [0] signedAttrs, signatureAlgorithm, signature, [1]?
    if len(si) not in (6, 7) or [k[0] for k in si[:6]] != [_INT, _SEQ, _SEQ, 0xA0, _SEQ, _OCTETS]:
        raise _Unusual("SignerInfo shape")
    if len(si) == 7 and si[6][0] != 0xA1:
        raise _d.NotDer("SignerInfo trailer")
    # sid: issuerAndSerialNumber ::= SEQUENCE { issuer Name, serialNumber INTEGER }
    sid = list(_d.children(der, si[1][2], si[1][3]))
    if len(sid) != 2 or sid[0][0] != _SEQ or sid[1][0] != _INT:
        raise _d.NotDer("issuerAndSerialNumber")
    return _Layout(der, econtent_type, econtent, certificates, si, der[sid[0][1]:sid[0][3]],
                   _d.integer(der, sid[1][2], sid[1][3]))


def included_signer(der: bytes) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """(signer, every certificate included) of the usual SignedData shape, found among the
    included certificates by issuer (byte-equal) and serial, nothing verified: a cheap look
    before the real judgement. NotDer or _Unusual when the shape is another or the signer is
    not included byte for byte (the caller then looks the generic way)."""
    lay = _layout(der)
    for cert in lay.certificates:
        if cert.serial_number == lay.want_serial and _issuer_der(cert) == lay.want_issuer:
            return cert, lay.certificates
    raise _Unusual("signer not included byte for byte")


def _check_fast(
    der: bytes,
    detached: bytes | memoryview | None,
    extra_certs: Sequence[x509.Certificate],
    require_ess: bool,
    policy: AlgorithmPolicy,
) -> _Checked:
    """check_signed_data for the usual shape, reading only what is checked (see there)."""
    lay = _layout(bytes(der))
    der, si, certificates = lay.der, lay.si, lay.certificates
    econtent_type, econtent = lay.econtent_type, lay.econtent
    want_issuer, want_serial = lay.want_issuer, lay.want_serial
    digest_oid, digest_params = _algorithm(der, si[2][2], si[2][3])
    hash_name = _DIGEST_OIDS.get(digest_oid)
    if hash_name is None or digest_params not in (b"", b"\x05\x00"):
        raise _Unusual("digest algorithm")
    policy.check_digest(hash_name)
    signed_der = _d_tlv_set(der[si[3][2]:si[3][3]])
    if si[3][2] == si[3][3]:
        raise _Unusual("signed attributes missing")
    attrs = _attributes(der, si[3][2], si[3][3], unique=True)
    sig_oid, sig_params = _algorithm(der, si[4][2], si[4][3])
    if sig_oid == ID_RSASSA_PSS or sig_params not in (b"", b"\x05\x00"):
        raise _Unusual("signature parameters")
    signature = der[si[5][2]:si[5][3]]
    unsigned = _attributes(der, si[6][2], si[6][3], unique=False) if len(si) == 7 else {}
    # asn1crypto checks each value's tag against its type when it lists them: only SEQUENCEs
    # pass here unread, and of the unsigned attributes only timestamp tokens
    for oid, values in attrs.items():
        if oid not in _READ_ATTRS and any(v[:1] != b"\x30" for v in values):
            raise _Unusual("a signed attribute that is not a SEQUENCE")
    for oid, values in unsigned.items():
        if oid != ID_AA_SIGNATURE_TIME_STAMP_TOKEN or any(v[:1] != b"\x30" for v in values):
            raise _Unusual("an unsigned attribute other than a timestamp token")

    signer = None
    for cert in [*certificates, *extra_certs]:  # the generic path's order: the same first match
        if cert.serial_number == want_serial:
            if _issuer_der(cert) != want_issuer:
                raise _Unusual("issuer not byte-equal: RFC 5280 comparison")
            signer = cert
            break
    if signer is None:
        raise _Unusual("signer not found")
    if econtent is not None and detached is not None:
        raise _Unusual("content twice")
    content = econtent if econtent is not None else detached
    if content is None:
        raise _Unusual("no content")
    ct = attrs.get(ID_CONTENT_TYPE)
    if ct is None or len(ct) != 1:
        raise _Unusual("contentType")
    tstart, tend = _d.whole(ct[0], _OID_TAG)
    if _oid_text(ct[0][tstart:tend]) != econtent_type:
        raise _Unusual("contentType differs")
    md = attrs.get(ID_MESSAGE_DIGEST)
    if md is None or len(md) != 1:
        raise _Unusual("messageDigest")
    mstart, mend = _d.whole(md[0], _OCTETS)
    if not hmac.compare_digest(md[0][mstart:mend], hashlib.new(hash_name, content).digest()):
        raise _Unusual("messageDigest differs")
    signing_time = None
    st = attrs.get(ID_SIGNING_TIME)
    if st is not None:
        if len(st) != 1:
            raise _Unusual("signingTime")
        signing_time = _time_value(st[0])
    if ID_AA_SIGNING_CERTIFICATE_V2 in attrs:
        ess = attrs[ID_AA_SIGNING_CERTIFICATE_V2]
        if len(ess) != 1:
            raise _Unusual("ESS values")
        _check_ess_fast(ess[0], True, signer)
    elif ID_AA_SIGNING_CERTIFICATE in attrs:
        ess = attrs[ID_AA_SIGNING_CERTIFICATE]
        if len(ess) != 1:
            raise _Unusual("ESS values")
        _check_ess_fast(ess[0], False, signer)
    elif require_ess:
        raise _Unusual("ESS missing")
    verify_raw(_public_key(signer), signature, signed_der, hash_name, sig_oid)
    return _Checked(
        signer=signer,
        certificates=certificates,
        econtent_type=econtent_type,
        econtent=econtent,
        signature=signature,
        signing_time=signing_time,
        unsigned=unsigned,
        digest=hash_name,
    )


def _d_tlv_set(contents: bytes) -> bytes:
    return _der_tlv(0x31, contents)


# --------------------------------------------------------------------------- public verification


def _finish(
    checked: _Checked,
    trust_roots: Sequence[x509.Certificate],
    tsa_roots: Sequence[x509.Certificate] | None,
    require_timestamp: bool,
    at: datetime | None,
    policy: AlgorithmPolicy,
    revocation: RevocationInfo | None,
) -> SignatureInfo:
    from pecd.trust.tsa import TimestampInvalid, verify_token  # tsa builds on this module

    timestamp_time: datetime | None = None
    tokens = checked.unsigned.get(ID_AA_SIGNATURE_TIME_STAMP_TOKEN, [])
    for token in tokens:
        try:
            when = verify_token(
                token,
                checked.signature,
                tsa_roots if tsa_roots is not None else trust_roots,
            )
        except TimestampInvalid as exc:
            # keep "intact but untrusted" apart from "broken" for the caller
            kind = (
                CertificateUntrusted if isinstance(exc.__cause__, CertificateUntrusted) else TimestampProblem
            )
            raise kind(f"signature timestamp: {exc}") from exc
        timestamp_time = when if timestamp_time is None else min(timestamp_time, when)
    if timestamp_time is None and require_timestamp:
        raise TimestampProblem("signature timestamp missing")
    check_at = at or timestamp_time or checked.signing_time
    if check_at is None:
        raise SignatureInvalid("no time to check the certificate at: no timestamp, no signingTime")
    chain = validate_path(checked.signer, checked.certificates, trust_roots, check_at, purpose="smime",
                          policy=policy, revocation=revocation)
    return SignatureInfo(
        signer=checked.signer,
        signing_time=checked.signing_time,
        timestamp_time=timestamp_time,
        certificates=tuple(chain),
        digest=checked.digest,
        weak_digest=policy.is_weak(checked.digest),
        judged_at=check_at,
    )


def verify_detached(
    signature_der: bytes,
    data: bytes | memoryview,
    trust_roots: Sequence[x509.Certificate],
    tsa_roots: Sequence[x509.Certificate] | None = None,
    require_timestamp: bool = False,
    *,
    at: datetime | None = None,
    policy: AlgorithmPolicy = DEFAULT_POLICY,
    revocation: RevocationInfo | None = None,
) -> SignatureInfo:
    """Verify a detached signature over ``data``; raise SignatureInvalid with the reason.

    Certificates must be valid at ``at``; by default at the verified timestamp's time, or else at
    the signer's claimed signingTime. A receiver checking fresh mail should pass ``at=clock.now()``.
    """
    checked = check_signed_data(signature_der, data, policy=policy)
    if checked.econtent_type != ID_DATA:
        raise SignatureInvalid(f"content type {checked.econtent_type} is not id-data")
    return _finish(checked, trust_roots, tsa_roots, require_timestamp, at, policy, revocation)


def verify_attached(
    signature_der: bytes,
    trust_roots: Sequence[x509.Certificate],
    tsa_roots: Sequence[x509.Certificate] | None = None,
    require_timestamp: bool = False,
    *,
    at: datetime | None = None,
    policy: AlgorithmPolicy = DEFAULT_POLICY,
) -> tuple[bytes, SignatureInfo]:
    """Verify a SignedData that carries its content; return the content and what was proved."""
    checked = check_signed_data(signature_der, None, policy=policy)
    if checked.econtent_type != ID_DATA:
        raise SignatureInvalid(f"content type {checked.econtent_type} is not id-data")
    assert checked.econtent is not None  # check_signed_data demands content
    return checked.econtent, _finish(checked, trust_roots, tsa_roots, require_timestamp, at, policy, None)


def extract_timestamp_token(signature_der: bytes) -> tuple[bytes, bytes] | None:
    """(token DER, signature value) of the CAdES-T timestamp, or None when there is none.

    The signature value is what the token's imprint covers: ``openssl ts -verify -data`` input.
    """
    try:
        ci = cms.ContentInfo.load(signature_der, strict=True)
        si = ci["content"]["signer_infos"][0]
        if isinstance(si["unsigned_attrs"], core.Void):
            return None
        for attr in si["unsigned_attrs"]:
            if attr["type"].dotted == ID_AA_SIGNATURE_TIME_STAMP_TOKEN:
                return bytes(attr["values"][0].dump()), bytes(si["signature"].native)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SignatureInvalid(f"malformed CMS structure: {exc}") from exc
    return None
