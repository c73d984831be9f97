"""The hash-chained ledger, on a real SQLite file: appends, refusals, tampering, checkpoints."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pecd.store import ledger
from pecd.store.ledger import (
    GENESIS,
    LedgerEvent,
    LedgerInvalid,
    LedgerUsageError,
    append,
    append_many,
    checkpoint,
    events_for,
    export_rows,
    install,
    row_hash,
    verify,
)

SQLITE3 = "/usr/bin/sqlite3"
T0 = datetime(2026, 11, 3, 9, 0, 0, tzinfo=UTC)
TSA_KEY = b"test tsa key"


def connect(path: Path) -> sqlite3.Connection:
    """As pecd.store.db opens it: autocommit mode, explicit transactions, WAL, Row factory."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "pecd.sqlite3"
    conn = connect(path)
    install(conn)
    yield path, conn
    conn.close()


def event(i: int) -> LedgerEvent:
    return LedgerEvent(
        event="accepted",
        msgid=f"pec-{i}@pec.a.test",
        ref_msgid=f"<orig-{i}@mua>",
        sender="alice@pec.a.test",
        recipients=("bob@pec.b.test", "carol@pec.c.test"),
        subject=f"Oggetto n° {i} — €",
        provider="Provider A",
        related=(f"rcpt-{i}@pec.a.test",),
        detail={"size": 1000 + i, "peer": "127.0.0.1", "z": [1, 2.5, None, True]},
    )


def fill(conn: sqlite3.Connection, n: int, start: int = 1) -> list[int]:
    conn.execute("BEGIN IMMEDIATE")
    seqs = [append(conn, event(i), T0 + timedelta(seconds=i)) for i in range(start, start + n)]
    conn.execute("COMMIT")
    return seqs


def shell(path: Path, sql: str) -> None:
    """Tamper as an operator with the sqlite3 command-line shell would."""
    subprocess.run([SQLITE3, str(path), sql], check=True, capture_output=True, timeout=30)


def stamp(digest: bytes) -> bytes:
    """A stand-in TSA: an HMAC over the head hash (the real one is an RFC 3161 responder)."""
    return hmac.new(TSA_KEY, digest, hashlib.sha256).digest()


def check_stamp(token: bytes, digest: bytes) -> None:
    if not hmac.compare_digest(token, stamp(digest)):
        raise ValueError("token does not match")


# --------------------------------------------------------------------------------- happy path


