"""Password guessing against the submission listener, and lockout abuse (guessing on purpose to
lock the owner out): failures are counted per (account, client address) and per address (a
clear 454 and one ledger row per episode), and per account, where they slow the password
checks down instead of refusing them, so brute force stays slow and the owner still gets in.
A durable lock, until the operator runs ``pecd user enable`` or ``pecd user passwd``, exists
only when the operator chose it (``lock_after_failures``)."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from pecd.clock import ManualClock
from pecd.store import users
from pecd.store.db import Database
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


def _throttle(clock: ManualClock, *, per_source: int = 100, per_address: int = 100,
              per_account: int = 100, window: float = 60.0, slow_interval: float = 10.0,
              slow_max_wait: float = 30.0) -> AuthThrottle:
    return AuthThrottle(clock, per_source=per_source, per_address=per_address,
                        per_account=per_account, window=window, slow_interval=slow_interval,
                        slow_max_wait=slow_max_wait)


def test_source_window_trips_then_lets_go() -> None:
    clock = ManualClock()
    t = _throttle(clock, per_source=3)
    for _ in range(3):
        assert t.check("alice", "10.0.0.1").allowed
        t.failure("alice", "10.0.0.1")
    first = t.check("alice", "10.0.0.1")
    assert (first.allowed, first.scope, first.first) == (False, "source", True)
    assert first.retry_after == pytest.approx(60.0)
    again = t.check("alice", "10.0.0.1")
    assert not again.allowed and not again.first  # one report per episode
    assert t.check("alice", "10.0.0.9").allowed  # the owner, elsewhere, is not locked out
    assert t.check("carol", "10.0.0.1").allowed  # nor are other accounts from that address
    clock.advance(timedelta(seconds=59))
    assert not t.check("alice", "10.0.0.1").allowed
    clock.advance(timedelta(seconds=2))
    assert t.check("alice", "10.0.0.1").allowed  # the window let go
    t.failure("alice", "10.0.0.1")
    assert t.check("alice", "10.0.0.1").allowed  # one failure in a fresh window


def test_address_window_spans_accounts_and_survives_a_success() -> None:
    clock = ManualClock()
    t = _throttle(clock, per_address=4)
    for i in range(4):
        t.failure(f"user{i}", "192.0.2.7")
    verdict = t.check("alice", "192.0.2.7")
    assert (verdict.allowed, verdict.scope) == (False, "address")
    t.success("alice", "192.0.2.7")  # a valid login does not buy fresh guesses
    assert not t.check("bob", "192.0.2.7").allowed
    assert t.check("bob", "192.0.2.8").allowed


def test_success_clears_the_pair_count_not_the_account_count() -> None:
    t = _throttle(ManualClock(), per_source=3, per_account=4)
    t.failure("alice", "a")
    t.failure("alice", "a")
    t.success("alice", "a")
    t.failure("alice", "a")
    t.failure("alice", "a")
    ok = t.check("alice", "a")
    assert ok.allowed and ok.delay == 0.0  # the owner's address: known, never slowed
    # but the account's 4 failures stand: for strangers it is slowed
    slowed = t.check("alice", "c")
    assert slowed.allowed and slowed.scope == "account" and slowed.first
    assert slowed.delay == 0.0
    assert t.check("alice", "d").delay == pytest.approx(10.0)  # the next one waits its turn
    assert t.check("alice", "a").delay == 0.0


# --- lockout abuse: guessing must stay slow and never lock the owner out ----------------------


def test_attack_lockout_abuse_slowed_account_is_never_refused_for_the_owner() -> None:
    """Many addresses guess at alice: the account is slowed (checks spaced out) but an attempt
    from any address, the owner's new one included, is checked once its turn comes."""
    clock = ManualClock()
    t = _throttle(clock, per_source=5, per_account=10, slow_interval=10.0, slow_max_wait=60.0)
    for i in range(10):
        t.failure("alice", f"198.51.100.{i}")
    owner = t.check("alice", "203.0.113.5")
    assert owner.allowed and owner.scope == "account" and owner.delay == 0.0
    clock.advance(timedelta(seconds=10))
    owner = t.check("alice", "203.0.113.5")
    assert owner.allowed and owner.delay == 0.0  # one turn per interval: this one is free


