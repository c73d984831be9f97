"""A real mail client against the access point: swaks (Debian's SMTP test client) submits with
STARTTLS + AUTH PLAIN on the submission port and with AUTH LOGIN on the implicit-TLS port,
verifying pecd's certificate against the provider CA; refusals show in swaks' exit status."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pecd.format import daticert, pec

from .conftest import ProviderDir
from .interop_support import RunningService, ledger_rows, require, wait_until

MESSAGE = (
    "From: Alice <alice@a.test>\r\n"
    "To: Bob <bob@b.test>\r\n"
    "Subject: {subject}\r\n"
    "Message-ID: <{tag}@swaks.a.test>\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Sent by swaks.\r\n"
)

# swaks(1) EXIT CODES
EXIT_OK, EXIT_MAIL, EXIT_AFTER_DATA, EXIT_AUTH = 0, 23, 26, 28


@pytest.fixture
def provider_a(two_providers: tuple[ProviderDir, ProviderDir]) -> Iterator[
        tuple[ProviderDir, RunningService]]:
    a, _b = two_providers
    with RunningService(a.config) as svc:
        yield a, svc


def swaks(a: ProviderDir, tmp_path: Path, *args: str, subject: str = "swaks",
          tag: str = "m1", header_from: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = require("swaks", "swaks")
    data = MESSAGE.format(subject=subject, tag=tag)
    if header_from is not None:
        data = data.replace("From: Alice <alice@a.test>", f"From: {header_from}")
    msg = tmp_path / f"{tag}.eml"
    msg.write_text(data)
    return subprocess.run(
        [exe, "--server", "localhost", "--to", "bob@b.test", "--data", f"@{msg}",
         "--tls-verify", "--tls-ca-path", str(a.ca), "--timeout", "30", *args],
        capture_output=True, text=True, timeout=60, check=False)


def _acceptances(a: ProviderDir) -> dict[str, daticert.CertData]:
    found = {}
    for raw in a.messages("alice@a.test"):
        parsed = pec.parse(raw)
        if parsed.certdata is not None and parsed.certdata.type == "accettazione":
            found[parsed.certdata.subject or ""] = parsed.certdata
    return found


def test_swaks_starttls_auth_plain(provider_a: tuple[ProviderDir, RunningService],
                                   tmp_path: Path) -> None:
    a, svc = provider_a
    proc = swaks(a, tmp_path, "--port", str(svc.submission_port), "--tls",
                 "--auth", "PLAIN", "--auth-user", "alice@a.test",
                 "--auth-password", "alice-secret", "--from", "alice@a.test",
                 subject="via STARTTLS and PLAIN", tag="plain")
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert "STARTTLS" in proc.stdout and "AUTH PLAIN" in proc.stdout
    wait_until(lambda: "via STARTTLS and PLAIN" in _acceptances(a), what="acceptance receipt")
    accepted = _acceptances(a)["via STARTTLS and PLAIN"]
    assert accepted.sender == "alice@a.test"
    assert accepted.recipients == (daticert.Recipient("bob@b.test", "certificato"),)
    assert accepted.msgid == "<plain@swaks.a.test>"


def test_swaks_implicit_tls_auth_login(provider_a: tuple[ProviderDir, RunningService],
                                       tmp_path: Path) -> None:
    a, svc = provider_a
    proc = swaks(a, tmp_path, "--port", str(svc.smtps_port), "--tls-on-connect",
                 "--auth", "LOGIN", "--auth-user", "alice@a.test",
                 "--auth-password", "alice-secret", "--from", "alice@a.test",
                 subject="via implicit TLS and LOGIN", tag="login")
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert "AUTH LOGIN" in proc.stdout
    wait_until(lambda: "via implicit TLS and LOGIN" in _acceptances(a),
               what="acceptance receipt")


def test_swaks_sees_refusals_in_exit_status(provider_a: tuple[ProviderDir, RunningService],
                                            tmp_path: Path) -> None:
    a, svc = provider_a
    login = ["--port", str(svc.submission_port), "--tls", "--auth", "PLAIN",
             "--auth-user", "alice@a.test"]

    # MAIL FROM someone else's address: refused at MAIL
    spoof_envelope = swaks(a, tmp_path, *login, "--auth-password", "alice-secret",
                           "--from", "mallory@a.test", tag="spoof1")
    assert spoof_envelope.returncode == EXIT_MAIL, spoof_envelope.stdout
    assert re.search(r"^<~?\*+ +553 ", spoof_envelope.stdout, re.M)

    # MAIL FROM is hers, the From: header is not: refused after DATA
    spoof_header = swaks(a, tmp_path, *login, "--auth-password", "alice-secret",
                         "--from", "alice@a.test", header_from="Boss <boss@a.test>",
                         tag="spoof2")
    assert spoof_header.returncode == EXIT_AFTER_DATA, spoof_header.stdout
    assert re.search(r"^<~?\*+ +550 ", spoof_header.stdout, re.M)

    wrong_password = swaks(a, tmp_path, *login, "--auth-password", "not-her-password",
                           "--from", "alice@a.test", tag="wrongpw")
    assert wrong_password.returncode == EXIT_AUTH, wrong_password.stdout

    refused = ledger_rows(a, "submission-refused")
    reasons = sorted(str(r["detail"]["reason"]) for r in refused)  # type: ignore[index]
    assert reasons == ["From header not owned", "MAIL FROM not owned"]
    assert len(ledger_rows(a, "auth-failed")) == 1
    assert _acceptances(a) == {}  # nothing was accepted
