"""Postfix as pecd's neighbour, a real instance on loopback with its own configuration and queue:
(1) mail for recipients outside PEC (``esterno``) leaves through Postfix as smarthost and arrives
unchanged at the next hop; (2) ordinary Internet mail that Postfix relays to pecd's inbound
listener reaches the recipient only inside an anomaly envelope."""

from __future__ import annotations

import os
import pwd
import smtplib
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from pecd.format import daticert, pec

from .conftest import ProviderDir, free_port, openssl_verifies, submit
from .interop_support import (
    RunningService,
    configure,
    ledger_rows,
    require,
    require_root,
    runtime_dir,
    wait_port,
    wait_until,
)

MASTER_CF = (
    "# only the services this instance needs; nothing chrooted (the queue is a throwaway directory)\n"
    "{port}      inet  n       -       n       -       -       smtpd\n"
    + (Path(__file__).resolve().parent.parent / "conf" / "postfix-master.cf.sample").read_text()
)


@dataclass
class Postfix:
    port: int
    log: Path


@dataclass
class Sink:
    """The next hop after Postfix: an SMTP server that keeps what it receives."""

    port: int
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos),
                                  bytes(envelope.original_content or b"")))
        return "250 2.0.0 kept"


def main_cf(root: Path, port: int, **extra: str) -> str:
    lines = {
        "compatibility_level": "3.6",
        "queue_directory": f"{root}/queue",
        "data_directory": f"{root}/data",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file": f"{root}/maillog",
        "maillog_file_prefixes": str(root),  # the default (/var, /dev/stdout) refuses others
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "myhostname": "mx.postfix.test",
        "mydomain": "postfix.test",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "may",
        "smtpd_tls_security_level": "none",
        "biff": "no",
        **extra,
    }
    return "".join(f"{k} = {v}\n" for k, v in lines.items())


@pytest.fixture
def start_postfix() -> Iterator[Callable[..., Postfix]]:
    """Start private Postfix instances (``postfix -c DIR start``) with extra main.cf settings;
    each is stopped, and its directory removed, at teardown, whatever the test did."""
    exe = require("postfix", "postfix", sbin=True)
    require_root("postfix")
    with ExitStack() as stack:

        def start(**extra: str) -> Postfix:
            root = stack.enter_context(runtime_dir("pecd-postfix-"))
            conf, log, port = root / "conf", root / "maillog", free_port()
            for d in (conf, root / "data", root / "queue"):
                d.mkdir()
            os.chown(root / "data", pwd.getpwnam("postfix").pw_uid, -1)  # master locks there
            (conf / "main.cf").write_text(main_cf(root, port, **extra))
            (conf / "master.cf").write_text(MASTER_CF.format(port=f"127.0.0.1:{port}"))
            stack.callback(_stop_postfix, exe, root, conf)
            for action in ("check", "start"):
                done = subprocess.run([exe, "-c", str(conf), action], capture_output=True,
                                      text=True, check=False)
                assert done.returncode == 0, (action, done.stdout, done.stderr,
                                              log.read_text() if log.exists() else "")
            wait_port(port, log=log)
            return Postfix(port, log)

        yield start


def _stop_postfix(exe: str, root: Path, conf: Path) -> None:
    """``postfix stop``, then wait until the master process is gone (``abort`` if it lingers)."""
    pid_file = root / "queue" / "pid" / "master.pid"
    pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    subprocess.run([exe, "-c", str(conf), "stop"], capture_output=True, check=False)

    def gone() -> bool:
        if pid is None:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, 15, "postfix master exit")
    except AssertionError:
        subprocess.run([exe, "-c", str(conf), "abort"], capture_output=True, check=False)
        wait_until(gone, 15, "postfix master exit after abort")


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink(port=free_port())
    controller = Controller(s, hostname="127.0.0.1", port=s.port)
    controller.start()
    try:
        yield s
    finally:
        controller.stop()


