"""One message's evidence as a zip archive a third party can check offline: its receipts as
``.eml`` (each checkable with ``pecd verify`` or ``openssl cms -verify``), its ledger rows with
their hashes, the chain links from them to the first timestamped checkpoint over them, that
checkpoint's RFC 3161 token with the exact bytes it stamps, and a report in words of what was
checked when the archive was made.

Receives what the caller read (receipts from the sender's mailbox, ledger rows, checkpoint);
trusts none of it: the report says what verified and what did not. Other messages' rows appear
only as hash links (seq, prev_hash, hash), never with their content: a reader can see that the
message's rows chain up to the stamped head, but the hashes of rows in between are the
provider's word until compared with a full ``pecd ledger export``. Pure apart from the signature
checks it runs; no storage, no sockets.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from pecd.store import ledger
from pecd.trust import tsa
from pecd.trust.judge import judge
from pecd.trust.paths import AlgorithmPolicy


@dataclass(frozen=True)
class Receipt:
    message_id: str
    data: bytes


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name)[:120]


def _check_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    problems = []
    for row in rows:
        if ledger.row_hash(str(row["prev_hash"]), row) != row["hash"]:
            problems.append(f"row {row['seq']}: its hash does not match its content")
    return problems


def _check_links(rows: Sequence[dict[str, Any]], links: Sequence[dict[str, Any]],
                 checkpoint: dict[str, Any]) -> list[str]:
    problems = []
    by_seq = {int(link["seq"]): link for link in links}
    for row in rows:
        link = by_seq.get(int(row["seq"]))
        if link is None or link["hash"] != row["hash"] or link["prev_hash"] != row["prev_hash"]:
            problems.append(f"row {row['seq']} is not the chain's row {row['seq']}")
    for before, after in itertools.pairwise(links):
        if after["seq"] != before["seq"] + 1 or after["prev_hash"] != before["hash"]:
            problems.append(f"the chain breaks between rows {before['seq']} and {after['seq']}")
    if not links or links[-1]["seq"] != checkpoint["seq_to"] \
            or links[-1]["hash"] != checkpoint["head_hash"]:
        problems.append("the chain does not end at the checkpoint's head")
    return problems


def build(pec_id: str, rows: Sequence[dict[str, Any]], links: Sequence[dict[str, Any]],
          checkpoint: dict[str, Any] | None, receipts: Sequence[Receipt],
          roots: Sequence[x509.Certificate], policy: AlgorithmPolicy,
          roots_pem: bytes) -> bytes:
    """The archive's bytes (blocking: signature checks; run it in an executor)."""
    report = [f"Evidence for PEC message {pec_id}", ""]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        report.append(f"Receipts ({len(receipts)}), judged with the provider's trust roots"
                      " (provider-ca.pem):")
        for i, receipt in enumerate(receipts, start=1):
            verdict = judge(receipt.data, roots, policy=policy)
            kind = verdict.pec.get("type", "?")
            name = f"receipts/{i:02d}-{_safe(str(kind))}-{_safe(receipt.message_id)}.eml"
            z.writestr(name, receipt.data)
            report.append(f"  {name}: {verdict.headline}"
                          + (f" ({verdict.reason})" if verdict.reason else "")
                          + (f"; time {verdict.pec['time']}" if "time" in verdict.pec else ""))
        if not receipts:
            report.append("  none found in the sender's mailbox")
        report += ["", f"Ledger rows ({len(rows)}):"]
        report += [f"  seq {r['seq']} {r['at']} {r['event']}" for r in rows]
        problems = _check_rows(rows)
        report.append("  each row's hash recomputed from its content: "
                      + ("OK" if not problems else "; ".join(problems)))
        cp_json: dict[str, Any] | None = None
        if checkpoint is None:
            report.append("  no timestamped checkpoint covers these rows yet: ask again later")
        else:
            cp_json = {k: v for k, v in checkpoint.items() if k != "token"}
            z.writestr("checkpoint.tsr", checkpoint["token"])
            z.writestr("checkpoint-head.bin", bytes.fromhex(checkpoint["head_hash"]))
            link_problems = _check_links(rows, links, checkpoint) if links else [
                "too many rows to the checkpoint: the chain links are left out"]
            report.append(f"  chain links from row {rows[0]['seq']} to checkpoint {checkpoint['id']}"
                          f" (head row {checkpoint['seq_to']}): "
                          + ("OK" if not link_problems else "; ".join(link_problems)))
            try:
                stamped = tsa.verify_token(checkpoint["token"],
                                           bytes.fromhex(checkpoint["head_hash"]), roots)
                report.append(f"  checkpoint token: valid RFC 3161 timestamp of the head at "
                              f"{stamped.isoformat()}")
            except tsa.TimestampInvalid as exc:
                report.append(f"  checkpoint token: NOT valid ({exc})")
        z.writestr("ledger.json", json.dumps({
            "message": pec_id, "rows": list(rows), "links": list(links), "checkpoint": cp_json,
            "row_hash": "sha256(prev_hash as ASCII hex || canonical JSON of the row's hashed"
                        " fields), see pecd.store.ledger"}, indent=1, sort_keys=True, default=str))
        z.writestr("provider-ca.pem", roots_pem)
        report += ["", "Check it yourself (trust roots of your own choosing are better than"
                   " provider-ca.pem):",
                   "  pecd verify --ca provider-ca.pem receipts/<file>.eml",
                   "  openssl ts -verify -in checkpoint.tsr -token_in -data checkpoint-head.bin"
                   " -CAfile provider-ca.pem", ""]
        z.writestr("REPORT.txt", "\n".join(report))
    return out.getvalue()
