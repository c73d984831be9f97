"""A real PKCS#11 token for the tests: SoftHSM2 with its own token directory.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is first initialised in this process, so
one configuration (and token directory) serves the whole test run; each test gets a token of its
own, with a fresh label. Without softhsm2 the tests skip, except in CI (``CI=true``), where a
missing token is a failure: the HSM path must not go untested there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pecd.trust.keys import Pkcs11Options

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
USER_PIN = "4321-user"
SO_PIN = "8765-so"


def require_softhsm() -> None:
    missing = [str(p) for p in (MODULE,) if not p.is_file()]
    if shutil.which("softhsm2-util") is None:
        missing.append("softhsm2-util")
    if missing:
        message = f"softhsm2 is not installed ({', '.join(missing)}): apt-get install softhsm2"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


_CONF: Path | None = None


def softhsm_conf(base: Path) -> Path:
    """The process-wide SoftHSM configuration (made once, under ``base``)."""
    global _CONF
    if _CONF is None:
        tokens = base / "softhsm-tokens"
        tokens.mkdir(parents=True)
        conf = base / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                        "log.level = ERROR\nslots.removable = false\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        _CONF = conf
    return _CONF


@dataclass
class Token:
    label: str
    pin_file: Path
    tokendir: Path

    @property
    def options(self) -> Pkcs11Options:
        return Pkcs11Options(module=MODULE, pin_file=self.pin_file)

    def uri(self, obj: str) -> str:
        return f"pkcs11:token={self.label};object={obj}"

    def directory(self) -> Path:
        """The token's own directory inside the token directory (SoftHSM names it by a UUID)."""
        for d in self.tokendir.iterdir():
            if d.is_dir() and self.label.encode() in (d / "token.object").read_bytes():
                return d
        raise AssertionError(f"token {self.label} not found in {self.tokendir}")


def new_token(base: Path, pin_dir: Path) -> Token:
    """Initialise a fresh token (its own label) with softhsm2-util, as an operator would."""
    require_softhsm()
    conf = softhsm_conf(base)
    label = f"pecd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", USER_PIN, "--so-pin", SO_PIN], check=True, capture_output=True,
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    pin_file = pin_dir / f"{label}.pin"
    pin_file.write_text(USER_PIN + "\n")  # a trailing newline, as editors leave it
    pin_file.chmod(0o600)
    tokendir = Path(conf.read_text().split("\n")[0].split("=", 1)[1].strip())
    return Token(label, pin_file, tokendir)
