"""Signing keys from a PEM file or from a PKCS#11 token (RFC 7512 ``pkcs11:`` URIs).

Receives: key references from the configuration (a path or a ``pkcs11:`` URI), the PKCS#11 module
path and where to read the PIN (a file or an environment variable, never the configuration
itself). Trusts: the PKCS#11 module the operator names (it runs in this process). A token key
never leaves the token: it is an object with cryptography's private-key interface whose
``sign`` runs C_Sign in the token; asking for its private numbers or bytes raises.

One session per token, opened at start, is shared by every worker thread under one lock per
module: python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which under PKCS#11
promises that no two threads call into it at once (a pool of sessions signing in parallel
crashed SoftHSM2), and re-initialising the module must not race a signature either. When the
token goes away mid-run a signature raises ``SigningUnavailable`` (the stages defer; nothing is
dropped) and the next signature reopens the session.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote_to_bytes

import pkcs11
from asn1crypto import algos, csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    encode_dss_signature,
)
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x
from pkcs11.util import ec as p11ec
from pkcs11.util import rsa as p11rsa

from pecd.trust.pki import PKIError, PrivateKey
from pecd.trust.pki import load_key as load_pem_key

T = TypeVar("T")

URI_SCHEME = "pkcs11:"


class SigningUnavailable(Exception):
    """The signing key cannot be used now (token removed, session lost); retry later."""


class KeySourceError(PKIError):
    """A key reference that cannot work: bad URI, module, token, object or PIN. Says which."""


# --------------------------------------------------------------------------- URIs and PINs


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI pecd uses: which token, which object (label and/or id)."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith(URI_SCHEME):
            raise KeySourceError(f"not a pkcs11: URI: {uri!r}")
        path, _, query = uri[len(URI_SCHEME):].partition("?")
        attrs: dict[str, bytes] = {}
        for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
            name, eq, value = part.partition("=")
            if not eq:
                raise KeySourceError(f"{uri!r}: attribute {name!r} has no value")
            attrs[name.strip().lower()] = unquote_to_bytes(value.strip())
        if "pin-value" in attrs:
            raise KeySourceError("a PIN must not be written in the key URI (pin-value): use"
                                 " [keys] pin_file or pin_env")
        known = {"token", "object", "id", "type", "module-path", "pin-source", "serial",
                 "manufacturer", "model", "library-manufacturer", "library-description",
                 "library-version", "slot-id", "slot-description", "slot-manufacturer"}
        unknown = set(attrs) - known
        if unknown:
            raise KeySourceError(f"{uri!r}: unknown attribute(s) {', '.join(sorted(unknown))}")
        if "type" in attrs and attrs["type"] not in (b"private", b"cert", b"public"):
            raise KeySourceError(f"{uri!r}: type must be private (a signing key)")
        if "token" not in attrs:
            raise KeySourceError(f"{uri!r}: names no token (token=LABEL)")
        if "object" not in attrs and "id" not in attrs:
            raise KeySourceError(f"{uri!r}: names no key (object=LABEL or id=%xx...)")
        return cls(token=attrs["token"].decode("utf-8"),
                   object=attrs["object"].decode("utf-8") if "object" in attrs else None,
                   id=attrs.get("id"),
                   module_path=attrs["module-path"].decode() if "module-path" in attrs else None)

    def __str__(self) -> str:
        parts = [f"token={self.token}"]
        if self.object is not None:
            parts.append(f"object={self.object}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        return URI_SCHEME + ";".join(parts)


def is_uri(ref: str | Path) -> bool:
    return str(ref).startswith(URI_SCHEME)


@dataclass(frozen=True)
class Pkcs11Options:
    """``[keys] pkcs11_module``, and where the user PIN comes from (one of the two)."""

    module: Path | None = None
    pin_file: Path | None = None
    pin_env: str | None = None

    def pin(self) -> str:
        """The user PIN; a trailing newline in the file is not part of it."""
        if self.pin_file is not None:
            try:
                return self.pin_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise KeySourceError(f"cannot read the PIN file {self.pin_file}: "
                                     f"{exc.strerror or exc}") from None
        if self.pin_env is not None:
            value = os.environ.get(self.pin_env)
            if value is None:
                raise KeySourceError(f"the PIN environment variable {self.pin_env} is not set")
            return value
        raise KeySourceError("a pkcs11: key needs [keys] pin_file or pin_env")


# --------------------------------------------------------------------------- sessions


_PKCS11_FAILURE = (p11x.PKCS11Error,)


class _Module:
    """One loaded PKCS#11 module; its lock guards every call into it, reopening included."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            self.lib = pkcs11.lib(path)
        except (p11x.PKCS11Error, OSError, RuntimeError) as exc:
            raise KeySourceError(f"cannot load the PKCS#11 module {path}: {exc or type(exc).__name__}"
                                 ) from None
        self.generation = 0  # bumped at each re-initialisation: older sessions are gone
        self.tokens: dict[str, _Token] = {}


