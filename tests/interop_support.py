"""Helpers for the interop tests (tests/test_interop_*.py): real programs (swaks, Dovecot,
Postfix, openssl's TSA) started on loopback with throwaway configurations, and a pecd Service run
in a background thread so that those programs can talk to it while the test waits on results."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from pecd.config import Config
from pecd.service import Service

from .conftest import ProviderDir

SETUP_HINT = "scripts/setup installs it (apt-get install {pkg})"


def require(program: str, package: str, *, sbin: bool = False) -> str:
    """The program's path; a loud skip only when it is not installed (scripts/setup failed)."""
    path = shutil.which(program) or (f"/usr/sbin/{program}" if sbin else None)
    if path is None or not os.access(path, os.X_OK):
        pytest.skip(f"INTEROP TEST NOT RUN: {program} is not installed and could not be "
                    f"installed here; {SETUP_HINT.format(pkg=package)}")
    return path


def require_root(program: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"INTEROP TEST NOT RUN: {program} needs root to run its own instance "
                    "(its master process changes user); run the suite as root, e.g. in CI")


@contextmanager
def runtime_dir(prefix: str) -> Iterator[Path]:
    """A directory every user can traverse, for daemons that drop privileges (pytest's tmp_path
    sits below a 0700 directory that their unprivileged processes cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
               log: Path | None = None) -> None:
    """Poll until ``predicate()`` holds; on timeout fail, showing ``log`` if given."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = ""
            if log is not None and log.exists():
                tail = "\n--- " + str(log) + " ---\n" + log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{what} not reached within {timeout} s{tail}")
        time.sleep(0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
              timeout: float = 30.0) -> None:
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        return port_open(port)

    wait_until(ready, timeout, f"port {port} listening", log)


def configure(provider: ProviderDir, section: str, **values: object) -> None:
    """Set ``key = value`` lines in one [section] of a provider's pecd.toml (TOML-encoded)."""
    text = provider.conf.read_text()
    header = f"[{section}]\n"
    if header not in text:
        text = text.rstrip("\n") + "\n\n" + header
    start = text.index(header) + len(header)
    nxt = text.find("\n[", start)
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end]
    for key, value in values.items():
        body = re.sub(rf"(?m)^{re.escape(key)}\s*=.*\n", "", body)
        body = f"{key} = {json.dumps(value)}\n" + body
    provider.conf.write_text(text[:start] + body + text[end:])


def ledger_rows(provider: ProviderDir, event: str | None = None) -> list[dict[str, object]]:
    conn = sqlite3.connect(provider.root / "data" / "pecd.sqlite")
    try:
        conn.row_factory = sqlite3.Row
        sql = "SELECT * FROM ledger" + (" WHERE event = ?" if event else "") + " ORDER BY seq"
        rows = [dict(r) for r in conn.execute(sql, (event,) if event else ())]
    finally:
        conn.close()
    for row in rows:
        if isinstance(row.get("detail"), str):
            row["detail"] = json.loads(str(row["detail"]))
    return rows


class RunningService:
    """A pecd Service with its listeners and runners on its own event loop in a thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.service: Service | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="pecd-service", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        try:
            self.service = Service(self.config)
            await self.service.start()
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.service.stop()

    def __enter__(self) -> RunningService:
        self._thread.start()
        if not self._ready.wait(60):
            raise AssertionError("pecd service did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "pecd service did not stop within 60 s"

    @property
    def submission_port(self) -> int:
        assert self.service is not None
        return self.service.ports.submission

    @property
    def smtps_port(self) -> int:
        assert self.service is not None
        return self.service.ports.smtps

    @property
    def inbound_port(self) -> int:
        assert self.service is not None
        return self.service.ports.inbound


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not go; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass(frozen=True)
class DovecotUser:
    """Whom a throwaway Dovecot stores mail as (it refuses uid 0) and runs its internal and
    login processes as."""

    uid: int
    gid: int
    internal: str
    login: str


def dovecot_user() -> DovecotUser:
    if os.geteuid() == 0:
        return DovecotUser(65534, 65534, "dovecot", "dovenull")  # nobody/nogroup
    name = pwd.getpwuid(os.getuid()).pw_name
    return DovecotUser(os.getuid(), os.getgid(), name, name)


def dovecot_conf(root: Path, who: DovecotUser, users: Path, imap_port: int, *, purpose: str,
                 mail_location: str, protocols: str = "imap", extra: str = "") -> str:
    """A self-contained instance's configuration: its own base_dir under ``root``, listeners on
    127.0.0.1 only, plaintext passwd-file users, IMAP on ``imap_port``; ``extra`` adds sections."""
    return f"""\
# throwaway Dovecot for {purpose} (see conf/dovecot-pecd.conf)
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = pecd-test-{imap_port}
protocols = {protocols}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {who.internal}
default_login_user = {who.login}
first_valid_uid = {min(who.uid, 500)}
mail_location = {mail_location}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{extra}"""
