"""A throwaway PostgreSQL cluster from Debian's packages for the tests.

One cluster per test session (initdb in a temp directory, a Unix socket there and a loopback
port, ``fsync=on``); each test gets a fresh database, cloned from an empty template (fast).
initdb refuses to run as root, so as root the server runs as the ``postgres`` system user
(``runuser``); the test process connects over TCP with a password-less ``trust`` rule limited
to loopback.

Without the binaries the PostgreSQL tests skip, except in CI (``CI=true``), where a missing
PostgreSQL is a failure: the README's test setup installs it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def require() -> Path:
    """The bin directory, or skip (fail in CI)."""
    found = bindir()
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("PostgreSQL binaries missing (/usr/lib/postgresql/*/bin): scripts/setup"
                        " installs them")
        pytest.skip("PostgreSQL not installed (apt install postgresql)")
    return found


class Cluster:
    """A running throwaway server; :meth:`database` makes one fresh database per call."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin = bin_dir
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="pecd-pg-"))
        self.data = self.root / "data"
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        self.role = "postgres" if self.user else (os.environ.get("USER") or "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        if self.user:
            shutil.chown(self.root, self.user, self.user)
        os.chmod(self.root, 0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.role,
                  "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = on\n"
                "max_connections = 200\nshared_buffers = 64MB\n")
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "log"))
        self.template = "pecd_template"
        self.psql("postgres", f"CREATE DATABASE {self.template}")

    def pg_ctl(self, *args: str) -> None:
        """``pg_ctl`` on this cluster (e.g. ``restart -m immediate`` in a crash test)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), *args)

    def psql(self, db: str, sql: str) -> str:
        done = self._run(str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", str(self.root), "-p", str(self.port), "-U", self.role,
                         "-d", db, "-c", sql)
        return done.stdout

    def url(self, db: str) -> str:
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{db}"

    def database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql("postgres", f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return self.url(name)

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast",
                  check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(port: int) -> Cluster:
    cluster = Cluster(require(), port)
    cluster.start()
    return cluster
