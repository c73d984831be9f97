"""The lean header-block reader (pecd.format.headers._parse_plain) against the standard library's
HeaderParser it stands in for: for any text it accepts, the same Message (fields, payload,
defects, Unix From line); anything it declines, the standard parser still reads."""

from __future__ import annotations

from email.message import Message
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pecd.format import headers

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "pec-samples"
if not SAMPLES.is_dir():
    SAMPLES = Path("/work/shared/pec-samples")


def _state(msg: Message) -> dict[str, object]:
    state = dict(vars(msg))
    state["defects"] = [(type(d), str(d)) for d in msg.defects]
    state["policy"] = repr(msg.policy)
    return state


def _same_as_stdlib(text: str) -> bool:
    """True when the lean reader took ``text``; fails the test when it took it differently."""
    lean = headers._parse_plain(text)
    if lean is None:
        return False
    assert _state(lean) == _state(headers._parser.parsestr(text))
    return True


_name = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
                min_size=0, max_size=8)
_chars = st.sampled_from([" ", "\t", "\r", "\n", "\r\n", ":", "a", "Z", "é", "\x00", "\x0b",
                          "\x0c", "\x85", "\u2028", "From ", "=?utf-8?q?x?=", ";", "<", "@"])
_value = st.lists(_chars, max_size=12).map("".join)
_end = st.sampled_from(["\r\n", "\n", "\r"])
_line = st.one_of(
    st.tuples(_name, st.just(":"), _value, _end).map("".join),  # a field's first line
    st.tuples(st.sampled_from([" ", "\t"]), _value, _end).map("".join),  # a continuation
    st.tuples(_value, _end).map("".join),  # anything
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_line, max_size=8).map("".join))
@example("Subject: a\r\n b\r\n\tc\r\nTo: x@y\r\n")
@example("A:\r\n \r\n")
@example("A: \t \r\n\t\r\n")
@example("A:b\rB:\nC: c\r\n")
@example("From x@y Mon Jan 1\r\nA: b\r\n")
@example(" A: b\r\n")
@example("A: b")
@example("A: b\n\n")
@example("A: b\r\n\r\nbody\r\n")
@example("A: b\r\n\r\n\r\n")
@example("")
def test_lean_header_reader_matches_header_parser(text: str) -> None:
    _same_as_stdlib(text)


@given(st.lists(st.tuples(_name.filter(bool), _value.filter(lambda v: not set(v) & set("\r\n")),
                          _end), min_size=1, max_size=6))
def test_plain_fields_take_the_lean_path(fields: list[tuple[str, str, str]]) -> None:
    assert _same_as_stdlib("".join(f"{n}:{v}{e}" for n, v, e in fields))


def test_malformed_blocks_go_to_the_standard_parser() -> None:
    for text in (" folded first\r\nA: b\r\n", "A: b\r\nno colon\r\n", "A: b", ":x\r\n",
                 "From a@b Mon\r\nA: b\r\n"):
        assert headers._parse_plain(text) is None
        assert isinstance(headers.parse(text.encode()), Message)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="no PEC samples")
def test_real_pec_messages_and_their_parts_read_the_same() -> None:
    lean = 0
    for path in sorted(SAMPLES.glob("*.eml")):
        data = path.read_bytes()
        blocks = [data]
        blocks += [data[s:e] for s, e in _part_spans(data)]
        for block in blocks:
            lean += _same_as_stdlib(headers.header_block(block).decode("utf-8", "replace"))
    assert lean > 0


def _part_spans(data: bytes) -> list[tuple[int, int]]:
    """Every part's span after a MIME boundary line, found by text search: enough to feed the
    readers many real part header blocks."""
    spans = []
    for marker in (b"\r\n--", b"\n--"):
        at = data.find(marker)
        while at >= 0:
            start = data.find(b"\n", at + len(marker)) + 1
            if start <= 0:
                break
            spans.append((start, len(data)))
            at = data.find(marker, start)
    return spans
