"""The provider index as the PEC network publishes it: LDIF entries of objectClass ``provider``
(RFC 6109 §4.5), inside a file the index authority signs (S/MIME or CMS).

Receives bytes from anywhere (a URL, a file an operator was handed) and trusts only the
index-authority certificate the caller passes: nothing in the file counts before its signature
holds under that certificate. Pure: no sockets, no disk, no clock (the time comes in as ``at``).

What is accepted as a signed index:

- an S/MIME ``multipart/signed`` message (detached signature), the LDIF as its first part;
- an S/MIME ``application/pkcs7-mime`` message (opaque signing), the LDIF inside;
- a bare CMS SignedData carrying the LDIF (a ``.p7m`` file), DER or PEM.

The signed content is the LDIF itself or a MIME entity holding it (any ``text/*`` or
``application/*`` leaf, in any transfer encoding). Anything else, unsigned LDIF included, is
refused with :class:`IndexRefused`, and so is a file over ``max_size`` bytes or with no provider.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser

import ldif
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pecd.trust import index
from pecd.trust.cms import SignatureInfo, SignatureInvalid, verify_attached
from pecd.trust.index import IndexCopy, IndexError_, Provider
from pecd.trust.smime import NotSigned, verify_message

MAX_SIZE = 16 * 1024 * 1024  # the national index is well under 1 MB; 16 MiB leaves room
MAX_ENTRIES = 10_000
_HEADERS = BytesHeaderParser(policy=email.policy.compat32)
_HEX40 = re.compile(r"[0-9a-f]{40}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_HASH_PREFIXES = ("sha1:", "sha-1:", "sha1=", "sha-1=", "{sha1}", "{sha}")
DEFAULT_BASE = "o=postacert"


class IndexRefused(IndexError_):
    """A would-be index copy that is not taken: unsigned, wrongly signed, altered, malformed,
    too big or empty. The copy in force stays."""


# --------------------------------------------------------------------------- certificate hashes


def normalize_hash(value: str | bytes) -> str:
    """A ``providerCertificateHash`` value as 40 lower-case hex digits.

    Accepted: hex in either case, with or without ``:`` (or space) between bytes, optionally
    prefixed ``sha1:``, ``sha-1:``, ``sha1=``, ``{sha1}`` or ``{sha}`` (any case); or the 20 raw
    bytes of the digest (a value given base64-encoded in LDIF with ``::``).
    """
    if isinstance(value, bytes):
        if len(value) == 20 and not value.isascii():
            return value.hex()
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("certificate hash is neither hex text nor a 20-byte SHA-1") from None
    text = value.strip().lower()
    for prefix in _HASH_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    text = text.replace(":", "").replace(" ", "")
    if not _HEX40.fullmatch(text):
        raise ValueError(f"certificate hash {value[:60]!r} is not a SHA-1 (40 hex digits)")
    return text


# --------------------------------------------------------------------------- entries


def _first_text(attrs: Mapping[str, list[bytes]], name: str) -> str:
    values = attrs.get(name, [])
    return values[0].decode("utf-8").strip() if values else ""


def _certificate_pem(value: bytes) -> str:
    cert = (x509.load_pem_x509_certificate(value) if value.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(value))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def provider_from_entry(dn: str, attrs: Mapping[str, list[bytes]]) -> Provider:
    """One ``provider`` entry (attribute names lower-case, options such as ``;binary`` dropped,
    values as bytes). Raises ValueError saying what is wrong with it."""
    name = _first_text(attrs, "providername")
    if not name:
        raise ValueError("no providerName")
    domains: list[str] = []
    for raw in attrs.get("manageddomains", []):
        domain = raw.decode("ascii").strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"managedDomains value {domain[:80]!r} is not a domain name")
        if domain not in domains:
            domains.append(domain)
    if not domains:
        raise ValueError("no managedDomains")
    mail_receipt = _first_text(attrs, "mailreceipt")
    if mail_receipt and mail_receipt.count("@") != 1:
        raise ValueError(f"mailReceipt {mail_receipt[:80]!r} is not an address")
    hashes = list(dict.fromkeys(normalize_hash(v) for v in attrs.get("providercertificatehash", [])))
    try:
        certs = list(dict.fromkeys(_certificate_pem(v) for v in attrs.get("providercertificate", [])))
    except ValueError as exc:
        raise ValueError(f"providerCertificate is not a certificate: {exc}") from None
    if not hashes and not certs:
        raise ValueError("neither providerCertificateHash nor providerCertificate")
    return Provider(
        name=name, domains=tuple(domains), host="", port=index.DEFAULT_PORT,
        service_address=mail_receipt, cert_pem=certs[0] if certs else "",
        more_certs_pem=tuple(certs[1:]), cert_hashes=tuple(hashes),
        unit=_first_text(attrs, "providerunit"), ldif_url=_first_text(attrs, "ldiflocationurl"), dn=dn,
    )


def providers_from_entries(
    entries: Iterable[tuple[str, Mapping[str, list[bytes]]]],
) -> tuple[list[Provider], list[str]]:
    """The ``provider`` entries (others, such as the base entry, are passed over) and, for each
    entry left out, why. An entry with a flaw is left out on its own so one bad provider does
    not freeze the index for all; a file with no good entry is refused by the caller."""
    providers: list[Provider] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for count, (dn, raw_attrs) in enumerate(entries, start=1):
        if count > MAX_ENTRIES:
            raise IndexRefused(f"more than {MAX_ENTRIES} entries")
        attrs: dict[str, list[bytes]] = {}
        for key, values in raw_attrs.items():
            attrs.setdefault(key.split(";", 1)[0].lower(), []).extend(values)
        classes = {v.decode("ascii", "replace").strip().lower() for v in attrs.get("objectclass", [])}
        if "provider" not in classes:
            continue
        if dn.lower() in seen:
            raise IndexRefused(f"entry {dn[:120]!r} appears twice")
        seen.add(dn.lower())
        try:
            providers.append(provider_from_entry(dn, attrs))
        except (ValueError, UnicodeDecodeError) as exc:
            skipped.append(f"{dn[:120]}: {exc}")
    return providers, skipped


def parse_ldif(data: bytes) -> tuple[list[Provider], list[str]]:
    """The providers in an LDIF text (RFC 2849 content records) and the entries left out.

    Raises IndexRefused when the text is not LDIF or holds no usable provider entry.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parser = ldif.LDIFParser(io.BytesIO(data), encoding=None, strict=True)  # values stay bytes
    try:
        entries = [(dn, attrs) for dn, attrs in parser.parse() if dn is not None]
        providers, skipped = providers_from_entries(entries)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise IndexRefused(f"malformed LDIF (line {parser.line_counter}): {exc}") from None
    if not providers:
        detail = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise IndexRefused(f"no usable provider entry in the LDIF{detail}")
    return providers, skipped


