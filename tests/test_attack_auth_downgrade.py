"""Getting a password sent in clear or over weak TLS: AUTH exists only on an encrypted socket
(after STARTTLS, or from the first byte on the implicit-TLS port, where aiosmtpd 1.4.6 on its
own would not offer it), TLS below 1.2 is refused, and the inbound listener offers no AUTH."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope, Session

from pecd.config import Limits
from pecd.edges.smtp import PecdSMTP
from pecd.throttle import ConnectionLimiter

from .attack_support import ALICE, ALICE_PW, Raw, login, serving, single_provider
from .conftest import ProviderDir, client_tls

PLAIN_BLOB = "AGFsaWNlQGEudGVzdABhbGljZS1zZWNyZXQ="  # \0alice@a.test\0alice-secret


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("downgrade"))


def test_no_auth_before_starttls_and_the_password_is_never_asked_for(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,), Raw(svc.ports.submission) as raw:
        raw.reply()
        code, ehlo = raw.cmd("EHLO attacker.test")
        assert code == 250 and "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert raw.cmd(f"AUTH PLAIN {PLAIN_BLOB}")[0] == 538
        assert raw.cmd("AUTH LOGIN")[0] == 538  # no 334: the client is never asked for secrets
        assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 530
        raw.starttls(a.ca)
        _, ehlo = raw.cmd("EHLO attacker.test")
        assert "AUTH" in ehlo and "STARTTLS" not in ehlo
        assert raw.cmd(f"AUTH PLAIN {PLAIN_BLOB}")[0] == 235
        assert isinstance(raw.sock, ssl.SSLSocket) and raw.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_implicit_tls_offers_auth_and_plaintext_gets_nothing(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,):
        with socket.create_connection(("127.0.0.1", svc.ports.smtps), timeout=15) as plain:
            plain.sendall(b"EHLO attacker.test\r\n")
            got = Raw.__new__(Raw)
            got.sock, got.buf = plain, b""
            assert b"220" not in got.wait_closed(15)  # a TLS listener: no SMTP in clear at all
        ctx = client_tls(a.ca)
        with socket.create_connection(("127.0.0.1", svc.ports.smtps), timeout=15) as tcp, \
                ctx.wrap_socket(tcp, server_hostname="localhost") as tls:
            raw = Raw.__new__(Raw)
            raw.sock, raw.buf = tls, b""
            assert raw.reply()[0] == 220
            _, ehlo = raw.cmd("EHLO client.test")
            assert "AUTH" in ehlo and "LOGIN" in ehlo and "PLAIN" in ehlo, ehlo
            assert raw.cmd(f"AUTH PLAIN {PLAIN_BLOB}")[0] == 235
            assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250


def test_auth_needs_an_encrypted_socket_whatever_aiosmtpd_is_told(tmp_path: Path) -> None:
    """Defence in depth: even wired with aiosmtpd's TLS requirement off (as the implicit-TLS
    work-around used to be), a plaintext socket never reaches the password check."""
    asked: list[str] = []

    class Handler:  # what PecdSMTP asks of its handler (smtp._Base), and no more
        connections = ConnectionLimiter(10)
        closing = False

        def __init__(self) -> None:
            self.sessions: set[PecdSMTP] = set()

        async def authenticate(self, user: str, password: str, peer: object) -> bool:
            asked.append(password)
            return True

        async def refused(self, session: Session, envelope: Envelope, refusal: object) -> str:
            raise AssertionError("not reached")

        def tls_failures_allow(self, address: str) -> bool:
            return True

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: PecdSMTP(Handler(), limits=Limits(), auth_require_tls=False,  # type: ignore[arg-type]
                             auth_required=True, loop=loop),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> list[int]:
            with Raw(port) as raw:
                raw.reply()
                raw.cmd("EHLO attacker.test")
                return [raw.cmd(f"AUTH PLAIN {PLAIN_BLOB}")[0], raw.cmd("AUTH LOGIN")[0]]

        try:
            assert await loop.run_in_executor(None, client) == [538, 538]
        finally:
            server.close()
            await server.wait_closed()

    with pytest.warns(UserWarning, match="Requiring AUTH while not requiring TLS"):
        asyncio.run(scenario())
    assert asked == []


def _tls11_client(ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    with warnings.catch_warnings():  # Python deprecates setting these; that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _control_server_speaks_tls11(a: ProviderDir) -> bool:
    """Can this machine's OpenSSL negotiate TLS 1.1 at all? (else the refusal proves nothing)"""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_ctx.load_cert_chain(str(a.root / "keys" / "tls.pem"), str(a.root / "keys" / "tls.key"))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as tcp, \
                _tls11_client(a.ca).wrap_socket(tcp, server_hostname="localhost") as tls:
            return tls.version() == "TLSv1.1"
    except (ssl.SSLError, OSError):
        return False
    finally:
        thread.join(10)
        listener.close()


def test_tls_1_1_client_is_refused_on_both_submission_ports(a: ProviderDir) -> None:
    if not _control_server_speaks_tls11(a):
        pytest.skip("this OpenSSL cannot negotiate TLS 1.1 even with a permissive server")
    with serving(a, runners=False) as (svc,):
        with Raw(svc.ports.submission) as raw:
            raw.reply()
            raw.cmd("EHLO old.client")
            assert raw.cmd("STARTTLS")[0] == 220
            with pytest.raises(ssl.SSLError):
                _tls11_client(a.ca).wrap_socket(raw.sock, server_hostname="localhost")
        with socket.create_connection(("127.0.0.1", svc.ports.smtps), timeout=15) as tcp, \
                pytest.raises(ssl.SSLError):
            _tls11_client(a.ca).wrap_socket(tcp, server_hostname="localhost")
        with Raw(svc.ports.submission) as raw:  # and the listener is still fine afterwards
            assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235


def test_inbound_listener_offers_no_auth_to_guess_at(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,), Raw(svc.ports.inbound) as raw:
        raw.reply()
        raw.cmd("EHLO peer.test")
        raw.starttls(a.ca)
        _, ehlo = raw.cmd("EHLO peer.test")
        assert "PLAIN" not in ehlo and "LOGIN" not in ehlo
        assert raw.cmd(f"AUTH PLAIN {PLAIN_BLOB}")[0] == 504
