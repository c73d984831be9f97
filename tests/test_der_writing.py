"""DER written by hand on every signature (times, integers) is what asn1crypto writes, and the
signatures and tokens made with it verify in openssl (tests/test_cms.py, tests/test_tsa.py)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from asn1crypto import core

from pecd.trust.cms import der_generalized_time, der_integer, der_time


def test_integers_are_written_as_asn1crypto_writes_them() -> None:
    rng = random.Random(1)
    values = [0, 1, 127, 128, 255, 256, -1, -128, -129, 2**126 + 5, 2**127 - 1]
    values += [rng.randrange(-2**130, 2**130) for _ in range(2000)]
    for n in values:
        assert der_integer(n) == bytes(core.Integer(n).dump()), n


def test_times_are_written_as_asn1crypto_writes_them() -> None:
    rng = random.Random(2)
    start = datetime(1900, 1, 1, tzinfo=UTC)
    for _ in range(2000):
        when = start + timedelta(seconds=rng.randrange(0, 6 * 10**9),
                                 microseconds=rng.randrange(0, 10**6))
        assert der_generalized_time(when) == bytes(core.GeneralizedTime(when).dump()), when
        whole = when.replace(microsecond=0)
        kind = core.UTCTime if 1950 <= whole.year < 2050 else core.GeneralizedTime
        assert der_time(when) == bytes(kind(whole).dump()), when
        assert der_time(when.astimezone(timezone(timedelta(hours=2)))) == der_time(when)
    for us in (0, 120000, 5000, 999000):  # the fraction without trailing zeros, none for .0
        when = datetime(2026, 1, 2, 3, 4, 5, us, tzinfo=UTC)
        assert der_generalized_time(when) == bytes(core.GeneralizedTime(when).dump())
