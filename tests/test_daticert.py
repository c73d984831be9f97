"""daticert.xml (RFC 6109 §4.4): golden renders, real-world parses, strict refusals, round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd.format.daticert import (
    CertData,
    CertDataError,
    DaticertInvalid,
    Recipient,
    format_human_time,
    parse,
    render,
    xml_safe,
)

GOLDEN = Path(__file__).parent / "golden" / "daticert"
CET = timezone(timedelta(hours=1))

ALICE = "alice@pec.a.test"
BOB = "bob@pec.b.test"
SUBJECT = "Contratto di fornitura"
PROV_A = "Provider A S.p.A."
PROV_B = "Provider B S.r.l."

CASES: dict[str, CertData] = {
    "accettazione": CertData(
        type="accettazione",
        sender=ALICE,
        recipients=(Recipient(BOB, "certificato"), Recipient("carol@mail.c.test", "esterno")),
        reply_to=ALICE,
        subject=SUBJECT,
        issuer=PROV_A,
        time=datetime(2026, 11, 3, 10, 15, 30, tzinfo=CET),
        identifier="opaque-1@pec.a.test",
        msgid="<orig-1@mua.a.test>",
    ),
    "non-accettazione": CertData(
        type="non-accettazione",
        error="altro",
        sender=ALICE,
        recipients=(Recipient(BOB),),
        reply_to=ALICE,
        subject=None,
        issuer=PROV_A,
        time=datetime(2026, 11, 3, 10, 15, 31, tzinfo=CET),
        identifier="opaque-2@pec.a.test",
        extended_error="Destinatari in Bcc non ammessi",
    ),
    "presa-in-carico": CertData(
        type="presa-in-carico",
        sender=ALICE,
        recipients=(Recipient(BOB), Recipient("dave@pec.b.test")),
        reply_to=ALICE,
        subject=SUBJECT,
        issuer=PROV_B,
        time=datetime(2026, 11, 3, 9, 15, 32, tzinfo=UTC),
        identifier="opaque-3@pec.b.test",
        msgid="<opaque-1@pec.a.test>",
        taken_in_charge=(BOB, "dave@pec.b.test"),
    ),
    "avvenuta-consegna": CertData(
        type="avvenuta-consegna",
        sender=ALICE,
        recipients=(Recipient(BOB),),
        reply_to=ALICE,
        subject=SUBJECT,
        issuer=PROV_B,
        time=datetime(2026, 11, 3, 3, 45, 33, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        identifier="opaque-4@pec.b.test",
        msgid="<opaque-1@pec.a.test>",
        receipt_kind="breve",
        delivered_to=BOB,
    ),
    "posta-certificata": CertData(
        type="posta-certificata",
        sender=ALICE,
        recipients=(Recipient(BOB), Recipient("carol@mail.c.test", "esterno")),
        reply_to="segreteria@pec.a.test",
        subject=SUBJECT,
        issuer=PROV_A,
        # A zone with DST, and sub-second precision that the XML cannot carry.
        time=datetime(2026, 11, 3, 10, 15, 30, 999_999, tzinfo=ZoneInfo("Europe/Rome")),
        identifier="opaque-1@pec.a.test",
        msgid="<orig-1@mua.a.test>",
        receipt_kind="completa",
    ),
    "errore-consegna": CertData(
        type="errore-consegna",
        error="no-dest",
        sender=ALICE,
        recipients=(Recipient("nobody@pec.b.test"),),
        reply_to=ALICE,
        subject=SUBJECT,
        issuer=PROV_B,
        time=datetime(2026, 11, 3, 10, 15, 34, tzinfo=CET),
        identifier="opaque-5@pec.b.test",
        msgid="<opaque-1@pec.a.test>",
        delivered_to="nobody@pec.b.test",
        extended_error="5.1.1 - Utente sconosciuto",
    ),
    "preavviso-errore-consegna": CertData(
        type="preavviso-errore-consegna",
        error="altro",
        sender=ALICE,
        recipients=(Recipient(BOB),),
        reply_to=ALICE,
        subject=SUBJECT,
        issuer=PROV_A,
        time=datetime(2026, 11, 3, 22, 15, 30, tzinfo=CET),
        identifier="opaque-6@pec.a.test",
        msgid="<orig-1@mua.a.test>",
        delivered_to=BOB,
        extended_error="Nessuna ricevuta entro 12 ore",
    ),
    "rilevazione-virus": CertData(
        type="rilevazione-virus",
        error="virus",
        sender=ALICE,
        recipients=(Recipient(BOB),),
        reply_to=ALICE,
        subject="Fattura",
        issuer=PROV_B,
        time=datetime(2026, 11, 3, 10, 15, 35, tzinfo=CET),
        identifier="opaque-7@pec.b.test",
        msgid="<opaque-8@pec.a.test>",
        delivered_to=BOB,
        extended_error="Eicar-Signature",
    ),
    "escaping": CertData(
        type="posta-certificata",
        sender='"Rossi & Figli" <rossi@pec.a.test>',
        recipients=(Recipient(BOB),),
        reply_to="",
        subject="Perché l'€ ]]> non <b>basta</b> — 日本\r\n\tfine",
        issuer="Società Ünïcode",
        time=datetime(2028, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=2))),
        identifier="opaque-9@pec.a.test",
        receipt_kind="sintetica",
    ),
}


def test_every_message_type_has_a_golden_file() -> None:
    types = {c.type for c in CASES.values()}
    assert types == {
        "accettazione", "non-accettazione", "presa-in-carico", "avvenuta-consegna",
        "posta-certificata", "errore-consegna", "preavviso-errore-consegna", "rilevazione-virus",
    }
    assert {p.stem for p in GOLDEN.glob("*.xml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_golden_byte_for_byte(name: str) -> None:
    assert render(CASES[name]) == (GOLDEN / f"{name}.xml").read_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_parses_back(name: str) -> None:
    assert parse((GOLDEN / f"{name}.xml").read_bytes()) == CASES[name]


def test_subsecond_time_is_dropped_on_construction() -> None:
    data = CASES["posta-certificata"]
    assert data.time.microsecond == 0
    assert data.time == datetime(2026, 11, 3, 9, 15, 30, tzinfo=UTC)


def test_parsed_time_keeps_the_offset() -> None:
    t = parse((GOLDEN / "avvenuta-consegna.xml").read_bytes()).time
    assert t.utcoffset() == -timedelta(hours=5, minutes=30)
    assert (t.hour, t.minute) == (3, 45)


# ------------------------------------------------------------------------------ real-world input

POSTECERT_2012 = (
    b'<postacert tipo="posta-certificata" errore="nessuno"><intestazione>'
    b"<mittente>mario.rossi@postecert.it</mittente>"
    b'<destinatari tipo="esterno">x@y.example</destinatari>'
    b"<risposte>mario.rossi@postecert.it</risposte><oggetto>Photos</oggetto></intestazione>"
    b"<dati><gestore-emittente>POSTECERT S.p.A.</gestore-emittente>"
    b'<data zona="+0200"><giorno>21/09/2012</giorno><ora>15:16:38</ora></data>'
    b"<identificativo>opec275.20120921151638.12345.01.1.5@postecert.it</identificativo>"
    b'<ricevuta tipo="completa" /></dati></postacert>'
)


def test_parses_postecert_2012_layout_without_declaration() -> None:
    data = parse(POSTECERT_2012)
    assert data == CertData(
        type="posta-certificata",
        sender="mario.rossi@postecert.it",
        recipients=(Recipient("x@y.example", "esterno"),),
        reply_to="mario.rossi@postecert.it",
        subject="Photos",
        issuer="POSTECERT S.p.A.",
        time=datetime(2012, 9, 21, 13, 16, 38, tzinfo=UTC),
        identifier="opec275.20120921151638.12345.01.1.5@postecert.it",
        receipt_kind="completa",
    )
    assert format_human_time(data.time) == "21/09/2012 15:16:38 (+02:00)"


def test_parses_other_declared_encodings() -> None:
    body = POSTECERT_2012.replace(b"Photos", "Però €".encode("cp1252"))
    for enc in ("windows-1252", "cp1252"):
        doc = f'<?xml version="1.0" encoding="{enc}"?>\n'.encode() + body
        assert parse(doc).subject == "Però €"
    latin1 = b'<?xml version="1.0" encoding="ISO-8859-1"?>' + POSTECERT_2012.replace(
        b"Photos", "Però".encode("latin-1")
    )
    assert parse(latin1).subject == "Però"
    utf16 = ('<?xml version="1.0" encoding="UTF-16"?>' + POSTECERT_2012.decode()).encode("utf-16")
    assert parse(utf16).subject == "Photos"


def test_attribute_defaults_of_the_dtd_apply() -> None:
    doc = POSTECERT_2012.replace(b' errore="nessuno"', b"").replace(b' tipo="esterno"', b"")
    data = parse(doc)
    assert data.error == "nessuno"
    assert data.recipients == (Recipient("x@y.example", "certificato"),)


def test_indentation_and_comments_between_elements_are_accepted() -> None:
    doc = POSTECERT_2012.replace(b"><", b">\r\n\t  <").replace(
        b"<dati>", b"<dati><!-- generated -->"
    )
    assert parse(doc) == parse(POSTECERT_2012)


def test_text_is_not_trimmed() -> None:
    doc = POSTECERT_2012.replace(b"<oggetto>Photos", b"<oggetto>  Photos \n")
    assert parse(doc).subject == "  Photos \n"


def test_empty_oggetto_is_empty_string_not_absent() -> None:
    assert parse(POSTECERT_2012.replace(b"<oggetto>Photos</oggetto>", b"<oggetto/>")).subject == ""
    assert parse(POSTECERT_2012.replace(b"<oggetto>Photos</oggetto>", b"")).subject is None


# ------------------------------------------------------------------------------------ refusals

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE postacert [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
""" + POSTECERT_2012.replace(b"Photos", b"&lol3;")

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE postacert [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
""" + POSTECERT_2012.replace(b"Photos", b"&xxe;")


def _swap(old: bytes, new: bytes) -> bytes:
    assert old in POSTECERT_2012
    return POSTECERT_2012.replace(old, new)


def _dati_first() -> bytes:
    head, rest = POSTECERT_2012.split(b"<intestazione>")
    intestazione, dati = rest.split(b"</intestazione>")
    return head + dati.replace(b"</postacert>", b"") + (
        b"<intestazione>" + intestazione + b"</intestazione></postacert>"
    )


REFUSED = {
    "billion laughs": BILLION_LAUGHS,
    "external entity": XXE,
    "bare doctype": b"<!DOCTYPE postacert>" + POSTECERT_2012,
    "undeclared entity": _swap(b"Photos", b"&nbsp;"),
    "processing instruction": _swap(b"<dati>", b"<dati><?php echo 1 ?>"),
    "unknown element": _swap(b"<ricevuta", b"<extra/><ricevuta"),
    "unknown root": b"<postacerto/>",
    "unknown attribute": _swap(b'<ricevuta tipo="completa"', b'<ricevuta tipo="completa" x="1"'),
    "namespace declaration": _swap(b"<postacert ", b'<postacert xmlns="urn:x" '),
    "missing required tipo": _swap(b'<postacert tipo="posta-certificata"', b"<postacert"),
    "missing zona": _swap(b' zona="+0200"', b""),
    "missing ricevuta tipo": _swap(b'<ricevuta tipo="completa" />', b"<ricevuta />"),
    "tipo outside enumeration": _swap(b'"posta-certificata"', b'"posta-normale"'),
    "errore outside enumeration": _swap(b'errore="nessuno"', b'errore="none"'),
    "ricevuta tipo outside enumeration": _swap(b'"completa"', b'"Completa"'),
    "destinatari tipo outside enumeration": _swap(b'"esterno"', b'"external"'),
    "wrong order in intestazione": _swap(
        b"<risposte>mario.rossi@postecert.it</risposte><oggetto>Photos</oggetto>",
        b"<oggetto>Photos</oggetto><risposte>mario.rossi@postecert.it</risposte>",
    ),
    "wrong order in dati": _swap(
        b'<ricevuta tipo="completa" />', b'<consegna>a@b</consegna><ricevuta tipo="completa" />'
    ),
    "intestazione after dati": _dati_first(),
    "missing risposte": _swap(b"<risposte>mario.rossi@postecert.it</risposte>", b""),
    "no recipient": _swap(b'<destinatari tipo="esterno">x@y.example</destinatari>', b""),
    "repeated oggetto": _swap(b"<oggetto>Photos</oggetto>", b"<oggetto>a</oggetto>" * 2),
    "repeated ricevuta": _swap(b"<ricevuta", b'<ricevuta tipo="breve" /><ricevuta'),
    "element inside text element": _swap(b"Photos", b"<b>Photos</b>"),
    "text inside element-only content": _swap(b"<dati>", b"<dati>hello"),
    "text inside EMPTY ricevuta": _swap(
        b'<ricevuta tipo="completa" />', b'<ricevuta tipo="completa">x</ricevuta>'
    ),
    "giorno as ISO date": _swap(b"21/09/2012", b"2012-09-21"),
    "giorno without zero padding": _swap(b"21/09/2012", b"21/9/2012"),
    "giorno with non-ASCII digits": _swap(b"21/09/2012", "٢١/09/2012".encode()),
    "giorno impossible": _swap(b"21/09/2012", b"31/02/2012"),
    "giorno padded": _swap(b"21/09/2012", b" 21/09/2012"),
    "ora impossible": _swap(b"15:16:38", b"24:00:00"),
    "ora leap second": _swap(b"15:16:38", b"23:59:60"),
    "ora without seconds": _swap(b"15:16:38", b"15:16"),
    "zona with colon": _swap(b'"+0200"', b'"+02:00"'),
    "zona without sign": _swap(b'"+0200"', b'"0200"'),
    "zona minutes 60": _swap(b'"+0200"', b'"+0260"'),
    "zona a day": _swap(b'"+0200"', b'"+2400"'),
    "trailing garbage": POSTECERT_2012 + b"<postacert/>",
    "truncated": POSTECERT_2012[:-5],
    "empty": b"",
    "not XML": b"Hello",
    "control character": _swap(b"Photos", b"Pho\x01tos"),
    "control character reference": _swap(b"Photos", b"Pho&#1;tos"),
    "bad UTF-8": _swap(b"Photos", b"Pho\xfftos"),
    "unknown encoding": b'<?xml version="1.0" encoding="x-klingon"?>' + POSTECERT_2012,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_parse_refuses(case: str) -> None:
    with pytest.raises(DaticertInvalid) as info:
        parse(REFUSED[case])
    assert info.value.reason


def test_refusal_reasons_name_the_fault() -> None:
    with pytest.raises(DaticertInvalid, match="DOCTYPE"):
        parse(BILLION_LAUGHS)
    with pytest.raises(DaticertInvalid, match="giorno"):
        parse(REFUSED["giorno as ISO date"])
    with pytest.raises(DaticertInvalid, match="risposte"):
        parse(REFUSED["missing risposte"])


def test_parse_refuses_oversized_input() -> None:
    huge = _swap(b"Photos", b"x" * (4 * 1024 * 1024))
    with pytest.raises(DaticertInvalid, match="larger"):
        parse(huge)


def test_parse_takes_bytes_only() -> None:
    with pytest.raises(TypeError):
        parse(POSTECERT_2012.decode())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- construction


def _base(**changes: object) -> CertData:
    fields: dict[str, object] = {
        "type": "accettazione",
        "sender": ALICE,
        "recipients": (Recipient(BOB),),
        "reply_to": ALICE,
        "subject": "s",
        "issuer": PROV_A,
        "time": datetime(2026, 11, 3, 10, 0, 0, tzinfo=UTC),
        "identifier": "id@a",
    }
    fields.update(changes)
    return CertData(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": "bell\x07"},
        {"sender": "nul\x00"},
        {"issuer": "\ufffe"},
        {"extended_error": "\ud800"},
        {"taken_in_charge": ("ok", "esc\x1b")},
        {"recipients": ()},
        {"recipients": ("bob@b",)},
        {"time": datetime(2026, 11, 3, 10, 0, 0)},
        {"time": datetime(2026, 11, 3, tzinfo=timezone(timedelta(seconds=30)))},
        {"type": "posta"},
        {"error": "none"},
        {"receipt_kind": "lunga"},
        {"subject": b"bytes"},
    ],
)
def test_construction_refuses_what_xml_or_the_dtd_cannot_carry(changes: dict[str, object]) -> None:
    with pytest.raises(CertDataError):
        _base(**changes)


def test_recipient_refuses_bad_kind_and_control_chars() -> None:
    with pytest.raises(CertDataError):
        Recipient("a@b", "other")  # type: ignore[arg-type]
    with pytest.raises(CertDataError):
        Recipient("a\x0c@b")


def test_xml_safe_makes_text_acceptable() -> None:
    text = "a\x00b\x07c\ufffed\ud800e\tf\r\ng€"
    safe = xml_safe(text)
    assert safe == "a\ufffdb\ufffdc\ufffdd\ufffde\tf\r\ng€"
    assert parse(render(_base(subject=safe))).subject == safe


def test_lists_are_stored_as_tuples() -> None:
    data = _base(recipients=[Recipient(BOB)], taken_in_charge=[BOB])
    assert data.recipients == (Recipient(BOB),)
    assert data.taken_in_charge == (BOB,)


# --------------------------------------------------------------------------------- human time


def test_format_human_time() -> None:
    assert format_human_time(datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)) == (
        "02/01/2026 03:04:05 (+00:00)"
    )
    west = timezone(-timedelta(hours=3, minutes=30))
    assert format_human_time(datetime(999, 12, 31, 23, 0, 0, tzinfo=west)) == (
        "31/12/0999 23:00:00 (-03:30)"
    )
    summer = datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Rome"))
    assert format_human_time(summer) == "01/07/2026 12:00:00 (+02:00)"
    with pytest.raises(CertDataError):
        format_human_time(datetime(2026, 1, 1))


# -------------------------------------------------------------------------------- round trip


def _xml_char(c: str) -> bool:
    o = ord(c)
    return o in (9, 10, 13) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


texts = st.text(st.characters(codec="utf-8").filter(_xml_char), max_size=40)
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
times = st.datetimes(timezones=offsets)
recipients = st.builds(Recipient, texts, st.sampled_from(["certificato", "esterno"]))
certdata = st.builds(
    CertData,
    type=st.sampled_from([
        "accettazione", "non-accettazione", "presa-in-carico", "avvenuta-consegna",
        "posta-certificata", "errore-consegna", "preavviso-errore-consegna", "rilevazione-virus",
    ]),
    error=st.sampled_from(["nessuno", "no-dest", "no-dominio", "virus", "altro"]),
    sender=texts,
    recipients=st.lists(recipients, min_size=1, max_size=4).map(tuple),
    reply_to=texts,
    subject=st.none() | texts,
    issuer=texts,
    time=times,
    identifier=texts,
    msgid=st.none() | texts,
    receipt_kind=st.none() | st.sampled_from(["completa", "breve", "sintetica"]),
    delivered_to=st.none() | texts,
    taken_in_charge=st.lists(texts, max_size=3).map(tuple),
    extended_error=st.none() | texts,
)


@settings(max_examples=400)
@given(certdata)
def test_parse_render_round_trip(data: CertData) -> None:
    xml = render(data)
    back = parse(xml)
    assert back == data
    assert back.time.utcoffset() == data.time.utcoffset()
    assert render(back) == xml  # deterministic: the same data gives the same bytes
