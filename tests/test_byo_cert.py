"""Bring your own certificate: ``pecd init --key --cert --chain`` with a signing pair made by an
outside CA (the openssl command line, a root and an issuing intermediate, nothing of pecd's).
The provider signs certified mail with it; a peer that trusts that CA takes the mail in charge,
and ``openssl cms -verify`` with the outside root alone as its trust judges the envelope."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from pecd.format import pec
from pecd.trust import pki

from .conftest import exchange_cards, make_provider, openssl, pecd, running, submit, wait_for
from .revocation_support import OutsideCA

BODY = (b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: firmato altrove\r\n"
        b"Message-ID: <byo-1@client.a.test>\r\n\r\nciao\r\n")


def test_provider_signs_with_an_outside_ca_certificate(tmp_path: Path) -> None:
    outside = OutsideCA.create(tmp_path / "outside")
    key, cert = outside.issue("Provider a.test", "posta-certificata@a.test")
    a = make_provider(tmp_path, "a.test", tmp_path / "devca", **{
        "--key": str(key), "--cert": str(cert), "--chain": str(outside.chain)})
    b = make_provider(tmp_path, "b.test", tmp_path / "devca")
    # the key was copied, owner-only, and the certificate is the outside CA's, not the dev CA's
    signing_key = a.root / "keys" / "signing.key"
    assert stat.S_IMODE(signing_key.stat().st_mode) == 0o600
    assert pki.load_key(signing_key).public_key() == pki.load_key(key).public_key()
    bundle = pki.load_certs(a.root / "keys" / "signing.pem")
    assert bundle[0] == pki.load_cert(cert) and bundle[1] == pki.load_cert(outside.intermediate)
    # b's operator trusts the outside CA for peers' signatures
    b.ca.write_bytes(b.ca.read_bytes() + outside.root.read_bytes())
    exchange_cards(a, b)
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")

    async def run() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            loop = asyncio.get_running_loop()
            code, reply = await loop.run_in_executor(
                None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                BODY, svc_a.ports.submission)
            assert code == 250, reply
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1
                           and len(a.messages("posta-certificata@a.test")) == 1
                           and len(a.messages("alice@a.test")) == 2)

    asyncio.run(run())
    delivered = b.messages("bob@b.test")[0]
    assert pec.parse(delivered).headers["X-Trasporto"] == "posta-certificata"
    eml = tmp_path / "envelope.eml"
    eml.write_bytes(delivered)
    # the outside root alone is enough: the intermediate travels in the signature
    openssl("cms", "-verify", "-in", str(eml), "-CAfile", str(outside.root), "-out", "/dev/null")
    openssl("cms", "-verify", "-in", str(eml), "-CAfile", str(tmp_path / "devca" / "ca.pem"),
            "-out", "/dev/null", ok=False)
    openssl("cms", "-verify", "-in", str(eml), "-CAfile", str(outside.root),
            "-signer", str(tmp_path / "signer.pem"), "-out", "/dev/null")
    assert pki.load_cert(tmp_path / "signer.pem") == pki.load_cert(cert)
    # a's own receipts are signed with it too, and a takes its own outside root as trusted
    for receipt in a.messages("alice@a.test"):
        assert pec.parse(receipt).certdata is not None
    assert b"ANOMALIA" not in b"".join(a.messages("alice@a.test"))


def test_unusable_outside_pairs_are_refused(tmp_path: Path) -> None:
    outside = OutsideCA.create(tmp_path / "outside")
    key, cert = outside.issue("Provider a.test", "posta-certificata@a.test")
    other_key, _ = outside.issue("Provider a.test", "posta-certificata@a.test", name="other")
    enc_key, enc_cert = outside.issue("Provider a.test", "posta-certificata@a.test", name="enc",
                                      key_usage="keyEncipherment")
    ca_key, ca_cert = outside.intermediate_key, outside.intermediate

    def init(domain: str, k: Path, c: Path, *chain: str) -> str:
        return pecd("init", str(tmp_path / domain), "--domain", domain, "--name",
                    "Provider a.test", "--ca", str(tmp_path / "devca"), "--key", str(k),
                    "--cert", str(c), *chain, ok=False)

    assert "does not belong to the certificate" in init("x1.test", other_key, cert)
    assert "does not allow digitalSignature" in init("x2.test", enc_key, enc_cert)
    assert "a CA certificate" in init("x3.test", ca_key, ca_cert)
    assert "was not issued by" in init("x4.test", key, cert, "--chain", str(outside.root))
    assert not (tmp_path / "x1.test" / "pecd.toml").exists()
    assert "--key and --cert go together" in pecd(
        "init", str(tmp_path / "x5.test"), "--domain", "x5.test", "--key", str(key), ok=False)


def test_outside_certificate_shape_problems_are_warned(tmp_path: Path) -> None:
    outside = OutsideCA.create(tmp_path / "outside")
    key, cert = outside.issue("Somebody Else", "info@elsewhere.test")
    out = pecd("init", str(tmp_path / "w.test"), "--domain", "w.test", "--name", "Provider w",
               "--ca", str(tmp_path / "devca"), "--key", str(key), "--cert", str(cert))
    assert "warning: the service address posta-certificata@w.test is not in" in out
    assert "warning: the provider name 'Provider w' is in neither CN nor O" in out
    assert "warning: no --chain" in out
    assert "warning: no root certificate given" in out
