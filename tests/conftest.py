"""Shared fixtures: real providers in temporary directories, real ports on 127.0.0.1, and the
openssl command line as the outside judge of every signed object."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvloop
from click.testing import CliRunner

from pecd import config
from pecd.cli import main as cli_main
from pecd.edges import aio
from pecd.service import Service
from pecd.store import db as db_mod
from pecd.trust import cms, smime

from . import pg_support

# the tests run on the loop ``pecd serve`` runs on (pecd.edges.aio; PECD_EVENT_LOOP=asyncio for
# the standard library's): asyncio.run and new_event_loop follow the policy
if aio.loop_factory() is uvloop.new_event_loop:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

if TYPE_CHECKING:
    from .revocation_support import CrlServer, RevocationCA

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range, never handed out twice in this run.

    A port from ``bind(0)`` is an ephemeral one: between this call and the listener's bind, any
    outgoing connection (a relay, a client) may take it as its local port, and the listener
    then fails with "address already in use"."""
    low = _ephemeral_low()
    candidates = list(range(10000, low)) if low > 11000 else []
    random.shuffle(candidates)
    for port in candidates:
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range: the old way
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pecd(*args: str, input: str | None = None, ok: bool = True) -> str:
    result = CliRunner().invoke(cli_main, list(args), input=input, catch_exceptions=False)
    if ok and result.exit_code != 0:
        raise AssertionError(f"pecd {' '.join(args)} failed ({result.exit_code}): {result.output}")
    if not ok and result.exit_code == 0:
        raise AssertionError(f"pecd {' '.join(args)} succeeded but should not: {result.output}")
    return result.output


@dataclass
class ProviderDir:
    root: Path
    domain: str

    @property
    def conf(self) -> Path:
        return self.root / "pecd.toml"

    @property
    def config(self) -> config.Config:
        return config.load(self.conf)

    @property
    def ca(self) -> Path:
        return self.root / "keys" / "ca.pem"

    @property
    def tsa_cert(self) -> Path:
        return self.root / "keys" / "tsa.pem"

    def cli(self, *args: str, input: str | None = None, ok: bool = True) -> str:
        return pecd("-c", str(self.conf), *args, input=input, ok=ok)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        """Rows from the provider's own database, whichever backend it is on."""
        conn = db_mod.connect(self.config.paths.database)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()

    def add_user(self, address: str, password: str) -> None:
        self.cli("user", "add", address, "--password-stdin", input=password + "\n")

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.root / "data" / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def make_provider(base: Path, domain: str, ca_dir: Path, **kwargs: str) -> ProviderDir:
    root = base / domain
    pecd("init", str(root), "--domain", domain, "--name", f"Provider {domain}", "--ca",
         str(ca_dir), "--submission-port", str(free_port()), "--smtps-port", str(free_port()),
         "--inbound-port", str(free_port()), "--http-port", str(free_port()),
         *[x for k, v in kwargs.items() for x in (k, v)])
    return ProviderDir(root, domain)


def exchange_cards(*providers: ProviderDir) -> None:
    for p in providers:
        card = p.root / "card.json"
        card.write_text(p.cli("index", "export"))
        for q in providers:
            if q is not p:
                q.cli("index", "import", str(card))


@pytest.fixture
def two_providers(tmp_path: Path) -> tuple[ProviderDir, ProviderDir]:
    return _two_providers(tmp_path)


def _two_providers(tmp_path: Path, urls: tuple[str | None, str | None] = (None, None)
                   ) -> tuple[ProviderDir, ProviderDir]:
    ca_dir = tmp_path / "ca"
    a, b = (make_provider(tmp_path, domain, ca_dir,
                          **({"--database-url": url} if url else {}))
            for domain, url in (("a.test", urls[0]), ("b.test", urls[1])))
    exchange_cards(a, b)
    a.add_user("alice@a.test", "alice-secret")
    b.add_user("bob@b.test", "bob-secret")
    return a, b


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg_support.Cluster]:
    """One throwaway PostgreSQL for the whole session (skips without PostgreSQL, fails in CI)."""
    cluster = pg_support.start_cluster(free_port())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: pg_support.Cluster) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return pg_cluster.database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Callable[[], str | None]:
    """The backend under test: a factory of database URLs (None: SQLite in the data dir)."""
    if request.param == "sqlite":
        return lambda: None
    cluster: pg_support.Cluster = request.getfixturevalue("pg_cluster")
    return cluster.database


@pytest.fixture
def two_providers_db(tmp_path: Path, database: Callable[[], str | None]
                     ) -> tuple[ProviderDir, ProviderDir]:
    """``two_providers`` on each backend (each provider its own database)."""
    return _two_providers(tmp_path, (database(), database()))


def client_tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def submit(provider: ProviderDir, user: str, password: str, mail_from: str, rcpts: list[str],
           data: bytes, port: int) -> tuple[int, bytes]:
    """A standard client (smtplib): STARTTLS, AUTH, one message. Returns the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=client_tls(provider.ca))
        s.login(user, password)
        code, msg = s.mail(mail_from)
        if code != 250:
            return code, msg
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code not in (250, 251):
                return code, msg
        return s.data(data)


@contextlib.asynccontextmanager
async def running(*providers: ProviderDir) -> AsyncIterator[list[Service]]:
    """The providers' services, started (listeners and runners), stopped however the test ends."""
    services: list[Service] = []
    try:
        for p in providers:
            services.append(Service(p.config))
            await services[-1].start()
        yield services
    finally:
        for svc in reversed(services):
            await svc.stop()


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a condition on disk until it holds; fails the test on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def openssl(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)
    if ok and proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {proc.stderr}")
    if not ok and proc.returncode == 0:
        raise AssertionError(f"openssl {' '.join(args)} succeeded but should not")
    return proc


def openssl_verifies(eml: Path, ca: Path) -> bool:
    proc = subprocess.run([OPENSSL, "cms", "-verify", "-in", str(eml), "-CAfile", str(ca),
                           "-out", "/dev/null"], capture_output=True, check=False)
    return proc.returncode == 0


def openssl_timestamp_verifies(eml: Path, ca: Path, tsa_cert: Path) -> bool:
    signed = smime.split_signed(eml.read_bytes())
    extracted = cms.extract_timestamp_token(signed.signature)
    assert extracted is not None, f"{eml.name}: no signature-time-stamp attribute"
    token, signature_value = extracted
    tok = eml.with_suffix(".tsr")
    data = eml.with_suffix(".sigvalue")
    tok.write_bytes(token)
    data.write_bytes(signature_value)
    proc = subprocess.run([OPENSSL, "ts", "-verify", "-data", str(data), "-in", str(tok),
                           "-token_in", "-CAfile", str(ca), "-untrusted", str(tsa_cert)],
                          capture_output=True, check=False)
    return proc.returncode == 0


@pytest.fixture
def crl_server() -> Iterator[CrlServer]:
    """A CRL server on loopback, for the revocation tests."""
    from .revocation_support import CrlServer  # it builds on this module

    server = CrlServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ca(tmp_path: Path, crl_server: CrlServer) -> RevocationCA:
    """A CA whose certificates name ``crl_server`` as their CRL distribution point."""
    from .revocation_support import RevocationCA

    return RevocationCA.create(tmp_path / "ca", crl_server.url("/ca.crl"),
                               f"http://127.0.0.1:{free_port()}/")
