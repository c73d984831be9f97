"""Dovecot as the mail store: pecd's delivery point hands messages to a real Dovecot over LMTP
(``[delivery] method = "lmtp"``), and the recipient reads them over IMAP. openssl verifies the
signature on the bytes fetched over IMAP, so nothing on the way changed what was signed."""

from __future__ import annotations

import imaplib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pecd.edges.lmtp import LmtpMailbox, MailboxTemporaryError
from pecd.format import daticert, pec
from pecd.points.delivery import MailboxError

from .conftest import OPENSSL, ProviderDir, free_port, openssl_verifies, submit
from .interop_support import (
    RunningService,
    configure,
    dovecot_conf,
    dovecot_user,
    ledger_rows,
    require,
    runtime_dir,
    stop_process,
    wait_port,
    wait_until,
)

PASSWORD = "imap-secret"
USERS = {
    "bob@b.test": "",
    "carol@b.test": "",
    # a 1 KiB quota: over it, Dovecot answers after DATA with 452 (tempfail) or 552 (permanent)
    "full@b.test": "userdb_quota_rule=*:storage=1K userdb_quota_full_tempfail=yes",
    "fullforgood@b.test": "userdb_quota_rule=*:storage=1K userdb_quota_full_tempfail=no",
}

ORIGINAL = (
    b"From: Alice <alice@a.test>\r\n"
    b"To: Bob <bob@b.test>\r\n"
    b"Subject: Verbale di consegna\r\n"
    b"Message-ID: <dovecot-1@client.a.test>\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Buongiorno Bob,\r\nil verbale e' pronto.\r\n"
)


