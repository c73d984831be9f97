"""Password guessing against the submission listener: throttled per account and per client
address (a clear 454 and one ledger row per episode), and an account locked after repeated
failures until the operator runs ``pecd user enable`` or ``pecd user passwd``."""

from __future__ import annotations

import asyncio
import smtplib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from pecd import users
from pecd.clock import ManualClock
from pecd.db import Database
from pecd.throttle import AuthThrottle, ConnectionLimiter, SlidingWindow

from .attack_support import (
    ALICE,
    ALICE_PW,
    LIGHT,
    Raw,
    add_user_fast,
    ledger_rows,
    login,
    serving,
    set_limits,
    single_provider,
)
from .conftest import ProviderDir, client_tls

# --- the pure core: pecd.throttle with a manual clock --------------------------------------------


def test_account_window_trips_then_lets_go() -> None:
    clock = ManualClock()
    t = AuthThrottle(clock, per_account=3, per_address=100, window=60.0)
    for _ in range(3):
        assert t.check("alice", "10.0.0.1").allowed
        t.failure("alice", "10.0.0.1")
    first = t.check("alice", "10.0.0.9")  # another address does not help the account
    assert (first.allowed, first.scope, first.first) == (False, "account", True)
    assert first.retry_after == pytest.approx(60.0)
    again = t.check("alice", "10.0.0.1")
    assert not again.allowed and not again.first  # one report per episode
    assert t.check("carol", "10.0.0.1").allowed  # other accounts unaffected
    clock.advance(timedelta(seconds=59))
    assert not t.check("alice", "10.0.0.1").allowed
    clock.advance(timedelta(seconds=2))
    assert t.check("alice", "10.0.0.1").allowed  # the window let go
    t.failure("alice", "10.0.0.1")
    assert t.check("alice", "10.0.0.1").allowed  # one failure in a fresh window


def test_address_window_spans_accounts_and_survives_a_success() -> None:
    clock = ManualClock()
    t = AuthThrottle(clock, per_account=100, per_address=4, window=60.0)
    for i in range(4):
        t.failure(f"user{i}", "192.0.2.7")
    verdict = t.check("alice", "192.0.2.7")
    assert (verdict.allowed, verdict.scope) == (False, "address")
    t.success("alice", "192.0.2.7")  # a valid login does not buy fresh guesses
    assert not t.check("bob", "192.0.2.7").allowed
    assert t.check("bob", "192.0.2.8").allowed


def test_success_clears_the_account_count() -> None:
    t = AuthThrottle(ManualClock(), per_account=3, per_address=100, window=60.0)
    t.failure("alice", "a")
    t.failure("alice", "a")
    t.success("alice", "a")
    t.failure("alice", "a")
    t.failure("alice", "a")
    assert t.check("alice", "a").allowed


def test_memory_is_bounded_whatever_the_attacker_sends() -> None:
    window = SlidingWindow(limit=3, window=60.0, max_keys=100)
    for i in range(10_000):
        for _ in range(5):
            window.hit(f"203.0.113.{i}", float(i))
    assert len(window) == 100
    assert window.count("203.0.113.9999", 9999.0) == 3  # only what can change a verdict is kept


def test_connection_limiter_counts_and_releases() -> None:
    limiter = ConnectionLimiter(2)
    assert limiter.acquire("x") and limiter.acquire("x")
    assert not limiter.acquire("x")
    assert limiter.acquire("y")
    limiter.release("x")
    assert limiter.acquire("x")
    for _ in range(3):
        limiter.release("x")
    assert limiter.count("x") == 0


# --- the durable lock: pecd.users.Authenticator on a real database ---------------------------


