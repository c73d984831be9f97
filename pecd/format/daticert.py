"""The certification data part, ``daticert.xml`` (RFC 6109 §4.4), written and read.

``render`` receives a ``CertData`` built by pecd itself and writes it deterministically (golden-file
testable). ``parse`` receives bytes from the network — a peer provider's envelope or receipt — and
trusts nothing in them: it accepts exactly the DTD of §4.4 and refuses any DOCTYPE, so entity
expansion (XXE, billion laughs) cannot happen. Per-type rules (which ``errore`` goes with which
``tipo``, when ``consegna`` is required) are not the DTD's business and are left to the callers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Literal, NoReturn, get_args
from xml.parsers import expat

MessageType = Literal[
    "accettazione",
    "non-accettazione",
    "presa-in-carico",
    "avvenuta-consegna",
    "posta-certificata",
    "errore-consegna",
    "preavviso-errore-consegna",
    "rilevazione-virus",
    # pecd's reading evidence (pecd.points.reading), beyond RFC 6109: only between providers whose
    # cards declare it
    "presa-visione",
    "mancata-presa-visione",
]
ErrorKind = Literal["nessuno", "no-dest", "no-dominio", "virus", "altro"]
RecipientKind = Literal["certificato", "esterno"]
ReceiptKind = Literal["completa", "breve", "sintetica"]

MESSAGE_TYPES: Final[tuple[str, ...]] = get_args(MessageType)
ERROR_KINDS: Final[tuple[str, ...]] = get_args(ErrorKind)
RECIPIENT_KINDS: Final[tuple[str, ...]] = get_args(RecipientKind)
RECEIPT_KINDS: Final[tuple[str, ...]] = get_args(ReceiptKind)

#: A daticert.xml lists recipients and little else; anything this large is not one.
MAX_SIZE: Final = 4 * 1024 * 1024

# XML 1.0 §2.2 Char, complemented: what may not appear in a document at all, not even escaped.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class DaticertError(ValueError):
    """Base of this module's errors."""


class DaticertInvalid(DaticertError):
    """The bytes are not a daticert.xml as RFC 6109 §4.4 defines it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CertDataError(DaticertError):
    """A ``CertData`` (or a time) that cannot be written as daticert.xml."""


@dataclass(frozen=True)
class Recipient:
    address: str
    kind: RecipientKind = "certificato"

    def __post_init__(self) -> None:
        _check_text("destinatari", self.address)
        if self.kind not in RECIPIENT_KINDS:
            raise CertDataError(f"recipient kind {self.kind!r} not in {RECIPIENT_KINDS}")


@dataclass(frozen=True, kw_only=True)
class CertData:
    """One daticert.xml. Keyword-only: a dozen string fields are too easy to swap by position.

    ``time`` is certified to the second: the sub-second part is dropped on construction so that the
    object equals what its XML says. Any aware ``tzinfo`` will do; the XML keeps only its offset.
    """

    type: MessageType
    error: ErrorKind = "nessuno"
    sender: str
    recipients: tuple[Recipient, ...]
    reply_to: str
    subject: str | None
    issuer: str
    time: datetime
    identifier: str
    msgid: str | None = None
    receipt_kind: ReceiptKind | None = None
    delivered_to: str | None = None
    taken_in_charge: tuple[str, ...] = ()
    extended_error: str | None = None

    def __post_init__(self) -> None:
        if self.type not in MESSAGE_TYPES:
            raise CertDataError(f"type {self.type!r} not in {MESSAGE_TYPES}")
        if self.error not in ERROR_KINDS:
            raise CertDataError(f"error {self.error!r} not in {ERROR_KINDS}")
        if self.receipt_kind is not None and self.receipt_kind not in RECEIPT_KINDS:
            raise CertDataError(f"receipt kind {self.receipt_kind!r} not in {RECEIPT_KINDS}")
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "taken_in_charge", tuple(self.taken_in_charge))
        if not self.recipients:
            raise CertDataError("at least one recipient is required (destinatari+)")
        for r in self.recipients:
            if not isinstance(r, Recipient):
                raise CertDataError(f"recipients must be Recipient, not {type(r).__name__}")
        for name, value in (
            ("mittente", self.sender),
            ("risposte", self.reply_to),
            ("oggetto", self.subject),
            ("gestore-emittente", self.issuer),
            ("identificativo", self.identifier),
            ("msgid", self.msgid),
            ("consegna", self.delivered_to),
            ("errore-esteso", self.extended_error),
            *(("ricezione", a) for a in self.taken_in_charge),
        ):
            if value is not None:
                _check_text(name, value)
        _zone(self.time)  # aware, whole minutes, within a day
        object.__setattr__(self, "time", self.time.replace(microsecond=0))


def xml_safe(text: str) -> str:
    """``text`` with every character XML 1.0 cannot carry replaced by U+FFFD.

    ``CertData`` refuses such characters rather than silently altering certified data; a caller
    that takes a Subject from the wire and prefers a lossy copy to a refusal uses this first.
    """
    return _NOT_XML_CHAR.sub("\ufffd", text)


def format_human_time(t: datetime) -> str:
    """``dd/mm/yyyy hh:mm:ss (+hh:mm)`` in ``t``'s own offset (RFC 6109 §4.2)."""
    zone = _zone(t)
    return (
        f"{t.day:02d}/{t.month:02d}/{t.year:04d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f" ({zone[0]}{zone[1:3]}:{zone[3:5]})"
    )