_modules: dict[str, _Module] = {}
_modules_lock = threading.Lock()


def _module(path: Path | str) -> _Module:
    key = str(Path(path).resolve())
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            if not Path(key).is_file():
                raise KeySourceError(f"no PKCS#11 module at {path}")
            mod = _modules[key] = _Module(key)
        return mod


class _Token:
    """A logged-in session on one token, reopened after the token came back."""

    def __init__(self, module: _Module, label: str, pin: str) -> None:
        self.module = module
        self.label = label
        self._pin = pin
        self._session: Any = None
        self._generation = -1
        self.broken = False

    def __repr__(self) -> str:  # never the PIN
        return f"<token {self.label!r} in {self.module.path}>"

    def _open(self) -> Any:
        """Under the module lock. After a failure the module is re-initialised first: SoftHSM
        (and most modules) keep the slot list of the C_Initialize that found the token."""
        mod = self.module
        if self.broken:
            self._reinitialize()
            self.broken = False
        try:
            token = mod.lib.get_token(token_label=self.label)
        except (p11x.NoSuchToken, p11x.GeneralError):
            # a token initialised after this process loaded the module: look again, once
            self._reinitialize()
            try:
                token = mod.lib.get_token(token_label=self.label)
            except (p11x.NoSuchToken, p11x.GeneralError):
                raise KeySourceError(f"no token labelled {self.label!r} in {mod.path}") from None
        except p11x.MultipleTokensReturned:
            raise KeySourceError(f"several tokens are labelled {self.label!r}") from None
        try:
            session = token.open(rw=True, user_pin=self._pin)
        except p11x.PinIncorrect:
            raise KeySourceError(f"token {self.label!r}: wrong PIN") from None
        except p11x.PinLocked:
            raise KeySourceError(f"token {self.label!r}: the PIN is locked") from None
        except p11x.UserAlreadyLoggedIn:
            session = token.open(rw=True)
        self._session = session
        self._generation = mod.generation
        return session

    def _reinitialize(self) -> None:
        """C_Finalize + C_Initialize: every session of this module is gone (generation bumped)."""
        with contextlib.suppress(p11x.PKCS11Error):
            self.module.lib.reinitialize()
        self.module.generation += 1

    def session(self) -> Any:
        """Under the module lock: the open session, opening it when needed."""
        if self._session is None or self._generation != self.module.generation or self.broken:
            self._session = None
            return self._open()
        return self._session

    def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(session)`` under the module lock; a lost token raises ``SigningUnavailable``."""
        with self.module.lock:
            try:
                return fn(self.session())
            except SigningUnavailable:  # e.g. the key vanished with the token's files
                self.broken = True
                self._session = None
                raise
            except KeySourceError as exc:
                self.broken = True
                raise SigningUnavailable(str(exc)) from None
            except _PKCS11_FAILURE as exc:
                self.broken = True
                self._session = None
                raise SigningUnavailable(f"token {self.label!r}: {type(exc).__name__}"
                                         f" {exc}".strip()) from None

    def check(self, fn: Callable[[Any], T]) -> T:
        """Like ``run`` at start-up: failures are configuration errors that say what is wrong."""
        with self.module.lock:
            try:
                return fn(self.session())
            except _PKCS11_FAILURE as exc:
                self.broken = True
                raise KeySourceError(f"token {self.label!r}: {type(exc).__name__} {exc}".strip()
                                     ) from None


def open_token(uri: Pkcs11Uri, options: Pkcs11Options) -> _Token:
    """The shared session of the token ``uri`` names (opened, logged in)."""
    path = uri.module_path or (str(options.module) if options.module else None)
    if path is None:
        raise KeySourceError("a pkcs11: key needs [keys] pkcs11_module (the module's path)")
    mod = _module(path)
    assert uri.token is not None
    with mod.lock:
        tok = mod.tokens.get(uri.token)
        if tok is None:
            tok = _Token(mod, uri.token, options.pin())
            tok.session()  # fail now, with a clear message, if module, token or PIN is wrong
            mod.tokens[uri.token] = tok
    return tok


def _template(uri: Pkcs11Uri, cls: ObjectClass) -> dict[Attribute, Any]:
    attrs: dict[Attribute, Any] = {Attribute.CLASS: cls}
    if uri.object is not None:
        attrs[Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[Attribute.ID] = uri.id
    return attrs


def _find_one(session: Any, uri: Pkcs11Uri, cls: ObjectClass) -> Any | None:
    found = list(session.get_objects(_template(uri, cls)))
    if len(found) > 1:
        raise KeySourceError(f"{uri}: {len(found)} objects of class {cls.name} match; give an id")
    return found[0] if found else None


# --------------------------------------------------------------------------- token keys


def _public_key(session: Any, uri: Pkcs11Uri, priv: Any) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    pub = _find_one(session, uri, ObjectClass.PUBLIC_KEY)
    key_type = priv[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        n = int.from_bytes(priv[Attribute.MODULUS], "big")
        e = int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if key_type == KeyType.EC:
        if pub is None:
            cert = _find_one(session, uri, ObjectClass.CERTIFICATE)
            if cert is None:
                raise KeySourceError(f"{uri}: an EC key needs its public key object or certificate"
                                     " in the token")
            k: object = x509.load_der_x509_certificate(cert[Attribute.VALUE]).public_key()
        else:
            k = serialization.load_der_public_key(p11ec.encode_ec_public_key(pub))
        if not isinstance(k, ec.EllipticCurvePublicKey):
            raise KeySourceError(f"{uri}: the public key is not an EC key")
        return k
    raise KeySourceError(f"{uri}: unsupported key type {key_type!r} (RSA or EC)")


class _TokenKey:
    """What the RSA and EC token keys share: where the key is, and signing in the token."""

    def __init__(self, token: _Token, uri: Pkcs11Uri,
                 public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> None:
        self.token = token
        self.uri = uri
        self._public = public
        self._handle: Any = None
        self._handle_session: Any = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"

    def _sign_in_token(self, mechanism: Mechanism, data: bytes) -> bytes:
        def go(session: Any) -> bytes:
            if self._handle is None or self._handle_session is not session:
                self._handle = _find_one(session, self.uri, ObjectClass.PRIVATE_KEY)
                if self._handle is None:
                    raise SigningUnavailable(f"{self.uri}: the key is not in the token")
                self._handle_session = session
            return bytes(self._handle.sign(data, mechanism=mechanism))
        return self.token.run(go)

    def _refuse(self) -> NoReturn:
        raise TypeError(f"{self.uri}: the key lives in the token and cannot be exported")



_DIGEST_INFO_PREFIX = {  # RFC 8017 §9.2 note 1
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_RSA_MECH = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
             "sha512": Mechanism.SHA512_RSA_PKCS}


class Pkcs11RSAKey(_TokenKey, rsa.RSAPrivateKey):
    """An RSA key in a token: PKCS#1 v1.5 signatures (CKM_SHA256_RSA_PKCS) only."""

    _public: rsa.RSAPublicKey

    def sign(self, data: bytes, padding: padding.AsymmetricPadding,
             algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo) -> bytes:
        if isinstance(algorithm, NoDigestInfo):
            raise UnsupportedAlgorithm(f"{self.uri}: signatures carry a DigestInfo")
        if padding.name != "EMSA-PKCS1-v1_5":
            raise UnsupportedAlgorithm(f"{self.uri}: only PKCS#1 v1.5 signatures")
        if isinstance(algorithm, Prehashed):
            prefix = _DIGEST_INFO_PREFIX.get(algorithm._algorithm.name)
            if prefix is None:
                raise UnsupportedAlgorithm(f"{self.uri}: digest {algorithm._algorithm.name}")
            return self._sign_in_token(Mechanism.RSA_PKCS, prefix + data)
        mech = _RSA_MECH.get(algorithm.name)
        if mech is None:
            raise UnsupportedAlgorithm(f"{self.uri}: digest {algorithm.name}")
        return self._sign_in_token(mech, data)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def __copy__(self) -> Pkcs11RSAKey:  # one key, one token session: a copy is the same key
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11RSAKey:
        return self

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise TypeError(f"{self.uri}: signing only")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        self._refuse()

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        self._refuse()