def test_lock_counts_consecutive_failures_and_passwd_resets_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = Database(tmp_path / "pecd.sqlite")
        cpu = ThreadPoolExecutor(2)
        try:
            await db.transact(lambda conn: conn.execute(
                "INSERT INTO users (address, password_hash, created) VALUES (?, ?, '')",
                ("erin@a.test", LIGHT.hash("erin-secret"))))
            auth = users.Authenticator(db, cpu, lock_after=3)
            for _ in range(2):  # a good login in between: never three in a row
                assert not (await auth.login("erin@a.test", "typo")).ok
            assert (await auth.login("erin@a.test", "erin-secret")).ok
            results = [await auth.login("erin@a.test", "typo") for _ in range(3)]
            assert [r.failures for r in results] == [1, 2, 3]
            assert [r.just_locked for r in results] == [False, False, True]
            assert not (await auth.login("erin@a.test", "erin-secret")).ok  # locked
            await db.transact(lambda conn: users.set_password(conn, "erin@a.test", "erin-new"))
            assert (await auth.login("erin@a.test", "erin-new")).ok
        finally:
            cpu.shutdown()
            db.close()

    asyncio.run(scenario())


# --- real sessions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory) -> ProviderDir:
    p = single_provider(tmp_path_factory.mktemp("bruteforce"))
    for name in ("carol", "dave", "frank", "gina", "hal", "ivan"):
        add_user_fast(p, f"{name}@a.test", f"{name}-secret")
    return p


def _attempt(a: ProviderDir, port: int, user: str, password: str) -> tuple[int, str]:
    with Raw(port) as raw:
        return login(raw, a.ca, user, password)


def test_guessing_one_account_gets_454_and_one_ledger_row(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_account=3, auth_failures_per_address=50,
               lock_after_failures=50)
    before = len(ledger_rows(a, "auth-throttled"))
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        for guess in ("123456", "password", "alice2026"):
            assert _attempt(a, port, ALICE, guess)[0] == 535
        for password in ("qwerty", ALICE_PW):  # not even the right password gets through now
            code, text = _attempt(a, port, ALICE, password)
            assert code == 454 and text.startswith("4.7.0"), text
        # the address is not blocked: another account still logs in from it
        assert _attempt(a, port, "carol@a.test", "carol-secret")[0] == 235
    rows = ledger_rows(a, "auth-throttled")[before:]
    assert len(rows) == 1, rows  # one row per episode, not per refused attempt
    assert rows[0]["sender"] == ALICE and rows[0]["detail"]["scope"] == "account"
    assert rows[0]["detail"]["peer"] == "127.0.0.1"


def test_guessing_many_accounts_from_one_address_gets_454(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_account=50, auth_failures_per_address=4,
               lock_after_failures=50)
    before = len(ledger_rows(a, "auth-throttled"))
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        for name in ("frank", "gina", "hal", "ivan"):
            assert _attempt(a, port, f"{name}@a.test", "guess")[0] == 535
        code, text = _attempt(a, port, ALICE, ALICE_PW)
        assert code == 454, text
        # the implicit-TLS listener shares the same bookkeeping
        with smtplib.SMTP_SSL("127.0.0.1", svc.ports.smtps, timeout=15,
                              context=client_tls(a.ca)) as s:
            s.ehlo()
            code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlQGEudGVzdABhbGljZS1zZWNyZXQ=")
            assert code == 454
    rows = ledger_rows(a, "auth-throttled")[before:]
    assert [r["detail"]["scope"] for r in rows] == ["address"]


def test_account_locks_and_only_the_operator_unlocks(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_account=50, auth_failures_per_address=50,
               lock_after_failures=3)
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        for _ in range(3):
            assert _attempt(a, port, "dave@a.test", "nope")[0] == 535
    locks = [r for r in ledger_rows(a, "account-locked") if r["sender"] == "dave@a.test"]
    assert len(locks) == 1 and locks[0]["detail"]["failures"] == 3
    with serving(a, runners=False) as (svc,):  # the lock is in the database, not in memory
        port = svc.ports.submission
        locked = _attempt(a, port, "dave@a.test", "dave-secret")
        unknown = _attempt(a, port, "nobody@a.test", "dave-secret")
        assert locked == unknown  # the right password on a locked account: no oracle
        assert locked[0] == 535
    a.cli("user", "enable", "dave@a.test")
    with serving(a, runners=False) as (svc,):
        assert _attempt(a, svc.ports.submission, "dave@a.test", "dave-secret")[0] == 235