ORIGINAL = (
    b"From: Alice <alice@a.test>\r\n"
    b"To: Carol <carol@example.org>\r\n"
    b"Subject: Offerta\r\n"
    b"Message-ID: <esterno-1@client.a.test>\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Gentile Carol,\r\nin allegato l'offerta.\r\n"
)


def test_esterno_recipient_relayed_through_postfix(
        two_providers: tuple[ProviderDir, ProviderDir], start_postfix: Callable[..., Postfix],
        sink: Sink, tmp_path: Path) -> None:
    a, _b = two_providers
    postfix = start_postfix(relayhost=f"[127.0.0.1]:{sink.port}")
    configure(a, "relay", smarthost="127.0.0.1", smarthost_port=postfix.port)

    with RunningService(a.config) as svc:
        code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test",
                             ["carol@example.org"], ORIGINAL, svc.submission_port)
        assert code == 250, reply
        wait_until(lambda: len(sink.received) == 1, what="envelope at the sink", log=postfix.log)
        wait_until(lambda: len(a.messages("alice@a.test")) == 1, what="acceptance receipt")

    mail_from, rcpts, data = sink.received[0]
    assert (mail_from, rcpts) == ("alice@a.test", ["carol@example.org"])
    headers_end = data.index(b"\r\n\r\n")
    assert b"by mx.postfix.test (Postfix)" in data[:headers_end]  # it went through Postfix
    envelope = pec.parse(data)
    assert envelope.headers["X-Trasporto"] == "posta-certificata"
    assert envelope.original == ORIGINAL
    assert envelope.certdata is not None
    assert envelope.certdata.recipients == (daticert.Recipient("carol@example.org", "esterno"),)
    eml = tmp_path / "at-the-sink.eml"
    eml.write_bytes(data)
    assert openssl_verifies(eml, a.ca)  # Postfix added headers, the signed part is untouched

    acceptance = pec.parse(a.messages("alice@a.test")[0]).certdata
    assert acceptance is not None and acceptance.type == "accettazione"
    assert acceptance.recipients == (daticert.Recipient("carol@example.org", "esterno"),)
    relayed = ledger_rows(a, "relayed")
    assert [r["detail"]["dest"] for r in relayed] == ["external"]  # type: ignore[index]
    assert "status=sent" in postfix.log.read_text()


def test_ordinary_mail_via_postfix_becomes_anomaly(
        two_providers: tuple[ProviderDir, ProviderDir],
        start_postfix: Callable[..., Postfix]) -> None:
    _a, b = two_providers
    inbound = b.config.listen.inbound_port
    postfix = start_postfix(relay_domains="b.test",
                            transport_maps=f"inline:{{ b.test=smtp:[127.0.0.1]:{inbound} }}")
    ordinary = (b"From: Dave <dave@internet.test>\r\nTo: Bob <bob@b.test>\r\n"
                b"Subject: Ciao\r\nMessage-ID: <plain-1@internet.test>\r\n\r\n"
                b"Posta ordinaria, non certificata.\r\n")

    with RunningService(b.config):
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
            refused = client.sendmail("dave@internet.test", ["bob@b.test"], ordinary)
        assert refused == {}
        wait_until(lambda: len(b.messages("bob@b.test")) == 1, what="anomaly envelope",
                   log=postfix.log)

    anomaly = b.messages("bob@b.test")[0]
    parsed = pec.parse(anomaly)
    assert parsed.category == "anomaly-envelope"
    assert parsed.headers["X-Trasporto"] == "errore"
    assert parsed.headers["Subject"] == "ANOMALIA MESSAGGIO: Ciao"
    assert b"Posta ordinaria, non certificata." in anomaly
    assert b"by mx.postfix.test (Postfix)" in anomaly  # the original, as Postfix handed it over
    received = ledger_rows(b, "received")
    assert len(received) == 1 and received[0]["sender"] == "dave@internet.test"
    assert received[0]["detail"]["tls"] is True  # type: ignore[index]  # Postfix used STARTTLS
    assert len(ledger_rows(b, "anomaly")) == 1
