"""pec.parse remembers recent small messages (the reception and delivery points parse the same
bytes): the remembered answer is the answer for those bytes only, and the memory it holds stays
within its bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from pecd.format import pec

GOLDEN = Path(__file__).parent / "golden" / "pec"


def test_the_same_bytes_give_the_same_answer_and_other_bytes_their_own() -> None:
    data = (GOLDEN / "avvenuta-consegna.eml").read_bytes()
    first = pec.parse(data)
    assert pec.parse(bytes(data)) is first  # an equal copy: remembered
    assert pec._parse(data).certdata == first.certdata
    other = data.replace(b"X-Ricevuta: avvenuta-consegna", b"X-Ricevuta: errore-consegna", 1)
    assert other != data
    changed = pec.parse(other)
    assert changed is not first
    assert (first.ricevuta, changed.ricevuta) == ("avvenuta-consegna", "errore-consegna")


def test_a_refused_message_is_refused_every_time() -> None:
    with pytest.raises(pec.NotPec):
        pec.parse(b"X-Trasporto: posta-certificata\r\n\r\nnot signed\r\n")
    with pytest.raises(pec.NotPec):
        pec.parse(b"X-Trasporto: posta-certificata\r\n\r\nnot signed\r\n")


def test_the_memory_held_stays_within_its_bound() -> None:
    data = (GOLDEN / "posta-certificata.eml").read_bytes()
    pad = b"X-Pad: " + b"x" * 200_000 + b"\r\n"
    for n in range(120):  # ~24 MB of distinct messages, each under the per-message limit
        pec.parse(b"X-N: %d\r\n" % n + pad + data)
    assert pec._memo_size <= pec._MEMO_BYTES
    assert pec._memo_size == sum(size for _, size in pec._memo.values())
    big = pad * 2 + data  # over the per-message limit: parsed, not remembered
    before = len(pec._memo)
    pec.parse(big)
    assert len(pec._memo) == before