# --------------------------------------------------------------------------- writing


def escape_rdn_value(value: str) -> str:
    """RFC 4514 §2.4 escaping of one attribute value in a DN."""
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def entry_ldif(provider: Provider, base: str = DEFAULT_BASE) -> bytes:
    """The LDIF entry that describes ``provider`` for the index authority: its name, unit,
    service mailbox, domains, every certificate (DER, base64) and each one's SHA-1 hash."""
    dn = provider.dn or f"providerName={escape_rdn_value(provider.name)},{base}"
    certs = provider.all_certificates
    record: dict[str, list[str | bytes]] = {
        "objectClass": ["top", "provider", *(["LDIFLocationURLObject"] if provider.ldif_url else [])],
        "providerName": [provider.name],
    }
    if provider.unit:
        record["providerUnit"] = [provider.unit]
    if provider.service_address:
        record["mailReceipt"] = [provider.service_address]
    record["managedDomains"] = list(provider.domains)
    record["providerCertificateHash"] = list(dict.fromkeys(
        [*(index.sha1_hex(c) for c in certs), *provider.cert_hashes]))
    record["providerCertificate"] = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    if provider.ldif_url:
        record["LDIFLocationURL"] = [provider.ldif_url]
    out = io.BytesIO()
    out.write(b"# pecd provider entry (RFC 6109 section 4.5)\nversion: 1\n\n")
    ldif.LDIFWriter(out, base64_attrs=["providerCertificate"]).unparse(dn, record)
    return out.getvalue()