# --------------------------------------------------------------------------------------- render


def render(data: CertData) -> bytes:
    """UTF-8 daticert.xml, two-space indented, LF line ends, elements in DTD order.

    Text is escaped (``& < > " '``) and CR is written as ``&#13;`` because a parser would otherwise
    turn it into LF; non-ASCII stays UTF-8. Every ``CertData`` renders: its constructor already
    refused what XML cannot carry.
    """
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<postacert tipo="{data.type}" errore="{data.error}">',
        "  <intestazione>",
        _leaf(2, "mittente", data.sender),
    ]
    lines += [
        _leaf(2, "destinatari", r.address, f' tipo="{r.kind}"') for r in data.recipients
    ]
    lines.append(_leaf(2, "risposte", data.reply_to))
    if data.subject is not None:
        lines.append(_leaf(2, "oggetto", data.subject))
    t = data.time
    lines += [
        "  </intestazione>",
        "  <dati>",
        _leaf(2, "gestore-emittente", data.issuer),
        f'    <data zona="{_zone(t)}">',
        f"      <giorno>{t.day:02d}/{t.month:02d}/{t.year:04d}</giorno>",
        f"      <ora>{t.hour:02d}:{t.minute:02d}:{t.second:02d}</ora>",
        "    </data>",
        _leaf(2, "identificativo", data.identifier),
    ]
    if data.msgid is not None:
        lines.append(_leaf(2, "msgid", data.msgid))
    if data.receipt_kind is not None:
        lines.append(f'    <ricevuta tipo="{data.receipt_kind}" />')
    if data.delivered_to is not None:
        lines.append(_leaf(2, "consegna", data.delivered_to))
    lines += [_leaf(2, "ricezione", a) for a in data.taken_in_charge]
    if data.extended_error is not None:
        lines.append(_leaf(2, "errore-esteso", data.extended_error))
    lines += ["  </dati>", "</postacert>", ""]
    return "\n".join(lines).encode("utf-8")


_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;", "\r": "&#13;"}
)


def _leaf(depth: int, tag: str, text: str, attrs: str = "") -> str:
    return f"{'  ' * depth}<{tag}{attrs}>{text.translate(_ESCAPES)}</{tag}>"


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise CertDataError(f"{name} must be str, not {type(value).__name__}")
    bad = _NOT_XML_CHAR.search(value)
    if bad:
        raise CertDataError(
            f"{name} contains U+{ord(bad.group()):04X}, which XML 1.0 cannot carry"
            " (see xml_safe)"
        )


def _zone(t: datetime) -> str:
    """The ``zona`` attribute, ``[+|-]hhmm``, of an aware datetime."""
    offset = t.utcoffset()
    if offset is None:
        raise CertDataError("time must be timezone-aware")
    minutes, rest = divmod(offset, timedelta(minutes=1))
    if rest:
        raise CertDataError(f"UTC offset {offset} is not a whole number of minutes")
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{mins:02d}"


# ---------------------------------------------------------------------------------------- parse

# The DTD of §4.4 as data: element -> its attributes (name -> allowed values, or None for CDATA;
# value: required?) and content model (a sequence of (child, min, max); "#PCDATA"; or "EMPTY").
_Content = tuple[tuple[str, int, int | None], ...] | Literal["#PCDATA", "EMPTY"]
_Attrs = dict[str, tuple[tuple[str, ...] | None, bool]]

