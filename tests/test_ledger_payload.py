"""The ledger's row hash written field by field (pecd.store.ledger._plain_payload) against the
canonical JSON of the whole row it stands in for: the same text for any row content, so every
hash pecd has written and every exported row stays verifiable."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pecd.store import ledger

_text = st.text(alphabet=st.characters(codec=None), max_size=20)  # surrogates, controls, anything
_opt = st.none() | _text
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=1500, deadline=None)
@given(seq=st.integers(min_value=1, max_value=2**63), at=_text, event=_text, msgid=_opt,
       ref_msgid=_opt, sender=_opt, subject=_opt, provider=_opt,
       recipients=st.lists(_text, max_size=3), related=st.lists(_text, max_size=3),
       detail=st.dictionaries(_text, _json, max_size=4))
@example(seq=1, at="2026-12-01T20:00:00.000000Z", event="accepted", msgid="<a@b>",
         ref_msgid=None, sender="à@b.it", subject='"q" \\ \n\t\x00\u2028 €', provider=None,
         recipients=["x@y"], related=[], detail={"size": 1, "tls": True, "b": {"a": [1.5]}})
def test_plain_payload_is_the_canonical_json_of_the_row(**row: Any) -> None:
    fields = {name: row[name] for name in ledger.HASHED_FIELDS}
    payload = ledger._plain_payload(
        fields, ledger.canonical_json(row["recipients"]), ledger.canonical_json(row["related"]),
        ledger.canonical_json(row["detail"]))
    assert payload == ledger.canonical_json(fields)


def test_fields_of_other_types_are_left_to_the_generic_encoder() -> None:
    row: dict[str, object] = {name: None for name in ledger.HASHED_FIELDS}
    row.update(seq=1, at="t", event="e", recipients=[], related=[], detail={})
    assert ledger._plain_payload(row, "[]", "[]", "{}") == ledger.canonical_json(row)
    for name, value in (("seq", True), ("seq", "1"), ("subject", 5), ("sender", b"x")):
        assert ledger._plain_payload({**row, name: value}, "[]", "[]", "{}") is None
