"""The provider's signing keys as the configuration names them: files or a PKCS#11 token, the
current certificate and, during a renewal, the next one.

Receives: the configuration. Trusts: the files and the token it names. Start-up calls these once;
a wrong module, token, object or PIN raises ``pki.PKIError`` with a message that says which.
Everything that signs for the provider (envelopes, receipts, checkpoints, exports) goes through
the one signer made here; the built-in TSA's key comes from here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from pecd.clock import Clock
from pecd.config import Config
from pecd.trust import keys, pki
from pecd.trust.cms import Signer
from pecd.trust.pki import PrivateKey
from pecd.trust.tsa import Timestamper

EXPIRY_WARNING_DAYS = 30


def provider_ref(config: Config) -> str | Path:
    return config.keys.provider or config.paths.signing_key


def tsa_ref(config: Config) -> str | Path:
    return config.keys.tsa or config.paths.tsa_key


def load(ref: str | Path, config: Config) -> PrivateKey:
    return keys.load_key(ref, config.keys.pkcs11)


def certificates(ref: str | Path, cert_path: Path, config: Config) -> list[x509.Certificate]:
    """The certificate (then its intermediates) from ``cert_path`` when that file exists, else
    the CKO_CERTIFICATE stored beside the token key."""
    if cert_path.exists() or not keys.is_uri(ref):
        return pki.load_certs(cert_path)
    cert = keys.token_certificate(str(ref), config.keys.pkcs11)
    if cert is None:
        raise pki.PKIError(f"no certificate for {ref}: neither {cert_path} nor one in the token")
    return [cert]


def tsa_pair(config: Config, *, required: bool = True
             ) -> tuple[PrivateKey | None, x509.Certificate | None]:
    """The built-in TSA's key and certificate; with ``required=False`` (an external TSA is
    configured) a missing file is ``None``, not an error."""
    ref, cert_path = tsa_ref(config), config.paths.tsa_cert
    if not required and not keys.is_uri(ref) and not Path(ref).exists():
        return None, pki.load_cert(cert_path) if cert_path.exists() else None
    key = load(ref, config)
    if not required and not cert_path.exists() and not keys.is_uri(ref):
        return key, None
    return key, certificates(ref, cert_path, config)[0]


def make_signer(config: Config, clock: Clock, timestamper: Timestamper | None) -> Signer:
    ref = provider_ref(config)
    cert, *chain = certificates(ref, config.paths.signing_cert, config)
    current = Signer(load(ref, config), cert, clock, chain=chain, timestamper=timestamper)
    k = config.keys
    if k.next_key is None or k.next_cert is None or k.switch_at is None:
        return current
    next_cert, *next_chain = certificates(k.next_key, k.next_cert, config)
    upcoming = Signer(load(k.next_key, config), next_cert, clock, chain=next_chain,
                      timestamper=timestamper)
    return SwitchingSigner(current, upcoming, k.switch_at, clock)


class SwitchingSigner(Signer):
    """Renewal without a gap: the current signer until ``switch_at``, the next one from then on.

    Both certificates are published meanwhile (``published_certificates``), so a peer takes in
    charge what either signed. Anything else a caller asks of a Signer is the active one's.
    """

    def __init__(self, current: Signer, upcoming: Signer, switch_at: datetime, clock: Clock
                 ) -> None:  # no super().__init__: this signer owns no key of its own
        self._current = current
        self._upcoming = upcoming
        self._switch_at = switch_at
        self._clock = clock

    def active(self) -> Signer:
        return self._upcoming if self._clock.now() >= self._switch_at else self._current

    @property
    def certificate(self) -> x509.Certificate:
        return self.active().certificate

    def sign_detached(self, data: Any) -> bytes:
        return self.active().sign_detached(data)

    def sign_attached(self, data: bytes) -> bytes:
        return self.active().sign_attached(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.active(), name)


def published_certificates(config: Config) -> list[x509.Certificate]:
    """What the card and the LDIF entry list: the current certificate, and the next one during
    a renewal (never a chain certificate)."""
    ref = provider_ref(config)
    certs = [certificates(ref, config.paths.signing_cert, config)[0]]
    k = config.keys
    if k.next_key is not None and k.next_cert is not None:
        nxt = certificates(k.next_key, k.next_cert, config)[0]
        if nxt != certs[0]:
            certs.append(nxt)
    return certs


def expiry_warnings(certs: Sequence[tuple[str, x509.Certificate]], now: datetime,
                    days: int = EXPIRY_WARNING_DAYS) -> list[str]:
    """One line per certificate that expires within ``days`` (or has expired)."""
    out = []
    for what, cert in certs:
        left = cert.not_valid_after_utc - now
        if left.total_seconds() <= 0:
            out.append(f"{what} certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif left.days < days:
            out.append(f"{what} certificate expires on {cert.not_valid_after_utc:%Y-%m-%d}"
                       f" ({left.days} days left): renew it ([keys] next_key, next_cert,"
                       " switch_at)")
    return out