@dataclass(frozen=True)
class Dovecot:
    lmtp_port: int
    imap_port: int
    log: Path

    def imap(self, user: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        conn.login(user, PASSWORD)
        return conn

    def fetch_all(self, user: str) -> list[bytes]:
        """Every message in the user's INBOX, exactly as IMAP returns it (BODY.PEEK[])."""
        conn = self.imap(user)
        try:
            typ, data = conn.select("INBOX", readonly=True)
            assert typ == "OK", data
            typ, data = conn.search(None, "ALL")
            out = []
            for num in (data[0] or b"").split():
                typ, parts = conn.fetch(num, "(BODY.PEEK[])")
                assert typ == "OK", parts
                out += [p[1] for p in parts if isinstance(p, tuple)]
            return out
        finally:
            conn.logout()


def dovecot_config(root: Path, lmtp_port: int, imap_port: int) -> Path:
    """A self-contained instance: its own base_dir, listeners on 127.0.0.1 only, passwd-file
    users, Maildirs below ``root``. Mail is stored as an unprivileged uid (Dovecot refuses 0)."""
    who = dovecot_user()
    uid, gid = who.uid, who.gid
    mail = root / "mail"
    mail.mkdir()
    os.chown(mail, uid, gid)
    users = root / "users"
    users.write_text("".join(
        f"{u}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{mail}/{u.split('@')[1]}/{u.split('@')[0]}::{extra}\n"
        for u, extra in USERS.items()))
    conf = root / "dovecot.conf"
    conf.write_text(dovecot_conf(root, who, users, imap_port, purpose="tests/test_interop_dovecot.py",
                                 mail_location=f"maildir:{mail}/%d/%n", protocols="imap lmtp",
                                 extra=f"""\
mail_plugins = quota
plugin {{
  quota = maildir:User quota
  quota_full_tempfail = yes
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0
  }}
}}
"""))
    return conf


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    exe = require("dovecot", "dovecot-core dovecot-imapd dovecot-lmtpd", sbin=True)
    with runtime_dir("pecd-dovecot-") as root:
        lmtp_port, imap_port = free_port(), free_port()
        conf = dovecot_config(root, lmtp_port, imap_port)
        log = root / "dovecot.log"
        proc = subprocess.Popen([exe, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=open(root / "stderr.log", "wb"))  # noqa: SIM115
        try:
            wait_port(lmtp_port, proc, root / "stderr.log")
            wait_port(imap_port, proc, root / "stderr.log")
            yield Dovecot(lmtp_port, imap_port, log)
        finally:
            stop_process(proc)


def _message(subject: str, size: int = 0) -> bytes:
    return (f"From: someone@a.test\r\nTo: x@b.test\r\nSubject: {subject}\r\n\r\n".encode()
            + b"x" * size + b"\r\n")


def test_lmtp_mailbox_maps_each_reply(dovecot: Dovecot, tmp_path: Path) -> None:
    box = LmtpMailbox("127.0.0.1", dovecot.lmtp_port, journal=tmp_path / "journal")
    created = time.time()

    reply = box.store("carol@b.test", "1-0", created, _message("first"))
    assert "Saved" in reply  # Dovecot's own 250 text
    # same key again (a retry after the stage failed later): not delivered twice
    assert box.store("carol@b.test", "1-0", created, _message("first")) == "already delivered"
    subjects = [re.search(rb"(?m)^Subject: (.*)\r$", m).group(1)  # type: ignore[union-attr]
                for m in dovecot.fetch_all("carol@b.test")]
    assert subjects == [b"first"]
    delivered = dovecot.fetch_all("carol@b.test")[0]
    assert delivered.startswith(b"Return-Path: <>\r\nDelivered-To: carol@b.test\r\n")

    with pytest.raises(MailboxError, match=r"RCPT for ghost@b.test: 550 5\.1\.1"):
        box.store("ghost@b.test", "2-0", created, _message("nobody home"))
    with pytest.raises(MailboxTemporaryError, match=r"DATA for full@b.test: 452 4\.2\.2"):
        box.store("full@b.test", "3-0", created, _message("too big", 4096))
    with pytest.raises(MailboxError, match=r"DATA for fullforgood@b.test: 552 5\.2\.2"):
        box.store("fullforgood@b.test", "4-0", created, _message("too big", 4096))
    # nothing was journalled for the refusals: a later retry really tries again
    assert sorted(p.name for p in (tmp_path / "journal").rglob("*") if p.is_file()) == \
        [f"{int(created)}.1-0"]

    with pytest.raises(MailboxTemporaryError, match="ConnectionRefusedError"):
        LmtpMailbox("127.0.0.1", free_port()).store("bob@b.test", "5-0", created, _message("x"))
    with pytest.raises(MailboxError, match="unusable mailbox address"):
        box.store("bob@b.test>\r\nRCPT TO:<carol@b.test", "6-0", created, _message("x"))


def test_certified_mail_read_over_imap(two_providers: tuple[ProviderDir, ProviderDir],
                                       dovecot: Dovecot, tmp_path: Path) -> None:
    a, b = two_providers
    configure(b, "delivery", method="lmtp", lmtp_host="127.0.0.1", lmtp_port=dovecot.lmtp_port)
    with RunningService(a.config) as svc_a, RunningService(b.config):
        code, reply = submit(a, "alice@a.test", "alice-secret", "alice@a.test", ["bob@b.test"],
                             ORIGINAL, svc_a.submission_port)
        assert code == 250, reply
        wait_until(lambda: len(a.messages("alice@a.test")) == 2,
                   what="acceptance and delivery receipts", log=dovecot.log)

    assert not b.messages("bob@b.test"), "with lmtp nothing may land in pecd's own Maildir"
    kinds = sorted(pec.parse(m).certdata.type for m in a.messages("alice@a.test"))  # type: ignore[union-attr]
    assert kinds == ["accettazione", "avvenuta-consegna"]

    inbox = [m for m in dovecot.fetch_all("bob@b.test") if b"Verbale di consegna" in m]
    assert len(inbox) == 1
    fetched = inbox[0]
    assert b"\r\nDelivered-To: bob@b.test\r\n" in fetched.split(b"\r\n\r\n")[0] + b"\r\n"

    envelope = pec.parse(fetched)
    assert envelope.category == "envelope"
    assert envelope.headers["X-Trasporto"] == "posta-certificata"
    assert envelope.headers["Subject"] == "POSTA CERTIFICATA: Verbale di consegna"
    assert envelope.original == ORIGINAL  # postacert.eml intact
    assert envelope.certdata is not None  # daticert.xml intact
    assert envelope.certdata.type == "posta-certificata"
    assert envelope.certdata.sender == "alice@a.test"
    assert envelope.certdata.recipients == (daticert.Recipient("bob@b.test", "certificato"),)

    # the outside judge, on the bytes IMAP returned
    eml = tmp_path / "fetched-over-imap.eml"
    eml.write_bytes(fetched)
    assert openssl_verifies(eml, a.ca)
    assert "signature: valid" in b.cli("verify", str(eml))
    tampered = tmp_path / "tampered.eml"
    tampered.write_bytes(fetched.replace(b"Buongiorno Bob", b"Buongiorno Bub"))
    assert not openssl_verifies(tampered, a.ca)

    delivered = ledger_rows(b, "delivered")
    assert len(delivered) == 1 and "bob@b.test" in str(delivered[0]["recipients"])


def test_sample_config_is_accepted_by_dovecot(tmp_path: Path) -> None:
    """conf/dovecot-pecd.conf, with its site paths filled in, is a configuration doveconf takes."""
    doveconf = require("doveconf", "dovecot-core")
    sample = (Path(__file__).parents[1] / "conf" / "dovecot-pecd.conf").read_text()
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.pem"), "-days", "1",
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    conf = tmp_path / "dovecot.conf"
    conf.write_text(sample.replace("/srv/pecd/keys/", f"{tmp_path}/")
                    .replace("uid=vmail gid=vmail", "uid=65534 gid=65534"))
    done = subprocess.run([doveconf, "-c", str(conf), "-n"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "port = 24" in done.stdout and "address = 127.0.0.1" in done.stdout
    assert "ssl = required" in done.stdout