def test_chain_verifies_after_many_appends(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    assert verify(conn) == ledger.LedgerReport(True, 0, 0, None, None)
    seqs: list[int] = []
    for batch in range(10):
        seqs += fill(conn, 50, start=batch * 50 + 1)
    assert seqs == list(range(1, 501))
    report = verify(conn)
    assert report.ok and report.rows == 500 and report.first_bad_seq is None


def test_first_row_chains_on_genesis_and_rows_chain_on_each_other(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    _, conn = db
    fill(conn, 3)
    rows = list(export_rows(conn, None, None))
    assert rows[0]["prev_hash"] == GENESIS
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert rows[2]["prev_hash"] == rows[1]["hash"]
    for r in rows:  # an export can be checked with row_hash alone
        assert row_hash(str(r["prev_hash"]), r) == r["hash"]


def test_row_hash_known_answer() -> None:
    """Pins the canonical form: if this changes, every existing ledger stops verifying."""
    row = {
        "seq": 1,
        "at": "2026-11-03T09:00:00.000001Z",
        "event": "accepted",
        "msgid": "m@a",
        "ref_msgid": None,
        "sender": "àlice@a",
        "recipients": ["b@b", "a@a"],
        "subject": 'x "y"',
        "provider": None,
        "related": [],
        "detail": {"z": 1, "a": {"d": 2.5, "c": None}},
    }
    canonical = (
        '{"at":"2026-11-03T09:00:00.000001Z","detail":{"a":{"c":null,"d":2.5},"z":1},'
        '"event":"accepted","msgid":"m@a","provider":null,"recipients":["b@b","a@a"],'
        '"ref_msgid":null,"related":[],"sender":"àlice@a","seq":1,"subject":"x \\"y\\""}'
    )
    expected = hashlib.sha256(GENESIS.encode() + canonical.encode("utf-8")).hexdigest()
    assert row_hash(GENESIS, row) == expected
    assert row_hash(GENESIS, {**row, "hash": "ignored", "prev_hash": "ignored"}) == expected
    with pytest.raises(LedgerInvalid):
        row_hash("not hex", row)
    with pytest.raises(LedgerInvalid):
        row_hash(GENESIS, {k: v for k, v in row.items() if k != "detail"})


def test_stored_row_matches_what_was_appended(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    at = datetime(2026, 11, 3, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    conn.execute("BEGIN IMMEDIATE")
    seq = append(conn, event(7), at)
    conn.execute("COMMIT")
    (row,) = events_for(conn, "pec-7@pec.a.test")
    assert row["seq"] == seq == 1
    assert row["at"] == "2026-11-03T09:00:00.123456Z"
    assert row["recipients"] == ["bob@pec.b.test", "carol@pec.c.test"]
    assert row["subject"] == "Oggetto n° 7 — €"
    assert row["detail"] == {"size": 1007, "peer": "127.0.0.1", "z": [1, 2.5, None, True]}
    raw = conn.execute("SELECT detail, recipients FROM ledger WHERE seq = 1").fetchone()
    assert raw[0] == '{"peer":"127.0.0.1","size":1007,"z":[1,2.5,null,true]}'
    assert raw[1] == '["bob@pec.b.test","carol@pec.c.test"]'


def test_install_is_idempotent(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 2)
    install(conn)
    conn.execute("BEGIN IMMEDIATE")
    install(conn)  # inside a caller's transaction too
    conn.execute("COMMIT")
    assert verify(conn).rows == 2


def test_append_rolls_back_with_the_callers_transaction(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    _, conn = db
    fill(conn, 2)
    conn.execute("BEGIN IMMEDIATE")
    append(conn, event(3), T0)
    conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("SAVEPOINT job")
    append(conn, event(4), T0)
    conn.execute("ROLLBACK TO job")
    conn.execute("RELEASE job")
    assert append(conn, event(5), T0) == 3  # the head is read afresh, not cached
    conn.execute("COMMIT")
    assert verify(conn) == ledger.LedgerReport(True, 3, 0, None, None)
    assert events_for(conn, "pec-3@pec.a.test") == []


def test_two_connections_interleave(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    other = connect(path)
    try:
        for i in range(1, 21):
            c = conn if i % 2 else other
            c.execute("BEGIN IMMEDIATE")
            assert append(c, event(i), T0) == i
            c.execute("COMMIT")
    finally:
        other.close()
    assert verify(conn).rows == 20


def test_append_many(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 1)
    conn.execute("BEGIN IMMEDIATE")
    assert append_many(conn, [(event(i), T0) for i in range(2, 6)]) == [2, 3, 4, 5]
    assert append_many(conn, []) == []
    conn.execute("COMMIT")
    assert verify(conn).rows == 5


def test_append_outside_a_transaction_is_refused(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    with pytest.raises(LedgerUsageError):
        append(conn, event(1), T0)
    assert conn.execute("SELECT count(*) FROM ledger").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: LedgerEvent(event=""), LedgerInvalid),
        (lambda: LedgerEvent(event="Accepted"), LedgerInvalid),
        (lambda: LedgerEvent(event="taken in charge"), LedgerInvalid),
        (lambda: LedgerEvent(event="-x"), LedgerInvalid),
        (lambda: LedgerEvent(event="x", msgid=1), LedgerInvalid),  # type: ignore[arg-type]
        (lambda: LedgerEvent(event="x", recipients=("a", 2)), LedgerInvalid),  # type: ignore[arg-type]
    ],
)
def test_bad_events_are_refused(make: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("ev", "at"),
    [
        (LedgerEvent(event="x", detail={"f": float("nan")}), T0),
        (LedgerEvent(event="x", detail={"f": object()}), T0),
        (LedgerEvent(event="x", detail={1: "a", "b": 2}), T0),  # type: ignore[dict-item]
        (LedgerEvent(event="x", subject="lone \udcff surrogate"), T0),
        (LedgerEvent(event="x"), datetime(2026, 11, 3)),
    ],
)
def test_unloggable_values_are_refused_and_nothing_is_written(
    db: tuple[Path, sqlite3.Connection], ev: LedgerEvent, at: datetime
) -> None:
    _, conn = db
    conn.execute("BEGIN IMMEDIATE")
    with pytest.raises(LedgerInvalid):
        append(conn, ev, at)
    conn.execute("COMMIT")
    assert conn.execute("SELECT count(*) FROM ledger").fetchone()[0] == 0


def test_event_detail_is_copied(db: tuple[Path, sqlite3.Connection]) -> None:
    detail: dict[str, object] = {"reason": "first"}
    ev = LedgerEvent(event="refused", detail=detail)
    detail["reason"] = "changed later"
    assert ev.detail == {"reason": "first"}


# ---------------------------------------------------------------------------------- refusals


def test_update_and_delete_are_refused(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 3)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE ledger SET subject = 'x' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM ledger WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM ledger")
    assert verify(conn).rows == 3


def test_insert_or_replace_from_a_second_connection_is_refused(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    path, conn = db
    fill(conn, 5)
    before = [dict(r) for r in export_rows(conn, None, None)]
    other = sqlite3.connect(path, isolation_level=None)
    try:
        assert other.execute("PRAGMA recursive_triggers").fetchone()[0] == 0
        row3 = before[2]
        forged = {**row3, "subject": "forged", "recipients": "[]", "related": "[]",
                  "detail": "{}"}
        cols = ", ".join(forged)
        marks = ", ".join("?" * len(forged))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute(f"INSERT OR REPLACE INTO ledger ({cols}) VALUES ({marks})",
                          list(forged.values()))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute(f"REPLACE INTO ledger ({cols}) VALUES ({marks})", list(forged.values()))
        # Nor a new row that does not chain onto the head, nor one that skips a seq.
        for seq, prev in ((6, GENESIS), (7, str(before[-1]["hash"])), (None, before[-1]["hash"])):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                other.execute(f"INSERT INTO ledger ({cols}) VALUES ({marks})",
                              list({**forged, "seq": seq, "prev_hash": prev}.values()))
    finally:
        other.close()
    assert [dict(r) for r in export_rows(conn, None, None)] == before
    assert verify(conn).ok


# --------------------------------------------------------------------------------- tampering


def test_row_edited_with_the_sqlite3_shell_is_named(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 6)
    shell(path, "DROP TRIGGER ledger_no_update; UPDATE ledger SET subject='x' WHERE seq=3;")
    report = verify(conn)
    assert not report.ok
    assert report.first_bad_seq == 3
    assert report.rows == 2
    assert report.reason is not None and "hash" in report.reason


def test_edited_hash_is_named(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 6)
    shell(path, f"DROP TRIGGER ledger_no_update; UPDATE ledger SET hash='{'a' * 64}' WHERE seq=4;")
    assert verify(conn).first_bad_seq == 4


def test_rehashed_row_breaks_the_next_link(db: tuple[Path, sqlite3.Connection]) -> None:
    """Editing row 4 and fixing its own hash still leaves row 5 pointing at the old one."""
    path, conn = db
    fill(conn, 6)
    row = next(r for r in export_rows(conn, None, None) if r["seq"] == 4)
    new_hash = row_hash(str(row["prev_hash"]), {**row, "subject": "x"})
    shell(path, "DROP TRIGGER ledger_no_update;"
                f" UPDATE ledger SET subject='x', hash='{new_hash}' WHERE seq=4;")
    report = verify(conn)
    assert report.first_bad_seq == 5
    assert report.reason is not None and "prev_hash" in report.reason


def test_reformatted_json_column_is_named(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 3)
    shell(path, "DROP TRIGGER ledger_no_update;"
                " UPDATE ledger SET detail=json_insert(detail, '$.x', 1) WHERE seq=2;")
    assert verify(conn).first_bad_seq == 2
    shell(path, "UPDATE ledger SET detail=json_remove(detail, '$.x') WHERE seq=2;")
    assert verify(conn).ok  # back to the original content
    shell(path, "UPDATE ledger SET recipients=replace(recipients, ',', ', ') WHERE seq=2;")
    report = verify(conn)
    assert report.first_bad_seq == 2 and "canonical" in str(report.reason)


def test_deleted_middle_row_is_detected(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 8)
    shell(path, "DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq=5;")
    report = verify(conn)
    assert not report.ok
    assert report.first_bad_seq == 5
    assert report.rows == 4
    assert "missing" in str(report.reason)


def test_deleted_and_renumbered_rows_are_detected(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 8)
    shell(path, "DROP TRIGGER ledger_no_delete; DROP TRIGGER ledger_no_update;"
                " DELETE FROM ledger WHERE seq=5; UPDATE ledger SET seq=seq-1 WHERE seq>5;")
    assert verify(conn).first_bad_seq == 5


def test_reordered_rows_are_detected(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 6)
    shell(path, "DROP TRIGGER ledger_no_update;"
                " UPDATE ledger SET seq=-1 WHERE seq=3; UPDATE ledger SET seq=3 WHERE seq=4;"
                " UPDATE ledger SET seq=4 WHERE seq=-1;")
    assert verify(conn).first_bad_seq == 3


def test_tail_truncation_is_caught_by_a_checkpoint(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 10)
    assert checkpoint(conn, T0, stamp) == 1
    shell(path, "DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq>=9;")
    report = verify(conn, check_stamp)
    assert not report.ok
    assert report.first_bad_seq == 9
    assert report.bad_checkpoint == 1


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoints_cover_new_rows_only(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    assert checkpoint(conn, T0, stamp) is None  # empty ledger
    fill(conn, 5)
    assert checkpoint(conn, T0, stamp) == 1
    assert checkpoint(conn, T0, stamp) is None  # nothing new
    fill(conn, 3, start=6)
    assert checkpoint(conn, T0 + timedelta(hours=1), stamp) == 2
    rows = conn.execute(
        "SELECT id, seq_from, seq_to, head_hash, at, token FROM ledger_checkpoint ORDER BY id"
    ).fetchall()
    heads = {r["seq"]: r["hash"] for r in export_rows(conn, None, None)}
    assert [tuple(r)[:4] for r in rows] == [(1, 1, 5, heads[5]), (2, 6, 8, heads[8])]
    assert rows[1]["at"] == "2026-11-03T10:00:00.000000Z"
    assert rows[1]["token"] == stamp(bytes.fromhex(str(heads[8])))
    report = verify(conn, check_stamp)
    assert report == ledger.LedgerReport(True, 8, 2, None, None)


def test_checkpoint_inside_the_callers_transaction(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    conn.execute("BEGIN IMMEDIATE")
    append(conn, event(1), T0)
    assert checkpoint(conn, T0, stamp) == 1
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM ledger_checkpoint").fetchone()[0] == 0


def test_failing_timestamper_writes_nothing(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 2)

    def down(_: bytes) -> bytes:
        raise ConnectionError("TSA unreachable")

    with pytest.raises(ConnectionError):
        checkpoint(conn, T0, down)
    assert not conn.in_transaction
    assert checkpoint(conn, T0, stamp) == 1


def test_checkpoints_are_append_only(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 4)
    checkpoint(conn, T0, stamp)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE ledger_checkpoint SET head_hash = ?", (GENESIS,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM ledger_checkpoint")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="ledger_checkpoint"):
            other.execute(
                "INSERT OR REPLACE INTO ledger_checkpoint VALUES (1, 1, 4, ?, 'x', x'00')",
                (GENESIS,),
            )
        with pytest.raises(sqlite3.IntegrityError, match="ledger_checkpoint"):
            other.execute(
                "INSERT INTO ledger_checkpoint VALUES (2, 5, 4, ?, 'x', x'00')", (GENESIS,)
            )
    finally:
        other.close()
    assert verify(conn, check_stamp).ok


def test_checkpoint_with_a_forged_head_is_detected(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    fill(conn, 6)
    checkpoint(conn, T0, stamp)
    fill(conn, 4, start=7)
    forged = "f" * 64
    token = stamp(bytes.fromhex(forged)).hex()  # even with a token that matches the forgery
    shell(path, "DROP TRIGGER ledger_checkpoint_extends; INSERT INTO ledger_checkpoint"
                f" VALUES (2, 7, 10, '{forged}', '2026-11-03T10:00:00.000000Z', x'{token}');")
    for verifier in (None, check_stamp):
        report = verify(conn, verifier)
        assert not report.ok
        assert report.bad_checkpoint == 2
        assert report.first_bad_seq == 7
        assert report.rows == 10 and report.checkpoints == 1
        assert "head hash" in str(report.reason)


def test_full_rewrite_is_caught_by_the_token(db: tuple[Path, sqlite3.Connection]) -> None:
    """Rewrite a row, re-hash the whole tail and the checkpoint: only the token can tell."""
    path, conn = db
    fill(conn, 5)
    checkpoint(conn, T0, stamp)
    rows = list(export_rows(conn, None, None))
    rows[1]["subject"] = "rewritten"
    prev = GENESIS
    sql = ["DROP TRIGGER ledger_no_update; DROP TRIGGER ledger_checkpoint_no_update;"]
    for r in rows:
        r["prev_hash"], r["hash"] = prev, row_hash(prev, r)
        prev = str(r["hash"])
        sql.append(f"UPDATE ledger SET subject='{r['subject']}', prev_hash='{r['prev_hash']}',"
                   f" hash='{r['hash']}' WHERE seq={r['seq']};")
    sql.append(f"UPDATE ledger_checkpoint SET head_hash='{prev}' WHERE id=1;")
    shell(path, " ".join(sql))
    assert verify(conn).ok  # the chain alone is consistent again
    report = verify(conn, check_stamp)
    assert not report.ok
    assert report.bad_checkpoint == 1 and report.first_bad_seq == 1
    assert "token" in str(report.reason)


def test_raising_token_verifier_fails_verification(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 3)
    checkpoint(conn, T0, stamp)
    seen: list[tuple[bytes, bytes]] = []

    def refuse(token: bytes, digest: bytes) -> None:
        seen.append((token, digest))
        raise RuntimeError("TSA certificate revoked")

    report = verify(conn, refuse)
    assert not report.ok and report.bad_checkpoint == 1
    assert "TSA certificate revoked" in str(report.reason)
    head = conn.execute("SELECT hash FROM ledger WHERE seq = 3").fetchone()[0]
    assert seen == [(stamp(bytes.fromhex(head)), bytes.fromhex(head))]
    assert verify(conn, check_stamp).ok


def test_deleted_checkpoint_is_detected(db: tuple[Path, sqlite3.Connection]) -> None:
    path, conn = db
    for i in range(3):
        fill(conn, 2, start=2 * i + 1)
        checkpoint(conn, T0, stamp)
    shell(path, "DROP TRIGGER ledger_checkpoint_no_delete;"
                " DELETE FROM ledger_checkpoint WHERE id=2;")
    report = verify(conn, check_stamp)
    assert not report.ok and report.bad_checkpoint == 3


# ------------------------------------------------------------------------------------ queries


def test_events_for_finds_by_msgid_ref_msgid_and_related(
    db: tuple[Path, sqlite3.Connection],
) -> None:
    _, conn = db
    conn.execute("BEGIN IMMEDIATE")
    append(conn, LedgerEvent(event="submitted", ref_msgid="<orig@mua>"), T0)
    append(conn, LedgerEvent(event="accepted", msgid="pec1@a", ref_msgid="<orig@mua>",
                             related=("acc1@a", "acc1@a")), T0)
    append(conn, LedgerEvent(event="relayed", msgid="other@a"), T0)
    append(conn, LedgerEvent(event="delivered", msgid="pec1@a", related=("cons1@b",)), T0)
    append(conn, LedgerEvent(event="receipt-sent", msgid="cons1@b"), T0)
    conn.execute("COMMIT")
    assert [r["seq"] for r in events_for(conn, "<orig@mua>")] == [1, 2]
    assert [r["seq"] for r in events_for(conn, "pec1@a")] == [2, 4]
    assert [r["seq"] for r in events_for(conn, "acc1@a")] == [2]
    assert [r["seq"] for r in events_for(conn, "cons1@b")] == [4, 5]
    assert events_for(conn, "nothing@x") == []
    with pytest.raises(sqlite3.IntegrityError):  # the index of related ids is append-only too
        conn.execute("INSERT INTO ledger_related VALUES ('forged@x', 3)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM ledger_related")


def test_export_rows_by_time_and_as_json_lines(db: tuple[Path, sqlite3.Connection]) -> None:
    _, conn = db
    fill(conn, 10)  # at = T0 + i seconds
    rows = list(export_rows(conn, T0 + timedelta(seconds=3), T0 + timedelta(seconds=7)))
    assert [r["seq"] for r in rows] == [3, 4, 5, 6]
    rome = timezone(timedelta(hours=1))
    assert [r["seq"] for r in export_rows(conn, (T0 + timedelta(seconds=9)).astimezone(rome),
                                          None)] == [9, 10]
    assert [r["seq"] for r in export_rows(conn, None, T0 + timedelta(seconds=2))] == [1]
    for r in rows:
        line = json.dumps(r, ensure_ascii=False)
        back = json.loads(line)
        assert row_hash(back["prev_hash"], back) == back["hash"]
    with pytest.raises(LedgerInvalid):
        list(export_rows(conn, datetime(2026, 1, 1), None))


# ------------------------------------------------------------------------------- properties

strings = st.text(st.characters(codec="utf-8"), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8,
)
events = st.builds(
    LedgerEvent,
    event=st.from_regex(r"[a-z]+(-[a-z]+)?", fullmatch=True),
    msgid=st.none() | strings,
    ref_msgid=st.none() | strings,
    sender=st.none() | strings,
    recipients=st.lists(strings, max_size=3).map(tuple),
    subject=st.none() | strings,
    provider=st.none() | strings,
    related=st.lists(strings, max_size=3).map(tuple),
    detail=st.dictionaries(strings, json_values, max_size=4),
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(events, st.datetimes(timezones=st.just(UTC))), min_size=1, max_size=5))
def test_any_events_append_verify_and_read_back(
    db: tuple[Path, sqlite3.Connection], batch: list[tuple[LedgerEvent, datetime]]
) -> None:
    _, conn = db
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
        seqs = append_many(conn, batch)
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:  # keep the shared connection usable for the next example
            conn.execute("ROLLBACK")
    assert seqs == list(range(start + 1, start + len(batch) + 1))
    assert verify(conn).ok
    rows = {r["seq"]: r for r in export_rows(conn, None, None)}
    for seq, (ev, _) in zip(seqs, batch, strict=True):
        r = rows[seq]
        assert (r["event"], r["msgid"], r["subject"], r["sender"]) == (
            ev.event, ev.msgid, ev.subject, ev.sender)
        assert r["recipients"] == list(ev.recipients)
        assert r["detail"] == json.loads(json.dumps(ev.detail))
        if ev.msgid is not None:
            assert seq in [x["seq"] for x in events_for(conn, ev.msgid)]
        for rel in ev.related:
            assert seq in [x["seq"] for x in events_for(conn, rel)]


def test_ids_sqlite_json_would_mangle_still_work(db: tuple[Path, sqlite3.Connection]) -> None:
    """SQLite's JSON functions stop at NUL; ids with NUL, quotes, escapes must still log."""
    _, conn = db
    odd = ("a\x00b", "\x00", 'q"uote', "back\\slash", "\u2028\x7f\x1b", "12", "")
    conn.execute("BEGIN IMMEDIATE")
    seq = append(conn, LedgerEvent(event="receipt-sent", msgid="m\x00", related=odd), T0)
    conn.execute("COMMIT")
    assert verify(conn).ok
    for rel in odd:
        assert [r["seq"] for r in events_for(conn, rel)] == [seq]
    assert [r["seq"] for r in events_for(conn, "m\x00")] == [seq]
    assert events_for(conn, "a") == []
