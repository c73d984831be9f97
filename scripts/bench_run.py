"""``scripts/bench``: how fast certified mail is, next to plain relays, in one run on 127.0.0.1.

Two providers A and B are made with ``pecd init`` in a temporary directory (shared dev CA, free
ports, default settings) and each runs as its own ``pecd -c CONF serve`` process, so CPU and RSS
are read per daemon from ``/proc/PID``. A separate load process (``bench_load.py``) submits over
persistent STARTTLS + AUTH sessions. Phases:

1. certified, max rate: N messages of 10 KiB from A's user to one recipient at B; a cycle ends
   when the delivery receipt (``X-Ricevuta: avvenuta-consegna``) whose X-Riferimento-Message-ID is
   the client's Message-ID lands in the sender's Maildir ``new/``;
2. certified at half the measured cycle rate (open-loop), for the DATA-end → ``250`` target;
3. baselines with the same client and messages: a plain aiosmtpd → aiosmtplib relay and a
   throwaway Postfix instance, both relaying to an aiosmtpd sink (``bench_relay.py``);
4. one big message (25 MB with attachments) through the full cycle: peak RSS growth per daemon;
5. deep queue: with B down, N messages are queued at A, then B starts: RSS queued vs empty,
   drain time, and that every delivery receipt arrived.

Nothing here asserts a speed. Every wait is bounded; every process started is stopped on exit,
Ctrl-C or failure; traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from base64 import encodebytes
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
PY = sys.executable
PECD = str(Path(sys.executable).parent / "pecd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK = b"@@N@@"  # bench_load.py replaces it with the message's index
PASSWORD = "bench-password-1"
SENDER = "alice@a.test"
RCPT = "bob@b.test"
MiB = 1024 * 1024


class BenchError(Exception):
    """A phase could not run (a daemon died, a port never opened); the message says which."""


# --- settings ---------------------------------------------------------------------------------

@dataclass
class Settings:
    messages: int
    min_seconds: float
    pairs: int
    clients: int
    half_seconds: float
    big_mb: float
    deep: int
    deep_hold: float
    drain_timeout: float
    stall: float
    postfix: bool
    profile: Path | None
    profile_gil: bool
    keep: bool
    json: Path | None
    quick: bool
    certified_only: bool
    keys: str = "file"  # "pkcs11": both providers sign in a SoftHSM2 token (keys_in_token)
    database: str = "sqlite"  # "postgresql": phase 6 also runs the certified cycle on PostgreSQL
    workers: int = 1  # phase 6: `pecd serve --workers N` beside one worker


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Certified throughput, latency and memory of pecd against a plain relay and "
                    "Postfix, on 127.0.0.1. Prints a table; never asserts a speed.")
    p.add_argument("--quick", action="store_true",
                   help="~30 s smoke run: few messages, 5 MB big message, 500 queued")
    p.add_argument("-n", "--messages", type=int,
                   help="at least this many messages per max-rate load phase (default 2000)")
    p.add_argument("--min-seconds", type=float,
                   help="and each max-rate load phase lasts at least this long, whichever is "
                        "longer (default 10)")
    p.add_argument("--pairs", type=int,
                   help="certified and Postfix max-rate phases run alternately this many times; "
                        "the ratio is reported as median and spread (default 3)")
    p.add_argument("-c", "--clients", type=int, help="concurrent SMTP sessions (default 8)")
    p.add_argument("--half-seconds", type=float, help="length of the half-rate phase (default 20)")
    p.add_argument("--big-mb", type=float, help="size of the big message in MB (default 25)")
    p.add_argument("--deep", type=int, help="messages queued with B down (default 100000)")
    p.add_argument("--deep-hold", type=float, help="seconds A runs with B down (default 10)")
    p.add_argument("--drain-timeout", type=float,
                   help="longest wait for the deep queue to drain, seconds (default 30)")
    p.add_argument("--no-postfix", action="store_true", help="skip the Postfix baseline")
    p.add_argument("--certified-only", action="store_true",
                   help="run only phases 1 and 2 (certified, max and half rate): to profile a "
                        "change quickly, not for the closing figures")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy profiles of A and B during the max-rate phase into DIR")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (Python CPU), "
                        "not every active thread (which includes fsync and SQLite waits)")
    p.add_argument("--keys", choices=["file", "pkcs11"], default="file",
                   help="where the providers' signing and TSA keys live (pkcs11: SoftHSM2)")
    p.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                   help="postgresql: phase 6 runs the certified max-rate phase again with both "
                        "providers on a throwaway PostgreSQL cluster (Debian's binaries), with 1 "
                        "and --workers worker processes, beside SQLite")
    p.add_argument("--workers", type=int, default=1,
                   help="phase 6: also run the providers as `pecd serve --workers N` (on SQLite, "
                        "and on PostgreSQL with --database postgresql)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    a = p.parse_args(argv)
    q = a.quick

    def pick(value: Any, default: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else default)

    s = Settings(
        messages=pick(a.messages, 2000, 30),
        min_seconds=pick(a.min_seconds, 10.0, 1.0),
        pairs=pick(a.pairs, 3, 1),
        clients=pick(a.clients, 8, 4),
        half_seconds=pick(a.half_seconds, 20.0, 3.0),
        big_mb=pick(a.big_mb, 25.0, 5.0),
        deep=pick(a.deep, 100_000, 500),
        deep_hold=pick(a.deep_hold, 10.0, 2.0),
        drain_timeout=pick(a.drain_timeout, 30.0, 4.0),
        stall=20.0 if q else 60.0,
        postfix=not a.no_postfix,
        profile=a.profile,
        profile_gil=a.profile_gil,
        keep=a.keep,
        json=a.json,
        quick=q,
        keys=a.keys,
        database=a.database,
        workers=a.workers,
        certified_only=a.certified_only,
    )
    if s.messages < 1 or s.clients < 1 or s.deep < 1 or s.pairs < 1 or s.min_seconds < 0 \
            or s.workers < 1:
        p.error("--messages, --clients, --deep, --pairs and --workers must be positive")
    return s


# --- /proc ------------------------------------------------------------------------------------

def proc_cpu(pid: int, children: bool = False) -> float:
    """utime + stime (+ reaped children's) of one process, in seconds; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; zeros once the process is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def reset_hwm(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux ≥ 4.0, writing 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy() -> float:
    """CPU seconds the whole machine spent running anything (all cores), from /proc/stat: user,
    nice, system, irq and softirq; not idle, iowait or steal (time the hypervisor gave to
    another guest is not spent here)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values[:3] + values[5:7]) / CLK_TCK


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (a `--workers` supervisor's workers, PostgreSQL's
    backends)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children_of(p))
    return out


def tree_cpu(pid: int) -> float:
    """CPU of a process and of its live and reaped descendants."""
    return sum(proc_cpu(p, children=True) for p in tree_pids(pid))


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


class OwnCpu:
    """CPU seconds of every process the benchmark runs: this process and its descendants (the
    daemons, the load process, the sink, py-spy), plus extra roots that left the tree (Postfix's
    master daemonises) and theirs. Each counts its reaped children (cutime + cstime), so a
    process that exits keeps counting through its parent. The tree is re-read at most once a
    second; /proc/stat minus this is what processes outside the benchmark used."""

    def __init__(self) -> None:
        self.roots: set[int] = {os.getpid()}
        self._pids: list[int] = [os.getpid()]
        self._listed = 0.0
        self._lock = threading.Lock()

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.add(pid)
            self._listed = 0.0

    def drop_root(self, pid: int) -> None:
        with self._lock:
            self.roots.discard(pid)
            self._listed = 0.0

    def _tree(self) -> list[int]:
        parent: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    text = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                parent[int(entry.name)] = int(text[text.rindex(")") + 2:].split()[1])
        with self._lock:
            inside = set(self.roots)
        grew = True
        while grew:
            more = {pid for pid, pp in parent.items() if pp in inside and pid not in inside}
            inside |= more
            grew = bool(more)
        return sorted(inside)

    def __call__(self) -> float:
        now = time.monotonic()
        if now - self._listed > 1.0:
            self._pids = self._tree()
            self._listed = now
        return sum(proc_cpu(pid, children=True) for pid in self._pids)


def proc_pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Meter(threading.Thread):
    """Every 50 ms: the memory of named process groups (peak kept per group) and the CPU seconds
    of named counters plus the whole machine (kept as a time series, so a phase's CPU can be
    taken between its first submit and its last arrival rather than around the waiting)."""

    def __init__(self) -> None:
        super().__init__(name="bench-meter", daemon=True)
        self._groups: dict[str, tuple[Callable[[], list[int]], bool]] = {}
        self._peak: dict[str, int] = {}
        self._cpu: dict[str, Callable[[], float]] = {}
        self.series: list[tuple[float, dict[str, float], float, float]] = []
        self.own = OwnCpu()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def watch(self, label: str, pids: Callable[[], list[int]], pss: bool = False) -> None:
        with self._lock:
            self._groups[label] = (pids, pss)
            self._peak[label] = 0

    def unwatch(self, label: str) -> None:
        with self._lock:
            self._groups.pop(label, None)

    def reset(self, label: str) -> None:
        with self._lock:
            self._peak[label] = 0

    def peak(self, label: str) -> int:
        with self._lock:
            return self._peak.get(label, 0)

    def count_cpu(self, counters: dict[str, Callable[[], float]]) -> None:
        """Start a fresh CPU series over ``counters``."""
        with self._lock:
            self._cpu = dict(counters)
            self.series = []
        self._sample_cpu()

    def cpu_between(self, start: float, end: float) -> tuple[dict[str, float], float, float]:
        """CPU seconds per counter, for the whole machine and for every benchmark process
        between two ``time.time()``s."""
        self._sample_cpu()
        with self._lock:
            series = list(self.series)
        if not series:
            return {}, 0.0, 0.0
        before = [x for x in series if x[0] <= start] or series[:1]
        after = [x for x in series if x[0] >= end] or series[-1:]
        _, c0, m0, o0 = before[-1]
        _, c1, m1, o1 = after[0]
        return {k: c1[k] - c0.get(k, 0.0) for k in c1}, m1 - m0, o1 - o0

    def _sample_cpu(self) -> None:
        with self._lock:
            counters = dict(self._cpu)
        if counters:
            sample = (time.time(), {k: f() for k, f in counters.items()}, machine_busy(),
                      self.own())
            with self._lock:
                self.series.append(sample)

    def run(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                groups = list(self._groups.items())
            for label, (pids, pss) in groups:
                total = sum(proc_pss(p) if pss else proc_mem(p)[0] for p in pids())
                with self._lock:
                    self._peak[label] = max(self._peak.get(label, 0), total)
            self._sample_cpu()

    def stop(self) -> None:
        self._stop.set()


# --- processes --------------------------------------------------------------------------------

class Procs:
    """Every child process the benchmark starts, by name; ``stop_all`` ends them by pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], stdout: Path | None = None,
              stdin: Path | None = None) -> subprocess.Popen[bytes]:
        if name in self.procs:
            raise BenchError(f"{name} is already running")
        with contextlib.ExitStack() as files:  # Popen holds its own copies
            out = files.enter_context(open(stdout or self.logs / f"{name}.log", "ab"))
            err = files.enter_context(open(self.logs / f"{name}.err", "ab")) if stdout else out
            inp = files.enter_context(open(stdin, "rb")) if stdin else None
            proc = subprocess.Popen(argv, stdout=out, stderr=err,
                                    stdin=inp if inp is not None else subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def forget(self, name: str) -> subprocess.Popen[bytes] | None:
        return self.procs.pop(name, None)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(name)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"{what} exited before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def keys_in_token(tmp: Path, root: Path, ca_dir: Path) -> None:
    """``--keys pkcs11``: the provider's signing and TSA keys made in a SoftHSM2 token (one token
    ``bench`` under ``tmp`` for both providers; the daemons inherit SOFTHSM2_CONF), the key
    files removed, ``[keys]`` pointing at the token."""
    conf, pin = tmp / "softhsm2.conf", tmp / "token.pin"
    if not conf.exists():
        (tmp / "tokens").mkdir()
        conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
                        "log.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin",
                        "1234", "--so-pin", "5678"], check=True, capture_output=True)
        pin.write_text("1234\n")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    cfg = root / "pecd.toml"
    for what, purpose in (("signing", "signing"), ("tsa", "tsa")):
        uri = f"pkcs11:token=bench;object={root.name}-{what}"
        pecd_cli("-c", str(cfg), "keys", "generate", "--pkcs11", uri, "--purpose", purpose,
                 "--module", module, "--pin-file", str(pin), "--ca", str(ca_dir),
                 "--cert", str(root / "keys" / f"{what}.pem"))
        (root / "keys" / f"{what}.key").unlink()
    text = cfg.read_text().replace("[keys]\n", "[keys]\n" + "".join(
        f'{k} = "{v}"\n' for k, v in (
            ("provider", f"pkcs11:token=bench;object={root.name}-signing"),
            ("tsa", f"pkcs11:token=bench;object={root.name}-tsa"),
            ("pkcs11_module", module), ("pin_file", str(pin)))), 1)
    cfg.write_text(text)