# --------------------------------------------------------------------------- the signed file


@dataclass(frozen=True)
class Unwrapped:
    content: bytes
    info: SignatureInfo


def _looks_like_ldif(data: bytes) -> bool:
    head = data.lstrip()[:64].lower()
    return head.startswith((b"dn:", b"version:", b"#", b"objectclass:"))


def _leaf_body(entity: bytes) -> bytes:
    """The decoded body of a single-part MIME entity (the signed part around the LDIF)."""
    msg = email.message_from_bytes(entity, policy=email.policy.compat32)
    if msg.is_multipart():
        raise IndexRefused("the signed part is multipart, not the LDIF")
    maintype = msg.get_content_maintype()
    if maintype not in ("text", "application"):
        raise IndexRefused(f"the signed part is {msg.get_content_type()}, not LDIF")
    body = msg.get_payload(decode=True)
    if not isinstance(body, bytes):
        raise IndexRefused("the signed part has no body")
    return body


def _content(signed: bytes) -> bytes:
    """Signed content → LDIF: as is when it reads as LDIF, else a MIME entity around it."""
    return signed if _looks_like_ldif(signed) else _leaf_body(signed)


def _der_from_pem(data: bytes) -> bytes:
    lines = data.strip().splitlines()
    if not lines[-1].startswith(b"-----END"):
        raise IndexRefused("PEM block not closed")
    try:
        return base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except binascii.Error as exc:
        raise IndexRefused(f"PEM block is not base64: {exc}") from None


def unwrap(data: bytes, authority: Sequence[x509.Certificate], at: datetime,
           max_size: int = MAX_SIZE) -> Unwrapped:
    """The LDIF inside a signed index file, once its signature holds under ``authority`` at
    ``at``. Raises IndexRefused saying why not."""
    if len(data) > max_size:
        raise IndexRefused(f"index file is {len(data)} bytes, over the limit of {max_size}")
    if not authority:
        raise IndexRefused("no index-authority certificate configured ([index] authority_cert)")
    stripped = data.lstrip()
    if not stripped:
        raise IndexRefused("index file is empty")
    if stripped.startswith(b"{"):
        raise IndexRefused("a JSON provider card, not a signed index")
    if _looks_like_ldif(stripped):
        raise IndexRefused("unsigned LDIF: the index must come signed by the index authority")
    try:
        if stripped.startswith(b"-----BEGIN"):
            content, info = verify_attached(_der_from_pem(stripped), authority, at=at)
            return Unwrapped(_content(content), info)
        if stripped[:1] == b"\x30":
            content, info = verify_attached(stripped, authority, at=at)
            return Unwrapped(_content(content), info)
        headers = _HEADERS.parsebytes(data)  # the header block only; the body is not parsed
        ctype = headers.get_content_type()
        if ctype == "multipart/signed":
            signed, info = verify_message(data, authority, at=at)
            return Unwrapped(_content(signed.inner), info)
        if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
            der = _leaf_body(data)
            content, info = verify_attached(der, authority, at=at)
            return Unwrapped(_content(content), info)
    except (SignatureInvalid, NotSigned) as exc:
        raise IndexRefused(f"index signature does not hold: {exc}") from None
    except (ValueError, TypeError) as exc:  # asn1crypto / email on garbage
        raise IndexRefused(f"index file is malformed: {exc}") from None
    raise IndexRefused("not a signed index (neither S/MIME nor CMS SignedData)")


def read_signed(data: bytes, source: str, authority: Sequence[x509.Certificate], at: datetime,
                max_size: int = MAX_SIZE) -> IndexCopy:
    """A whole index copy from a signed file: signature first, then the LDIF inside it."""
    unwrapped = unwrap(data, authority, at, max_size)
    providers, skipped = parse_ldif(unwrapped.content)
    info = unwrapped.info
    return IndexCopy(source=source, kind="ldif", raw=data, providers=tuple(providers),
                     signer=info.signer.subject.rfc4514_string(),
                     signed_at=info.timestamp_time or info.signing_time, skipped=tuple(skipped))
