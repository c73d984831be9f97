"""Secrets leaking through logs, replies and files: passwords and AUTH lines never reach the log
(captured at DEBUG, aiosmtpd's own logger included) nor any reply; an unexpected error answers
``451`` with an incident id that the log also holds, and nothing about the error itself; key
files and the database are readable by their owner only."""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from pecd.store.queue import INLINE_MAX

from .attack_support import ALICE, ALICE_PW, Raw, ledger_rows, login, serving, single_provider
from .conftest import ProviderDir, pecd

WRONG = "Wr0ng-Passw0rd!"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _forms(secret: str, user: str = ALICE) -> set[str]:
    """Every spelling of a password that a session carries."""
    forms = {secret, _b64(secret), _b64(f"\0{user}\0{secret}")}
    forms |= {f.upper() for f in forms}  # aiosmtpd upper-cases what it takes for a command
    return forms


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    return single_provider(tmp_path_factory.mktemp("secrets"))


def test_passwords_and_auth_lines_never_reach_logs_or_replies(
        a: ProviderDir, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")
    replies: list[str] = []
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        with Raw(port) as raw:  # a careless client pipelines AUTH LOGIN before TLS
            replies.append(raw.reply()[1])
            raw.send(f"EHLO c\r\nAUTH LOGIN\r\n{_b64(ALICE)}\r\n{_b64(WRONG)}\r\n"
                     f"{_b64(ALICE_PW)}\r\nQUIT\r\n".encode())
            replies.append(raw.wait_closed(15).decode())
        with Raw(port) as raw:  # PLAIN with initial response, wrong then right
            code, text = login(raw, a.ca, ALICE, WRONG)
            assert code == 535
            replies.append(text)
            code, text = raw.cmd(f"AUTH PLAIN {_b64(chr(0) + ALICE + chr(0) + ALICE_PW)}")
            assert code == 235
            replies.append(text)
        with Raw(port) as raw:  # LOGIN with challenges, a line that is not base64, then right
            login(raw, a.ca, "nobody@a.test", "x")
            for line in ("AUTH LOGIN", _b64(ALICE), f"{WRONG} not base64"):
                replies.append(raw.cmd(line)[1])
            for line in ("AUTH LOGIN", _b64(ALICE), _b64(ALICE_PW)):
                code, text = raw.cmd(line)
                replies.append(text)
            assert code == 235
        with Raw(port) as raw:  # PLAIN with a challenge
            login(raw, a.ca, "nobody@a.test", "x")
            replies.append(raw.cmd("AUTH PLAIN")[1])
            code, text = raw.cmd(_b64(f"\0{ALICE}\0{WRONG}"))
            assert code == 535
            replies.append(text)
    logged = "\n".join(
        r.getMessage() + (caplog.handler.formatter or logging.Formatter()).formatException(r.exc_info)
        if r.exc_info else r.getMessage() for r in caplog.records)
    assert any(r.name == "mail.log" and r.levelno == logging.DEBUG for r in caplog.records)
    assert "auth" in logged.lower()  # the exchanges were logged, just not their secrets
    ledger = repr(ledger_rows(a))
    for secret in (WRONG, ALICE_PW):
        for form in _forms(secret):
            assert form not in logged, form
            assert form not in ledger, form
            for reply in replies:
                assert form not in reply, (form, reply)
    key_line = (a.root / "keys" / "signing.key").read_text().splitlines()[5]
    assert key_line not in logged and "PRIVATE KEY" not in logged


def test_unexpected_error_answers_451_with_an_incident_id_in_the_log(
        a: ProviderDir, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    spool_tmp = a.root / "data" / "spool" / "tmp"
    with serving(a, runners=False) as (svc,), Raw(svc.ports.submission) as raw:
        assert login(raw, a.ca, ALICE, ALICE_PW)[0] == 235
        shutil.rmtree(spool_tmp)
        spool_tmp.write_text("not a directory")  # the disk goes bad under the queue
        try:
            assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
            assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            # over INLINE_MAX, so its bytes go to the spool file the broken disk refuses
            body = b"x" * 76 + b"\r\n"
            code, text = raw.cmd(b"From: alice@a.test\r\nTo: alice@a.test\r\n\r\n"
                                 + body * (INLINE_MAX // len(body) + 1) + b".")
        finally:
            spool_tmp.unlink()
            spool_tmp.mkdir()
        assert code == 451, text
        match = re.fullmatch(r"4\.3\.0 Temporary failure, please retry \(incident ([0-9a-f]{12})\)",
                             text)
        assert match, text  # nothing about the error itself: no class, no path, no errno
        # the client retries and the listener is fine
        assert raw.cmd("RSET")[0] == 250
        assert raw.cmd("MAIL FROM:<alice@a.test>")[0] == 250
        assert raw.cmd("RCPT TO:<alice@a.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        assert raw.cmd(b"From: alice@a.test\r\nTo: alice@a.test\r\n\r\nx\r\n.")[0] == 250
    incident = [r for r in caplog.records if f"incident {match[1]}" in r.getMessage()]
    assert len(incident) == 1 and incident[0].levelno == logging.ERROR
    assert incident[0].exc_info is not None  # the operator gets the traceback, the client not


def test_init_writes_keys_and_database_for_the_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)  # even a careless umask must not open them up
    try:
        pecd("init", str(tmp_path / "p"), "--domain", "p.test", "--ca", str(tmp_path / "ca"))
    finally:
        os.umask(old)
    secret_files = [*(tmp_path / "p" / "keys").glob("*.key"), tmp_path / "ca" / "ca.key",
                    tmp_path / "p" / "data" / "pecd.sqlite"]
    assert len(secret_files) == 5
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for pem in (tmp_path / "p" / "keys").glob("*.pem"):  # certificates are public
        assert "PRIVATE KEY" not in pem.read_text()
