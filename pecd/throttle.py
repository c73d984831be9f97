"""Brute-force and flood bookkeeping for the SMTP listeners, pure: no sockets, no storage, and
time only through the :class:`~pecd.clock.Clock` it is given, so tests step through windows.

Receives account names and client addresses as the listener saw them; trusts nothing about
them (an attacker picks both) and so keeps its memory bounded whatever they send. Touches
nothing outside itself: the SMTP adapter turns a refusal into a reply and a ledger row, and the
durable account lock lives in the users table (:mod:`pecd.users`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from pecd.clock import Clock

Scope = Literal["account", "address"]


@dataclass(frozen=True)
class Verdict:
    """Whether an AUTH attempt may go ahead. When not, ``scope`` says which limit tripped,
    ``retry_after`` how many seconds until it lets go, and ``first`` whether this is the first
    refusal since it tripped (so the caller writes one ledger row per episode, not per attempt)."""

    allowed: bool
    scope: Scope | None = None
    retry_after: float = 0.0
    first: bool = False


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

    def __len__(self) -> int:
        return len(self._hits)


class AuthThrottle:
    """Failed logins per account and per client address in a sliding window.

    An account that failed ``per_account`` times, or an address that failed ``per_address`` times
    (over any accounts), within ``window`` seconds is refused without a password check until the
    window lets go. A success clears the account's count, never the address's: one valid login
    must not buy an address a fresh set of guesses at other accounts.
    """

    def __init__(self, clock: Clock, *, per_account: int, per_address: int, window: float,
                 max_keys: int = 100_000) -> None:
        self.clock = clock
        self.accounts = SlidingWindow(per_account, window, max_keys)
        self.addresses = SlidingWindow(per_address, window, max_keys)
        self._reported: set[tuple[Scope, str]] = set()

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def check(self, account: str, address: str) -> Verdict:
        now = self._now()
        limits: tuple[tuple[Scope, SlidingWindow, str], ...] = (
            ("address", self.addresses, address), ("account", self.accounts, account))
        for scope, window, key in limits:
            wait = window.retry_after(key, now)
            marker = (scope, key)
            if wait > 0:
                first = marker not in self._reported
                if first:
                    if len(self._reported) >= 2 * window.max_keys:
                        self._reported.clear()
                    self._reported.add(marker)
                return Verdict(False, scope, wait, first)
            self._reported.discard(marker)
        return ALLOWED

    def failure(self, account: str, address: str) -> None:
        now = self._now()
        self.accounts.hit(account, now)
        self.addresses.hit(address, now)

    def success(self, account: str, address: str) -> None:
        self.accounts.clear(account)
        self._reported.discard(("account", account))


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
