"""Real providers' messages (../shared/pec-samples, read in place) are the judge of pecd's reading.

Aruba PEC, Sogei and Namirial sign with RSA and SHA-1, their 2014 intermediate is itself
SHA-1-signed, and every leaf has long expired: each intact message must still be judged intact and
trusted with Debian's roots *at its signing time*, as `openssl cms -verify -attime` judges it,
with SHA-1 marked weak; each edited one must be judged altered or malformed with its own reason;
and a genuine envelope reaching pecd's inbound listener while its certificate was valid (the
daemon under faketime) must be taken in charge, not turned into an anomaly.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from pecd.cli import main as cli_main
from pecd.clock import ManualClock
from pecd.trust import cms, pki, smime
from pecd.trust import paths as trust
from pecd.trust.judge import judge, load_roots
from pecd.trust.paths import AlgorithmPolicy
from pecd.trust.verdict import EXIT_CODES, AlgorithmRefused

from .attack_support import kind_of, ledger_rows
from .conftest import OPENSSL, free_port, make_provider
from .pechelpers import configure, send_inbound, serve_under_faketime
from .realworld import ACTALIS, BALTIMORE, DEBIAN_ROOTS, EDITED, INTACT, UNSIGNED, derive_namirial, sample

ROOTS = load_roots([DEBIAN_ROOTS])


def _signed_at(data: bytes) -> datetime:
    signed = smime.split_signed(data)
    checked = cms.check_signed_data(signed.signature, signed.inner_view)
    assert checked.signing_time is not None
    return checked.signing_time


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, ["-c", "/nonexistent/pecd.toml", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("name", INTACT)
def test_intact_samples_are_trusted_at_their_signing_time(name: str, tmp_path: Path) -> None:
    data = sample(name)
    verdict = judge(data, ROOTS)
    assert verdict.kind == "valid", verdict.reason
    assert verdict.digest == "sha1" and verdict.weak_digest
    assert verdict.judged_at == verdict.signing_time == _signed_at(data)
    assert len(verdict.chain) == 3
    root = verdict.chain[-1].subject.rfc4514_string()
    assert ("Baltimore CyberTrust Root" if "2014" in name else "Actalis Authentication Root CA") in root
    assert verdict.pec["category"] in ("envelope", "receipt") and verdict.pec["identifier"]
    # the outside judge agrees, at the same time
    when = str(int(_signed_at(data).timestamp()))
    (tmp_path / "m.eml").write_bytes(data)
    proc = subprocess.run([OPENSSL, "cms", "-verify", "-in", str(tmp_path / "m.eml"), "-CAfile",
                           str(DEBIAN_ROOTS), "-attime", when, "-out", "/dev/null"],
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_sha1_intermediate_is_judged_not_dropped() -> None:
    """The 2014 chain's DigitPA CA1 is SHA-1-signed: it holds by default, and an allow-list
    without SHA-1 names that link and the algorithm instead of 'no path to a trusted root'."""
    data = sample("aruba-posta-certificata-2014.eml")
    strict = judge(data, ROOTS, policy=AlgorithmPolicy.from_names(["sha256", "sha384", "sha512"]))
    assert strict.kind == "algorithm-refused"
    assert "sha1" in strict.reason
    signed = smime.split_signed(data)
    checked = cms.check_signed_data(signed.signature, signed.inner_view)
    with pytest.raises(AlgorithmRefused, match=r"DigitPA CA1.*sha1"):
        trust.validate_path(checked.signer, checked.certificates, ROOTS, _signed_at(data),
                            policy=AlgorithmPolicy.from_names(["sha256"]))


def test_the_namirial_envelope_from_a_list_archive() -> None:
    verdict = judge(derive_namirial(), ROOTS)
    assert verdict.kind == "valid", verdict.reason
    assert verdict.pec["type"] == "posta-certificata"
    assert verdict.pec["identifier"].endswith("@sicurezzapostale.it")
    assert len(verdict.pec["recipients"]) == 7
    # as archived, Mailman's wrapper is not S/MIME: malformed, not "altered"
    assert judge(sample("namirial-posta-certificata-2024-mailman.eml"), ROOTS).kind == "malformed"


@pytest.mark.parametrize("name", EDITED)
def test_edited_samples_are_judged_altered(name: str) -> None:
    verdict = judge(sample(name), ROOTS)
    assert verdict.kind == "altered", verdict.reason
    assert "messageDigest does not match" in verdict.reason
    assert verdict.signer is None or "Sogei" in verdict.signer.subject.rfc4514_string()


@pytest.mark.parametrize("name", UNSIGNED)
def test_unsigned_anonymised_samples_are_malformed(name: str) -> None:
    verdict = judge(sample(name), ROOTS)
    assert verdict.kind == "malformed"
    assert "not an S/MIME signed message" in verdict.reason


def test_verify_needs_no_provider_and_tells_verdicts_apart(tmp_path: Path) -> None:
    good = tmp_path / "consegna.eml"
    good.write_bytes(sample("aruba-avvenuta-consegna-2018.eml"))
    code, out = _cli("verify", "--system-roots", str(good))
    assert code == 0, out
    assert out.startswith("VALID") and "digest: sha1 (weak" in out and "Actalis" in out
    code, out = _cli("verify", "--system-roots", "--json", str(good))
    assert code == 0 and json.loads(out)["verdict"] == "valid" and json.loads(out)["weak_digest"]

    # judged today the same receipt's certificate has expired: a different word, a different code
    code, out = _cli("verify", "--system-roots", "--at", "2026-01-01", str(good))
    assert code == EXIT_CODES["expired"] == 12, out
    assert "expired 2020-12-03" in out
    # trusting only the other root: intact, but not trusted, and it says which certificate
    code, out = _cli("verify", "--ca", str(BALTIMORE), str(good))
    assert code == EXIT_CODES["untrusted"] == 10, out
    assert "NOT TRUSTED" in out and "Posta Certificata ARUBA PEC" in out
    # --ca takes a directory too
    code, _ = _cli("verify", "--ca", str(ACTALIS.parent), str(good))
    assert code == 0

    edited = tmp_path / "edited.eml"
    edited.write_bytes(sample(EDITED[0]))
    code, out = _cli("verify", "--system-roots", str(edited))
    assert code == EXIT_CODES["altered"] == 11 and "altered after signing" in out
    unsigned = tmp_path / "unsigned.eml"
    unsigned.write_bytes(sample(UNSIGNED[0]))
    code, out = _cli("verify", "--system-roots", "--json", str(unsigned))
    assert code == EXIT_CODES["malformed"] == 17 and json.loads(out)["verdict"] == "malformed"
    # a real provider's signature carries no RFC 3161 token: asking for one says so
    code, out = _cli("verify", "--system-roots", "--require-timestamp", str(good))
    assert code == EXIT_CODES["timestamp"] == 15 and "timestamp missing" in out
    # no roots and no provider configuration: a clear error, not a traceback
    code, out = _cli("verify", str(good))
    assert code == 1 and "no configuration file" in out


@pytest.mark.parametrize(("key_type", "digest", "pss"), [
    ("rsa", "sha1", False), ("rsa", "sha384", False), ("rsa", "sha512", True), ("rsa", "sha256", True),
    ("ec", "sha1", False), ("ec", "sha384", False), ("ec", "sha512", False),
])
def test_what_other_signers_make_is_accepted(key_type: str, digest: str, pss: bool, tmp_path: Path) -> None:
    """openssl signs (RSA PKCS#1 v1.5 or PSS, ECDSA; SHA-1 to SHA-512); pecd verifies, and marks
    SHA-1 weak. pecd's own signatures stay SHA-256."""
    ca = pki.CertAuthority.load_or_create(tmp_path / "ca")
    key = pki.new_key(key_type)
    cert = ca.issue_signing_cert(key, "Other", "posta@other.test")
    pki.write_key(tmp_path / "k.pem", key)
    pki.write_cert(tmp_path / "c.pem", cert)
    (tmp_path / "data").write_bytes(b"Dati certificati\r\n")
    args = [OPENSSL, "cms", "-sign", "-binary", "-md", digest, "-signer", str(tmp_path / "c.pem"),
            "-inkey", str(tmp_path / "k.pem"), "-in", str(tmp_path / "data"), "-outform", "DER",
            "-out", str(tmp_path / "sig")]
    if pss:
        args += ["-keyopt", "rsa_padding_mode:pss"]
    subprocess.run(args, check=True, capture_output=True)
    info = cms.verify_detached((tmp_path / "sig").read_bytes(), b"Dati certificati\r\n", [ca.cert])
    assert info.digest == digest and info.weak_digest == (digest == "sha1")
    with pytest.raises(cms.SignatureInvalid, match=r"altered|does not match"):
        cms.verify_detached((tmp_path / "sig").read_bytes(), b"Dati certificati!\r\n", [ca.cert])
    if digest == "sha1":
        with pytest.raises(cms.SignatureInvalid, match="sha1 not accepted"):
            cms.verify_detached((tmp_path / "sig").read_bytes(), b"Dati certificati\r\n", [ca.cert],
                                policy=AlgorithmPolicy.from_names(["sha256"]))
    ours = cms.Signer(key, cert, ManualClock(datetime.now(UTC))).sign_detached(b"x")
    assert cms.verify_detached(ours, b"x", [ca.cert]).digest == "sha256"


def test_a_genuine_envelope_is_taken_in_charge_at_its_time(tmp_path: Path) -> None:
    """Sogei's 2018 envelope to l.battistini@pec.it, its signer imported into the index, sent to
    pecd's inbound listener while pecd's clock says 2018-12-08: envelope in the mailbox,
    take-charge receipt issued, no anomaly; the ledger marks the SHA-1 signature."""
    # stored with bare LF as the fixture's authors saved it; SMTP carries CRLF
    data = sample("sogei-posta-certificata-2018.eml").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    verdict = judge(data, ROOTS)
    assert verdict.signer is not None and verdict.pec["sender"] == "sdi03@pec.fatturapa.it"
    rcpt = "l.battistini@pec.it"
    p = make_provider(tmp_path, "pec.it", tmp_path / "ca")
    p.add_user(rcpt, "battistini-secret")
    with p.ca.open("a") as bundle:  # trust the real network's root beside the dev CA
        bundle.write(ACTALIS.read_text())
    card = tmp_path / "sogei.json"
    card.write_text(json.dumps({
        "pecd-provider-card": 1, "name": "Sogei", "domains": ["pec.fatturapa.it"],
        "host": "127.0.0.1", "port": free_port(), "service_address": "posta-certificata@pec.fatturapa.it",
        "certificate": verdict.signer.public_bytes(serialization.Encoding.PEM).decode(),
    }))
    assert "imported" in p.cli("index", "import", str(card))
    # no Internet here: the signer's real CRL and OCSP responder cannot be asked, and the
    # default policy would (rightly) defer the envelope; this replay of 2018 mail opts out
    configure(p, "reception", revocation="off")
    port = p.config.listen.inbound_port
    sent: list[tuple[int, bytes]] = []

    def arrived() -> bool:
        if not sent:
            try:
                sent.append(send_inbound(p, port, "sdi03@pec.fatturapa.it", [rcpt], data, tls=True))
            except OSError:
                return False  # the listener is not up yet
        return len(p.messages(rcpt)) >= 1

    serve_under_faketime(p, "@2018-12-08 12:00:00", arrived, "envelope in the mailbox")
    assert sent[0][0] == 250, sent
    [stored] = p.messages(rcpt)
    assert kind_of(stored) == "posta-certificata"
    assert judge(stored, load_roots([ACTALIS])).kind == "valid"  # delivered as signed
    assert ledger_rows(p, "anomaly") == []
    [taken] = ledger_rows(p, "taken-in-charge")
    assert taken["msgid"] == verdict.pec["identifier"]
    assert taken["detail"]["digest"] == "sha1" and taken["detail"]["weak_digest"] is True
    assert taken["related"], "a take-charge receipt was issued"
    conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
    try:
        metas = [json.loads(m) for (m,) in conn.execute("SELECT meta FROM queue")]
    finally:
        conn.close()
    assert any(m.get("what") == "take-charge" and m.get("msgid") == taken["related"][0] for m in metas)


def test_the_same_envelope_after_its_certificate_expired_is_an_anomaly() -> None:
    """Judged at arrival, not at the time the signature claims: an expired key cannot choose."""
    data = sample("sogei-posta-certificata-2018.eml")
    verdict = judge(data, ROOTS, at=datetime(2021, 1, 1, tzinfo=UTC))
    assert verdict.kind == "expired" and "expired 2020-11-22" in verdict.reason

