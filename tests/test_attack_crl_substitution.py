"""CRLs and OCSP answers travel over plain HTTP: whoever sits on the path (or runs the server a
certificate names) can answer anything. pecd keeps a revocation answer only when the issuer's
key vouches for it and it is newer than the copy in force; a huge, malformed, wrongly signed,
stale or replayed-older answer, or a source that never answers, is refused with its reason and
the copy in force stays in use (memory and database); nothing raises. And nothing is fetched
for a signer that is not in the provider index: a stranger's certificate cannot point the
reception point at addresses of its choosing."""

from __future__ import annotations

import smtplib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp

from pecd.clock import ManualClock
from pecd.store.db import Database
from pecd.trust import pki, revocation

from .attack_support import ALICE, BOB, kind_of, ledger_rows, serving, wait_until
from .conftest import client_tls
from .revocation_support import (
    SETTINGS,
    CrlServer,
    RevocationCA,
    envelope_signed_by,
    gather,
    revoking_pair,
)


def test_attack_crl_substitution(
        tmp_path: Path, ca: RevocationCA, crl_server: CrlServer) -> None:
    """A huge, malformed, wrongly signed, stale or replayed-older CRL is refused with its reason
    and never replaces the good copy, in memory or in the database; nothing raises."""
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a", ocsp=False)
    start = datetime.now(UTC)
    good = ca.crl(this_update=start - timedelta(minutes=1), next_update=start + timedelta(hours=2))
    old = ca.crl(this_update=start - timedelta(minutes=30), next_update=start + timedelta(hours=3))
    crl_server.files["/ca.crl"] = good
    clock = ManualClock(start)
    db = Database(tmp_path / "pecd.sqlite")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        sources = revocation.Sources(SETTINGS, clock, db)
        assert gather(sources, cert, ca.cert).info.crls == (good,)
        clock.advance(timedelta(minutes=100))  # into the refresh window: a fetch is due
        now = clock.now()
        cases = {
            "over the limit": b"0" * (SETTINGS.max_crl_bytes + 1),
            "malformed CRL": b"\x30\x82\x01\x00 not a CRL",
            "not signed by the certificate's issuer": ca.crl(key=other_key),
            "issued by CN=Somebody": ca.crl(issuer=x509.Name.from_rfc4514_string("CN=Somebody")),
            "stale": ca.crl(this_update=now - timedelta(hours=3),
                            next_update=now - timedelta(minutes=1)),
            "older than the copy in force": old,
        }
        for reason, body in cases.items():
            crl_server.files["/ca.crl"] = body
            material = gather(sources, cert, ca.cert)
            assert material.info.crls == (good,), reason  # still in force
            assert len(material.problems) == 1 and reason in material.problems[0], \
                (reason, material.problems)
        restarted = revocation.Sources(SETTINGS, clock, db)
        restarted.load()
        assert [c.der for c in restarted._copies.values()] == [good]
    finally:
        db.close()


def test_attack_crl_substitution_slow_source(ca: RevocationCA, crl_server: CrlServer) -> None:
    """A source that accepts and never answers costs one timeout, then counts as down."""
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a", ocsp=False)
    crl_server.files["/ca.crl"] = ca.crl()
    crl_server.slow.add("/ca.crl")
    sources = revocation.Sources(replace(SETTINGS, revocation_timeout=0.5), ManualClock())
    material = gather(sources, cert, ca.cert)
    assert not material.known and "unreachable: TimeoutError" in material.problems[0]


def _ocsp_answer(ca: RevocationCA, cert: x509.Certificate, this_update: datetime,
                 signer: tuple[rsa.RSAPrivateKey, x509.Certificate] | None = None) -> bytes:
    key, responder = signer or (ca.responder_key, ca.responder)
    builder = (ocsp.OCSPResponseBuilder()
               .add_response(cert=cert, issuer=ca.cert, algorithm=hashes.SHA1(),
                             cert_status=ocsp.OCSPCertStatus.GOOD, this_update=this_update,
                             next_update=this_update + timedelta(hours=2), revocation_time=None,
                             revocation_reason=None)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
               .certificates([responder]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_attack_crl_substitution_ocsp_answers(ca: RevocationCA) -> None:
    """OCSP answers get the same checks: signed by the issuer or a responder it certified for
    OCSP signing, not older than the answer in force, not stale."""
    _key, _path, cert = ca.issue("Provider a.test", "posta-certificata@a.test", "a", crl=False)
    now = datetime.now(UTC)
    in_force = revocation.check_ocsp(_ocsp_answer(ca, cert, now - timedelta(minutes=1)), cert,
                                     ca.cert, now, "k", None)
    older = _ocsp_answer(ca, cert, now - timedelta(minutes=30))
    with pytest.raises(revocation.RevocationError, match="older than the copy in force"):
        revocation.check_ocsp(older, cert, ca.cert, now, "k", in_force)
    with pytest.raises(revocation.RevocationError, match="stale"):
        revocation.check_ocsp(_ocsp_answer(ca, cert, now - timedelta(hours=3)), cert, ca.cert,
                              now, "k", None)
    # signed by a certificate the CA issued, but not for OCSP signing (another provider's)
    mallory_key_path, _p2, other = ca.issue("Mallory", "mallory@evil.test", "mallory")
    mallory_key = pki.load_key(mallory_key_path)
    assert isinstance(mallory_key, rsa.RSAPrivateKey)
    forged = _ocsp_answer(ca, cert, now, signer=(mallory_key, other))
    with pytest.raises(revocation.RevocationError, match="not signed by the issuer or its responder"):
        revocation.check_ocsp(forged, cert, ca.cert, now, "k", None)


def test_attack_crl_substitution_stranger_points_elsewhere(
        tmp_path: Path, ca: RevocationCA, crl_server: CrlServer) -> None:
    """A certificate from a CA b trusts, but not a provider in b's index, naming a CRL URL:
    the message is an anomaly ("not a provider in the index") and the URL is never asked."""
    a, b, _cert = revoking_pair(tmp_path, ca, ocsp=False)
    crl_server.files["/ca.crl"] = ca.crl()
    key_path, cert_path, _stranger = ca.issue("Provider a.test", "posta-certificata@a.test",
                                              "stranger")
    data = envelope_signed_by(a, key_path, cert_path, "da uno sconosciuto")
    with serving(b) as (svc_b,):
        with smtplib.SMTP("127.0.0.1", svc_b.ports.inbound, timeout=30) as s:
            s.starttls(context=client_tls(b.ca))
            s.ehlo()
            s.mail(ALICE)
            s.rcpt(BOB)
            code, reply = s.data(data)
        assert code == 250, reply
        wait_until(lambda: len(b.messages(BOB)) == 1, what="bob's mailbox")
    assert [kind_of(m) for m in b.messages(BOB)] == ["errore"]
    [row] = ledger_rows(b, "anomaly")
    assert "not a provider in the index" in row["detail"]["reason"]
    assert crl_server.hits.get("/ca.crl", 0) == 0
