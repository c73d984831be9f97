"""Two nodes per provider on one database, killed at random under load: nothing acknowledged
is lost, nothing is done twice, and both ledgers still verify.

Providers a.test and b.test each run as two ``pecd serve --reuse-port`` processes on the same
configuration (so the same database and the same ports, shared with ``SO_REUSEPORT``). Senders
are real SMTP clients (aiosmtplib, STARTTLS with the providers' CA, AUTH) submitting certified
mail from a.test to b.test over loopback. While they send, nodes are killed at random (SIGKILL,
and now and then SIGTERM) and started again at once. Each submission carries a fresh
Message-ID: one that got ``250`` must reach the recipient's Maildir exactly once, with exactly
one acceptance, one take-charge and one delivery receipt; one cut off by a kill may arrive at
most once. Then ``pecd ledger verify`` must pass on both providers.

On PostgreSQL (``test_crash_two_nodes_per_provider_postgresql``, skipped where PostgreSQL is
not installed) the server is also restarted once with ``pg_ctl restart -m immediate`` and
stopped once for a while mid-run: a client then gets ``4xx``, never ``250``, and the nodes carry
on when it is back, without a restart.

The message count is :data:`MESSAGES` (at least 1000 for the issue's figure; ``PECD_CRASH_MESSAGES``
overrides it for a quick local run). The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from pecd.format import pec

from .conftest import ProviderDir, exchange_cards, make_provider
from .pechelpers import configure

MESSAGES = int(os.environ.get("PECD_CRASH_MESSAGES", "1000"))
KILLS = 20  # SIGKILLs at least, spread over the sending time
SIGTERMS = 3  # graceful stops mid-load (a node told to stop must lose nothing acknowledged)
CLIENTS = 6
RECIPIENT = "bob@b.test"
SEED = int(os.environ.get("PECD_CRASH_SEED", "16"))
_headers = BytesHeaderParser()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Node:
    """One ``pecd serve --reuse-port`` process of a provider."""

    def __init__(self, name: str, provider: ProviderDir, log: Path) -> None:
        self.name, self.provider, self.log = name, provider, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []
        self.starts = 0
        self._since = 0  # where the current process's part of the log begins

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self._since = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pecd", "-c", str(self.provider.conf), "serve", "--reuse-port"],
                stdout=out, stderr=subprocess.STDOUT)

    def serving(self) -> bool:
        """Whether the current process has come up (its part of the log says so).

        Not a count of the log's "pecd serving" lines against the starts: a process killed
        while it was still starting never writes one, and such a count stays one short for
        good (the wait before a PostgreSQL restart then waited for the run's deadline)."""
        if not self.log.exists():
            return False
        with self.log.open("rb") as f:
            f.seek(self._since)
            return b"pecd serving" in f.read()

    def starting(self) -> bool:
        """Alive but not serving yet."""
        return self.proc is not None and self.proc.poll() is None and not self.serving()

    def signal(self, sig: signal.Signals, wait: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=wait)
        self.exits.append(code)
        return code

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0
        try:
            return self.signal(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def _providers(base: Path, urls: tuple[str | None, str | None]) -> tuple[ProviderDir, ProviderDir]:
    ca_dir = base / "ca"
    a, b = (make_provider(base, domain, ca_dir, **({"--database-url": url} if url else {}))
            for domain, url in (("a.test", urls[0]), ("b.test", urls[1])))
    for p in (a, b):  # retries soon, and never give up during the run
        configure(p, "relay", retry_base=0.2, retry_max=2.0, max_attempts=1000)
    exchange_cards(a, b)
    for i in range(CLIENTS):
        a.add_user(f"sender{i}@a.test", "pw")
    b.add_user(RECIPIENT, "pw")
    return a, b


def _message(sender: str, msgid: str) -> bytes:
    return (f"From: {sender}\r\nTo: {RECIPIENT}\r\nSubject: crash {msgid}\r\n"
            f"Message-ID: {msgid}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            f"body of {msgid}\r\n").encode()


class Sender:
    """One client: keeps one authenticated session, sends until its share is acknowledged."""

    def __init__(self, index: int, share: int, port: int, tls: ssl.SSLContext) -> None:
        self.user = f"sender{index}@a.test"
        self.index, self.share, self.port, self.tls = index, share, port, tls
        self.acked: list[str] = []
        self.unacked: list[str] = []
        self.refused: Counter[int | str] = Counter()  # reply codes / errors (never counted as sent)

    async def run(self, deadline: float) -> None:
        smtp: aiosmtplib.SMTP | None = None
        attempt = 0
        while len(self.acked) < self.share and time.monotonic() < deadline:
            attempt += 1
            msgid = f"<crash-{self.index}-{attempt}@client.test>"
            try:
                if smtp is None:
                    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=30,
                                           tls_context=self.tls, start_tls=True)
                    await smtp.connect()
                    await smtp.login(self.user, "pw")
                await smtp.sendmail(self.user, [RECIPIENT], _message(self.user, msgid))
                self.acked.append(msgid)
            except (OSError, aiosmtplib.SMTPException) as exc:
                self.unacked.append(msgid)
                code = getattr(exc, "code", None)
                self.refused[code if isinstance(code, int) else type(exc).__name__] += 1
                if smtp is not None:
                    with contextlib.suppress(Exception):
                        smtp.close()
                smtp = None
                await asyncio.sleep(0.1)
        if smtp is not None:
            with contextlib.suppress(Exception):
                await smtp.quit()


def _scan(maildir: Path) -> list[tuple[str, str]]:
    """(kind, the client's Message-ID it refers to) for every stored file."""
    new = maildir / "new"
    out = []
    for path in new.iterdir() if new.exists() else ():
        data = path.read_bytes()
        h = _headers.parsebytes(data)
        kind = str(h.get("X-Ricevuta") or h.get("X-Trasporto") or "?").strip()
        ref = str(h.get("X-Riferimento-Message-ID", "")).strip()
        if kind == "avvenuta-consegna":
            cd = pec.parse(data).certdata
            assert cd is not None and cd.delivered_to == RECIPIENT
        out.append((kind, ref))
    return out


def _verify(p: ProviderDir) -> str:
    """``pecd ledger verify``'s answer, as a separate process (the way an auditor runs it)."""
    proc = subprocess.run([sys.executable, "-m", "pecd", "-c", str(p.conf), "ledger", "verify"],
                          capture_output=True, text=True, check=False, timeout=300)
    return f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()}"


def _queue_empty(p: ProviderDir) -> bool:
    return not any(line.startswith("queue ") for line in p.cli("status").splitlines())


async def _outage_replies(p: ProviderDir, port: int, tls: ssl.SSLContext, n: int = 3) -> list[int | str]:
    """What fresh clients get while the database is away: each reply code, or the error."""
    out: list[int | str] = []
    for i in range(n):
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, tls_context=tls,
                               start_tls=True)
        try:
            await smtp.connect()
            await smtp.login("sender0@a.test", "pw")
            msgid = f"<outage-{i}@client.test>"
            await smtp.sendmail("sender0@a.test", [RECIPIENT], _message("sender0@a.test", msgid))
            out.append(250)
        except aiosmtplib.SMTPResponseException as exc:
            out.append(exc.code)
        except (OSError, aiosmtplib.SMTPException) as exc:
            out.append(type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                smtp.close()
    return out


async def _crash_run(base: Path, urls: tuple[str | None, str | None] = (None, None),
                     cluster: Any = None) -> dict[str, object]:
    """The run; with ``cluster`` (tests/pg_support.Cluster, both providers on it) PostgreSQL is
    also restarted once with ``-m immediate``, and stopped once for a while mid-run."""
    rng = random.Random(SEED)
    a, b = _providers(base, urls)
    nodes = [Node(f"{p.domain}#{i}", p, base / f"{p.domain}-{i}.log") for p in (a, b) for i in (1, 2)]
    started = time.monotonic()
    for node in nodes:
        node.start()
    while not all(n.serving() for n in nodes):
        assert all(n.proc is not None and n.proc.poll() is None for n in nodes), "a node died at start"
        assert time.monotonic() < started + 120, "nodes did not start"
        await asyncio.sleep(0.1)
    tls = ssl.create_default_context(cafile=str(a.ca))
    port = a.config.listen.submission_port
    shares = [MESSAGES // CLIENTS + (i < MESSAGES % CLIENTS) for i in range(CLIENTS)]
    senders = [Sender(i, n, port, tls) for i, n in enumerate(shares)]
    deadline = started + 600
    sending = asyncio.gather(*(s.run(deadline) for s in senders))
    kills: Counter[str] = Counter()
    terms: Counter[str] = Counter()
    unplanned: list[str] = []  # nodes found dead that nobody stopped (PostgreSQL away, say)
    outage: list[int | str] = []
    # interruptions in a random order: KILLS SIGKILLs, SIGTERMS graceful stops and, on
    # PostgreSQL, one immediate restart and one outage of the database
    plan: list[str] = ["kill"] * KILLS + ["term"] * SIGTERMS
    rng.shuffle(plan)
    if cluster is not None:
        plan.insert(len(plan) * 2 // 3, "pg-restart")
        plan.insert(len(plan) // 3, "pg-outage")
    pg_log = str(cluster.root / "log") if cluster is not None else ""  # the server's user writes it
    try:
        while plan:
            acked = sum(len(s.acked) for s in senders)
            # spread the interruptions over the sending: the next after ~1/len(plan) of what is
            # left; those left when the sending is over go into the drain, a second or so apart
            target = acked + max(1, (MESSAGES - acked) // (len(plan) + 1))
            while sum(len(s.acked) for s in senders) < target and not sending.done():
                await asyncio.sleep(0.05)
            if sending.done():
                await asyncio.sleep(rng.uniform(0.5, 1.5))
            for n in nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    unplanned.append(f"{n.name} exit {n.proc.returncode}")
                    n.start()
            action = plan.pop()
            if action.startswith("pg-"):  # not while a node is starting: it would refuse to
                while any(n.starting() for n in nodes):  # start (database unreachable)
                    assert time.monotonic() < deadline, [n.name for n in nodes if n.starting()]
                    await asyncio.sleep(0.1)
            if action == "pg-restart":
                await asyncio.to_thread(cluster.pg_ctl, "restart", "-m", "immediate", "-w",
                                        "-t", "60", "-l", pg_log)
                continue
            if action == "pg-outage":
                await asyncio.to_thread(cluster.pg_ctl, "stop", "-m", "immediate", "-w")
                try:
                    outage = await _outage_replies(a, port, tls)
                finally:
                    await asyncio.to_thread(cluster.pg_ctl, "start", "-w", "-t", "60", "-l", pg_log)
                continue
            victim = rng.choice(nodes)
            sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
            await asyncio.to_thread(victim.signal, sig)
            (kills if sig == signal.SIGKILL else terms)[victim.name] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            victim.start()
        await sending
        acked_msgs = [m for s in senders for m in s.acked]
        # drain: every acknowledged message with its receipts, and nothing left in the queues
        sender_boxes = [a.maildir(f"sender{i}@a.test") for i in range(CLIENTS)]
        while time.monotonic() < deadline:
            receipts = sum(len(list((d / "new").iterdir())) for d in sender_boxes if (d / "new").exists())
            if (receipts >= 2 * len(acked_msgs)
                    and await asyncio.to_thread(_queue_empty, a)
                    and await asyncio.to_thread(_queue_empty, b)):
                break
            await asyncio.sleep(0.5)
        for n in nodes:
            if n.proc is not None and n.proc.poll() is not None:
                unplanned.append(f"{n.name} exit {n.proc.returncode}")
    finally:
        stops = {n.name: n.stop() for n in nodes}
    seconds = time.monotonic() - started
    acked_msgs = [m for s in senders for m in s.acked]
    unacked = [m for s in senders for m in s.unacked]
    sender_files = [f for i in range(CLIENTS) for f in _scan(a.maildir(f"sender{i}@a.test"))]
    service_files = _scan(a.maildir("posta-certificata@a.test"))
    envelopes = Counter(ref for kind, ref in _scan(b.maildir(RECIPIENT)) if kind == "posta-certificata")
    acceptances = Counter(ref for kind, ref in sender_files if kind == "accettazione")
    deliveries = Counter(ref for kind, ref in sender_files if kind == "avvenuta-consegna")
    take_charge = Counter(ref for kind, ref in service_files if kind == "presa-in-carico")
    problems = []
    for m in acked_msgs:
        for what, counter in (("envelope", envelopes), ("acceptance", acceptances),
                              ("take-charge", take_charge), ("delivery receipt", deliveries)):
            if counter[m] != 1:
                problems.append(f"{m}: {what} x{counter[m]}")
    for m in unacked:
        if envelopes[m] > 1 or acceptances[m] > 1 or deliveries[m] > 1:
            problems.append(f"{m} (unacknowledged): more than once")
    attempted = set(acked_msgs) | set(unacked)
    strangers = [m for m in envelopes if m not in attempted]
    ledgers = {p.domain: _verify(p) for p in (a, b)}
    figures: dict[str, object] = {
        "messages": MESSAGES, "acknowledged": len(acked_msgs), "unacknowledged": len(unacked),
        "unacknowledged_delivered": sum(1 for m in unacked if envelopes[m]),
        "refusals": dict(sum((s.refused for s in senders), Counter())),
        "kills": sum(kills.values()), "sigterms": sum(terms.values()),
        "kills_per_node": dict(kills), "stops": stops, "seconds": round(seconds, 1),
        "problems": problems[:20], "strangers": strangers[:5], "ledgers": ledgers,
        "unplanned_exits": unplanned, "outage_replies": outage,
    }
    print(json.dumps(figures, indent=2))
    return figures


def _check(figures: dict[str, object]) -> None:
    assert figures["acknowledged"] == MESSAGES, figures
    assert figures["kills"] >= min(KILLS, 20) and figures["sigterms"] >= 1, figures
    assert figures["problems"] == [] and figures["strangers"] == [], figures
    assert figures["unplanned_exits"] == [], figures
    ledgers = figures["ledgers"]
    assert isinstance(ledgers, dict)
    assert all(v.startswith("exit 0: ledger ok") for v in ledgers.values()), ledgers
    # a node stopped with SIGTERM at the end stops cleanly
    stops = figures["stops"]
    assert isinstance(stops, dict) and all(code == 0 for code in stops.values()), stops


def test_crash_two_nodes_per_provider_sqlite(tmp_path: Path) -> None:
    _check(asyncio.run(_crash_run(tmp_path)))


def test_crash_two_nodes_per_provider_postgresql(tmp_path: Path, pg_cluster: Any) -> None:
    """The same on PostgreSQL (each provider its own database on one server), which is also
    restarted once with ``pg_ctl restart -m immediate`` and stopped once for a while: during
    the outage a client gets 4xx, never 250, and afterwards the same nodes carry on (none
    exits on its own; none is restarted for it)."""
    urls = (pg_cluster.database(), pg_cluster.database())
    figures = asyncio.run(_crash_run(tmp_path, urls, pg_cluster))
    _check(figures)
    outage = figures["outage_replies"]
    assert isinstance(outage, list) and outage, figures
    assert all(isinstance(c, int) and 400 <= c < 500 for c in outage), outage
