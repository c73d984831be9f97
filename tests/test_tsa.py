"""pecd.trust.tsa: tokens checked by `openssl ts` and openssl-made tokens checked by verify_token."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import core, tsp
from cryptography import x509

from pecd.clock import ManualClock, SystemClock
from pecd.trust import cms, pki, tsa

OPENSSL = "/usr/bin/openssl"
T0 = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=123456)  # inside cert life


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, check=False, timeout=60)


@dataclass
class TSAFiles:
    dir: Path
    ca: pki.CertAuthority
    key: pki.PrivateKey
    cert: x509.Certificate

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def tsa_pem(self) -> Path:
        return self.dir / "tsa.pem"

    @property
    def tsa_key(self) -> Path:
        return self.dir / "tsa.key"


def _make(base: Path, kind: pki.KeyType) -> TSAFiles:
    ca = pki.CertAuthority.load_or_create(base, f"TSA test CA {kind}", kind=kind)
    key = pki.new_key(kind)
    cert = ca.issue_tsa_cert(key, f"pecd TSA {kind}")
    pki.write_key(base / "tsa.key", key)
    pki.write_cert(base / "tsa.pem", cert)
    return TSAFiles(base, ca, key, cert)


@pytest.fixture(scope="session", params=["rsa", "ec"])
def tsa_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TSAFiles:
    return _make(tmp_path_factory.mktemp(f"tsa-{request.param}"), request.param)


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TSAFiles:
    return _make(tmp_path_factory.mktemp("tsa-other"), "ec")


def tst_info(token: bytes) -> tsp.TSTInfo:
    ci = asn1_cms.ContentInfo.load(token)
    return ci["content"]["encap_content_info"]["content"].parsed


# --------------------------------------------------------------------------- LocalTSA.timestamp


def test_token_verifies_and_carries_the_clock_time(tsa_files: TSAFiles) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, ManualClock(T0))
    token = local.timestamp(b"some signature value")
    assert tsa.verify_token(token, b"some signature value", [tsa_files.ca.cert]) == T0.replace(
        microsecond=123000
    )
    info = tst_info(token)
    assert (
        info["message_imprint"]["hashed_message"].native == hashlib.sha256(b"some signature value").digest()
    )
    assert info["policy"].dotted == tsa.DEFAULT_POLICY
    with pytest.raises(tsa.TimestampInvalid, match="imprint"):
        tsa.verify_token(token, b"other data", [tsa_files.ca.cert])


def test_openssl_ts_verify_accepts_local_tokens(tsa_files: TSAFiles, tmp_path: Path) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    data = b"\x00\x01 signature value bytes \xff"
    (tmp_path / "data.bin").write_bytes(data)
    (tmp_path / "tok.der").write_bytes(local.timestamp(data))
    r = openssl(
        "ts", "-verify", "-data", tmp_path / "data.bin", "-in", tmp_path / "tok.der",
        "-token_in", "-CAfile", tsa_files.ca_pem, "-untrusted", tsa_files.tsa_pem,
    )  # fmt: skip
    assert r.returncode == 0 and "Verification: OK" in r.stdout, r.stderr
    (tmp_path / "other.bin").write_bytes(data + b"!")
    r = openssl(
        "ts", "-verify", "-data", tmp_path / "other.bin", "-in", tmp_path / "tok.der",
        "-token_in", "-CAfile", tsa_files.ca_pem, "-untrusted", tsa_files.tsa_pem,
    )  # fmt: skip
    assert r.returncode != 0


def test_untrusted_tampered_and_expired_tokens_fail(tsa_files: TSAFiles, other_ca: TSAFiles) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    token = local.timestamp(b"x")
    with pytest.raises(tsa.TimestampInvalid, match="trusted root"):
        tsa.verify_token(token, b"x", [other_ca.ca.cert])
    # flip a byte inside the signed TSTInfo (its last byte: accuracy seconds 1 → 0)
    tst_der = tst_info(token).dump()
    at = token.index(tst_der) + len(tst_der) - 1
    tampered = token[:at] + bytes([token[at] ^ 1]) + token[at + 1 :]
    with pytest.raises(tsa.TimestampInvalid, match="messageDigest"):
        tsa.verify_token(tampered, b"x", [tsa_files.ca.cert])
    with pytest.raises(tsa.TimestampInvalid, match="malformed"):
        tsa.verify_token(b"\x30\x03\x02\x01\x01", b"x", [tsa_files.ca.cert])
    # a TSA whose clock is past its certificate's life issues tokens nobody should accept
    late = tsa.LocalTSA(
        tsa_files.key,
        tsa_files.cert,
        ManualClock(tsa_files.cert.not_valid_after_utc + timedelta(1)),
    )
    with pytest.raises(tsa.TimestampInvalid, match="expired"):
        tsa.verify_token(late.timestamp(b"x"), b"x", [tsa_files.ca.cert])


def test_local_tsa_refuses_a_certificate_without_timestamping_eku(tsa_files: TSAFiles) -> None:
    key = pki.new_key("ec")
    cert = tsa_files.ca.issue_signing_cert(key, "Not a TSA", "x@x.test")
    with pytest.raises(ValueError, match="TSA certificate"):
        tsa.LocalTSA(key, cert, SystemClock())
    with pytest.raises(ValueError, match="does not belong"):
        tsa.LocalTSA(pki.new_key("ec"), tsa_files.cert, SystemClock())


def test_serial_numbers_are_unique_and_positive(tsa_files: TSAFiles) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, ManualClock(T0))
    serials = [tst_info(local.timestamp(b"same")).native["serial_number"] for _ in range(300)]
    assert len(set(serials)) == 300
    assert all(0 < s < 2**160 for s in serials)
    again = tsa.LocalTSA(tsa_files.key, tsa_files.cert, ManualClock(T0))
    assert tst_info(again.timestamp(b"same")).native["serial_number"] not in serials


# --------------------------------------------------------------------------- LocalTSA.respond


def _query(tmp_path: Path, *opts: str, data: bytes = b"document") -> Path:
    (tmp_path / "doc.bin").write_bytes(data)
    req = tmp_path / "req.tsq"
    r = openssl("ts", "-query", "-data", tmp_path / "doc.bin", *opts, "-out", req)
    assert r.returncode == 0, r.stderr
    return req


def _reply_text(tmp_path: Path, resp: bytes) -> str:
    (tmp_path / "resp.tsr").write_bytes(resp)
    r = openssl("ts", "-reply", "-in", tmp_path / "resp.tsr", "-text")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("digest", ["sha256", "sha1", "sha384", "sha512"])
def test_respond_to_openssl_query(tsa_files: TSAFiles, tmp_path: Path, digest: str) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    req = _query(tmp_path, f"-{digest}", "-cert")
    resp = local.respond(req.read_bytes())
    text = _reply_text(tmp_path, resp)
    assert "Status: Granted." in text
    assert f"Hash Algorithm: {digest}" in text
    assert f"Policy OID: {tsa.DEFAULT_POLICY}" in text
    nonce = openssl("ts", "-query", "-in", req, "-text").stdout.split("Nonce: ")[1].split()[0]
    assert f"Nonce: {nonce}" in text
    r = openssl(
        "ts", "-verify", "-queryfile", req, "-in", tmp_path / "resp.tsr",
        "-CAfile", tsa_files.ca_pem,
    )  # fmt: skip
    assert r.returncode == 0 and "Verification: OK" in r.stdout, r.stderr
    # the same response does not answer another query (different nonce and data)
    (tmp_path / "other").mkdir()
    other = _query(tmp_path / "other", f"-{digest}", "-cert", data=b"another document")
    r = openssl(
        "ts", "-verify", "-queryfile", other, "-in", tmp_path / "resp.tsr",
        "-CAfile", tsa_files.ca_pem,
    )  # fmt: skip
    assert r.returncode != 0


def test_respond_honours_cert_req_false(tsa_files: TSAFiles, tmp_path: Path) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    req = _query(tmp_path, "-sha256", "-no_nonce")
    resp = local.respond(req.read_bytes())
    (tmp_path / "resp.tsr").write_bytes(resp)
    token = tsp.TimeStampResp.load(resp)["time_stamp_token"]
    assert isinstance(token["content"]["certificates"], core.Void)  # absent
    # without the certificate in the token openssl needs it as -untrusted
    args: list[str | Path] = ["ts", "-verify", "-queryfile", req, "-in", tmp_path / "resp.tsr", "-CAfile"]
    assert openssl(*args, tsa_files.ca_pem).returncode != 0
    assert openssl(*args, tsa_files.ca_pem, "-untrusted", tsa_files.tsa_pem).returncode == 0


def test_respond_rejections_are_valid_responses(tsa_files: TSAFiles, tmp_path: Path) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    text = _reply_text(tmp_path, local.respond(b"\x30\x03garbage"))
    assert "Status: Rejected" in text and "has the wrong format" in text

    req = _query(tmp_path, "-md5")
    text = _reply_text(tmp_path, local.respond(req.read_bytes()))
    assert "Status: Rejected" in text and "unsupported algorithm" in text, text

    req = _query(tmp_path, "-sha256", "-tspolicy", "1.2.3.4.5")
    text = _reply_text(tmp_path, local.respond(req.read_bytes()))
    assert "Status: Rejected" in text and "policy is not supported" in text, text

    req = _query(tmp_path, "-sha256", "-tspolicy", tsa.DEFAULT_POLICY)
    assert "Status: Granted" in _reply_text(tmp_path, local.respond(req.read_bytes()))


# --------------------------------------------------------------------------- openssl as the TSA

OPENSSL_TSA_CONF = """\
[ tsa ]
default_tsa = tsa_config1

