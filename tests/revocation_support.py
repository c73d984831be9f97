"""Outside PKI for the revocation and bring-your-own-certificate tests.

:class:`OutsideCA` is made by the ``openssl`` command line (nothing of pecd's): a root and an
issuing intermediate, as accredited PEC CAs have. :class:`RevocationCA` (``cryptography``) issues
provider certificates that name a CRL distribution point and an OCSP responder, revokes them,
and publishes: its CRL through :class:`CrlServer` (``http.server`` on loopback, in a thread) and
its status through :class:`OcspResponder` (``openssl ocsp`` as a subprocess on loopback)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .conftest import OPENSSL

_EXTENSIONS = """
[v3_int]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[v3_leaf]
keyUsage = critical, {key_usage}
subjectAltName = email:{email}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {proc.stderr}")


@dataclass(frozen=True)
class OutsideCA:
    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root.pem"

    @property
    def intermediate(self) -> Path:
        return self.dir / "int.pem"

    @property
    def intermediate_key(self) -> Path:
        return self.dir / "int.key"

    @property
    def chain(self) -> Path:
        """Intermediate then root, as CAs hand them out."""
        return self.dir / "chain.pem"

    @classmethod
    def create(cls, dir: Path) -> OutsideCA:
        dir.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key",
                 "-out", "root.pem", "-days", "30", "-subj", "/CN=Outside Root CA/O=Outside Trust",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "int.key", "-out", "int.csr",
                 "-subj", "/CN=Outside Issuing CA/O=Outside Trust", cwd=dir)
        (dir / "int.cnf").write_text(_EXTENSIONS.format(key_usage="digitalSignature", email="x@x"))
        _openssl("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
                 "-set_serial", "2", "-days", "30", "-out", "int.pem", "-extfile", "int.cnf",
                 "-extensions", "v3_int", cwd=dir)
        (dir / "chain.pem").write_bytes((dir / "int.pem").read_bytes()
                                        + (dir / "root.pem").read_bytes())
        return cls(dir)

    def issue(self, provider: str, email: str, name: str = "leaf",
              key_usage: str = "digitalSignature, nonRepudiation") -> tuple[Path, Path]:
        """(key, certificate) for a provider, issued by the intermediate."""
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={provider}/O={provider}", cwd=self.dir)
        (self.dir / f"{name}.cnf").write_text(_EXTENSIONS.format(key_usage=key_usage, email=email))
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "int.pem", "-CAkey", "int.key",
                 "-CAcreateserial", "-days", "20", "-out", f"{name}.pem",
                 "-extfile", f"{name}.cnf", "-extensions", "v3_leaf", cwd=self.dir)
        return self.dir / f"{name}.key", self.dir / f"{name}.pem"