def test_attack_lockout_abuse_brute_force_stays_slow() -> None:
    """A botnet of 300 addresses, each guessing at alice as fast as pecd lets it, for one
    window: counted, pecd checks at most ``per_account`` passwords plus one per
    ``slow_interval`` (and one per address for each address's own limit), not thousands."""
    clock = ManualClock()
    window, interval = 300.0, 10.0
    t = _throttle(clock, per_source=5, per_address=20, per_account=10, window=window,
                  slow_interval=interval, slow_max_wait=60.0)
    start = clock.now()
    checked = refused = 0
    busy_until: dict[str, float] = {}  # a bot waits for its delayed attempt before the next
    for second in range(int(window)):
        now = float(second)
        for bot in range(300):
            address = f"10.{bot // 250}.{bot % 250}.1"
            if busy_until.get(address, -1.0) > now:
                continue
            verdict = t.check("alice", address)
            if not verdict.allowed:
                refused += 1
                continue
            busy_until[address] = now + verdict.delay
            checked += 1  # its password is checked once the delay is over
            t.failure("alice", address)
        clock.advance(timedelta(seconds=1))
    assert clock.now() - start == timedelta(seconds=window)
    bound = 10 + window / interval + 60.0 / interval + 1
    assert checked <= bound, (checked, bound)
    assert refused > 100 * checked  # the rest were answered 454 without a password check


def test_attack_lockout_abuse_one_address_many_accounts_is_throttled() -> None:
    clock = ManualClock()
    t = _throttle(clock, per_source=5, per_address=20, per_account=10)
    tried = 0
    for n in range(100):
        if t.check(f"user{n}@a.test", "192.0.2.66").allowed:
            tried += 1
            t.failure(f"user{n}@a.test", "192.0.2.66")
    assert tried == 20  # then every account is refused to that address
    assert t.check("user0@a.test", "192.0.2.67").allowed  # and to no other


def test_slowed_attempts_over_the_max_wait_get_454_for_now() -> None:
    clock = ManualClock()
    t = _throttle(clock, per_account=1, slow_interval=10.0, slow_max_wait=25.0)
    t.failure("alice", "x")
    delays = [t.check("alice", f"10.0.0.{i}") for i in range(5)]
    assert [v.delay for v in delays[:3]] == [0.0, 10.0, 20.0]
    assert [v.allowed for v in delays] == [True, True, True, False, False]
    assert delays[3].scope == "account" and delays[3].first and not delays[4].first
    clock.advance(timedelta(seconds=30))
    assert t.check("alice", "10.0.0.9").allowed  # the queue moved on


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


# --- the durable lock: pecd.store.users.Authenticator on a real database ---------------------------


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


@pytest.fixture(autouse=True)
def _fresh_counts(request: pytest.FixtureRequest) -> None:
    """Failure counts live in the database (shared by every node) and outlive a restart: each
    test here starts from none, as the module's one provider serves them all."""
    if "a" in request.fixturenames:
        p: ProviderDir = request.getfixturevalue("a")
        conn = sqlite3.connect(p.root / "data" / "pecd.sqlite")
        with conn:
            conn.execute("DELETE FROM auth_failures")
        conn.close()


def _attempt(a: ProviderDir, port: int, user: str, password: str,
             source: str = "127.0.0.1") -> tuple[int, str]:
    """One AUTH from ``source`` (any 127/8 address is this machine's loopback)."""
    raw = Raw.__new__(Raw)
    raw.sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                        source_address=(source, 0))
    raw.buf = b""
    with raw:
        return login(raw, a.ca, user, password)


def test_guessing_one_account_gets_454_and_one_ledger_row(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_source=3, auth_failures_per_account=50,
               auth_failures_per_address=50, lock_after_failures=0)
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
    assert rows[0]["sender"] == ALICE and rows[0]["detail"]["scope"] == "source"
    assert rows[0]["detail"]["peer"] == "127.0.0.1"


