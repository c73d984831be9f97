"""Noise that hides attacks: a TLS scan's failed handshakes and malformed commands must not fill
the log with incidents and tracebacks (an operator stops reading it). A failed handshake is one
INFO line per connection and counts against the client address; a malformed path is a plain
``501``; and no command line at all reaches the incident path (``451``), fuzzed with hypothesis
over a real socket."""

from __future__ import annotations

import base64
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pecd import replies
from pecd.service import Service

from .attack_support import Raw, serving, set_limits, single_provider, wait_until
from .conftest import ProviderDir

GARBAGE = b"\x16\x03\x01\x00\x05hello" + b"GET / HTTP/1.0\r\n\r\n"


def _connect(port: int, source: str = "127.0.0.1") -> Raw:
    raw = Raw.__new__(Raw)
    raw.sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                        source_address=(source, 0))
    raw.buf = b""
    return raw


def _failed_starttls(port: int, source: str = "127.0.0.1") -> None:
    with _connect(port, source) as raw:
        assert raw.reply()[0] == 220
        raw.cmd("EHLO scanner.test")
        assert raw.cmd("STARTTLS")[0] == 220
        raw.send(GARBAGE)
        raw.wait_closed(15)


def _failed_implicit(port: int, source: str = "127.0.0.1") -> None:
    with _connect(port, source) as raw:
        raw.send(GARBAGE)
        assert raw.wait_closed(15) == b""  # nothing said in clear on a TLS port


def _tls_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "TLS handshake" in r.getMessage()]


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("noise"))


@pytest.fixture(scope="module")
def svc(a: ProviderDir) -> Iterator[Service]:
    with serving(a, runners=False) as (service,):
        yield service


def test_attack_tls_handshake_noise_is_one_info_line_per_connection(
        svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pecd")
    _failed_starttls(svc.ports.submission, "127.0.0.11")
    _failed_starttls(svc.ports.inbound, "127.0.0.11")
    _failed_implicit(svc.ports.smtps, "127.0.0.11")
    # the implicit port's line may follow the close the client saw by a loop iteration
    wait_until(lambda: len(_tls_records(caplog)) >= 3, what="three handshake lines")
    records = _tls_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO] * 3, [r.getMessage() for r in records]
    assert all(r.getMessage().startswith("127.0.0.11: TLS handshake failed (") for r in records)
    assert all(r.exc_info is None for r in records)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]  # no incident, no traceback


