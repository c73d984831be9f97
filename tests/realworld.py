"""The real PEC messages in ``../shared/pec-samples`` (see its SOURCES.md), read in place.

They are the judge of pecd's reading: never copied into this repository. ``PECD_SAMPLES`` points
elsewhere when the shared folder is not beside the checkout.
"""

from __future__ import annotations

import os
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

SAMPLES = Path(os.environ.get("PECD_SAMPLES")
               or Path(__file__).resolve().parents[2] / "shared" / "pec-samples")

# intact, signed by the provider, full chain to a Debian root at the signing time (SOURCES.md)
INTACT = (
    "aruba-accettazione-2014.eml",
    "aruba-accettazione-2018.eml",
    "aruba-avvenuta-consegna-2014.eml",
    "aruba-avvenuta-consegna-2018.eml",
    "aruba-posta-certificata-2014.eml",
    "aruba-posta-certificata-2014-b.eml",
    "sogei-posta-certificata-2018.eml",
    "sogei-posta-certificata-2018-b.eml",
)
EDITED = ("edited-sogei-posta-certificata-base64.eml", "edited-sogei-posta-certificata-no-daticert.eml")
UNSIGNED = ("anon-aruba-accettazione-2024.eml", "anon-aruba-errore-consegna-2024.eml")
NAMIRIAL = "namirial-posta-certificata-2024-mailman.eml"
DEBIAN_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")
ACTALIS = Path("/etc/ssl/certs/Actalis_Authentication_Root_CA.pem")
BALTIMORE = Path("/etc/ssl/certs/Baltimore_CyberTrust_Root.pem")

_PROVIDER_FIELDS = ("x-riferimento-message-id", "date", "message-id", "to", "cc", "x-trasporto",
                    "x-ricevuta", "from", "reply-to", "mime-version", "subject")


def sample(name: str) -> bytes:
    path = SAMPLES / name
    assert path.is_file(), f"{path} missing: the shared PEC samples must sit beside the checkout"
    return path.read_bytes()


def derive_namirial() -> bytes:
    """The Namirial envelope as its provider sent it: the provider's own header fields of the
    archived copy (list tags taken off the Subject) above the inner multipart/signed entity,
    byte for byte. Only that entity is covered by the signature."""
    data = sample(NAMIRIAL)
    head, _, _ = data.partition(b"\n\n")
    outer = BytesHeaderParser(policy=compat32).parsebytes(head + b"\n\n")
    boundary = outer.get_boundary()
    assert boundary, "the archived copy is a multipart/mixed"
    delimiter = b"\n--" + boundary.encode() + b"\n"
    start = data.index(delimiter) + len(delimiter)
    end = data.index(b"\n--" + boundary.encode(), start)
    inner = data[start:end + 1]
    lines = []
    for name, value in outer.items():
        if name.lower() in _PROVIDER_FIELDS:
            if name.lower() == "subject":
                value = re.sub(r"^(\[[^\]]*\]\s*)+", "", value)
            lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\n".join(lines) + b"\n" + inner