def test_guessing_many_accounts_from_one_address_gets_454(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_source=50, auth_failures_per_account=50,
               auth_failures_per_address=4, lock_after_failures=0)
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
    set_limits(a, auth_failures_per_source=50, auth_failures_per_account=50,
               auth_failures_per_address=50, lock_after_failures=3)  # the operator's policy
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


def test_attack_lockout_abuse_owner_gets_in_from_another_address(a: ProviderDir) -> None:
    """The review's attack: wrong passwords for alice from one address used to make her right
    one fail from every address. Now that address alone is refused; alice, elsewhere, gets in
    (her account is slowed: her check waits its turn, a fraction of a second here)."""
    set_limits(a, auth_failures_per_source=5, auth_failures_per_address=20,
               auth_failures_per_account=5, auth_slow_interval=0.2, auth_slow_max_wait=30.0,
               lock_after_failures=0)
    before = {e: len(ledger_rows(a, e)) for e in ("auth-throttled", "auth-slowed")}
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        for guess in range(5):
            assert _attempt(a, port, "gina@a.test", f"guess{guess}", "127.0.0.31")[0] == 535
        code, _ = _attempt(a, port, "gina@a.test", "gina-secret", "127.0.0.31")
        assert code == 454  # the guesser's own address: refused, even the right password
        assert _attempt(a, port, "gina@a.test", "gina-secret", "127.0.0.32")[0] == 235
        assert _attempt(a, port, "gina@a.test", "gina-secret", "127.0.0.32")[0] == 235
        # and from a third address, slowed but checked: a wrong password is a 535, not a 454
        assert _attempt(a, port, "gina@a.test", "nope", "127.0.0.33")[0] == 535
    throttled = ledger_rows(a, "auth-throttled")[before["auth-throttled"]:]
    assert [(r["detail"]["scope"], r["detail"]["peer"]) for r in throttled] == [
        ("source", "127.0.0.31")]
    slowed = ledger_rows(a, "auth-slowed")[before["auth-slowed"]:]
    assert len(slowed) == 1 and slowed[0]["sender"] == "gina@a.test"  # one row per episode
    assert not [r for r in ledger_rows(a, "account-locked") if r["sender"] == "gina@a.test"]


def test_attack_lockout_abuse_repeated_failures_lock_nothing_by_default(a: ProviderDir) -> None:
    """Thirty failures from six addresses (the old durable lock took twenty): with the default
    policy nothing locks, and after a restart the owner logs in at once."""
    text = a.conf.read_text()
    a.conf.write_text(text.replace("lock_after_failures", "# lock_after_failures"))
    set_limits(a, auth_failures_per_source=5, auth_failures_per_address=20,
               auth_failures_per_account=50)
    assert a.config.limits.lock_after_failures == 0  # the default
    with serving(a, runners=False) as (svc,):
        for n in range(6):
            for _ in range(5):
                code, _ = _attempt(a, svc.ports.submission, "hal@a.test", "nope", f"127.0.0.4{n}")
                assert code == 535
    with serving(a, runners=False) as (svc,):
        assert _attempt(a, svc.ports.submission, "hal@a.test", "hal-secret",
                        "127.0.0.49")[0] == 235
    assert not [r for r in ledger_rows(a, "account-locked") if r["sender"] == "hal@a.test"]


def test_attack_lockout_abuse_one_address_cannot_lock_several_owners(a: ProviderDir) -> None:
    set_limits(a, auth_failures_per_source=5, auth_failures_per_address=4,
               auth_failures_per_account=50, lock_after_failures=0)
    with serving(a, runners=False) as (svc,):
        port = svc.ports.submission
        for name in ("ivan", "frank", "ivan", "frank"):
            assert _attempt(a, port, f"{name}@a.test", "guess", "127.0.0.51")[0] == 535
        assert _attempt(a, port, "carol@a.test", "guess", "127.0.0.51")[0] == 454
        for name in ("ivan", "frank", "carol"):  # every owner, from elsewhere
            assert _attempt(a, port, f"{name}@a.test", f"{name}-secret", "127.0.0.52")[0] == 235
