#!/usr/bin/env python3
"""Signatures per second: file keys against keys in a PKCS#11 token (SoftHSM2), in process.

Three levels, each for RSA-2048 and P-256: the raw signature (``key.sign``), a whole pecd CMS
signature (``Signer.sign_detached``: signed attributes, SHA-256, the signature), and the same
with the built-in TSA's timestamp (two signatures: the TSA's and the provider's). Run with one
thread and with ``--threads`` worker threads, as the stages call the signer. The token session is
opened once and reused; nothing here asserts a speed.

    .venv/bin/python scripts/bench_keys.py [--seconds 2] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "1234"


def token(base: Path) -> Path:
    """A fresh SoftHSM token ``bench`` in ``base``; returns the PIN file."""
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is loaded
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN,
                    "--so-pin", "5678"], check=True, capture_output=True)
    pin = base / "pin"
    pin.write_text(PIN + "\n")
    return pin


def rate(fn: Callable[[int], object], seconds: float, threads: int) -> float:
    """Calls per second of ``fn`` over ``seconds``, from ``threads`` threads."""
    def worker(_: int) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            fn(n)
            n += 1
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    return total / (time.perf_counter() - start)


def raw_signer(key: object) -> Callable[[int], object]:
    """One raw SHA-256 signature per call, the way pecd's CMS code asks for it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        rsa_key = key
        return lambda i: rsa_key.sign(b"%d" % i, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ec_key = key
    return lambda i: ec_key.sign(b"%d" % i, ec.ECDSA(hashes.SHA256()))


def numbered(sign: Callable[[bytes], bytes]) -> Callable[[int], object]:
    return lambda i: sign(b"message %d" % i)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if not MODULE.exists() or shutil.which("softhsm2-util") is None:
        print("softhsm2 is not installed (apt-get install softhsm2)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="pecd-bench-keys-"))
    try:
        pin = token(base)
        from pecd.clock import SystemClock
        from pecd.trust import keys, pki
        from pecd.trust.cms import Signer
        from pecd.trust.tsa import LocalTSA

        options = keys.Pkcs11Options(MODULE, pin)
        ca = pki.CertAuthority.create()
        clock = SystemClock()
        print(f"{'key':<8} {'where':<6} {'threads':>7} {'raw sign/s':>11} {'CMS/s':>8}"
              f" {'CMS+TSA/s':>10}")
        for kind in ("rsa", "ec"):
            pairs = {"file": (pki.new_key(kind), pki.new_key(kind)),  # type: ignore[arg-type]
                     "token": (keys.generate_in_token(f"pkcs11:token=bench;object=p-{kind}",
                                                      options, kind),
                               keys.generate_in_token(f"pkcs11:token=bench;object=t-{kind}",
                                                      options, kind))}
            for where, (key, tsa_key) in pairs.items():
                cert = ca.issue_signing_cert(key, "Bench", "posta-certificata@bench.test")
                tsa = LocalTSA(tsa_key, ca.issue_tsa_cert(tsa_key, "Bench TSA"), clock)
                raw = raw_signer(key)
                plain_sign = Signer(key, cert, clock).sign_detached
                stamped_sign = Signer(key, cert, clock, timestamper=tsa).sign_detached
                for threads in sorted({1, args.threads}):
                    figures = [rate(raw, args.seconds, threads),
                               rate(numbered(plain_sign), args.seconds, threads),
                               rate(numbered(stamped_sign), args.seconds, threads)]
                    print(f"{kind:<8} {where:<6} {threads:>7} {figures[0]:>11.0f} {figures[1]:>8.0f}"
                          f" {figures[2]:>10.0f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