[ tsa_config1 ]
serial = {dir}/tsaserial
crypto_device = builtin
signer_cert = {dir}/tsa.pem
certs = {dir}/ca.pem
signer_key = {dir}/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha1, sha256, sha384, sha512
accuracy = secs:1, millisecs:500, microsecs:100
clock_precision_digits = 3
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = {ess_alg}
"""


@pytest.mark.parametrize("ess_alg", ["sha256", "sha1"])  # signingCertificateV2 / V1
def test_openssl_made_tokens_pass_verify_token(
    tsa_files: TSAFiles, other_ca: TSAFiles, tmp_path: Path, ess_alg: str
) -> None:
    conf = tmp_path / "tsa.cnf"
    conf.write_text(OPENSSL_TSA_CONF.format(dir=tsa_files.dir, ess_alg=ess_alg))
    (tsa_files.dir / "tsaserial").write_text("01\n")
    data = b"the signature value of some CMS SignerInfo"
    req = _query(tmp_path, "-sha256", "-cert", data=data)
    before = datetime.now(UTC).replace(microsecond=0)
    r = openssl("ts", "-reply", "-config", conf, "-queryfile", req, "-token_out", "-out", tmp_path / "t.der")
    assert r.returncode == 0, r.stderr
    token = (tmp_path / "t.der").read_bytes()
    when = tsa.verify_token(token, data, [tsa_files.ca.cert])
    assert before <= when <= datetime.now(UTC) + timedelta(seconds=1)
    with pytest.raises(tsa.TimestampInvalid, match="imprint"):
        tsa.verify_token(token, data + b"x", [tsa_files.ca.cert])
    with pytest.raises(tsa.TimestampInvalid):
        tsa.verify_token(token, data, [other_ca.ca.cert])


# --------------------------------------------------------------------------- RemoteTSA over HTTP


@pytest.fixture
def http_tsa() -> Iterator[Callable[[Callable[[bytes], tuple[int, bytes]]], str]]:
    """Start a real HTTP server on 127.0.0.1 whose POST handler is the given function."""
    servers: list[http.server.ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []

    def start(answer: Callable[[bytes], tuple[int, bytes]]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/timestamp-query"
                status, payload = answer(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"http://127.0.0.1:{server.server_address[1]}/tsr"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(timeout=10)


def test_remote_tsa_against_a_real_http_server(tsa_files: TSAFiles, http_tsa: Callable[..., str]) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    url = http_tsa(lambda body: (200, local.respond(body)))
    for cert in (tsa_files.cert, None):
        remote = tsa.RemoteTSA(url, cert, timeout=5)
        token = remote.timestamp(b"signature value")
        tsa.verify_token(token, b"signature value", [tsa_files.ca.cert])
        info = tst_info(token)
        assert info["message_imprint"]["hash_algorithm"]["algorithm"].native == "sha256"
        assert info["nonce"].native is not None
    # a Signer with the remote TSA produces CAdES-T signatures that verify
    key = pki.new_key("ec")
    signer = cms.Signer(
        key,
        tsa_files.ca.issue_signing_cert(key, "P", "p@p.test"),
        SystemClock(),
        timestamper=tsa.RemoteTSA(url, tsa_files.cert),
    )
    result = cms.verify_detached(
        signer.sign_detached(b"m"), b"m", [tsa_files.ca.cert], require_timestamp=True
    )
    assert result.timestamp_time is not None


def test_remote_tsa_rejects_a_token_from_another_tsa_certificate(
    tsa_files: TSAFiles, other_ca: TSAFiles, http_tsa: Callable[..., str]
) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    url = http_tsa(lambda body: (200, local.respond(body)))
    with pytest.raises(tsa.TimestampInvalid):
        tsa.RemoteTSA(url, other_ca.cert).timestamp(b"x")


def test_remote_tsa_rejects_a_replayed_nonce(tsa_files: TSAFiles, http_tsa: Callable[..., str]) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())

    def other_nonce(body: bytes) -> tuple[int, bytes]:
        req = tsp.TimeStampReq.load(body)
        req["nonce"] = req["nonce"].native + 1
        return 200, local.respond(req.dump(force=True))

    url = http_tsa(other_nonce)
    for cert in (tsa_files.cert, None):
        with pytest.raises(tsa.TimestampInvalid, match="nonce"):
            tsa.RemoteTSA(url, cert).timestamp(b"x")


def test_remote_tsa_rejects_a_token_for_other_data(tsa_files: TSAFiles, http_tsa: Callable[..., str]) -> None:
    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())

    def wrong_data(body: bytes) -> tuple[int, bytes]:
        req = tsp.TimeStampReq.load(body)
        forged = tsp.TimeStampReq(
            {
                "version": "v1",
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": hashlib.sha256(b"something else").digest(),
                },
                "nonce": req["nonce"].native,
                "cert_req": True,
            }
        )
        return 200, local.respond(forged.dump())

    url = http_tsa(wrong_data)
    for cert in (tsa_files.cert, None):
        with pytest.raises(tsa.TimestampInvalid):
            tsa.RemoteTSA(url, cert).timestamp(b"x")


def test_remote_tsa_unavailable(tsa_files: TSAFiles, http_tsa: Callable[..., str]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and is now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tsa.TimestampUnavailable):
        tsa.RemoteTSA(f"http://127.0.0.1:{port}/tsr", tsa_files.cert, timeout=5).timestamp(b"x")

    url = http_tsa(lambda body: (500, b"internal error"))
    with pytest.raises(tsa.TimestampUnavailable):
        tsa.RemoteTSA(url, tsa_files.cert, timeout=5).timestamp(b"x")

    local = tsa.LocalTSA(tsa_files.key, tsa_files.cert, SystemClock())
    refusing = http_tsa(lambda body: (200, local.respond(b"not a request")))
    with pytest.raises(tsa.TimestampUnavailable, match="refused"):
        tsa.RemoteTSA(refusing, tsa_files.cert, timeout=5).timestamp(b"x")