_DTD: Final[dict[str, tuple[_Attrs, _Content]]] = {
    "postacert": (
        {"tipo": (MESSAGE_TYPES, True), "errore": (ERROR_KINDS, False)},
        (("intestazione", 1, 1), ("dati", 1, 1)),
    ),
    "intestazione": (
        {},
        (("mittente", 1, 1), ("destinatari", 1, None), ("risposte", 1, 1), ("oggetto", 0, 1)),
    ),
    "mittente": ({}, "#PCDATA"),
    "destinatari": ({"tipo": (RECIPIENT_KINDS, False)}, "#PCDATA"),
    "risposte": ({}, "#PCDATA"),
    "oggetto": ({}, "#PCDATA"),
    "dati": (
        {},
        (
            ("gestore-emittente", 1, 1),
            ("data", 1, 1),
            ("identificativo", 1, 1),
            ("msgid", 0, 1),
            ("ricevuta", 0, 1),
            ("consegna", 0, 1),
            ("ricezione", 0, None),
            ("errore-esteso", 0, 1),
        ),
    ),
    "gestore-emittente": ({}, "#PCDATA"),
    "data": ({"zona": (None, True)}, (("giorno", 1, 1), ("ora", 1, 1))),
    "giorno": ({}, "#PCDATA"),
    "ora": ({}, "#PCDATA"),
    "identificativo": ({}, "#PCDATA"),
    "msgid": ({}, "#PCDATA"),
    "ricevuta": ({"tipo": (RECEIPT_KINDS, True)}, "EMPTY"),
    "consegna": ({}, "#PCDATA"),
    "ricezione": ({}, "#PCDATA"),
    "errore-esteso": ({}, "#PCDATA"),
}

_XML_SPACE = " \t\r\n"
_GIORNO = re.compile(r"([0-9]{2})/([0-9]{2})/([0-9]{4})")
_ORA = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})")
_ZONA = re.compile(r"([+-])([0-9]{2})([0-5][0-9])")


@dataclass
class _Node:
    tag: str
    attrs: dict[str, str]
    children: list[_Node]
    text: list[str]


def parse(xml: bytes) -> CertData:
    """Read a daticert.xml, strictly: DTD order, DTD enumerations, DTD date formats.

    Accepts what real providers send and the DTD allows: any encoding expat knows (declared, or
    UTF-8 by default, or a UTF-16 BOM), no XML declaration, indentation between elements,
    comments, the attribute defaults (``errore="nessuno"``, ``destinatari tipo="certificato"``).
    Refuses a DOCTYPE outright, processing instructions, namespaces, unknown elements/attributes.
    Raises ``DaticertInvalid``.
    """
    if not isinstance(xml, bytes | bytearray | memoryview):
        raise TypeError("parse() takes bytes; the encoding is the document's business")
    if len(xml) > MAX_SIZE:
        raise DaticertInvalid(f"document larger than {MAX_SIZE} bytes")
    root = _build_tree(bytes(xml))
    try:
        return _to_certdata(root)
    except CertDataError as exc:  # a value the DTD allows but a CertData cannot hold
        raise DaticertInvalid(str(exc)) from exc