def test_attack_tls_handshake_noise_is_throttled_per_address(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = single_provider(tmp_path)
    set_limits(p, tls_failures_per_address=4)
    caplog.set_level(logging.INFO, logger="pecd")
    with serving(p, runners=False) as (service,):
        ports = service.ports
        for port in (ports.submission, ports.inbound):
            _failed_starttls(port, "127.0.0.21")
        for n in (3, 4):
            _failed_implicit(ports.smtps, "127.0.0.21")
            wait_until(lambda n=n: len(_tls_records(caplog)) >= n, what=f"{n} failures")  # type: ignore[misc]
        # the scanner's address is now refused before any TLS, on every listener
        with _connect(ports.inbound, "127.0.0.21") as raw:
            assert raw.wait_closed(15) == replies.TOO_MANY_TLS_FAILURES.encode() + b"\r\n"
        with _connect(ports.submission, "127.0.0.21") as raw:
            assert raw.reply()[0] == 421
        with _connect(ports.smtps, "127.0.0.21") as raw:
            assert raw.wait_closed(15) == b""
        # another address is served as before, over TLS
        ctx = ssl.create_default_context(cafile=str(p.ca))
        with _connect(ports.smtps, "127.0.0.22") as raw:
            raw.sock = ctx.wrap_socket(raw.sock, server_hostname="localhost")
            assert raw.reply()[0] == 220
        with _connect(ports.inbound, "127.0.0.22") as raw:
            assert raw.reply()[0] == 220
            raw.cmd("EHLO peer.test")
            raw.starttls(p.ca)
            assert raw.cmd("EHLO peer.test")[0] == 250
    failures = [r for r in _tls_records(caplog) if r.levelno == logging.INFO]
    assert len(failures) == 4  # the refused connections did not even reach a handshake
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "failed TLS handshakes" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("127.0.0.21: 4 failed")


@pytest.mark.parametrize(("line", "code"), [
    ("MAIL FROM:<", 501),
    ("MAIL FROM: <", 501),
    ("MAIL FROM:<<", 501),
    ("MAIL FROM:<\"", 501),
    ("MAIL FROM:<x@", 501),
])
def test_attack_malformed_path_mail_from(svc: Service, line: str, code: int,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with Raw(svc.ports.inbound) as raw:
        raw.reply()
        raw.cmd("EHLO attacker.test")
        got, text = raw.cmd(line)
        assert got in (code, 553), text  # a syntax error either way, never 451
        assert "incident" not in text
        assert raw.cmd("MAIL FROM:<x@internet.test>")[0] == 250  # the session goes on
    assert not [r for r in caplog.records if r.exc_info or "incident" in r.getMessage()]


@pytest.mark.parametrize("line", ["RCPT TO:<", "RCPT TO: <", "RCPT TO:<<", "RCPT TO:<\""])
def test_attack_malformed_path_rcpt_to(svc: Service, line: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with Raw(svc.ports.inbound) as raw:
        raw.reply()
        raw.cmd("EHLO attacker.test")
        assert raw.cmd("MAIL FROM:<x@internet.test>")[0] == 250
        got, text = raw.cmd(line)
        assert got in (501, 553), text
        assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
    assert not [r for r in caplog.records if r.exc_info or "incident" in r.getMessage()]


def test_attack_malformed_path_lone_bracket_is_501(svc: Service) -> None:
    """The review's exact finding: these two answered 451 with an IndexError traceback."""
    with Raw(svc.ports.inbound) as raw:
        raw.reply()
        raw.cmd("EHLO attacker.test")
        assert raw.cmd("MAIL FROM:<")[0] == 501
        assert raw.cmd("MAIL FROM:<x@internet.test>")[0] == 250
        assert raw.cmd("RCPT TO:<")[0] == 501


VERBS = ["MAIL FROM:", "RCPT TO:", "MAIL FROM:<", "RCPT TO:<", "HELO ", "EHLO ", "VRFY ",
         "EXPN ", "HELP ", "NOOP ", "RSET", "AUTH ", "STARTTLS ", "MAIL ", "RCPT ", "DATA ",
         "BDAT ", "XCLIENT ", ""]
# any character but CR and LF (those end the line) and NUL-free (aiosmtpd reads lines, the
# parser sees whatever else arrives: quotes, brackets, backslashes, controls, non-ASCII)
ARG = st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                     blacklist_categories=("Cs",)), max_size=60)
SPECIALS = st.text(alphabet='<>"\\@:()[],;. \t=', max_size=30)
LINE = st.tuples(st.sampled_from(VERBS), st.one_of(ARG, SPECIALS)).map(lambda t: t[0] + t[1])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_attack_command_fuzz_never_reaches_the_incident_path(
        svc: Service, lines: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    with Raw(svc.ports.inbound) as raw:
        assert raw.reply()[0] == 220
        raw.cmd("EHLO fuzzer.test")
        for line in lines:
            if line.upper().startswith(("DATA", "BDAT", "STARTTLS", "QUIT")) and \
                    line.strip().upper() in ("DATA", "STARTTLS", "QUIT"):
                continue  # would leave command mode; not the parser under test
            try:
                code, text = raw.cmd(line.encode("utf-8", "surrogatepass"))
            except ConnectionError:  # a 421 (too many errors) closes: fine, but not a 451
                break
            assert code != 451 and "incident" not in text, (line, code, text)
            assert 200 <= code < 600
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]


AUTH_LINE = st.tuples(
    st.sampled_from(["AUTH PLAIN", "AUTH LOGIN", "AUTH CRAM-MD5", "AUTH XOAUTH2", "AUTH",
                     "AUTH PLAIN =", "AUTH LOGIN *", ""]),
    st.one_of(st.just(""), st.binary(max_size=40).map(lambda b: " " + base64.b64encode(b).decode()),
              ARG.map(lambda t: " " + t))).map(lambda t: (t[0] + t[1]).strip() or "*")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(AUTH_LINE, min_size=1, max_size=4))
def test_attack_command_fuzz_auth_never_reaches_the_incident_path(
        a: ProviderDir, svc: Service, lines: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The AUTH exchange on the submission listener, after STARTTLS, fed arbitrary lines
    (a 334 challenge takes the next line as its answer, as a client's would be)."""
    caplog.clear()
    with Raw(svc.ports.submission) as raw:
        raw.reply()
        raw.cmd("EHLO fuzzer.test")
        raw.starttls(a.ca)
        raw.cmd("EHLO fuzzer.test")
        for line in lines:
            try:
                code, text = raw.cmd(line.encode("utf-8", "surrogatepass"))
            except ConnectionError:
                break
            assert code != 451 and "incident" not in text, (line, code, text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]
