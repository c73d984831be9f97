"""Keys that never leave the hardware: a real SoftHSM2 token, pecd signing through it, openssl
as the outside judge, and two providers on loopback (one whose keys are in the token)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass

from pecd import replies
from pecd.clock import SystemClock
from pecd.config import ConfigError
from pecd.service import Service
from pecd.trust import cms, keys, pki
from pecd.trust.keys import KeySourceError, Pkcs11Options, Pkcs11Uri, SigningUnavailable
from pecd.trust.tsa import LocalTSA

from .conftest import (
    ProviderDir,
    exchange_cards,
    free_port,
    openssl,
    openssl_timestamp_verifies,
    openssl_verifies,
    pecd,
    running,
    submit,
    wait_for,
)
from .hsm_support import MODULE, Token, new_token
from .pechelpers import configure, ledger

ORIGINAL = (
    b"From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\nSubject: Firmato nel token\r\n"
    b"Message-ID: <hsm-1@client.a.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCiao Bob.\r\n"
)


@pytest.fixture
def token(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Token:
    return new_token(tmp_path_factory.getbasetemp() / "softhsm", tmp_path)


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --------------------------------------------------------------------------- the key object


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_token_key_signs_cms_and_tsa_tokens_that_openssl_verifies(
        token: Token, tmp_path: Path, kind: str) -> None:
    ca = pki.CertAuthority.create(kind="rsa")
    signing = keys.generate_in_token(token.uri("provider"), token.options, kind)
    tsa_key = keys.generate_in_token(token.uri("tsa"), token.options, kind)
    assert isinstance(signing, rsa.RSAPrivateKey if kind == "rsa" else ec.EllipticCurvePrivateKey)
    cert = ca.issue_signing_cert(signing, "P", "posta-certificata@a.test")
    tsa_cert = ca.issue_tsa_cert(tsa_key, "P TSA")
    tsa = LocalTSA(tsa_key, tsa_cert, SystemClock())
    signer = cms.Signer(signing, cert, SystemClock(), timestamper=tsa)
    der = tmp_path / "signed.der"
    der.write_bytes(signer.sign_attached(b"certified content"))
    ca_pem = _pem(ca.cert, tmp_path / "ca.pem")
    out = openssl("cms", "-verify", "-inform", "DER", "-in", str(der), "-CAfile", str(ca_pem),
                  "-purpose", "any")
    assert out.stdout == "certified content"
    extracted = cms.extract_timestamp_token(der.read_bytes())
    assert extracted is not None
    tst, value = extracted
    (tmp_path / "tst.der").write_bytes(tst)
    (tmp_path / "value").write_bytes(value)
    openssl("ts", "-verify", "-data", str(tmp_path / "value"), "-in", str(tmp_path / "tst.der"),
            "-token_in", "-CAfile", str(ca_pem), "-untrusted", str(_pem(tsa_cert, tmp_path / "t.pem")))


def test_generated_key_is_sensitive_and_never_extractable(token: Token) -> None:
    key = keys.generate_in_token(token.uri("provider"), token.options)
    with pytest.raises(TypeError, match="cannot be exported"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    with pytest.raises(TypeError):
        key.private_numbers()

    def attrs(session: object) -> tuple[bool, bool, bool]:
        obj = next(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,  # type: ignore[attr-defined]
                                        Attribute.LABEL: "provider"}))
        return obj[Attribute.SENSITIVE], obj[Attribute.EXTRACTABLE], obj[Attribute.NEVER_EXTRACTABLE]

    assert key.token.run(attrs) == (True, False, True)
    assert "PIN" not in repr(key) and "4321" not in repr(key.token)


def test_signatures_reuse_one_session_across_threads(token: Token) -> None:
    key = keys.generate_in_token(token.uri("provider"), token.options)
    assert isinstance(key, rsa.RSAPrivateKey)
    first = key.token.session()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        sigs = list(pool.map(lambda i: key.sign(b"m%d" % i, padding.PKCS1v15(), hashes.SHA256()),
                             range(64)))
    for i, sig in enumerate(sigs):
        key.public_key().verify(sig, b"m%d" % i, padding.PKCS1v15(), hashes.SHA256())
    assert key.token.session() is first  # no reopen per signature


def test_wrong_pin_token_object_module_fail_with_a_clear_message(
        token: Token, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    keys.generate_in_token(token.uri("provider"), token.options)
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("0000\n")
    unopened = new_token(tmp_path_factory.getbasetemp() / "softhsm", tmp_path)
    with pytest.raises(KeySourceError, match="wrong PIN"):
        keys.load_token_key(unopened.uri("provider"), Pkcs11Options(MODULE, bad_pin))
    with pytest.raises(KeySourceError, match="no token labelled"):
        keys.load_token_key("pkcs11:token=nosuch;object=provider", token.options)
    with pytest.raises(KeySourceError, match="no such private key"):
        keys.load_token_key(token.uri("nosuch"), token.options)
    with pytest.raises(KeySourceError, match="no PKCS#11 module"):
        keys.load_token_key(token.uri("provider"), Pkcs11Options(tmp_path / "nope.so", bad_pin))
    with pytest.raises(KeySourceError, match="PIN environment variable"):
        keys.load_token_key("pkcs11:token=other;object=x",
                            Pkcs11Options(MODULE, None, "PECD_TEST_NO_SUCH_PIN_VAR"))


def test_uri_parsing_follows_rfc7512() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=My%20Token;object=provider;id=%01%02?module-path=/x.so")
    assert (uri.token, uri.object, uri.id, uri.module_path) == ("My Token", "provider", b"\x01\x02", "/x.so")
    with pytest.raises(KeySourceError, match="pin-value"):
        Pkcs11Uri.parse("pkcs11:token=t;object=o?pin-value=1234")
    with pytest.raises(KeySourceError, match="names no key"):
        Pkcs11Uri.parse("pkcs11:token=t")


def test_token_gone_mid_run_raises_signing_unavailable_then_recovers(token: Token) -> None:
    key = keys.generate_in_token(token.uri("provider"), token.options)
    assert isinstance(key, rsa.RSAPrivateKey)
    key.sign(b"before", padding.PKCS1v15(), hashes.SHA256())
    directory = token.directory()
    backup = directory.parent.parent / (directory.name + ".away")  # out of the token directory
    directory.rename(backup)  # the token is unplugged
    try:
        with pytest.raises(SigningUnavailable):
            key.sign(b"during", padding.PKCS1v15(), hashes.SHA256())
        with pytest.raises(SigningUnavailable):  # still away: still unavailable, no crash
            key.sign(b"during", padding.PKCS1v15(), hashes.SHA256())
    finally:
        backup.rename(directory)  # plugged back in
    sig = key.sign(b"after", padding.PKCS1v15(), hashes.SHA256())  # the session is reopened
    key.public_key().verify(sig, b"after", padding.PKCS1v15(), hashes.SHA256())
    assert replies.reply_for(SigningUnavailable("gone")).startswith("451 ")


# --------------------------------------------------------------------------- configuration


def _provider_in_token(tmp_path: Path, token: Token, domain: str, ca_dir: Path) -> ProviderDir:
    """`pecd init --key-uri`: the signing key born in the token; then the TSA key too."""
    root = tmp_path / domain
    out = pecd("init", str(root), "--domain", domain, "--name", f"Provider {domain}", "--ca",
               str(ca_dir), "--submission-port", str(free_port()), "--smtps-port",
               str(free_port()), "--inbound-port", str(free_port()), "--http-port",
               str(free_port()), "--pkcs11-module", str(MODULE), "--pin-file",
               str(token.pin_file), "--key-uri", token.uri(f"{domain}-signing"))
    assert "generated pkcs11:" in out
    p = ProviderDir(root, domain)
    assert not (root / "keys" / "signing.key").exists()  # no file copy of the key, ever
    p.cli("keys", "generate", "--pkcs11", token.uri(f"{domain}-tsa"), "--purpose", "tsa",
          "--ca", str(ca_dir), "--cert", str(root / "keys" / "tsa.pem"))
    (root / "keys" / "tsa.key").unlink()
    configure(p, "keys", tsa=token.uri(f"{domain}-tsa"))
    return p


def test_pin_in_the_configuration_is_refused(token: Token, tmp_path: Path) -> None:
    p = _provider_in_token(tmp_path, token, "a.test", tmp_path / "ca")
    text = p.conf.read_text()
    p.conf.write_text(text.replace("[keys]\n", '[keys]\npin = "4321-user"\n'))
    with pytest.raises(ConfigError, match="a PIN must not be written in the configuration"):
        p.config  # noqa: B018
    p.conf.write_text(text.replace(f"object={'a.test'}-signing", "object=a.test-signing?pin-value=1"))
    with pytest.raises(ConfigError, match="pin-value"):
        p.config  # noqa: B018


def test_start_up_fails_clearly_with_a_wrong_pin_or_object(token: Token, tmp_path: Path) -> None:
    p = _provider_in_token(tmp_path, token, "a.test", tmp_path / "ca")
    text = p.conf.read_text()
    p.conf.write_text(text.replace("object=a.test-signing", "object=missing"))
    with pytest.raises(pki.PKIError, match="no such private key"):
        Service(p.config)
    out = p.cli("serve", ok=False)
    assert "Error: pkcs11:token=" in out and "no such private key" in out
    assert "Traceback" not in out
    p.conf.write_text(text.replace(f"token={token.label}", f"token={token.label}-nope"))
    with pytest.raises(pki.PKIError, match="no token labelled"):
        Service(p.config)


def test_certificate_kept_in_the_token_and_init_finds_an_existing_key(
        token: Token, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    made = keys.generate_in_token(token.uri("a.test-signing"), token.options)
    ca = pki.CertAuthority.load_or_create(ca_dir)
    in_token = ca.issue_signing_cert(made, "Provider a.test", "posta-certificata@a.test")
    keys.store_certificate(in_token, token.uri("a.test-signing"), token.options)
    out = pecd("init", str(tmp_path / "a.test"), "--domain", "a.test", "--name", "Provider a.test",
               "--ca", str(ca_dir), "--pkcs11-module", str(MODULE), "--pin-file",
               str(token.pin_file), "--key-uri", token.uri("a.test-signing"))
    assert "using pkcs11:" in out  # found, not generated again
    p = ProviderDir(tmp_path / "a.test", "a.test")
    (p.root / "keys" / "signing.pem").unlink()  # the certificate now lives only in the token
    service = Service(p.config)
    try:
        assert service.issuer.signer.certificate == in_token
    finally:
        service.cpu.shutdown()
        service.db.close()
    assert "(token)" in p.cli("keys", "list")


def test_keys_list_shows_token_keys_and_expiry(token: Token, tmp_path: Path) -> None:
    p = _provider_in_token(tmp_path, token, "a.test", tmp_path / "ca")
    out = p.cli("keys", "list")
    assert f"provider: key pkcs11:token={token.label};object=a.test-signing" in out
    assert f"tsa: key pkcs11:token={token.label};object=a.test-tsa" in out
    assert "valid until" in out and "warning" not in out


def test_keys_generate_makes_a_csr_for_a_token_key(token: Token, tmp_path: Path) -> None:
    csr_path = tmp_path / "req.csr"
    pecd("keys", "generate", "--pkcs11", token.uri("next"), "--module", str(MODULE),
         "--pin-file", str(token.pin_file), "--name", "Provider A", "--email",
         "posta-certificata@a.test", "--csr", str(csr_path))
    openssl("req", "-verify", "-noout", "-in", str(csr_path))
    request = x509.load_pem_x509_csr(csr_path.read_bytes())
    key = keys.load_token_key(token.uri("next"), token.options)
    assert request.public_key() == key.public_key() and request.is_signature_valid


def test_keys_import_moves_a_pem_key_into_the_token(token: Token, tmp_path: Path) -> None:
    pem_key = pki.new_key("ec")
    pki.write_key(tmp_path / "old.key", pem_key)
    out = pecd("keys", "import", str(tmp_path / "old.key"), "--pkcs11", token.uri("migrated"),
               "--module", str(MODULE), "--pin-file", str(token.pin_file))
    assert "imported" in out
    key = keys.load_token_key(token.uri("migrated"), token.options)
    assert key.public_key() == pem_key.public_key()
    sig = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    pem_key.public_key().verify(sig, b"x", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(TypeError):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())


# --------------------------------------------------------------------------- end to end


def _two(tmp_path: Path, token: Token) -> tuple[ProviderDir, ProviderDir]:
    from .conftest import make_provider

    ca_dir = tmp_path / "ca"
    a = _provider_in_token(tmp_path, token, "a.test", ca_dir)
    b = make_provider(tmp_path, "b.test", ca_dir)
    exchange_cards(a, b)
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")
    return a, b


def _signer_of(eml: Path, ca: Path) -> x509.Certificate:
    out = eml.with_suffix(".signer.pem")
    openssl("cms", "-verify", "-in", str(eml), "-CAfile", str(ca), "-out", "/dev/null",
            "-signer", str(out))
    return x509.load_pem_x509_certificate(out.read_bytes())


async def _send(a: ProviderDir, b: ProviderDir, svc_a: Service, n_alice: int) -> None:
    loop = asyncio.get_running_loop()
    code, reply = await loop.run_in_executor(
        None, submit, a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
        ORIGINAL, svc_a.ports.submission)
    assert code == 250, reply
    await wait_for(lambda: len(a.messages("alice@a.test")) == n_alice)


def test_provider_with_keys_in_the_token_delivers_certified_mail_openssl_verifies(
        token: Token, tmp_path: Path) -> None:
    a, b = _two(tmp_path, token)

    async def go() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            await _send(a, b, svc_a, 2)  # acceptance + delivery receipts
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1)
            svc_a.checkpoint()  # the ledger checkpoint's timestamp comes from the token TSA

    asyncio.run(go())
    a_files = sorted((a.maildir("alice@a.test") / "new").iterdir())
    b_files = sorted((b.maildir("bob@b.test") / "new").iterdir())
    token_cert = keys.load_token_key(token.uri("a.test-signing"), token.options).public_key()
    for f in [*a_files, *b_files]:
        assert openssl_verifies(f, a.ca), f
    envelope = b_files[0]
    assert _signer_of(envelope, a.ca).public_key() == token_cert  # signed in the token
    assert openssl_timestamp_verifies(envelope, a.ca, a.tsa_cert)  # TSA key in the token too
    acceptance = next(f for f in a_files if b"accettazione" in f.read_bytes()[:4000])
    assert openssl_timestamp_verifies(acceptance, a.ca, a.tsa_cert)
    conn = sqlite3.connect(a.root / "data" / "pecd.sqlite")
    try:
        assert conn.execute("SELECT count(*) FROM ledger_checkpoint").fetchone()[0] >= 1
    finally:
        conn.close()


def test_token_gone_mid_run_defers_the_message_and_delivers_it_when_back(
        token: Token, tmp_path: Path) -> None:
    a, b = _two(tmp_path, token)
    directory = token.directory()
    away = directory.parent.parent / (directory.name + ".away")

    async def go() -> None:
        async with running(a, b) as (svc_a, _svc_b):
            directory.rename(away)  # the HSM goes away while the provider runs
            try:
                loop = asyncio.get_running_loop()
                code, reply = await loop.run_in_executor(
                    None, submit, a, "alice@a.test", "alice-secret", "alice@a.test",
                    ["bob@b.test"], ORIGINAL, svc_a.ports.submission)
                assert code == 250, reply  # accepted into the queue: nothing is lost
                await wait_for(lambda: any(r["detail"].get("reason") == "signing key unavailable"
                                           for r in ledger(a, "deferred")))
                assert a.messages("alice@a.test") == [] and b.messages("bob@b.test") == []
            finally:
                away.rename(directory)
            item = next(r["detail"]["queue_id"] for r in ledger(a, "deferred"))
            a.cli("queue", "retry", str(item))  # or wait for the retry delay
            await wait_for(lambda: len(a.messages("alice@a.test")) == 2)
            await wait_for(lambda: len(b.messages("bob@b.test")) == 1)

    asyncio.run(go())
    for f in (b.maildir("bob@b.test") / "new").iterdir():
        assert openssl_verifies(f, a.ca)


def test_renewal_without_a_gap_peers_take_either_certificate(token: Token, tmp_path: Path) -> None:
    a, b = _two(tmp_path, token)
    ca_dir = tmp_path / "ca"
    next_pem = a.root / "keys" / "signing-next.pem"
    a.cli("keys", "generate", "--pkcs11", token.uri("a.test-2027"), "--ca", str(ca_dir),
          "--cert", str(next_pem))
    soon = (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    configure(a, "keys", next_key=token.uri("a.test-2027"), next_cert=str(next_pem), switch_at=soon)
    listed = a.cli("keys", "list")
    assert "next: key pkcs11:" in listed and "signing switches to it at" in listed
    assert "(pending)" in listed
    card = tmp_path / "a-card.json"
    card.write_text(a.cli("index", "export"))
    assert '"more_certificates"' in card.read_text()  # both published meanwhile
    ldif = a.cli("index", "export", "--ldif")
    assert ldif.count("providerCertificate:: ") == 2
    b.cli("index", "import", str(card))
    a.cli("index", "import", str(card))  # its own mail verifies under either, too
    current = pki.load_cert(a.root / "keys" / "signing.pem")
    upcoming = pki.load_cert(next_pem)

    async def round_(n: int) -> None:
        async with running(a, b) as (svc_a, _svc_b):
            await _send(a, b, svc_a, 2 * n)
            await wait_for(lambda: len(b.messages("bob@b.test")) == n)

    asyncio.run(round_(1))
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    configure(a, "keys", switch_at=past)  # the switch time has come
    asyncio.run(round_(2))
    envelopes = sorted((b.maildir("bob@b.test") / "new").iterdir(), key=lambda f: f.stat().st_mtime)
    assert [_signer_of(f, a.ca) for f in envelopes] == [current, upcoming]
    for f in envelopes:  # certified, not anomaly envelopes: b took both in charge
        assert b"X-Trasporto: posta-certificata" in f.read_bytes()
    receipts = [f.read_bytes() for f in (a.maildir("alice@a.test") / "new").iterdir()]
    assert sum(b"X-Ricevuta: avvenuta-consegna" in r for r in receipts) == 2


def test_status_warns_thirty_days_before_expiry(tmp_path: Path) -> None:
    from .conftest import make_provider

    p = make_provider(tmp_path, "a.test", tmp_path / "ca")
    assert "warning" not in p.cli("status")
    ca = pki.CertAuthority.load_or_create(tmp_path / "ca")
    key = pki.load_key(p.root / "keys" / "signing.key")
    pki.write_cert(p.root / "keys" / "signing.pem",
                   ca.issue_signing_cert(key, "Provider a.test", "posta-certificata@a.test", days=20))
    out = p.cli("status")
    assert "warning: provider certificate expires on" in out and "days left" in out


def test_running_signer_switches_to_the_next_key_at_switch_at(token: Token, tmp_path: Path) -> None:
    from pecd.clock import ManualClock
    from pecd.keyring import SwitchingSigner

    ca = pki.CertAuthority.create()
    clock = ManualClock()
    old_key = pki.new_key()
    new_key = keys.generate_in_token(token.uri("next"), token.options)
    old = cms.Signer(old_key, ca.issue_signing_cert(old_key, "P", "p@a.test"), clock)
    new = cms.Signer(new_key, ca.issue_signing_cert(new_key, "P", "p@a.test"), clock)
    signer = SwitchingSigner(old, new, clock.now() + timedelta(hours=1), clock)
    ca_pem = _pem(ca.cert, tmp_path / "ca.pem")

    def signed_by() -> x509.Certificate:
        (tmp_path / "s.der").write_bytes(signer.sign_attached(b"x"))
        openssl("cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "s.der"), "-CAfile",
                str(ca_pem), "-purpose", "any", "-out", "/dev/null",
                "-signer", str(tmp_path / "signer.pem"))
        return pki.load_cert(tmp_path / "signer.pem")

    assert signed_by() == old.certificate == signer.certificate
    clock.advance(timedelta(hours=1))  # no restart, no reload: the next signature switches
    assert signed_by() == new.certificate == signer.certificate