def pecd_cli(*args: str, stdin: str | None = None) -> str:
    """Run a ``pecd`` command in this process (click's test runner, as tests/conftest.py does)."""
    sys.path.insert(0, str(ROOT))
    from click.testing import CliRunner

    from pecd.cli import main as cli_main

    result = CliRunner().invoke(cli_main, list(args), input=stdin, catch_exceptions=False)
    if result.exit_code != 0:
        raise BenchError(f"pecd {' '.join(args[:3])} … failed: {result.output.strip()}")
    return result.output


def run(argv: list[str], stdin: str | None = None, timeout: float = 120.0) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} … failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


# --- messages ---------------------------------------------------------------------------------

def small_message(label: str, size: int = 10 * 1024) -> bytes:
    """A 10 KiB text message; MARK in Subject and Message-ID becomes the message's index."""
    head = (f"From: Alice <{SENDER}>\r\nTo: Bob <{RCPT}>\r\nSubject: bench {label} @@N@@\r\n"
            f"Message-ID: <{label}.@@N@@@client.a.test>\r\n"
            "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    rng = random.Random(label)
    words = ["certified", "mail", "receipt", "provider", "timestamp", "signature", "ledger",
             "queue", "transport", "envelope", "delivery", "acceptance", "notice", "domain"]
    lines = [head]
    total = len(head)
    while total < size - 80:
        line = " ".join(rng.choice(words) for _ in range(10)) + "\r\n"
        lines.append(line)
        total += len(line)
    lines.append("x" * max(0, size - total - 2) + "\r\n")
    return "".join(lines).encode()


def big_message(label: str, size: int) -> bytes:
    """About ``size`` bytes: a text part and three base64 attachments (a PDF-like blob each)."""
    boundary = "bench-boundary-7f3a"
    head = (f"From: Alice <{SENDER}>\r\nTo: Bob <{RCPT}>\r\nSubject: bench {label} @@N@@\r\n"
            f"Message-ID: <{label}.@@N@@@client.a.test>\r\n"
            "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Three attachments follow.\r\n").encode()
    rng = random.Random(label)
    parts = [head]
    raw_each = int((size - len(head) - 1000) / 3 * 57 / 78)  # base64 76 chars + CRLF per 57 bytes
    for n in range(3):
        blob = rng.randbytes(raw_each)
        body = encodebytes(blob).replace(b"\n", b"\r\n")
        parts.append(f"--{boundary}\r\nContent-Type: application/pdf; name=\"allegato-{n}.pdf\""
                     f"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;"
                     f" filename=\"allegato-{n}.pdf\"\r\n\r\n".encode())
        parts.append(body)
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


# --- watching results -------------------------------------------------------------------------

_RICEVUTA = re.compile(rb"^X-Ricevuta:[ \t]*([^\r\n]+)", re.M | re.I)
_RIF = re.compile(rb"^X-Riferimento-Message-ID:[ \t]*([^\r\n]+)", re.M | re.I)


def norm_id(value: str) -> str:
    return value.strip().strip("<>").strip()


class Receipts:
    """Delivery receipts landing in a Maildir's ``new/``: message id → time stored (ctime)."""

    def __init__(self, maildir: Path, kind: str = "avvenuta-consegna") -> None:
        self.new = maildir / "new"
        self.kind = kind.encode()
        self.seen: set[str] = set()
        self.found: dict[str, float] = {}
        self.other = 0

    def poll(self) -> int:
        try:
            names = os.listdir(self.new)
        except FileNotFoundError:
            return 0
        added = 0
        for name in names:
            if name in self.seen:
                continue
            path = self.new / name
            try:
                with open(path, "rb") as f:
                    head = f.read(16384)
                ctime = os.stat(path).st_ctime
            except FileNotFoundError:
                continue
            self.seen.add(name)
            end = head.find(b"\r\n\r\n")
            block = head if end < 0 else head[:end]
            kind, ref = _RICEVUTA.search(block), _RIF.search(block)
            if kind and ref and kind.group(1).strip() == self.kind:
                self.found[norm_id(ref.group(1).decode("latin-1"))] = ctime
                added += 1
            else:
                self.other += 1
        return added


class SinkLog:
    """Arrivals the sink logged: message id → time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.found: dict[str, float] = {}

    def poll(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        added = 0
        for line in chunk[:end].decode("latin-1").splitlines():
            mid, _, at = line.rpartition(" ")
            if mid:
                self.found[norm_id(mid)] = float(at)
                added += 1
        return added


Watch = Receipts | SinkLog


def wait_arrivals(watch: Watch, wanted: set[str], timeout: float, stall: float,
                  idle: Callable[[], bool] | None = None) -> str:
    """Poll until every wanted id has arrived. Returns ``complete``; ``idle`` when ``idle()``
    held twice a second apart with nothing arriving (the systems have nothing left: whatever is
    missing is lost); ``stalled`` after ``stall`` s without progress; ``timeout``."""
    deadline = time.monotonic() + timeout
    last_progress = time.monotonic()
    next_idle_check = time.monotonic() + 1.0
    idle_seen = False
    while True:
        if watch.poll():
            last_progress = time.monotonic()
            idle_seen = False
        if wanted <= watch.found.keys():
            return "complete"
        now = time.monotonic()
        if idle is not None and now >= next_idle_check:
            next_idle_check = now + 1.0
            if idle():
                if idle_seen and not watch.poll():
                    return "idle"
                idle_seen = True
            else:
                idle_seen = False
        if now > deadline:
            return "timeout"
        if now - last_progress > stall:
            return "stalled"
        time.sleep(0.05)


# --- statistics -------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def lat(values: list[float]) -> dict[str, float | None]:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99),
            "max": max(values) if values else None}


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Provider:
    name: str
    domain: str
    root: Path
    submission: int
    inbound: int

    @property
    def conf(self) -> Path:
        return self.root / "pecd.toml"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.root / "data" / "mail" / domain / local


@dataclass
class Bench:
    s: Settings
    tmp: Path
    procs: Procs
    meter: Meter
    a: Provider | None = None
    b: Provider | None = None
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ca: Path | None = None
    urls: dict[str, str] = field(default_factory=dict)  # provider name → PostgreSQL URL
    workers: int = 1  # `pecd serve --workers N`
    pg_pid: int | None = None  # the PostgreSQL postmaster whose CPU counts as server CPU

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # ---- providers -----------------------------------------------------------------------

    def make_providers(self) -> None:
        """``pecd init`` twice (shared dev CA), cards exchanged, one user each: pecd's own CLI,
        invoked in this process (as the tests do) to spare eight interpreter start-ups."""
        ca_dir = self.tmp / "ca"
        self.a, self.b = [
            Provider(n.upper(), f"{n}.test", self.tmp / n, free_port(), free_port())
            for n in ("a", "b")]
        for p in (self.a, self.b):
            url = self.urls.get(p.name)
            pecd_cli("init", str(p.root), "--domain", p.domain, "--ca", str(ca_dir),
                     "--submission-port", str(p.submission), "--smtps-port", str(free_port()),
                     "--inbound-port", str(p.inbound), "--http-port", str(free_port()),
                     *(["--database-url", url] if url else []))
            if url:
                DATABASE_URLS[p.root] = url
            if self.s.keys == "pkcs11":
                keys_in_token(self.tmp, p.root, ca_dir)
        for p, q in ((self.a, self.b), (self.b, self.a)):
            card = self.tmp / f"{p.name}.card"
            card.write_text(pecd_cli("-c", str(p.conf), "index", "export"))
            pecd_cli("-c", str(q.conf), "index", "import", str(card))
        for p, user in ((self.a, SENDER), (self.b, RCPT)):
            pecd_cli("-c", str(p.conf), "user", "add", user, "--password-stdin",
                     stdin=PASSWORD + "\n")
        self.ca = self.a.root / "keys" / "ca.pem"

    def start_pecd(self, p: Provider) -> None:
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        proc = self.procs.start(p.name, [PECD, "-c", str(p.conf), "serve", *workers])
        alive = lambda: proc.poll() is None  # noqa: E731
        try:
            wait_port(p.submission, 60, alive, f"provider {p.name}")
            wait_port(p.inbound, 30, alive, f"provider {p.name}")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.procs.tail(p.name)}") from None
        pid = proc.pid
        self.meter.watch(p.name, lambda: tree_pids(pid))

    def stop_pecd(self, p: Provider) -> None:
        self.meter.unwatch(p.name)
        self.procs.stop(p.name)

    def pid(self, p: Provider) -> int:
        return self.procs.pid(p.name)

    # ---- load ----------------------------------------------------------------------------

    def load(self, label: str, template: bytes, count: int, port: int, watch: Watch | None,
             rate: float = 0.0, concurrency: int | None = None, auth: bool = True,
             tls: bool = True, deadline: float = 600.0,
             on_ready: Callable[[], None] | None = None,
             min_seconds: float = 0.0) -> dict[str, Any]:
        """Run the load process; poll ``watch`` meanwhile so arrival times stay fresh.
        ``on_ready`` runs once every session has logged in, before the first message."""
        tpl = self.tmp / f"{label}.eml"
        tpl.write_bytes(template)
        job = {"port": port, "ca": str(self.ca) if tls else None, "users": [[SENDER, PASSWORD]],
               "rcpt": RCPT, "template": str(tpl), "count": count, "min_seconds": min_seconds,
               "concurrency": concurrency or self.s.clients, "rate": rate, "auth": auth,
               "deadline": deadline}
        ready, go = self.tmp / f"{label}.ready", self.tmp / f"{label}.go"
        if on_ready is not None:
            job.update(ready_file=str(ready), go_file=str(go))
        spec = self.tmp / f"{label}.job.json"
        spec.write_text(json.dumps(job))
        out = self.tmp / f"{label}.out.json"
        name = f"load-{label}"
        proc = self.procs.start(name, [PY, str(SCRIPTS / "bench_load.py")], stdout=out, stdin=spec)
        limit = time.monotonic() + deadline + 60
        while proc.poll() is None:
            if time.monotonic() > limit:
                self.procs.stop(name)
                raise BenchError(f"load process {label} overran its deadline")
            if on_ready is not None and ready.exists() and not go.exists():
                on_ready()
                go.touch()
            if watch is not None:
                watch.poll()
            time.sleep(0.05)
        self.procs.forget(name)
        if proc.returncode != 0:
            err = (self.tmp / "logs" / f"{name}.err").read_text(errors="replace")[-2000:]
            raise BenchError(f"load process {label} failed ({proc.returncode}): {err}")
        result: dict[str, Any] = json.loads(out.read_text())
        for e in result["errors"][:3]:
            self.say(f"  client error: {e}")
        return result

    def measure(self, label: str, template: bytes, count: int, port: int, watch: Watch,
                cpu: dict[str, Callable[[], float]], rss: list[str], idle: Callable[[], bool],
                rate: float = 0.0, auth: bool = True, min_seconds: float = 0.0) -> dict[str, Any]:
        """One load phase: submit (at least ``count`` messages and for at least
        ``min_seconds``), wait for every acknowledged message to arrive (or for the systems to
        go idle without it: then it is lost), summarise. CPU is counted from the first submit
        to the last arrival."""
        for r in rss:
            self.meter.reset(r)
        self.meter.count_cpu(cpu)
        t0 = time.time()
        res = self.load(label, template, count, port, watch, rate=rate, auth=auth,
                        min_seconds=min_seconds, deadline=max(600.0, 4 * min_seconds))
        recs = res["records"]
        wanted = {norm_id(r["msgid"]) for r in recs}
        ended = wait_arrivals(watch, wanted, timeout=max(120.0, 2.0 * len(recs)),
                              stall=self.s.stall, idle=idle)
        arrived = {m: watch.found[m] for m in wanted if m in watch.found}
        n = len(recs)
        first = min((r["start"] for r in recs), default=t0)
        last_ack = max((r["acked"] for r in recs), default=t0)
        last_arrival = max(arrived.values(), default=last_ack)
        used, busy, ours = self.meter.cpu_between(first, max(last_arrival, last_ack))
        self.meter.count_cpu({})
        cpu_used = {k: v for k, v in used.items() if k != "sink"}
        client_share = res["cpu"] / max(1e-9, res["ended"] - res["started"])
        outside = max(0.0, busy - ours)
        window = max(1e-9, max(last_arrival, last_ack) - first)
        by_id = {norm_id(r["msgid"]): r for r in recs}
        return {
            "sent": max(count, n), "acked": n, "arrived": len(arrived), "missing": n - len(arrived),
            "wait_ended": ended, "client_errors": res["errors"],
            "submissions_per_s": n / (last_ack - first) if n and last_ack > first else None,
            "end_to_end_per_s": (len(arrived) / (last_arrival - first)
                                 if arrived and last_arrival > first else None),
            "data_end_to_250_s": lat([r["acked"] - r["data_end"] for r in recs]),
            "submit_to_arrival_s": lat([arrived[m] - by_id[m]["start"] for m in arrived]),
            "cpu_s": cpu_used,
            "cpu_s_per_msg": {k: v / max(1, len(arrived)) for k, v in cpu_used.items()},
            "server_cpu_s_per_msg": (sum(cpu_used.values()) / len(arrived)) if arrived else None,
            "server_cpu_share": {k: v / window for k, v in cpu_used.items()},
            "client_cpu_s": res["cpu"],
            "client_cpu_s_per_msg": res["cpu"] / max(1, n),
            "client_cpu_share": client_share,
            "machine_cpu_s_per_msg": busy / max(1, len(arrived)),
            "machine_cpu_share": busy / window / (os.cpu_count() or 1),
            "sink_cpu_s_per_msg": used["sink"] / max(1, len(arrived)) if "sink" in used else None,
            "others_cpu_share": outside / window,
            "outside_cpu_s": outside,
            "benchmark_cpu_s": ours,
            "peak_rss": {r: self.meter.peak(r) for r in rss},
            "offered_rate": rate or None,
            "window_s": window,
        }

    def pecd_idle(self) -> bool:
        """Nothing queued at A or B (a receipt is in the Maildir before its item is removed)."""
        assert self.a and self.b
        counts = [queue_counts(self.a.root), queue_counts(self.b.root)]
        return all(c is not None and not any(c.values()) for c in counts)

    # ---- phases --------------------------------------------------------------------------

    def certified(self, label: str, count: int, rate: float = 0.0,
                  profile: Path | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
        assert self.a and self.b
        a_pid, b_pid = self.pid(self.a), self.pid(self.b)
        watch = Receipts(self.a.maildir(SENDER))
        spies: list[tuple[str, subprocess.Popen[bytes]]] = []
        if profile is not None:
            spies = self.start_profiles(profile, label)
        try:
            cpu = {"A": lambda: tree_cpu(a_pid), "B": lambda: tree_cpu(b_pid)}
            if self.pg_pid is not None:
                pg = self.pg_pid
                cpu["PostgreSQL"] = lambda: tree_cpu(pg)
            out = self.measure(label, small_message(label), count, self.a.submission, watch,
                               cpu=cpu,
                               rss=["A", "B"], idle=self.pecd_idle, rate=rate,
                               min_seconds=min_seconds)
        finally:
            self.stop_profiles(spies)
        out["hwm"] = {"A": proc_mem(a_pid)[1], "B": proc_mem(b_pid)[1]}
        prefix = f"{label}."
        out["stages"] = stage_times(self.a.root, self.b.root, {
            k: v for k, v in watch.found.items() if k.startswith(prefix)})
        return out

    def start_profiles(self, where: Path, label: str) -> list[tuple[str, subprocess.Popen[bytes]]]:
        assert self.a and self.b
        spy = Path(PY).parent / "py-spy"
        if not spy.exists():
            self.notes.append("--profile: py-spy is not installed in the venv (pip install py-spy)")
            return []
        where.mkdir(parents=True, exist_ok=True)
        spies = []
        for p in (self.a, self.b):
            raw = where / f"{label}-{p.name}.raw"
            name = f"py-spy-{p.name}"
            spies.append((str(raw), self.procs.start(name, [
                str(spy), "record", "--pid", str(self.pid(p)), "--rate", "100", "--format", "raw",
                "--threads", "--nonblocking", "--output", str(raw),
                *(["--gil"] if self.s.profile_gil else [])])))
        return spies

    def stop_profiles(self, spies: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        for _raw, proc in spies:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for raw, proc in spies:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.procs.forget(f"py-spy-{Path(raw).stem.rsplit('-', 1)[1]}")
            if Path(raw).exists():
                sys.path.insert(0, str(SCRIPTS))
                from bench_profile import summary
                self.results.setdefault("profile", {})[Path(raw).name] = summary(
                    Path(raw), 15, title=f"{Path(raw).stem} ({raw})")

    def plain_relay(self, sink: SinkLog, sink_port: int, sink_pid: int) -> dict[str, Any]:
        assert self.a
        port = free_port()
        proc = self.procs.start("relay", [
            PY, str(SCRIPTS / "bench_relay.py"), "relay", "--port", str(port),
            "--spool", str(self.tmp / "relay-spool"), "--sink-port", str(sink_port),
            "--cert", str(self.a.root / "keys" / "tls.pem"),
            "--key", str(self.a.root / "keys" / "tls.key"), "--user", f"{SENDER}:{PASSWORD}"])
        wait_port(port, 30, lambda: proc.poll() is None, "plain relay")
        pid = proc.pid
        self.meter.watch("relay", lambda: [pid])
        try:
            spool = self.tmp / "relay-spool"
            return self.measure("relay", small_message("relay"), self.s.messages, port, sink,
                                cpu={"relay": lambda: proc_cpu(pid),
                                     "sink": lambda: proc_cpu(sink_pid)}, rss=["relay"],
                                idle=lambda: not any(spool.iterdir()),
                                min_seconds=self.s.min_seconds)
        finally:
            self.meter.unwatch("relay")
            self.procs.stop("relay")

    def postfix_up(self, sink_port: int) -> Postfix | None:
        """A throwaway Postfix for the baseline phases, or None (with a note saying why)."""
        pf = Postfix(self.tmp / "postfix", self.a.root / "keys" if self.a else self.tmp, sink_port)
        why = pf.unavailable()
        if why:
            self.notes.append(f"Postfix baseline skipped: {why}")
            return None
        try:
            pf.start()
            master = pf.master_pid()
        except BaseException:
            pf.stop()
            raise
        self.meter.own.add_root(master)  # it daemonised: outside this process's tree
        if not pf.auth:
            self.notes.append("Postfix: saslpasswd2 missing, so submission is STARTTLS "
                              "without AUTH (apt-get install sasl2-bin for AUTH)")
        return pf

    def postfix_down(self, pf: Postfix) -> None:
        self.meter.unwatch("postfix")
        master = pf._master
        pf.stop()
        if master is not None:
            self.meter.own.drop_root(master)

    def postfix(self, pf: Postfix, label: str, sink: SinkLog, sink_pid: int) -> dict[str, Any]:
        """One Postfix max-rate phase through the running instance."""
        master = pf.master_pid()

        def group() -> list[int]:
            return [master, *children_of(master)]

        def cpu() -> float:  # exited children count in the master's cutime + cstime
            return sum(proc_cpu(p, children=p == master) for p in group())

        self.meter.watch("postfix", group, pss=True)
        try:
            out = self.measure(label, small_message(label), self.s.messages, pf.port,
                               sink, cpu={"postfix": cpu, "sink": lambda: proc_cpu(sink_pid)},
                               rss=["postfix"], idle=pf.idle, auth=pf.auth,
                               min_seconds=self.s.min_seconds)
        finally:
            self.meter.unwatch("postfix")
        out["auth"] = pf.auth
        return out

    def big(self) -> dict[str, Any]:
        assert self.a and self.b
        size = int(self.s.big_mb * 1_000_000)
        data = big_message("big", size)
        a_pid, b_pid = self.pid(self.a), self.pid(self.b)
        watch = Receipts(self.a.maildir(SENDER))
        watch.poll()
        time.sleep(1.0)
        before_login = proc_mem(a_pid)[0]
        reset_hwm(a_pid)
        base: dict[str, int] = {}
        login: dict[str, int] = {}
        marks: dict[str, Any] = {}

        def logged_in() -> None:
            # the login's own peak (argon2id's working memory, per concurrent login, whatever
            # the message) is reported apart; the message's growth is counted from here
            login["A"] = max(0, proc_mem(a_pid)[1] - before_login)
            time.sleep(0.5)  # let the password check's buffers go back before the baseline
            base.update({"A": proc_mem(a_pid)[0], "B": proc_mem(b_pid)[0]})
            marks["exact"] = reset_hwm(a_pid) and reset_hwm(b_pid)
            for r in ("A", "B"):
                self.meter.reset(r)
            marks["t0"] = time.time()

        res = self.load("big", data, 1, self.a.submission, watch, concurrency=1, deadline=300,
                        on_ready=logged_in)
        exact, t0 = marks["exact"], marks["t0"]
        mid = {norm_id(r["msgid"]) for r in res["records"]}
        done = bool(mid) and wait_arrivals(watch, mid, timeout=300, stall=120,
                                           idle=self.pecd_idle) == "complete"
        hwm = {"A": proc_mem(a_pid)[1], "B": proc_mem(b_pid)[1]}
        peak = {r: hwm[r] if exact else max(hwm[r], self.meter.peak(r)) for r in ("A", "B")}
        growth = {r: max(0, peak[r] - base[r]) for r in ("A", "B")}
        return {
            "size": len(data), "complete": done, "acked": len(res["records"]),
            "cycle_s": (max(watch.found[m] for m in mid) - t0) if done else None,
            "rss_before": base, "peak_rss": peak, "growth": growth,
            "growth_per_size": {r: growth[r] / len(data) for r in growth},
            "hwm_reset": exact, "login_growth": login,
        }

    def deep(self) -> dict[str, Any]:
        assert self.a and self.b
        a, b, n = self.a, self.b, self.s.deep
        # retries every few seconds instead of 30 s doubling to an hour: the drain then measures
        # pecd's throughput, not the retry schedule; and no item reaches max_attempts meanwhile
        conf = a.conf.read_text()
        conf = re.sub(r"(?m)^retry_base = .*$", "retry_base = 1.0", conf)
        conf = re.sub(r"(?m)^retry_max = .*$", "retry_max = 4.0", conf)
        conf = re.sub(r"(?m)^max_attempts = .*$", "max_attempts = 100000", conf)
        a.conf.write_text(conf)
        self.notes.append("deep queue: A runs with [relay] retry_base = 1, retry_max = 4, "
                          "max_attempts = 100000 (defaults 30 s doubling to 1 h, 30 attempts), so "
                          "the drain measures throughput, not the retry schedule; the queue is "
                          "filled through pecd.store.queue.Queue.enqueue with A stopped (the listener's "
                          "own durable path, minus SMTP)")
        self.stop_pecd(a)
        self.start_pecd(a)
        # RSS with an empty queue: a fresh A after a short warm-up, idle
        warm = self.certified("warm", 3 if self.s.quick else 20)
        time.sleep(1.0)
        empty = 0
        for _ in range(10):
            empty = max(empty, proc_mem(self.pid(a))[0])
            time.sleep(0.1)
        self.stop_pecd(b)
        self.stop_pecd(a)
        template = small_message("deep")
        t0 = time.monotonic()
        seed(a.conf, n, template)
        seed_s = time.monotonic() - t0
        self.say(f"  seeded {n} messages into A's queue in {seed_s:.1f} s; A up, B down")
        t0 = time.monotonic()
        self.start_pecd(a)
        start_s = time.monotonic() - t0
        a_pid = self.pid(a)
        self.meter.reset("A")
        time.sleep(self.s.deep_hold)
        queued_rss = max(self.meter.peak("A"), proc_mem(a_pid)[0])
        queued_hwm = proc_mem(a_pid)[1]
        counts_before = queue_counts(a.root)
        watch = Receipts(a.maildir(SENDER))
        watch.poll()
        wanted = {f"deep.{i}@client.a.test" for i in range(n)}
        self.say(f"  B up: draining (at most {self.s.drain_timeout:.0f} s)")
        t1 = time.time()
        self.meter.reset("A")
        self.start_pecd(b)
        ended = wait_arrivals(watch, wanted, timeout=self.s.drain_timeout, stall=self.s.stall,
                              idle=self.pecd_idle)
        done = ended == "complete"
        drain_s = time.time() - t1
        draining_rss = self.meter.peak("A")
        got = len(wanted & watch.found.keys())
        counts_a, counts_b = queue_counts(a.root) or {}, queue_counts(b.root) or {}
        stuck = sum(v for k, v in [*counts_a.items(), *counts_b.items()]
                    if k.endswith("/hold") or k.endswith("/corrupt"))
        rate = got / drain_s if got else 0.0
        return {
            "queued": n, "seed_s": seed_s, "start_with_queue_s": start_s,
            "warmup_cycles_per_s": warm["end_to_end_per_s"],
            "rss_empty": empty, "rss_queued": queued_rss, "hwm_queued": queued_hwm,
            "rss_ratio": queued_rss / empty if empty else None,
            "rss_peak_draining": draining_rss,
            "queue_at_a_while_b_down": counts_before or {},
            "drained": got, "complete": done, "wait_ended": ended,
            "drain_s": drain_s if done else None,
            "waited_s": drain_s, "drain_rate_per_s": rate,
            "projected_drain_s": (n / rate) if rate and not done else (drain_s if done else None),
            "lost": (n - got) if ended in ("complete", "idle") else None,
            "held_or_corrupt": stuck, "queue_left_a": counts_a, "queue_left_b": counts_b,
        }


DATABASE_URLS: dict[Path, str] = {}  # provider root → PostgreSQL URL (phase 6); else SQLite


def _query(root: Path, sql: str) -> list[Any]:
    """Rows of one read-only query on a provider's database, SQLite file or PostgreSQL."""
    url = DATABASE_URLS.get(root)
    if url is None:
        conn = sqlite3.connect(f"file:{root / 'data' / 'pecd.sqlite'}?mode=ro", uri=True,
                               timeout=10)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    import psycopg
    try:
        with psycopg.connect(url, connect_timeout=10) as pg:
            return pg.execute(sql).fetchall()  # type: ignore[arg-type]
    except psycopg.Error as exc:
        raise sqlite3.OperationalError(str(exc)) from exc


def queue_counts(root: Path) -> dict[str, int] | None:
    """``kind/state`` → count, read-only (the daemon keeps writing meanwhile)."""
    try:
        rows = _query(root, "SELECT kind, state, count(*) FROM queue GROUP BY 1, 2")
    except sqlite3.Error:
        return None
    return {f"{k}/{s}": c for k, s, c in rows}


STAGES = (
    ("A access point: queue wait, checks, sign acceptance + envelope", "submitted", "accepted"),
    ("A relay → B: queue wait, SMTP, B's durable enqueue", "accepted", "b_received"),
    ("B reception: queue wait, verify, sign take-charge", "b_received", "taken"),
    ("B delivery: queue wait, Maildir, sign delivery receipt", "taken", "delivered"),
    ("B relay → A: queue wait, SMTP, A's durable enqueue", "delivered", "a_received"),
    ("A reception: queue wait, verify the receipt", "a_received", "receipt"),
    ("A delivery: queue wait, sender's Maildir", "receipt", "stored"),
)


def _ledger(root: Path) -> list[tuple[str, str, str, str, str, str]]:
    return _query(root, "SELECT at, event, coalesce(msgid, ''), coalesce(ref_msgid, ''),"
                        " related, detail FROM ledger")


def _ts(at: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(at).timestamp()


def stage_times(a_root: Path, b_root: Path, stored: dict[str, float]) -> dict[str, Any]:
    """Where a certified cycle's time goes, from both ledgers: per stage, the p50 / p95 of the
    time between the ledger rows that open and close it (each includes its queue wait)."""
    try:
        rows_a, rows_b = _ledger(a_root), _ledger(b_root)
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    t: dict[str, dict[str, float]] = {}  # client id → point → time
    pec_of: dict[str, str] = {}  # PEC id → client id
    receipt_of: dict[str, str] = {}  # delivery receipt id → client id
    for at, event, msgid, ref, _related, _detail in rows_a:
        if event == "submitted" and norm_id(ref) in stored:
            t.setdefault(norm_id(ref), {})["submitted"] = _ts(at)
        elif event == "accepted" and norm_id(ref) in stored:
            pec_of[msgid] = norm_id(ref)
            t.setdefault(norm_id(ref), {})["accepted"] = _ts(at)
    for at, event, msgid, ref, related, _detail in rows_b:
        if event == "received" and norm_id(ref) in pec_of:
            t[pec_of[norm_id(ref)]].setdefault("b_received", _ts(at))
        elif event == "taken-in-charge" and msgid in pec_of:
            t[pec_of[msgid]]["taken"] = _ts(at)
        elif event == "delivered" and msgid in pec_of:
            t[pec_of[msgid]]["delivered"] = _ts(at)
            for rid in json.loads(related or "[]"):
                receipt_of[rid] = pec_of[msgid]
    for at, event, msgid, ref, _related, detail in rows_a:
        if event == "received" and norm_id(ref) in receipt_of:
            t[receipt_of[norm_id(ref)]]["a_received"] = _ts(at)
        elif (event == "receipt-received" and msgid in pec_of
              and json.loads(detail or "{}").get("type") == "avvenuta-consegna"):
            t[pec_of[msgid]]["receipt"] = _ts(at)
    for cid, when in stored.items():
        if cid in t:
            t[cid]["stored"] = when
    out: dict[str, Any] = {}
    for name, start, end in STAGES:
        spans = [p[end] - p[start] for p in t.values() if start in p and end in p]
        out[name] = {"p50": pct(spans, 50), "p95": pct(spans, 95), "n": len(spans)}
    return out


def seed(conf: Path, n: int, template: bytes) -> None:
    """Queue ``n`` submissions at A (stopped) through pecd's own durable ``Queue.enqueue``: the
    path the submission listener takes before its ``250``, minus SMTP, so 100 000 messages take
    seconds, not the hours SMTP at today's submission rate would."""
    sys.path.insert(0, str(ROOT))
    from pecd import config as config_mod
    from pecd.clock import SystemClock
    from pecd.format import headers
    from pecd.store.db import Database
    from pecd.store.ledger import LedgerEvent
    from pecd.store.queue import NewItem, Queue
    from pecd.store.spool import Spool

    cfg = config_mod.load(conf)
    db = Database(cfg.paths.database)
    queue = Queue(db, Spool(cfg.paths.spool), SystemClock())

    def batch(start: int) -> tuple[list[Any], list[Any]]:
        items, events = [], []
        for i in range(start, min(n, start + 250)):
            data = template.replace(MARK, str(i).encode())
            msg = headers.parse(data)
            items.append(NewItem("submission", SENDER, (RCPT,), data=data))
            events.append(LedgerEvent(
                event="submitted", ref_msgid=headers.message_id(msg), sender=SENDER,
                recipients=(RCPT,), subject=headers.text(msg, "Subject"),
                detail={"size": len(data), "peer": "bench-seed"}))
        return items, events

    async def fill() -> None:
        # several enqueue calls in flight, as several SMTP sessions would have: spool writes
        # overlap in the executor and the single writer commits them in groups
        starts = iter(range(0, n, 250))

        async def worker() -> None:
            for start in starts:
                await queue.enqueue(*batch(start))

        await asyncio.gather(*(worker() for _ in range(4)))

    try:
        asyncio.run(fill())
    finally:
        db.close()


class Postfix:
    """A throwaway Postfix on 127.0.0.1: its own config, queue and data directories under the
    benchmark's temporary directory; submission with STARTTLS + AUTH (Cyrus sasldb); relayhost
    the sink. Stopped with ``postfix stop`` (then ``abort``, then SIGKILL to its master pid)."""

    def __init__(self, root: Path, keys: Path, sink_port: int) -> None:
        self.root = root
        self.keys = keys
        self.sink_port = sink_port
        self.port = free_port()
        self.etc = root / "etc"
        self.auth = shutil.which("saslpasswd2") is not None
        self.started = False
        self._master: int | None = None

    @staticmethod
    def unavailable() -> str | None:
        if not Path("/usr/sbin/postfix").exists():
            return "postfix is not installed (apt-get install postfix)"
        if os.geteuid() != 0:
            return "a throwaway Postfix instance needs root"
        try:
            import pwd
            pwd.getpwnam("postfix")
        except KeyError:
            return "no postfix user"
        return None

    def _postfix(self, *args: str, check: bool = True) -> None:
        proc = subprocess.run(["/usr/sbin/postfix", "-c", str(self.etc), *args],
                              capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            log = self.root / "maillog"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise BenchError(f"postfix {' '.join(args)} failed: {proc.stderr}{tail}")

    def start(self) -> None:
        r = self.root
        for d in (r, self.etc, self.etc / "sasl", r / "queue", r / "data"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        shutil.chown(r / "data", "postfix")
        shutil.copy(self.keys / "tls.pem", self.etc / "tls.pem")
        shutil.copy(self.keys / "tls.key", self.etc / "tls.key")
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.localhost
mydomain = localhost
myorigin = localhost
mydestination =
local_recipient_maps =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.sink_port}
smtp_dns_support_level = disabled
alias_maps =
alias_database =
smtpd_tls_cert_file = {self.etc}/tls.pem
smtpd_tls_key_file = {self.etc}/tls.key
smtpd_tls_security_level = may
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtp_tls_security_level = none
maillog_file = {r}/maillog
maillog_file_prefixes = {r}
biff = no
""")
        submission = [f"127.0.0.1:{self.port} inet n - n - - smtpd",
                      "  -o smtpd_tls_security_level=encrypt"]
        if self.auth:
            submission += ["  -o smtpd_sasl_auth_enable=yes", "  -o smtpd_tls_auth_only=yes",
                           "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject"]
        else:
            submission += ["  -o smtpd_relay_restrictions=permit_mynetworks,reject"]
        services = (ROOT / "conf" / "postfix-master.cf.sample").read_text()
        (self.etc / "master.cf").write_text("\n".join(submission) + "\n" + services)
        if self.auth:
            # Debian's Postfix reads Cyrus settings from $config_directory/sasl/smtpd.conf
            db = self.etc / "sasl" / "sasldb2"
            (self.etc / "sasl" / "smtpd.conf").write_text(
                f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
                f"sasldb_path: {db}\n")
            local, _, domain = SENDER.partition("@")
            run(["saslpasswd2", "-f", str(db), "-p", "-c", "-u", domain, local],
                stdin=PASSWORD + "\n")
            shutil.chown(db, "postfix")
            db.chmod(0o600)
        self._postfix("check")
        self.started = True  # before ``start``: an interrupt there must still stop it
        self._postfix("start")
        wait_port(self.port, 30, lambda: True, "postfix")

    def idle(self) -> bool:
        """No queue file in incoming, active or deferred."""
        for d in ("incoming", "active", "deferred"):
            for _dirpath, _dirs, files in os.walk(self.root / "queue" / d):
                if files:
                    return False
        return True

    def master_pid(self) -> int:
        if self._master is None:
            path = self.root / "queue" / "pid" / "master.pid"
            deadline = time.monotonic() + 10
            while not path.exists() or not path.read_text().strip():
                if time.monotonic() > deadline:
                    raise BenchError("postfix wrote no master.pid")
                time.sleep(0.05)
            self._master = int(path.read_text().strip())
        return self._master

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        master = self._master
        pid_file = self.root / "queue" / "pid" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            master = master or int(pid_file.read_text().strip())
        self._postfix("stop", check=False)
        if master is None:
            return
        for attempt in range(3):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if not Path(f"/proc/{master}").exists():
                    return
                time.sleep(0.1)
            if attempt == 0:
                self._postfix("abort", check=False)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGKILL)


# --- report -----------------------------------------------------------------------------------

def ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:.1f}"


def num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def mib(v: float | None) -> str:
    return "—" if v is None else f"{v / MiB:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def lat3(d: dict[str, float | None]) -> str:
    return f"{ms(d['p50'])} / {ms(d['p95'])} / {ms(d['p99'])}"


def report(results: dict[str, Any], notes: list[str]) -> str:
    out: list[str] = []
    env = results["env"]
    s = results["settings"]
    out.append(f"pecd benchmark  {env['when']}  {env['cpus']} CPUs  {env['kernel']}  "
               f"Python {env['python']}  load average at start {env['loadavg']}")
    out.append(f"Each max-rate phase: ≥ {s['messages']} messages of 10 KiB and ≥ "
               f"{s['min_seconds']:g} s, one recipient, {s['clients']} persistent STARTTLS + AUTH "
               "sessions, one load process; all on 127.0.0.1")
    c = results.get("certified")
    rel = results.get("relay")
    pf = results.get("postfix")
    cols = [("pecd certified", c), ("plain relay", rel), ("postfix", pf)]
    out.append("")
    out.append("1. Max rate (certified: until the delivery receipt is in the sender's Maildir;"
               " baselines: until the sink has it; certified and postfix columns: the pair with "
               "the median CPU ratio)")
    width = 44

    def row(name: str, fmt: Callable[[dict[str, Any]], str],
            val: Callable[[dict[str, Any]], float | None] | None = None) -> None:
        cells = [fmt(r) if r else "—" for _, r in cols]
        ratios = []
        if val is not None and c:
            for base in (rel, pf):
                ratios.append(ratio(val(c), val(base)) if base else "—")
        else:
            ratios = ["", ""]
        out.append(f"  {name:<{width}}" + "".join(f"{x:>17}" for x in cells)
                   + "".join(f"{x:>14}" for x in ratios))

    out.append(f"  {'':<{width}}" + "".join(f"{n:>17}" for n, _ in cols)
               + f"{'pecd/relay':>14}{'pecd/postfix':>14}")
    row("submissions/s (250s per second)", lambda r: num(r["submissions_per_s"]),
        lambda r: r["submissions_per_s"])
    row("end-to-end/s (certified cycles; relayed)", lambda r: num(r["end_to_end_per_s"]),
        lambda r: r["end_to_end_per_s"])
    for metric, name in (("data_end_to_250_s", "DATA-end → 250"),
                         ("submit_to_arrival_s", "submit → receipt stored / at sink")):
        for key in ("p50", "p95", "p99"):
            value = _getter(metric, key)
            row(f"{name} {key}, ms", _fmt_ms(value), value)
    row("server CPU s per message", lambda r: num(r["server_cpu_s_per_msg"], 4),
        lambda r: r["server_cpu_s_per_msg"])
    row("  of which, per process", lambda r: " ".join(
        f"{k} {v:.4f}" for k, v in r["cpu_s_per_msg"].items()))
    row("CPU-bound ceiling, msg/s (cores / server CPU)", lambda r: num(
        (os.cpu_count() or 1) / r["server_cpu_s_per_msg"] if r["server_cpu_s_per_msg"] else None),
        lambda r: 1 / r["server_cpu_s_per_msg"] if r["server_cpu_s_per_msg"] else None)
    row("whole machine CPU s per message", lambda r: num(r["machine_cpu_s_per_msg"], 4),
        lambda r: r["machine_cpu_s_per_msg"])
    row("machine CPU busy (all cores)", lambda r: f"{100 * r['machine_cpu_share']:.0f}%")
    row("  processes outside the benchmark (cores)", lambda r: f"{r['others_cpu_share']:.2f}")
    row("client CPU s per message", lambda r: num(r["client_cpu_s_per_msg"], 4))
    row("sink CPU s per message", lambda r: num(r["sink_cpu_s_per_msg"], 4))
    row("client CPU (share of one core)", lambda r: f"{100 * r['client_cpu_share']:.0f}%")
    row("peak RSS MiB", lambda r: " ".join(f"{k} {mib(v)}" for k, v in r["peak_rss"].items()),
        lambda r: sum(r["peak_rss"].values()))
    row("server CPU busy (share of one core)", lambda r: " ".join(
        f"{k} {100 * v:.0f}%" for k, v in r["server_cpu_share"].items()))
    row("acknowledged / arrived / missing", lambda r: f"{r['acked']}/{r['arrived']}/{r['missing']}")
    row("wait ended (idle = queues empty)", lambda r: str(r["wait_ended"]))
    if pf and not pf.get("auth", True):
        out.append("  (postfix submission without AUTH: see notes)")
    if c and c.get("stages") and "error" not in c["stages"]:
        out.append("")
        out.append("  Where a certified cycle's time goes at max rate (from both ledgers; each stage"
                   " includes its queue wait), p50 / p95 ms:")
        for name, v in c["stages"].items():
            out.append(f"    {name:<62}{ms(v['p50']):>10} /{ms(v['p95']):>10}")
    pairs = results.get("pairs", [])
    if pairs:
        out.append("")
        out.append(f"1b. Certified and Postfix max-rate phases, alternately ({len(pairs)} pairs; "
                   "CPU per message from each process's /proc stat; outside = /proc/stat minus "
                   "every benchmark process, in cores)")
        out.append(f"  {'pair':<5}{'cycles/s':>9}{'A ms':>8}{'B ms':>8}{'A+B ms':>8}"
                   f"{'outside':>9}{'postfix/s':>11}{'pf ms':>8}{'outside':>9}"
                   f"{'CPU ratio':>11}{'rate ratio':>12}")
        for r in pairs:
            per = r["certified_cpu_s_per_cycle"]
            out.append(
                f"  {r['pair']:<5}{num(r['certified_cycles_per_s']):>9}"
                f"{ms(per.get('A')):>8}{ms(per.get('B')):>8}"
                f"{ms(r['certified_server_cpu_s_per_cycle']):>8}"
                f"{num(r['certified_outside_cpu_cores'], 2):>9}"
                f"{num(r['postfix_msgs_per_s']):>11}{ms(r['postfix_cpu_s_per_msg']):>8}"
                f"{num(r['postfix_outside_cpu_cores'], 2):>9}"
                f"{ratio(r['cpu_ratio'], 1):>11}{num(r['rate_ratio'], 3):>12}")
        key = "certified_cpu_per_cycle_over_postfix_cpu_per_msg"
        rkey = "certified_cycles_per_s_over_postfix_msgs_per_s"
        if results.get(key) is not None:
            out.append(f"  server CPU per certified cycle / Postfix CPU per message: median "
                       f"{results[key]:.1f}× (min {results[key + '_min']:.1f}×, max "
                       f"{results[key + '_max']:.1f}×); certified cycles/s / Postfix msg/s: "
                       f"median {results[rkey]:.3f} (min {results[rkey + '_min']:.3f}, max "
                       f"{results[rkey + '_max']:.3f})")
    h = results.get("half")
    if h:
        out.append("")
        out.append(f"2. Half rate: pecd certified at {h['offered_rate']:.1f} msg/s offered "
                   "(half the max certified cycle rate), open loop")
        out.append(f"  DATA-end → 250 p50 / p95 / p99 ms: {lat3(h['data_end_to_250_s'])}")
        out.append(f"  submit → receipt p50 / p95 / p99 ms: {lat3(h['submit_to_arrival_s'])}")
        if h.get("stages") and "error" not in h["stages"]:
            out.append("  stages p50 ms: " + ", ".join(
                f"{n.split(':')[0]} {ms(v['p50'])}" for n, v in h["stages"].items()))
        out.append(f"  certified cycles/s {num(h['end_to_end_per_s'])};  acknowledged {h['acked']},"
                   f" receipts {h['arrived']}, missing {h['missing']} (wait ended: "
                   f"{h['wait_ended']})")
    big = results.get("big")
    if big:
        out.append("")
        out.append(f"3. Big message: {big['size'] / 1e6:.1f} MB with 3 attachments, full cycle "
                   f"{num(big['cycle_s'])} s{'' if big['complete'] else ' (DID NOT COMPLETE)'}")
        for r in ("A", "B"):
            out.append(f"  {r}: RSS before {mib(big['rss_before'][r])} MiB, peak "
                       f"{mib(big['peak_rss'][r])} MiB, growth {mib(big['growth'][r])} MiB = "
                       f"{big['growth_per_size'][r]:.2f} × message size")
        if big.get("login_growth", {}).get("A") is not None:
            out.append(f"  (counted from after the client's login; the login itself, argon2id's "
                       f"working memory, peaked A at +{mib(big['login_growth']['A'])} MiB, "
                       f"whatever the message size)")
    d = results.get("deep")
    if d:
        out.append("")
        out.append(f"4. Deep queue: {d['queued']} messages queued at A with B down "
                   f"(seeded in {d['seed_s']:.1f} s; A then listening after "
                   f"{d['start_with_queue_s']:.1f} s)")
        out.append(f"  A RSS empty queue {mib(d['rss_empty'])} MiB; with the queue, B down "
                   f"{mib(d['rss_queued'])} MiB (ratio {num(d['rss_ratio'], 2)}); peak while "
                   f"draining {mib(d['rss_peak_draining'])} MiB")
        out.append(f"  queue at A while B down: {_counts(d['queue_at_a_while_b_down'])}")
        if d["complete"]:
            out.append(f"  drained in {d['drain_s']:.1f} s ({d['drain_rate_per_s']:.1f}/s); "
                       f"delivery receipts {d['drained']}/{d['queued']}; lost {d['lost']}")
        else:
            proj = d["projected_drain_s"]
            out.append(f"  NOT drained ({d['wait_ended']} after {d['waited_s']:.0f} s): "
                       f"{d['drained']}/{d['queued']} "
                       f"delivery receipts ({d['drain_rate_per_s']:.1f}/s; full drain projected "
                       f"{'—' if proj is None else f'{proj / 60:.0f} min'})")
            out.append(f"  left at A: {_counts(d['queue_left_a'])}; at B: "
                       f"{_counts(d['queue_left_b'])}")
        out.append(f"  items in hold or corrupt: {d['held_or_corrupt']}")
    rows = results.get("scaling")
    if rows:
        out.append("")
        out.append("6. Storage and workers: certified max-rate phase, fresh providers each "
                   "(server CPU = A + B + PostgreSQL)")
        out.append(f"  {'database':<11} {'workers':>7} {'cycles/s':>9} {'A ms':>7} {'B ms':>7} "
                   f"{'PG ms':>7} {'server ms/cycle':>16} {'DATA→250 p99':>13} {'outside':>8}"
                   f" {'missing':>8}")
        for r in rows:
            if "error" in r:
                out.append(f"  {r['database']:<11} {r['workers']:>7}  failed: {r['error']}")
                continue
            cpu = r["cpu_ms_per_cycle"]
            out.append(f"  {r['database']:<11} {r['workers']:>7} {num(r['cycles_per_s']):>9} "
                       f"{num(cpu.get('A')):>7} {num(cpu.get('B')):>7} "
                       f"{num(cpu.get('PostgreSQL')):>7} {num(r['server_ms_per_cycle']):>16} "
                       f"{ms(r['p99']):>13} {num(r['outside_cores']):>8} {r['missing']:>8}")
    out.append("")
    out.append("Targets")
    for t in results.get("targets", []):
        out.append(f"  [{t['verdict']:>6}] {t['target']}: {t['detail']}")
    if notes:
        out.append("")
        out.append("Notes")
        out += [f"  - {n}" for n in notes]
    for text in results.get("profile", {}).values():
        out.append("")
        out.append(text.rstrip())
    return "\n".join(out)


def _getter(metric: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(r: dict[str, Any]) -> float | None:
        value: float | None = r[metric][key]
        return value

    return get


def _fmt_ms(get: Callable[[dict[str, Any]], float | None]) -> Callable[[dict[str, Any]], str]:
    return lambda r: ms(get(r))


def _counts(c: dict[str, int]) -> str:
    shown = {k: v for k, v in c.items() if v}
    return ", ".join(f"{k} {v}" for k, v in sorted(shown.items())) or "empty"


def targets(results: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    h = results.get("half")
    key = "certified_cpu_per_cycle_over_postfix_cpu_per_msg"
    name = "server CPU per certified cycle ≤ 10 × Postfix's server CPU per message"
    if results.get(key) is not None:
        got = results[key]
        rate = results["certified_cycles_per_s_over_postfix_msgs_per_s"]
        out.append({"target": name, "verdict": "met" if got <= 10 else "MISSED",
                    "detail": f"median {got:.1f}× over {len(results['pairs'])} pairs (spread "
                              f"{results[key + '_min']:.1f}–{results[key + '_max']:.1f}×)"
                              + ("" if got <= 10 else f"; {got / 10:.2f}× over")
                              + (f"; certified cycles/s = {rate:.3f} × Postfix msg/s"
                                 if rate is not None else "")})
    else:
        out.append({"target": name, "verdict": "n/a", "detail": "no Postfix figure in this run"})
    if h and h["data_end_to_250_s"]["p99"] is not None:
        p99 = h["data_end_to_250_s"]["p99"]
        out.append({"target": "p99 DATA-end → 250 ≤ 25 ms at half the max rate",
                    "verdict": "met" if p99 <= 0.025 else "MISSED",
                    "detail": f"{p99 * 1000:.1f} ms" + ("" if p99 <= 0.025 else
                                                        f" ({p99 / 0.025:.1f}× the limit)")})
    big = results.get("big")
    if big:
        worst = max(big["growth_per_size"].values())
        out.append({"target": "peak RSS growth ≤ 2 × message size (big message)",
                    "verdict": ("met" if worst <= 2 else "MISSED") if big["complete"] else "n/a",
                    "detail": ", ".join(f"{r} {v:.2f}×" for r, v in big["growth_per_size"].items())
                              + ("" if big["complete"] else " (cycle did not complete)")})
    every = {k: results[k] for k in ("half", "relay") if results.get(k)}
    for pair in results.get("pairs", []):
        for kind, phase in pair["phases"].items():
            every[f"{kind}{pair['pair']}"] = phase
    lost = {k: r["missing"] for k, r in every.items()
            if r["wait_ended"] == "idle" and r["missing"]}
    phases = list(every)
    if phases:
        out.append({"target": "nothing lost in the load phases (all queues empty, receipt absent)",
                    "verdict": "MISSED" if lost else "met",
                    "detail": ", ".join(f"{k}: {v} lost" for k, v in lost.items()) or
                    ", ".join(f"{k}: {every[k]['arrived']}/{every[k]['acked']}"
                              for k in phases)})
    d = results.get("deep")
    if d and d["rss_ratio"]:
        out.append({"target": f"RSS with {d['queued']} queued ≤ 1.5 × RSS with an empty queue",
                    "verdict": "met" if d["rss_ratio"] <= 1.5 else "MISSED",
                    "detail": f"{d['rss_ratio']:.2f}×"})
        out.append({"target": "deep queue: nothing lost",
                    "verdict": ("met" if d["lost"] == 0 else "MISSED") if d["lost"] is not None
                    else "n/a",
                    "detail": (f"{d['drained']}/{d['queued']} delivery receipts" +
                               ("" if d["complete"] else ", drain not finished in this run"))})
    return out


# --- certified against Postfix, pair by pair -----------------------------------------------------

def compare(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair: server CPU per certified cycle over Postfix's server CPU per message, and the
    cycles/s ratio; then their median and spread. ``certified`` and ``postfix`` become the pair
    whose CPU ratio is the median (the table's columns), ``pairs`` keeps every phase."""
    rows = []
    for k, pair in enumerate(pairs, 1):
        c, pf = pair["certified"], pair.get("postfix")
        row: dict[str, Any] = {
            "pair": k,
            "certified_cycles_per_s": c["end_to_end_per_s"],
            "certified_server_cpu_s_per_cycle": c["server_cpu_s_per_msg"],
            "certified_cpu_s_per_cycle": c["cpu_s_per_msg"],
            "certified_outside_cpu_cores": c["others_cpu_share"],
            "postfix_msgs_per_s": pf["end_to_end_per_s"] if pf else None,
            "postfix_cpu_s_per_msg": pf["server_cpu_s_per_msg"] if pf else None,
            "postfix_outside_cpu_cores": pf["others_cpu_share"] if pf else None,
            "cpu_ratio": None, "rate_ratio": None,
        }
        if pf and c["server_cpu_s_per_msg"] and pf["server_cpu_s_per_msg"]:
            row["cpu_ratio"] = c["server_cpu_s_per_msg"] / pf["server_cpu_s_per_msg"]
        if pf and c["end_to_end_per_s"] and pf["end_to_end_per_s"]:
            row["rate_ratio"] = c["end_to_end_per_s"] / pf["end_to_end_per_s"]
        rows.append(row)

    def spread(key: str) -> tuple[float | None, float | None, float | None]:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return None, None, None
        return statistics.median(values), min(values), max(values)

    cpu, cpu_lo, cpu_hi = spread("cpu_ratio")
    rate, rate_lo, rate_hi = spread("rate_ratio")
    valid = sorted((r for r in rows if r["cpu_ratio"] is not None), key=lambda r: r["cpu_ratio"])
    if valid:
        mid = valid[len(valid) // 2]
    else:  # no Postfix: the pair with the median certified rate
        mid = sorted(rows, key=lambda r: r["certified_cycles_per_s"] or 0.0)[len(rows) // 2]
    chosen = pairs[mid["pair"] - 1]
    out: dict[str, Any] = {
        "pairs": [{**r, "phases": pairs[r["pair"] - 1]} for r in rows],
        "certified": chosen["certified"],
        "certified_cpu_per_cycle_over_postfix_cpu_per_msg": cpu,
        "certified_cpu_per_cycle_over_postfix_cpu_per_msg_min": cpu_lo,
        "certified_cpu_per_cycle_over_postfix_cpu_per_msg_max": cpu_hi,
        "certified_cycles_per_s_over_postfix_msgs_per_s": rate,
        "certified_cycles_per_s_over_postfix_msgs_per_s_min": rate_lo,
        "certified_cycles_per_s_over_postfix_msgs_per_s_max": rate_hi,
    }
    if chosen.get("postfix"):
        out["postfix"] = chosen["postfix"]
    return out


# --- main -------------------------------------------------------------------------------------

def environment(s: Settings) -> dict[str, Any]:
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through ``finally`` and cleanup (SIGINT too, as a
    shell starts background jobs with it ignored)."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, raise_interrupt)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def scaling(s: Settings, tmp: Path, procs: Procs, meter: Meter,
            say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Phase 6: the certified max-rate phase again on fresh providers, with `--workers N` on
    SQLite and with 1 and N workers on a throwaway PostgreSQL cluster (the tests' own, from
    Debian's binaries; fsync on), whose CPU counts as server CPU."""
    combos = [("sqlite", s.workers)] if s.workers > 1 else []
    if s.database == "postgresql":
        combos += [("postgresql", w) for w in sorted({1, s.workers})]
    cluster = None
    rows: list[dict[str, Any]] = []
    try:
        if s.database == "postgresql":
            sys.path.insert(0, str(ROOT / "tests"))
            import pg_support  # type: ignore[import-not-found]  # the tests' throwaway cluster
            bin_dir = pg_support.bindir()
            if bin_dir is None:
                raise BenchError("PostgreSQL binaries missing: apt install postgresql")
            cluster = pg_support.Cluster(bin_dir, free_port())
            cluster.start()
        for db, w in combos:
            say(f"6. {db}, {w} worker(s): certified, max rate")
            sub = Bench(s, tmp / f"{db}-{w}", procs, meter, workers=w)
            sub.tmp.mkdir()
            if cluster is not None and db == "postgresql":
                sub.urls = {"A": cluster.database(), "B": cluster.database()}
                sub.pg_pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
            try:
                sub.make_providers()
                assert sub.a and sub.b
                sub.start_pecd(sub.a)
                sub.start_pecd(sub.b)
                out = sub.certified(f"{db}{w}", s.messages, min_seconds=s.min_seconds)
            except BenchError as exc:
                rows.append({"database": db, "workers": w, "error": str(exc)[:300]})
                continue
            finally:
                for p in (sub.a, sub.b):
                    if p is not None and procs.running(p.name):
                        sub.stop_pecd(p)
            per = out["server_cpu_s_per_msg"]
            rows.append({
                "database": db, "workers": w, "cycles_per_s": out["end_to_end_per_s"],
                "cpu_ms_per_cycle": {k: v * 1000 for k, v in out["cpu_s_per_msg"].items()},
                "server_ms_per_cycle": per * 1000 if per is not None else None,
                "p99": out["data_end_to_250_s"]["p99"], "missing": out["missing"],
                "outside_cores": out["others_cpu_share"]})
    finally:
        if cluster is not None:
            cluster.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-"))
    tmp.chmod(0o711)  # Postfix's unprivileged processes must traverse it
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    meter = Meter()
    meter.start()
    bench = Bench(s, tmp, procs, meter)
    results: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(s).items()},
                               "env": environment(s)}
    bench.results = results
    status = 0
    try:
        with interrupts_as_exceptions():
            bench.say(f"working in {tmp}")
            bench.make_providers()
            assert bench.a and bench.b
            bench.start_pecd(bench.a)
            bench.start_pecd(bench.b)
            sink_proc = None
            sink = SinkLog(tmp / "sink.log")
            pf = None
            if not s.certified_only:
                sink_port = free_port()
                sink_proc = procs.start("sink", [PY, str(SCRIPTS / "bench_relay.py"), "sink",
                                                 "--port", str(sink_port), "--log",
                                                 str(sink.path)])
                wait_port(sink_port, 30, lambda: sink_proc.poll() is None, "sink")
                bench.say("3a. plain relay baseline")
                results["relay"] = bench.plain_relay(sink, sink_port, sink_proc.pid)
                if s.postfix:
                    pf = bench.postfix_up(sink_port)
                else:
                    bench.notes.append("Postfix baseline skipped (--no-postfix)")
            pairs: list[dict[str, Any]] = []
            try:
                for k in range(1, s.pairs + 1):
                    bench.say(f"1. pair {k}/{s.pairs}: certified, max rate: ≥ {s.messages} "
                              f"messages and ≥ {s.min_seconds:g} s, {s.clients} sessions")
                    pair: dict[str, Any] = {"certified": bench.certified(
                        f"max{k}", s.messages, min_seconds=s.min_seconds,
                        profile=s.profile if k == 1 else None)}
                    if pf is not None and sink_proc is not None:
                        bench.say(f"3b. pair {k}/{s.pairs}: Postfix baseline")
                        pair["postfix"] = bench.postfix(pf, f"postfix{k}", sink, sink_proc.pid)
                    pairs.append(pair)
            finally:
                if pf is not None:
                    bench.postfix_down(pf)
            results.update(compare(pairs))
            rates = [x["certified"]["end_to_end_per_s"] for x in pairs
                     if x["certified"]["end_to_end_per_s"]]
            half = (statistics.median(rates) if rates else 1.0) / 2
            count = max(5, round(half * s.half_seconds))
            bench.say(f"2. certified, half rate: {count} messages at {half:.1f}/s")
            results["half"] = bench.certified("half", count, rate=half)
            if s.certified_only:
                bench.notes.append("phases 3 to 5 skipped (--certified-only)")
            else:
                procs.stop("sink")
                bench.say(f"4. big message: {s.big_mb:g} MB")
                results["big"] = bench.big()
                bench.say(f"5. deep queue: {s.deep} messages")
                results["deep"] = bench.deep()
            if s.database == "postgresql" or s.workers > 1:
                for p in (bench.a, bench.b):
                    if procs.running(p.name):
                        bench.stop_pecd(p)
                results["scaling"] = scaling(s, tmp, procs, meter, bench.say)
    except KeyboardInterrupt:
        bench.say("interrupted: stopping every process started")
        status = 130
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        bench.say(f"benchmark failed: {exc}")
        results["error"] = str(exc)
        status = 1
    finally:
        # a second Ctrl-C must not cut the cleanup short
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            procs.stop_all()
            meter.stop()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
    results["targets"] = targets(results)
    results["notes"] = bench.notes
    results["duration_s"] = time.monotonic() - started
    if status == 0:
        print(report(results, bench.notes))
        print(f"\n(total {results['duration_s']:.0f} s; logs and data in {tmp}"
              f"{'' if s.keep else ', removed'})")
    if s.json:
        s.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    if s.keep or status == 1:
        bench.say(f"logs and data kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
