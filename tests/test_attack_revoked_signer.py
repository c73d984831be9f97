"""A provider whose signing certificate its CA revoked (say, after the key leaked) keeps
sending certified mail. b.test's reception point learns the revocation from the certificate's
CRL distribution point (a real HTTP server on loopback) or its OCSP responder (``openssl
ocsp``), and the mail reaches bob only inside an anomaly envelope that says so, with an
``anomaly`` ledger row: never taken in charge, never delivered as certified."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .attack_support import BOB, kind_of, ledger_rows, serving, wait_until
from .conftest import free_port
from .revocation_support import (
    CrlServer,
    OcspResponder,
    RevocationCA,
    revoking_pair,
    send_certified,
)


@pytest.fixture
def crl_server() -> Iterator[CrlServer]:
    server = CrlServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("source", ["crl", "ocsp"])
def test_attack_revoked_signer(tmp_path: Path, crl_server: CrlServer, source: str) -> None:
    ocsp_port = free_port()
    ca = RevocationCA.create(tmp_path / "rca", crl_server.url("/ca.crl"),
                             f"http://127.0.0.1:{ocsp_port}/")
    a, b, cert = revoking_pair(tmp_path, ca, crl=source == "crl", ocsp=source == "ocsp")
    ca.revoke(cert)
    crl_server.files["/ca.crl"] = ca.crl()
    responder = OcspResponder(ca, ocsp_port)
    if source == "ocsp":
        responder.start()
    try:
        with serving(a, b) as (svc_a, _svc_b):
            send_certified(a, svc_a.ports.submission, "firmato con chiave revocata")
            wait_until(lambda: len(b.messages(BOB)) == 1, what="bob's mailbox")
    finally:
        responder.stop()
    assert [kind_of(m) for m in b.messages(BOB)] == ["errore"]  # the anomaly envelope
    assert b"ANOMALIA MESSAGGIO: " in b.messages(BOB)[0]
    reasons = [r["detail"]["reason"] for r in ledger_rows(b, "anomaly")]
    assert len(reasons) == 1 and "revoked at" in reasons[0] and "compromise" in reasons[0].lower()
    assert ledger_rows(b, "taken-in-charge") == []
    assert (crl_server.hits.get("/ca.crl", 0) > 0) == (source == "crl")
    assert "ledger ok" in b.cli("ledger", "verify")


def test_attack_revoked_signer_not_yet_revoked_is_certified(
        tmp_path: Path, crl_server: CrlServer) -> None:
    """The control: the same setup with the certificate not revoked is taken in charge."""
    ca = RevocationCA.create(tmp_path / "rca", crl_server.url("/ca.crl"),
                             f"http://127.0.0.1:{free_port()}/")
    a, b, _cert = revoking_pair(tmp_path, ca, ocsp=False)
    crl_server.files["/ca.crl"] = ca.crl()
    with serving(a, b) as (svc_a, _svc_b):
        send_certified(a, svc_a.ports.submission, "firmato con chiave valida")
        wait_until(lambda: len(b.messages(BOB)) == 1, what="bob's mailbox")
    assert [kind_of(m) for m in b.messages(BOB)] == ["posta-certificata"]
    assert len(ledger_rows(b, "taken-in-charge")) == 1 and ledger_rows(b, "anomaly") == []
    assert crl_server.hits["/ca.crl"] == 1  # SMTP pre-check fetched, the reception used the cache
