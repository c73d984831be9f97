"""Brute-force and flood bookkeeping for the SMTP listeners, pure: no sockets, no storage, and
time only through the :class:`~pecd.clock.Clock` it is given, so tests step through windows.

Receives account names and client addresses as the listener saw them; trusts nothing about
them (an attacker picks both) and so keeps its memory bounded whatever they send. Touches
nothing outside itself: the SMTP adapter turns a refusal into a reply and a ledger row, and the
durable account lock lives in the users table (:mod:`pecd.store.users`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pecd.clock import Clock

Scope = Literal["source", "address", "account"]


@dataclass(frozen=True)
class Verdict:
    """Whether an AUTH attempt may go ahead. When not, ``scope`` says which limit tripped,
    ``retry_after`` how many seconds until it lets go, and ``first`` whether this is the first
    refusal since it tripped (so the caller writes one ledger row per episode, not per attempt).

    An attempt on a slowed account (``scope == "account"``) is allowed but must wait ``delay``
    seconds before its password is checked; ``first`` then marks the episode's first one."""

    allowed: bool
    scope: Scope | None = None
    retry_after: float = 0.0
    first: bool = False
    delay: float = 0.0


ALLOWED = Verdict(True)


class SlidingWindow:
    """Failure times per key within the last ``window`` seconds, for at most ``max_keys`` keys
    (the least recently touched key is forgotten first)."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def _live(self, key: str, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def count(self, key: str, now: float) -> int:
        hits = self._live(key, now)
        return len(hits) if hits else 0

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` is under the limit again (0 when it is already)."""
        hits = self._live(key, now)
        if hits is None or len(hits) < self.limit:
            return 0.0
        # the oldest hit that has to expire for the count to drop below the limit
        return max(0.0, hits[len(hits) - self.limit] + self.window - now)

    def hit(self, key: str, now: float) -> None:
        hits = self._live(key, now)
        if hits is None:
            hits = self._hits[key] = deque()
        hits.append(now)
        while len(hits) > self.limit:  # older hits can no longer change the verdict
            hits.popleft()
        self._hits.move_to_end(key)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)

    def clear(self, key: str) -> None:
        self._hits.pop(key, None)

    def adopt(self, key: str, hits: Iterable[float], now: float) -> None:
        """Make ``hits`` the failure times of ``key`` (those of every node, read from the
        database), in place of what this process saw alone."""
        live = sorted(t for t in hits if t > now - self.window)[-self.limit:]
        if not live:
            self._hits.pop(key, None)
            return
        self._hits[key] = deque(live)
        self._hits.move_to_end(key)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)

    def __len__(self) -> int:
        return len(self._hits)