_EC_HASHES: dict[str, Callable[[bytes], Any]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


class Pkcs11ECKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """An EC key in a token: CKM_ECDSA over a digest made here, r||s re-encoded as DER."""

    _public: ec.EllipticCurvePublicKey

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm(f"{self.uri}: ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
        else:
            h = _EC_HASHES.get(algorithm.name)
            if h is None:
                raise UnsupportedAlgorithm(f"{self.uri}: digest {algorithm.name}")
            digest = h(bytes(data)).digest()
        rs = self._sign_in_token(Mechanism.ECDSA, digest)
        half = len(rs) // 2
        return encode_dss_signature(int.from_bytes(rs[:half], "big"), int.from_bytes(rs[half:], "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def __copy__(self) -> Pkcs11ECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11ECKey:
        return self

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError(f"{self.uri}: signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse()

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        self._refuse()


TokenKey = Pkcs11RSAKey | Pkcs11ECKey


def load_token_key(uri: str | Pkcs11Uri, options: Pkcs11Options) -> TokenKey:
    """The token key ``uri`` names; KeySourceError says what is wrong (module, token, PIN, object)."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    token = open_token(parsed, options)

    def find(session: Any) -> TokenKey:
        priv = _find_one(session, parsed, ObjectClass.PRIVATE_KEY)
        if priv is None:
            raise KeySourceError(f"{parsed}: no such private key in the token")
        public = _public_key(session, parsed, priv)
        if isinstance(public, rsa.RSAPublicKey):
            return Pkcs11RSAKey(token, parsed, public)
        return Pkcs11ECKey(token, parsed, public)

    return token.check(find)


def token_certificate(uri: str | Pkcs11Uri, options: Pkcs11Options) -> x509.Certificate | None:
    """The CKO_CERTIFICATE with the key's label/id, if the token holds one."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    token = open_token(parsed, options)

    def find(session: Any) -> x509.Certificate | None:
        obj = _find_one(session, parsed, ObjectClass.CERTIFICATE)
        return None if obj is None else x509.load_der_x509_certificate(obj[Attribute.VALUE])

    return token.check(find)


def load_key(ref: str | Path, options: Pkcs11Options | None = None) -> PrivateKey:
    """A PEM path or a ``pkcs11:`` URI: the one entry point for the provider's and TSA's keys."""
    if is_uri(ref):
        return load_token_key(str(ref), options or Pkcs11Options())
    return load_pem_key(Path(ref))


# --------------------------------------------------------------------------- making keys


def generate_in_token(uri: str | Pkcs11Uri, options: Pkcs11Options, kind: str = "rsa") -> TokenKey:
    """A key pair made inside the token: sensitive, never extractable, for signing only."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    if parsed.object is None:
        raise KeySourceError(f"{parsed}: a new key needs a label (object=...)")
    token = open_token(parsed, options)
    key_id = parsed.id or hashlib.sha1(parsed.object.encode()).digest()[:8]  # a stable id, not security

    def make(session: Any) -> None:
        if _find_one(session, parsed, ObjectClass.PRIVATE_KEY) is not None:
            raise KeySourceError(f"{parsed}: the token already holds this key")
        priv_t = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                  Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.PRIVATE: True,
                  Attribute.TOKEN: True}
        pub_t = {Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False,
                 Attribute.TOKEN: True}
        if kind == "rsa":
            session.generate_keypair(KeyType.RSA, 2048, label=parsed.object, id=key_id, store=True,
                                     public_template=pub_t, private_template=priv_t)
        elif kind == "ec":
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: p11ec.encode_named_curve_parameters("secp256r1")},
                local=True)
            params.generate_keypair(label=parsed.object, id=key_id, store=True,
                                    public_template=pub_t, private_template=priv_t)
        else:
            raise KeySourceError(f"unknown key type {kind!r} (rsa or ec)")

    token.check(make)
    return load_token_key(Pkcs11Uri(parsed.token, parsed.object, key_id, parsed.module_path),
                          options)


def import_into_token(key: PrivateKey, uri: str | Pkcs11Uri, options: Pkcs11Options) -> TokenKey:
    """Copy a PEM key into the token (migration): stored sensitive and not extractable. The
    PEM file is the operator's to destroy afterwards."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    if parsed.object is None:
        raise KeySourceError(f"{parsed}: the imported key needs a label (object=...)")
    token = open_token(parsed, options)
    key_id = parsed.id or hashlib.sha1(parsed.object.encode()).digest()[:8]  # a stable id, not security
    common = {Attribute.LABEL: parsed.object, Attribute.ID: key_id, Attribute.TOKEN: True}
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        priv = p11rsa.decode_rsa_private_key(der)
        pub = p11rsa.decode_rsa_public_key(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1))
    else:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        priv = p11ec.decode_ec_private_key(der)
        pub = p11ec.decode_ec_public_key(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    priv.update(common)
    priv.update({Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                 Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.PRIVATE: True})
    pub.update(common)
    pub.update({Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False})

    def store(session: Any) -> None:
        if _find_one(session, parsed, ObjectClass.PRIVATE_KEY) is not None:
            raise KeySourceError(f"{parsed}: the token already holds this key")
        session.create_object(priv)
        session.create_object(pub)

    token.check(store)
    return load_token_key(Pkcs11Uri(parsed.token, parsed.object, key_id, parsed.module_path),
                          options)


def store_certificate(cert: x509.Certificate, uri: str | Pkcs11Uri, options: Pkcs11Options) -> None:
    """The certificate as a CKO_CERTIFICATE beside its key (same label and id)."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    token = open_token(parsed, options)

    def store(session: Any) -> None:
        priv = _find_one(session, parsed, ObjectClass.PRIVATE_KEY)
        key_id = parsed.id or (priv[Attribute.ID] if priv is not None else b"")
        for old in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                        Attribute.LABEL: parsed.object}):
            old.destroy()
        session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
            Attribute.TOKEN: True, Attribute.PRIVATE: False,
            Attribute.LABEL: parsed.object or "", Attribute.ID: key_id,
            Attribute.SUBJECT: cert.subject.public_bytes(),
            Attribute.ISSUER: cert.issuer.public_bytes(),
            Attribute.SERIAL_NUMBER: asn1_x509.Certificate.load(
                cert.public_bytes(serialization.Encoding.DER))["tbs_certificate"]["serial_number"].dump(),
            Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
        })

    token.check(store)


def make_csr(key: PrivateKey, subject: x509.Name, email: str | None = None) -> bytes:
    """A PKCS#10 request (PEM) signed by ``key``; works for token keys, which cryptography's
    CSR builder cannot use (it wants a key it holds itself)."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    attributes = []
    if email:
        san = x509.SubjectAlternativeName([x509.RFC822Name(email)])
        ext = asn1_x509.Extension({"extn_id": "subject_alt_name", "critical": False,
                                   "extn_value": asn1_x509.GeneralNames.load(san.public_bytes())})
        attributes.append({"type": "extension_request", "values": [[ext]]})
    info = csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1_x509.Name.load(subject.public_bytes()),
        "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
        "attributes": attributes,
    })
    tbs = info.dump()
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        alg = algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa"})
    else:
        sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        alg = algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
    req = csr.CertificationRequest({"certification_request_info": info,
                                    "signature_algorithm": alg, "signature": sig})
    der = req.dump()
    x509.load_der_x509_csr(der)  # parse check: what we hand out must be a valid request
    return serialization_pem("CERTIFICATE REQUEST", der)


def serialization_pem(label: str, der: bytes) -> bytes:
    import base64
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"".join([f"-----BEGIN {label}-----\n".encode(), *(ln + b"\n" for ln in lines),
                     f"-----END {label}-----\n".encode()])


def describe(key: PrivateKey) -> str:
    """For ``pecd keys list`` and logs: where the key lives, never anything secret."""
    if isinstance(key, Pkcs11RSAKey | Pkcs11ECKey):
        return f"{key.uri} ({'RSA' if isinstance(key, Pkcs11RSAKey) else 'EC'} {key.key_size}, in token)"
    kind = "RSA" if isinstance(key, rsa.RSAPrivateKey) else "EC"
    return f"file ({kind} {key.key_size})"
