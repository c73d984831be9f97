"""An external RFC 3161 TSA over HTTP: an independent TSA (``openssl ts -reply``, its own CA, key
and certificate) behind a small HTTP front. With ``[tsa] url`` pecd's signatures carry that TSA's
tokens, which ``openssl ts -verify`` accepts against the independent CA alone. When the TSA is
down, mail is still accepted and receipts still made, stamped by the built-in TSA, and each such
token is a ``tsa-fallback`` ledger row naming its imprint and the reason."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pecd.clock import SystemClock
from pecd.format import pec
from pecd.trust import cms, pki, smime
from pecd.trust.tsa import (
    FallbackTimestamper,
    FallbackUse,
    LocalTSA,
    RemoteTSA,
    TimestampInvalid,
    verify_token,
)

from .conftest import OPENSSL, ProviderDir, openssl, openssl_timestamp_verifies, submit
from .interop_support import RunningService, configure, ledger_rows, require, wait_until

TS_CONFIG = """\
[ tsa ]
default_tsa = independent

[ independent ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.pem
certs = $dir/tsa.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.3.6.1.4.1.4146.2.3
other_policies = 1.3.6.1.4.1.4146.2.2
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = no
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


@dataclass
class OpensslTSA:
    """openssl's TSA (one ``openssl ts -reply`` per request) behind an HTTP POST front."""

    dir: Path
    ca: Path
    cert: Path
    port: int = 0
    served: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tsr"

    def reply(self, query: bytes) -> bytes | None:
        with self._lock:  # openssl's serial file is not safe for concurrent writers
            n = next(_counter)
            tsq, tsr = self.dir / f"q{n}.tsq", self.dir / f"r{n}.tsr"
            tsq.write_bytes(query)
            done = subprocess.run(
                [OPENSSL, "ts", "-reply", "-config", str(self.dir / "ts.cnf"), "-queryfile",
                 str(tsq), "-out", str(tsr)], capture_output=True, check=False)
            if done.returncode != 0:
                return None
            self.served += 1
            return tsr.read_bytes()

    def start(self) -> None:
        tsa = self

        class Front(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                query = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Type") != "application/timestamp-query":
                    self.send_error(415)
                    return
                answer = tsa.reply(query)
                if answer is None:
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Front)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Down: the port refuses connections until ``start`` again (same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


_counter = itertools.count()


@pytest.fixture
def openssl_tsa(tmp_path: Path) -> Iterator[OpensslTSA]:
    require("openssl", "openssl")
    d = tmp_path / "independent-tsa"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
            "-out", str(d / "ca.pem"), "-days", "3650", "-subj", "/O=Independent/CN=Independent TSA Root",
            "-addext", "basicConstraints=critical,CA:true",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "tsa.key"),
            "-out", str(d / "tsa.csr"), "-subj", "/O=Independent/CN=Independent TSA")
    (d / "tsa.ext").write_text("basicConstraints=critical,CA:false\n"
                               "keyUsage=critical,digitalSignature\n"
                               "extendedKeyUsage=critical,timeStamping\n")
    openssl("x509", "-req", "-in", str(d / "tsa.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
            str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "tsa.pem"), "-days", "825",
            "-extfile", str(d / "tsa.ext"))
    (d / "serial").write_text("01\n")
    (d / "ts.cnf").write_text(TS_CONFIG.format(dir=d))
    tsa = OpensslTSA(dir=d, ca=d / "ca.pem", cert=d / "tsa.pem")
    tsa.start()
    try:
        yield tsa
    finally:
        tsa.stop()


def _openssl_verifies_token(token: bytes, data: bytes, tsa: OpensslTSA, tmp_path: Path) -> bool:
    (tmp_path / "tok.der").write_bytes(token)
    (tmp_path / "data.bin").write_bytes(data)
    done = subprocess.run([OPENSSL, "ts", "-verify", "-data", str(tmp_path / "data.bin"), "-in",
                           str(tmp_path / "tok.der"), "-token_in", "-CAfile", str(tsa.ca),
                           "-untrusted", str(tsa.cert)], capture_output=True, check=False)
    return done.returncode == 0


def test_remote_tsa_and_fallback_against_openssl_tsa(openssl_tsa: OpensslTSA,
                                                     tmp_path: Path) -> None:
    independent_ca = pki.load_cert(openssl_tsa.ca)
    token = RemoteTSA(openssl_tsa.url, None, roots=[independent_ca]).timestamp(b"payload")
    assert _openssl_verifies_token(token, b"payload", openssl_tsa, tmp_path)
    verify_token(token, b"payload", [independent_ca])

    # trust comes from the roots: a TSA that does not chain to them is not used
    own_ca = pki.CertAuthority.load_or_create(tmp_path / "own-ca")
    with pytest.raises(TimestampInvalid):
        RemoteTSA(openssl_tsa.url, None, roots=[own_ca.cert]).timestamp(b"payload")

    tsa_key = pki.new_key("rsa")
    local = LocalTSA(tsa_key, own_ca.issue_tsa_cert(tsa_key, "built-in TSA"), SystemClock())
    now = [0.0]
    uses: list[FallbackUse] = []
    stamper = FallbackTimestamper(RemoteTSA(openssl_tsa.url, None, roots=[independent_ca]),
                                  local, name=openssl_tsa.url, retry_after=60,
                                  on_fallback=uses.append, monotonic=lambda: now[0])
    verify_token(stamper.timestamp(b"one"), b"one", [independent_ca])  # external while up
    assert uses == [] and openssl_tsa.served == 3

    openssl_tsa.stop()
    down = stamper.timestamp(b"two")
    verify_token(down, b"two", [own_ca.cert])  # made by the built-in TSA
    assert [u.imprint_sha256 for u in uses] == [hashlib.sha256(b"two").hexdigest()]
    assert "TimestampUnavailable" in uses[0].reason and uses[0].primary == openssl_tsa.url

    openssl_tsa.start()  # back, but the primary rests for retry_after: no request is made
    verify_token(stamper.timestamp(b"three"), b"three", [own_ca.cert])
    assert openssl_tsa.served == 3 and len(uses) == 2 and "not retried" in uses[1].reason
    now[0] += 61
    verify_token(stamper.timestamp(b"four"), b"four", [independent_ca])
    assert openssl_tsa.served == 4 and len(uses) == 2