def _build_tree(xml: bytes) -> _Node:
    parser = expat.ParserCreate()
    parser.buffer_text = True
    # No DTD means no entity declarations: only the five predefined entities and character
    # references can be expanded, so nothing can expand to something large or external.
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Node] = []
    roots: list[_Node] = []

    def refuse(what: str) -> NoReturn:
        raise DaticertInvalid(f"{what} not allowed in daticert.xml")

    def start(tag: str, attrs: dict[str, str]) -> None:
        if tag not in _DTD:
            raise DaticertInvalid(f"unknown element <{tag}>")
        if stack:  # refuse misplaced elements early, before building a deep tree
            model = _DTD[stack[-1].tag][1]
            if isinstance(model, str) or tag not in (c for c, _, _ in model):
                raise DaticertInvalid(f"<{tag}> not allowed inside <{stack[-1].tag}>")
        elif tag != "postacert":
            raise DaticertInvalid(f"root element must be <postacert>, not <{tag}>")
        allowed = _DTD[tag][0]
        for name, value in attrs.items():
            if name not in allowed:
                raise DaticertInvalid(f"unknown attribute {name!r} on <{tag}>")
            values = allowed[name][0]
            if values is not None and value not in values:
                raise DaticertInvalid(f"<{tag} {name}={value!r}>: not one of {values}")
        for name, (_, required) in allowed.items():
            if required and name not in attrs:
                raise DaticertInvalid(f"<{tag}> lacks required attribute {name!r}")
        node = _Node(tag, attrs, [], [])
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def end(tag: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text.append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = lambda *_: refuse("DOCTYPE")
    parser.EntityDeclHandler = lambda *_: refuse("entity declaration")
    parser.ExternalEntityRefHandler = lambda *_: refuse("external entity")
    parser.ProcessingInstructionHandler = lambda *_: refuse("processing instruction")
    try:
        parser.Parse(xml, True)
    except DaticertInvalid:
        raise
    except expat.ExpatError as exc:
        raise DaticertInvalid(f"not well-formed XML: {exc}") from exc
    except (LookupError, ValueError) as exc:  # an encoding Python or expat cannot decode
        raise DaticertInvalid(f"unreadable encoding: {exc}") from exc
    if len(roots) != 1 or roots[0].tag != "postacert":
        raise DaticertInvalid("root element must be <postacert>")
    _check_content(roots[0])
    return roots[0]


def _check_content(node: _Node) -> None:
    """Validate ``node`` and its subtree against the content models of ``_DTD``."""
    model = _DTD[node.tag][1]
    text = "".join(node.text)
    if model == "EMPTY":
        if node.children or text:
            raise DaticertInvalid(f"<{node.tag}> must be empty")
        return
    if model == "#PCDATA":
        if node.children:
            raise DaticertInvalid(f"<{node.tag}> holds text only, found <{node.children[0].tag}>")
        return
    if text.strip(_XML_SPACE):
        raise DaticertInvalid(f"<{node.tag}> holds elements only, found text {text.strip()!r}")
    tags = [c.tag for c in node.children]
    i = 0
    for tag, least, most in model:
        n = 0
        while i < len(tags) and tags[i] == tag and (most is None or n < most):
            i, n = i + 1, n + 1
        if n < least:
            found = f"<{tags[i]}>" if i < len(tags) else "the end"
            raise DaticertInvalid(f"<{node.tag}>: expected <{tag}>, found {found}")
    if i < len(tags):
        raise DaticertInvalid(f"<{node.tag}>: <{tags[i]}> out of order or repeated")
    for child in node.children:
        _check_content(child)


def _to_certdata(root: _Node) -> CertData:
    head, dati = root.children

    def texts(parent: _Node, tag: str) -> list[str]:
        return ["".join(c.text) for c in parent.children if c.tag == tag]

    def optional(parent: _Node, tag: str) -> str | None:
        found = texts(parent, tag)
        return found[0] if found else None

    data_node = next(c for c in dati.children if c.tag == "data")
    ricevuta = [c for c in dati.children if c.tag == "ricevuta"]
    return CertData(
        type=root.attrs["tipo"],  # type: ignore[arg-type]  # checked against _DTD
        error=root.attrs.get("errore", "nessuno"),  # type: ignore[arg-type]
        sender=texts(head, "mittente")[0],
        recipients=tuple(
            Recipient(
                "".join(c.text),
                c.attrs.get("tipo", "certificato"),  # type: ignore[arg-type]
            )
            for c in head.children
            if c.tag == "destinatari"
        ),
        reply_to=texts(head, "risposte")[0],
        subject=optional(head, "oggetto"),
        issuer=texts(dati, "gestore-emittente")[0],
        time=_parse_time(
            data_node.attrs["zona"], texts(data_node, "giorno")[0], texts(data_node, "ora")[0]
        ),
        identifier=texts(dati, "identificativo")[0],
        msgid=optional(dati, "msgid"),
        receipt_kind=ricevuta[0].attrs["tipo"] if ricevuta else None,  # type: ignore[arg-type]
        delivered_to=optional(dati, "consegna"),
        taken_in_charge=tuple(texts(dati, "ricezione")),
        extended_error=optional(dati, "errore-esteso"),
    )


def _parse_time(zona: str, giorno: str, ora: str) -> datetime:
    z = _ZONA.fullmatch(zona)
    d = _GIORNO.fullmatch(giorno)
    t = _ORA.fullmatch(ora)
    if not z:
        raise DaticertInvalid(f"zona {zona!r} is not [+|-]hhmm")
    if not d:
        raise DaticertInvalid(f"giorno {giorno!r} is not dd/mm/yyyy")
    if not t:
        raise DaticertInvalid(f"ora {ora!r} is not hh:mm:ss")
    sign = -1 if z[1] == "-" else 1
    offset = sign * timedelta(hours=int(z[2]), minutes=int(z[3]))
    try:
        tz = timezone(offset)
        return datetime(
            int(d[3]), int(d[2]), int(d[1]), int(t[1]), int(t[2]), int(t[3]), tzinfo=tz
        )
    except ValueError as exc:  # 31/02, 24:00:00, a leap second, zona +2400
        raise DaticertInvalid(f"no such time: {giorno} {ora} {zona} ({exc})") from exc
