"""TLS 1.2 with CBC suites (MAC-then-encrypt: the Lucky13 / padding-oracle family): every
listener offers only AEAD suites with TLS 1.2 by default, and ``[tls] tls12_ciphers`` can widen
that for old clients. Judged by real clients that speak only the suites they are given."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import pytest

from pecd.config import ConfigError
from pecd.service import Service

from .attack_support import Raw, serving, single_provider
from .conftest import ProviderDir, client_tls

CBC_ONLY = ("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:"
            "ECDHE-RSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
AEAD = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256"
CHACHA = "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("tls12"))


def _client(ca: Path, ciphers: str) -> ssl.SSLContext:
    ctx = client_tls(ca)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


def _handshake(svc: Service, listener: str, ca: Path, ciphers: str) -> str:
    """The suite a TLS 1.2 client offering only ``ciphers`` ends up with on ``listener``
    (STARTTLS or implicit TLS, as that listener speaks); raises ``ssl.SSLError`` if refused."""
    port = getattr(svc.ports, listener)
    ctx = _client(ca, ciphers)
    if listener == "smtps":
        with socket.create_connection(("127.0.0.1", port), timeout=15) as tcp, \
                ctx.wrap_socket(tcp, server_hostname="localhost") as tls:
            raw = Raw.__new__(Raw)
            raw.sock, raw.buf = tls, b""
            assert raw.reply()[0] == 220
            return str(tls.cipher()[0])
    with Raw(port) as raw:
        raw.reply()
        raw.cmd("EHLO attacker.test")
        assert raw.cmd("STARTTLS")[0] == 220
        raw.sock = ctx.wrap_socket(raw.sock, server_hostname="localhost")
        assert isinstance(raw.sock, ssl.SSLSocket) and raw.sock.version() == "TLSv1.2"
        assert raw.cmd("EHLO attacker.test")[0] == 250  # the session goes on over the suite
        return str(raw.sock.cipher()[0])


LISTENERS = ("submission", "smtps", "inbound")


def test_attack_tls12_cbc_suites_refused_on_every_listener(a: ProviderDir) -> None:
    with serving(a, runners=False) as (svc,):
        for listener in LISTENERS:
            with pytest.raises(ssl.SSLError):
                _handshake(svc, listener, a.ca, CBC_ONLY)
            assert re.search("GCM", _handshake(svc, listener, a.ca, AEAD)), listener
            assert "CHACHA20" in _handshake(svc, listener, a.ca, CHACHA), listener


def test_attack_tls12_cbc_suites_allowed_only_when_the_operator_says_so(tmp_path: Path) -> None:
    """The control: the same CBC-only client gets in once the operator widened the list, so
    the refusal above is the default's doing, not a client that cannot connect at all."""
    p = single_provider(tmp_path)
    text = p.conf.read_text()
    text, n = re.subn(r'(?m)^tls12_ciphers = .*$',
                      'tls12_ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES"', text)
    assert n == 1
    p.conf.write_text(text)
    with serving(p, runners=False) as (svc,):
        for listener in LISTENERS:
            suite = _handshake(svc, listener, p.ca, CBC_ONLY)
            assert "GCM" not in suite and "CHACHA" not in suite, suite


def test_tls12_ciphers_that_select_nothing_is_a_config_error(tmp_path: Path) -> None:
    p = single_provider(tmp_path)
    p.conf.write_text(re.sub(r'(?m)^tls12_ciphers = .*$', 'tls12_ciphers = "NO-SUCH-SUITE"',
                             p.conf.read_text()))
    with pytest.raises(ConfigError, match=r"\[tls\] tls12_ciphers"):
        _ = p.config
    assert "tls12_ciphers" in p.cli("queue", "list", ok=False)
