"""Crash test for pecd's delivery promise: every message that got ``250`` arrives exactly once,
with exactly one acceptance, one take-charge and one delivery receipt per recipient, while the
daemons are killed with SIGKILL at random moments and restarted.

Each submission attempt carries a fresh Message-ID. Attempts that got ``250`` are *acknowledged*:
each must be delivered exactly once. Attempts cut off by a kill are *unacknowledged*: they may
appear at most once (durable just before the crash, reply lost) and are reported apart.
Exit status 0 only when nothing was lost, nothing doubled and both ledgers verify.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from email.parser import BytesHeaderParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PECD = str(ROOT / ".venv" / "bin" / "pecd")
RECIPIENTS = ["bob@b.test", "carol@b.test"]
_headers = BytesHeaderParser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([PECD, *args], input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pecd {' '.join(args)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


class Daemon:
    def __init__(self, name: str, conf: Path, log: Path) -> None:
        self.name, self.conf, self.log = name, conf, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(re.search(r"submission_port = (\d+)", conf.read_text()).group(1))  # type: ignore[union-attr]
        self.inbound = int(re.search(r"inbound_port = (\d+)", conf.read_text()).group(1))  # type: ignore[union-attr]
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([PECD, "-c", str(self.conf), "serve"], stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.inbound), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} exited at start; see {self.log}") from None
                time.sleep(0.05)
        raise SystemExit(f"{self.name} did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def make_providers(work: Path, clients: int) -> tuple[Path, Path]:
    confs = []
    for domain in ("a.test", "b.test"):
        root = work / domain
        run("init", str(root), "--domain", domain, "--ca", str(work / "ca"),
            "--submission-port", str(free_port()), "--smtps-port", str(free_port()),
            "--inbound-port", str(free_port()), "--http-port", str(free_port()))
        conf = root / "pecd.toml"
        text = conf.read_text()
        text = re.sub(r"retry_base = [0-9.]+", "retry_base = 0.2", text)
        text = re.sub(r"retry_max = [0-9.]+", "retry_max = 2.0", text)
        text = re.sub(r"max_attempts = [0-9]+", "max_attempts = 1000", text)
        conf.write_text(text)
        confs.append(conf)
    a, b = confs
    for conf, other in ((a, b), (b, a)):
        card = conf.parent / "card.json"
        card.write_text(run("-c", str(conf), "index", "export"))
        run("-c", str(other), "index", "import", str(card))
    for i in range(clients):
        run("-c", str(a), "user", "add", f"sender{i}@a.test", "--password-stdin", stdin="pw\n")
    for r in RECIPIENTS:
        run("-c", str(b), "user", "add", r, "--password-stdin", stdin="pw\n")
    return a, b


def message(sender: str, msgid: str) -> bytes:
    return (f"From: {sender}\r\nTo: {', '.join(RECIPIENTS)}\r\nSubject: crash test {msgid}\r\n"
            f"Message-ID: {msgid}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            f"body of {msgid}\r\n").encode()


class Client(threading.Thread):
    def __init__(self, index: int, count: int, daemon_a: Daemon, ca: Path, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.user = f"sender{index}@a.test"
        self.index, self.count, self.a, self.stop_at = index, count, daemon_a, stop_at
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.acked: list[str] = []
        self.unacked: list[str] = []
        self.attempts = 0

    def run(self) -> None:
        smtp: smtplib.SMTP | None = None
        done = 0
        while done < self.count and time.monotonic() < self.stop_at:
            self.attempts += 1
            msgid = f"<crash-{self.index}-{self.attempts}@client.test>"
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.a.port, timeout=20)
                    smtp.starttls(context=self.tls)
                    smtp.login(self.user, "pw")
                smtp.sendmail(self.user, RECIPIENTS, message(self.user, msgid))
                self.acked.append(msgid)
                done += 1
            except (OSError, smtplib.SMTPException):
                self.unacked.append(msgid)
                if smtp is not None:
                    with contextlib.suppress(OSError):
                        smtp.close()
                smtp = None
                time.sleep(0.05)
        if smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()


def scan(maildir: Path) -> list[tuple[str, str, str | None]]:
    """(kind, referenced client Message-ID, recipient for delivery receipts) per stored file."""
    sys.path.insert(0, str(ROOT))
    from pecd.format import pec

    out = []
    new = maildir / "new"
    if not new.exists():
        return out
    for path in new.iterdir():
        data = path.read_bytes()
        h = _headers.parsebytes(data)
        ref = str(h.get("X-Riferimento-Message-ID", "")).strip()
        kind = str(h.get("X-Ricevuta") or h.get("X-Trasporto") or "?").strip()
        rcpt = None
        if kind == "avvenuta-consegna":
            cd = pec.parse(data).certdata
            rcpt = cd.delivered_to if cd else None
        out.append((kind, ref, rcpt))
    return out


def queue_empty(conf: Path) -> bool:
    out = run("-c", str(conf), "status")
    return not any(line.startswith("queue ") for line in out.splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=1000, help="acknowledged messages to reach")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (A or B at random)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent submission clients")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep state here (default: temp)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pecd-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.timeout
    conf_a, conf_b = make_providers(work, args.clients)
    a = Daemon("A", conf_a, work / "a.log")
    b = Daemon("B", conf_b, work / "b.log")
    a.start()
    b.start()
    per = [args.messages // args.clients + (1 if i < args.messages % args.clients else 0)
           for i in range(args.clients)]
    clients = [Client(i, n, a, conf_a.parent / "keys" / "ca.pem", deadline - 60)
               for i, n in enumerate(per)]
    for c in clients:
        c.start()
    # spread the kills over the expected sending time, then keep killing during the drain
    kills = Counter[str]()
    expected = max(5.0, args.messages / 40)
    try:
        while sum(kills.values()) < args.kills and time.monotonic() < deadline - 120:
            time.sleep(rng.uniform(0.2, 2 * expected / max(args.kills, 1)))
            victim = rng.choice([a, b])
            victim.kill()
            kills[victim.name] += 1
            time.sleep(rng.uniform(0.0, 0.5))
            victim.start()
        for c in clients:
            c.join(timeout=max(1.0, deadline - 60 - time.monotonic()))
        acked = [m for c in clients for m in c.acked]
        unacked = [m for c in clients for m in c.unacked]
        # drain: wait until every acknowledged message has all its receipts, or time runs out
        senders_dirs = [conf_a.parent / "data" / "mail" / "a.test" / f"sender{i}"
                        for i in range(args.clients)]
        while time.monotonic() < deadline:
            receipts = sum(len(list((d / "new").glob("*"))) for d in senders_dirs if (d / "new").exists())
            if receipts >= len(acked) * (1 + len(RECIPIENTS)) and queue_empty(conf_a) and queue_empty(conf_b):
                break
            time.sleep(0.5)
    finally:
        codes = {"A": a.stop(), "B": b.stop()}
    # --- the checks -------------------------------------------------------------------------
    sender_files = [f for i in range(args.clients)
                    for f in scan(conf_a.parent / "data" / "mail" / "a.test" / f"sender{i}")]
    service_files = scan(conf_a.parent / "data" / "mail" / "a.test" / "posta-certificata")
    boxes = {r: scan(conf_b.parent / "data" / "mail" / "b.test" / r.split("@")[0]) for r in RECIPIENTS}
    envelopes = {r: Counter(ref for kind, ref, _ in files if kind == "posta-certificata")
                 for r, files in boxes.items()}
    acceptances = Counter(ref for kind, ref, _ in sender_files if kind == "accettazione")
    deliveries = Counter((ref, rcpt) for kind, ref, rcpt in sender_files if kind == "avvenuta-consegna")
    take_charge = Counter(ref for kind, ref, _ in service_files if kind == "presa-in-carico")
    lost: list[str] = []
    doubled: list[str] = []
    for m in acked:
        for r in RECIPIENTS:
            n = envelopes[r][m]
            if n == 0:
                lost.append(f"{m} envelope to {r}")
            elif n > 1:
                doubled.append(f"{m} envelope to {r} x{n}")
            d = deliveries[(m, r)]
            if d != 1:
                (lost if d == 0 else doubled).append(f"{m} delivery receipt for {r} x{d}")
        if acceptances[m] != 1:
            (lost if acceptances[m] == 0 else doubled).append(f"{m} acceptance x{acceptances[m]}")
        if take_charge[m] != 1:
            (lost if take_charge[m] == 0 else doubled).append(f"{m} take-charge x{take_charge[m]}")
    attempted = set(acked) | set(unacked)
    unacked_delivered = 0
    for m in unacked:
        counts = [envelopes[r][m] for r in RECIPIENTS]
        if any(c > 1 for c in counts) or acceptances[m] > 1:
            doubled.append(f"{m} (unacknowledged) delivered more than once")
        if any(counts):
            unacked_delivered += 1
    strangers = {ref for r in RECIPIENTS for ref in envelopes[r] if ref not in attempted}
    ledgers = {}
    for name, conf in (("A", conf_a), ("B", conf_b)):
        proc = subprocess.run([PECD, "-c", str(conf), "ledger", "verify"], capture_output=True,
                              text=True, check=False)
        ledgers[name] = (proc.stdout + proc.stderr).strip()
    ledgers_ok = all("ledger ok" in v for v in ledgers.values())
    figures = {
        "seed": seed, "clients": args.clients, "attempts": sum(c.attempts for c in clients),
        "acknowledged": len(acked), "unacknowledged": len(unacked),
        "unacknowledged_but_delivered": unacked_delivered,
        "delivered": sum(1 for m in acked if all(envelopes[r][m] == 1 for r in RECIPIENTS)),
        "delivery_receipts": sum(deliveries.values()), "lost": len(lost), "duplicates": len(doubled),
        "unknown_messages": len(strangers), "kills": dict(kills), "kills_total": sum(kills.values()),
        "exit_codes_on_sigterm": codes, "ledgers": ledgers,
        "seconds": round(time.monotonic() - started, 1), "workdir": str(work),
    }
    print(json.dumps(figures, indent=2))
    for line in (lost + doubled)[:20]:
        print("  problem:", line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = (not lost and not doubled and not strangers and ledgers_ok
          and len(acked) == args.messages and all(c == 0 for c in codes.values()))
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