ORIGINAL = (
    b"From: Alice <alice@a.test>\r\n"
    b"To: Bob <bob@b.test>\r\n"
    b"Subject: {subject}\r\n"
    b"Message-ID: <{tag}@client.a.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Marca temporale esterna.\r\n"
)


def _message(subject: str, tag: str) -> bytes:
    return ORIGINAL.replace(b"{subject}", subject.encode()).replace(b"{tag}", tag.encode())


def _acceptance(a: ProviderDir, subject: str) -> bytes | None:
    for raw in a.messages("alice@a.test"):
        cd = pec.parse(raw).certdata
        if cd is not None and cd.type == "accettazione" and cd.subject == subject:
            return raw
    return None


def test_service_stamps_with_external_tsa_and_falls_back(
        two_providers: tuple[ProviderDir, ProviderDir], openssl_tsa: OpensslTSA,
        tmp_path: Path) -> None:
    a, b = two_providers
    for p in (a, b):  # operators trust the external TSA's CA, as they trust the provider CA
        p.ca.write_text(p.ca.read_text() + openssl_tsa.ca.read_text())
    configure(a, "tsa", url=openssl_tsa.url)
    independent_only = openssl_tsa.ca

    with RunningService(a.config) as svc, RunningService(b.config):
        code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                             _message("up", "tsa-up"), svc.submission_port)
        assert code == 250, reply
        wait_until(lambda: len(b.messages("bob@b.test")) == 1 and _acceptance(a, "up") is not None,
                   what="envelope and acceptance with the external TSA up")
        up_served = openssl_tsa.served
        assert up_served >= 2  # the acceptance's and the envelope's signatures

        openssl_tsa.stop()
        code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                             _message("down", "tsa-down"), svc.submission_port)
        assert code == 250, reply  # accepted although the external TSA is down
        wait_until(lambda: len(b.messages("bob@b.test")) == 2 and
                   _acceptance(a, "down") is not None,
                   what="envelope and acceptance with the external TSA down")
    assert openssl_tsa.served == up_served

    up, down = _acceptance(a, "up"), _acceptance(a, "down")
    assert up is not None and down is not None
    up_eml, down_eml = tmp_path / "up.eml", tmp_path / "down.eml"
    up_eml.write_bytes(up)
    down_eml.write_bytes(down)
    envelope_up = tmp_path / "envelope-up.eml"
    envelope_up.write_bytes(next(m for m in b.messages("bob@b.test")
                                 if b"Subject: POSTA CERTIFICATA: up" in m))

    # while up: openssl accepts the tokens against the independent TSA's CA alone
    assert openssl_timestamp_verifies(up_eml, independent_only, openssl_tsa.cert)
    assert openssl_timestamp_verifies(envelope_up, independent_only, openssl_tsa.cert)
    # while down: the built-in TSA stamped, and the independent CA does not vouch for it
    assert not openssl_timestamp_verifies(down_eml, independent_only, openssl_tsa.cert)
    assert openssl_timestamp_verifies(down_eml, a.ca, a.tsa_cert)
    for eml in (up_eml, down_eml):
        out = a.cli("verify", str(eml))
        assert "signature: valid" in out and "(RFC 3161, verified)" in out

    fallbacks = ledger_rows(a, "tsa-fallback")
    assert fallbacks, "the ledger must say that the built-in TSA stood in"
    details = [r["detail"] for r in fallbacks]
    assert all(d["tsa"] == "built-in" and d["external"] == openssl_tsa.url  # type: ignore[index]
               for d in details)
    assert "TimestampUnavailable" in str(details[0]["reason"])  # type: ignore[index]
    extracted = cms.extract_timestamp_token(smime.split_signed(down).signature)
    assert extracted is not None
    imprint = hashlib.sha256(extracted[1]).hexdigest()
    assert imprint in {d["imprint_sha256"] for d in details}  # type: ignore[index]
    up_extracted = cms.extract_timestamp_token(smime.split_signed(up).signature)
    assert up_extracted is not None
    assert hashlib.sha256(up_extracted[1]).hexdigest() not in \
        {d["imprint_sha256"] for d in details}  # type: ignore[index]
    assert "ledger ok" in a.cli("ledger", "verify")