class AuthThrottle:
    """Failed logins in a sliding window of ``window`` seconds, kept so that guessing stays slow
    and a guesser cannot lock the owner out.

    - per (account, client address), ``per_source`` failures: that pair is refused (``454``)
      until the window lets go; the owner, from any other address, is not;
    - per client address over all accounts, ``per_address`` failures: the address is refused
      (one address guessing at many accounts);
    - per account over all addresses, ``per_account`` failures: the account is *slowed*, never
      refused outright: its password checks are spaced ``slow_interval`` seconds apart, however
      many addresses ask, so a botnet gets ``window / slow_interval`` guesses per window. An
      attempt that would wait more than ``slow_max_wait`` gets ``454`` for now (the queue of
      waiting attempts is bounded). A client address this account logged in from before
      (remembered for ``known_for`` seconds) is not slowed: the owner's usual address gets in
      at once even while strangers hammer the account.

    A success clears the pair's count, never the address's nor the account's: one valid login
    must not buy fresh guesses.
    """

    def __init__(self, clock: Clock, *, per_source: int, per_address: int, per_account: int,
                 window: float, slow_interval: float = 10.0, slow_max_wait: float = 60.0,
                 known_for: float = 30 * 86400.0, max_keys: int = 100_000) -> None:
        if slow_interval <= 0 or slow_max_wait < 0:
            raise ValueError("slow_interval must be > 0 and slow_max_wait >= 0")
        self.clock = clock
        self.sources = SlidingWindow(per_source, window, max_keys)
        self.addresses = SlidingWindow(per_address, window, max_keys)
        self.accounts = SlidingWindow(per_account, window, max_keys)
        self.slow_interval = slow_interval
        self.slow_max_wait = slow_max_wait
        self.known_for = known_for
        self.max_keys = max_keys
        self._next_check: OrderedDict[str, float] = OrderedDict()  # slowed account -> next slot
        self._known: OrderedDict[str, float] = OrderedDict()  # pair -> last good login
        self._reported: set[tuple[str, str]] = set()  # (scope or "queue-full", key)

    def _now(self) -> float:
        return self.clock.now().timestamp()

    @staticmethod
    def _pair(account: str, address: str) -> str:
        return f"{address} {account}"  # an address holds no space; the account may

    def _first(self, scope: str, key: str) -> bool:
        marker = (scope, key)
        if marker in self._reported:
            return False
        if len(self._reported) >= 3 * self.max_keys:
            self._reported.clear()
        self._reported.add(marker)
        return True

    @property
    def window(self) -> float:
        return self.sources.window

    def now(self) -> float:
        return self._now()

    def keys(self, account: str, address: str) -> list[tuple[Scope, str]]:
        """The (scope, key) counts an attempt of ``account`` from ``address`` touches."""
        return [("source", self._pair(account, address)), ("address", address),
                ("account", account)]

    def adopt(self, hits: Mapping[tuple[str, str], Iterable[float]]) -> None:
        """Take the failure times of these (scope, key) counts as shared by every node (see
        :class:`pecd.store.throttle_store.SharedAuthThrottle`); the check that follows judges
        them, not just this process's own."""
        now = self._now()
        windows = {"source": self.sources, "address": self.addresses, "account": self.accounts}
        for (scope, key), times in hits.items():
            windows[scope].adopt(key, times, now)

    def known(self, account: str, address: str) -> bool:
        """Whether ``account`` logged in from ``address`` within ``known_for`` seconds."""
        at = self._known.get(self._pair(account, address))
        return at is not None and at > self._now() - self.known_for

    def check(self, account: str, address: str) -> Verdict:
        now = self._now()
        pair = self._pair(account, address)
        limits: tuple[tuple[Scope, SlidingWindow, str], ...] = (
            ("address", self.addresses, address), ("source", self.sources, pair))
        for scope, window, key in limits:
            wait = window.retry_after(key, now)
            if wait > 0:
                return Verdict(False, scope, wait, self._first(scope, key))
            self._reported.discard((scope, key))
        if self.accounts.retry_after(account, now) == 0:  # not slowed (any more)
            self._reported.discard(("account", account))
            self._reported.discard(("queue-full", account))
            return ALLOWED
        if self.known(account, address):  # slowed, but not for the owner's usual address
            return ALLOWED
        slot = max(now, self._next_check.get(account, now))
        delay = slot - now
        if delay > self.slow_max_wait:
            return Verdict(False, "account", delay, self._first("queue-full", account))
        self._reported.discard(("queue-full", account))
        self._next_check[account] = slot + self.slow_interval
        self._next_check.move_to_end(account)
        while len(self._next_check) > self.max_keys:
            self._next_check.popitem(last=False)
        return Verdict(True, "account", 0.0, self._first("account", account), delay)

    def failure(self, account: str, address: str) -> None:
        now = self._now()
        self.sources.hit(self._pair(account, address), now)
        self.addresses.hit(address, now)
        self.accounts.hit(account, now)

    def success(self, account: str, address: str) -> None:
        pair = self._pair(account, address)
        self.sources.clear(pair)
        self._reported.discard(("source", pair))
        self._known[pair] = self._now()
        self._known.move_to_end(pair)
        while len(self._known) > self.max_keys:
            self._known.popitem(last=False)


class ConnectionLimiter:
    """Concurrent connections per client address; ``acquire`` says whether one more may start."""

    def __init__(self, per_address: int) -> None:
        if per_address < 1:
            raise ValueError("per_address must be >= 1")
        self.per_address = per_address
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        n = self._open.get(address, 0)
        if n >= self.per_address:
            return False
        self._open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self._open.get(address, 0) - 1
        if n > 0:
            self._open[address] = n
        else:
            self._open.pop(address, None)

    def count(self, address: str) -> int:
        return self._open.get(address, 0)
